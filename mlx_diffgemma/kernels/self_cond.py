"""Self-conditioning's soft embedding without the (N, V) probabilities: out[n] = sum_v exp(z[n, v] - lse[n]) E[v]
where z = softcap(logits) / temperature is computed on the fly from the raw logits (the same scaled logits as the
vocabulary pass, which gives lse), and E (V, H) is the embedding table, read in its own dtype (float32, float16 or
bfloat16 on a GPU; float32 in the CPU expansion), accumulated in float32. What the decoder's first layer reads at
every step after the first (times sqrt(hidden) and the model dtype, applied outside).

One group of GROUP_THREADS threads per row. The vocabulary goes by in tiles of GROUP_THREADS: the threads compute
the tile's probabilities together into shared memory, meet at a barrier, then each thread adds the tile's rows of
E into its own columns (h = TID, TID + GROUP_THREADS, ...), and they meet again before the next tile. One
exponential per logit; E is read once per row, its rows in order. At most MAX_COLS columns per thread.
"""

from __future__ import annotations

import mlx.core as mx

from .dialect import KernelSpec
from .vocab import scaled

MAX_COLS = 16  # columns per thread: H up to GROUP_THREADS * MAX_COLS

BODY = """
SHARED(float, s_p, GROUP_THREADS);
const int t = TID;
const int row = GROUP;
const float lse = lses[row];
const float inv_temp = 1.0f / temps[row];
const float cap = params[0];
float acc[MAX_COLS];
for (int j = 0; j < MAX_COLS; ++j) {
  acc[j] = 0.0f;
}
for (int base = 0; base < V; base += GROUP_THREADS) {
  const int v = base + t;
  float prob = 0.0f;
  if (v < V) {
    float x = logits[row * V + v];
    if (cap > 0.0f) {
      x = cap * TANHF(x / cap);
    }
    prob = EXPF(x * inv_temp - lse);
  }
  s_p[t] = prob;
  BARRIER();
  const int n = (V - base < GROUP_THREADS) ? (V - base) : GROUP_THREADS;
  for (int i = 0; i < n; ++i) {
    const float p = s_p[i];
    for (int j = 0; j < MAX_COLS; ++j) {
      const int h = t + j * GROUP_THREADS;
      if (h < H) {
        acc[j] += p * static_cast<float>(table[(base + i) * H + h]);
      }
    }
  }
  BARRIER();
}
for (int j = 0; j < MAX_COLS; ++j) {
  const int h = t + j * GROUP_THREADS;
  if (h < H) {
    out[row * H + h] = acc[j];
  }
}
""".replace("MAX_COLS", str(MAX_COLS))

SPEC = KernelSpec(
    name="self_cond",
    inputs=(
        ("logits", "float32"),
        ("temps", "float32"),
        ("lses", "float32"),
        ("table", "float32"),
        ("params", "float32"),
    ),
    outputs=(("out", "float32"),),
    constants=("V", "H", "GROUP_THREADS"),
    body=BODY,
)
GROUP_THREADS = 256


def reference(logits: mx.array, temps: mx.array, lse: mx.array, table: mx.array, cap: float) -> mx.array:
    """softmax(z) @ table, z = softcap(logits) / temperature, from raw logits (N, V), temperatures (N,), the
    log-sum-exp of z (N,) and the table (V, H): (N, H) float32."""
    return mx.exp(scaled(logits, temps, cap) - lse[:, None]) @ table.astype(mx.float32)
