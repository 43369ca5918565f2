"""Self-conditioning's soft embedding without the (N, V) probabilities: out[n] = sum_v exp(z[n, v] - lse[n]) E[v]
for scaled logits z (the vocabulary pass gives lse), an embedding table E (V, H), float32. What the decoder's
first layer reads at every step after the first (times sqrt(hidden) and the model dtype, applied outside).

One group of GROUP_THREADS threads per row. The vocabulary goes by in tiles of GROUP_THREADS: the threads compute
the tile's probabilities together into shared memory, meet at a barrier, then each thread adds the tile's rows of
E into its own columns (h = TID, TID + GROUP_THREADS, ...), and they meet again before the next tile. One
exponential per logit; E is read once per row, its rows in order. At most MAX_COLS columns per thread.
"""

from __future__ import annotations

import mlx.core as mx

from .dialect import KernelSpec

MAX_COLS = 16  # columns per thread: H up to GROUP_THREADS * MAX_COLS

BODY = """
SHARED(float, s_p, GROUP_THREADS);
const int t = TID;
const int row = GROUP;
const float lse = lses[row];
float acc[MAX_COLS];
for (int j = 0; j < MAX_COLS; ++j) {
  acc[j] = 0.0f;
}
for (int base = 0; base < V; base += GROUP_THREADS) {
  const int v = base + t;
  s_p[t] = (v < V) ? EXPF(z[row * V + v] - lse) : 0.0f;
  BARRIER();
  const int n = (V - base < GROUP_THREADS) ? (V - base) : GROUP_THREADS;
  for (int i = 0; i < n; ++i) {
    const float p = s_p[i];
    for (int j = 0; j < MAX_COLS; ++j) {
      const int h = t + j * GROUP_THREADS;
      if (h < H) {
        acc[j] += p * table[(base + i) * H + h];
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
    inputs=(("z", "float32"), ("lses", "float32"), ("table", "float32")),
    outputs=(("out", "float32"),),
    constants=("V", "H", "GROUP_THREADS"),
    body=BODY,
)
GROUP_THREADS = 256


def reference(z: mx.array, lse: mx.array, table: mx.array) -> mx.array:
    """softmax(z) @ table from z (N, V), its log-sum-exp (N,) and table (V, H): (N, H) float32."""
    return mx.exp(z.astype(mx.float32) - lse[:, None]) @ table.astype(mx.float32)
