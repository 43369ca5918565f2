"""The sampler's vocabulary pass in one read of the logits: per row of (N, V) raw float32 logits, the softcap,
the temperature, and from the scaled logits x the max, the log-sum-exp, the entropy, the argmax (first on ties)
and a Gumbel-max sample with given uniforms (argmax of x - log(-log u)). What a denoising step needs besides the
probabilities themselves, which the self-conditioning path recomputes from the logits and the log-sum-exp.

One group of GROUP_THREADS threads per row: each thread strides over the vocabulary keeping a running max m and
the sums of e^(x - m) and (x - m) e^(x - m), moved along when m grows (one exponential per logit; the entropy
log(sum e) - sum (x - m) e / sum e has no cancellation between large terms), its best logit and its best Gumbel
score; the group then merges them in shared memory, halving at each barrier.
"""

from __future__ import annotations

import mlx.core as mx

from .dialect import KernelSpec

BODY = """
SHARED(float, s_m, GROUP_THREADS);
SHARED(float, s_a, GROUP_THREADS);
SHARED(float, s_b, GROUP_THREADS);
SHARED(float, s_best, GROUP_THREADS);
SHARED(int, s_arg, GROUP_THREADS);
SHARED(float, s_gbest, GROUP_THREADS);
SHARED(int, s_garg, GROUP_THREADS);
const int t = TID;
const int row = GROUP;
const float inv_temp = 1.0f / temps[row];
const float cap = params[0];
float m = -INFF, a = 0.0f, b = 0.0f, best = -INFF, gbest = -INFF;
int arg = V, garg = V;
for (int v = t; v < V; v += GROUP_THREADS) {
  float x = logits[row * V + v];
  if (cap > 0.0f) {
    x = cap * TANHF(x / cap);
  }
  x = x * inv_temp;
  if (x > best) {  // v grows along a thread: the first of equal logits stays
    best = x;
    arg = v;
  }
  const float g = x - LOGF(-LOGF(uniforms[row * V + v]));
  if (g > gbest) {
    gbest = g;
    garg = v;
  }
  if (x > m) {  // move the running sums to the new max (from -inf: they are 0)
    if (m != -INFF) {
      const float d = x - m, r = EXPF(-d);
      b = r * (b - d * a);
      a = r * a;
    }
    m = x;
  }
  const float z = x - m, e = EXPF(z);
  a += e;
  b += z * e;
}
s_m[t] = m;
s_a[t] = a;
s_b[t] = b;
s_best[t] = best;
s_arg[t] = arg;
s_gbest[t] = gbest;
s_garg[t] = garg;
BARRIER();
for (int half = GROUP_THREADS / 2; half > 0; half /= 2) {
  if (t < half) {
    const int o = t + half;
    const float m1 = s_m[t], m2 = s_m[o];
    const float mm = m1 > m2 ? m1 : m2;
    if (mm != -INFF) {  // both halves' sums, moved to the common max (an empty half adds nothing)
      float a_ = 0.0f, b_ = 0.0f;
      if (m1 != -INFF) {
        const float d = mm - m1, r = EXPF(-d);
        a_ += r * s_a[t];
        b_ += r * (s_b[t] - d * s_a[t]);
      }
      if (m2 != -INFF) {
        const float d = mm - m2, r = EXPF(-d);
        a_ += r * s_a[o];
        b_ += r * (s_b[o] - d * s_a[o]);
      }
      s_a[t] = a_;
      s_b[t] = b_;
      s_m[t] = mm;
    }
    if (s_best[o] > s_best[t] || (s_best[o] == s_best[t] && s_arg[o] < s_arg[t])) {
      s_best[t] = s_best[o];
      s_arg[t] = s_arg[o];
    }
    if (s_gbest[o] > s_gbest[t] || (s_gbest[o] == s_gbest[t] && s_garg[o] < s_garg[t])) {
      s_gbest[t] = s_gbest[o];
      s_garg[t] = s_garg[o];
    }
  }
  BARRIER();
}
if (t == 0) {
  const float log_a = LOGF(s_a[0]);
  stats[row * 3 + 0] = s_m[0];
  stats[row * 3 + 1] = s_m[0] + log_a;
  stats[row * 3 + 2] = log_a - s_b[0] / s_a[0];  // relative to the max: no cancellation between large terms
  ids[row * 2 + 0] = s_arg[0];
  ids[row * 2 + 1] = s_garg[0];
}
"""

SPEC = KernelSpec(
    name="vocab_pass",
    inputs=(("logits", "float32"), ("temps", "float32"), ("uniforms", "float32"), ("params", "float32")),
    outputs=(("stats", "float32"), ("ids", "int32")),
    constants=("V", "GROUP_THREADS"),
    body=BODY,
)
GROUP_THREADS = 256  # a power of two (the halving merge)


def scaled(logits: mx.array, temps: mx.array, cap: float) -> mx.array:
    """softcap(logits) / temperature per row, float32 (cap 0: no softcap): the logits the sampler reads."""
    x = logits.astype(mx.float32)
    if cap > 0:
        x = cap * mx.tanh(x / cap)
    return x / temps[:, None]


def reference(logits: mx.array, temps: mx.array, uniforms: mx.array, cap: float) -> tuple[mx.array, mx.array]:
    """The same results from MLX operations: stats (N, 3) = max, log-sum-exp, entropy of the scaled logits;
    ids (N, 2) = argmax, Gumbel-max sample. logits, uniforms (N, V) float32; temps (N,); cap 0: no softcap."""
    x = scaled(logits, temps, cap)
    m = x.max(axis=-1)
    z = x - m[:, None]
    e = mx.exp(z)
    a = e.sum(axis=-1)
    lse = m + mx.log(a)
    entropy = mx.log(a) - (z * e).sum(axis=-1) / a
    sample = mx.argmax(x - mx.log(-mx.log(uniforms)), axis=-1)
    stats = mx.stack([m, lse, entropy], axis=-1)
    return stats, mx.stack([mx.argmax(x, axis=-1), sample], axis=-1).astype(mx.int32)
