"""The router's choice per token in one pass: from the router logits (N, E), the softmax over the experts, the
top K (largest first, the lower expert index first on ties), their probabilities renormalised to sum to one and
scaled per expert. What `model.Router` computes after its projection; the experts' gather reads these.

One thread per token: E is small (128 in the real model), so each thread reads its row once into the running
max and sum, then picks the K largest by K passes over the row (K x E comparisons, no shared memory).
"""

from __future__ import annotations

import mlx.core as mx

from .dialect import KernelSpec

BODY = """
const int n = GROUP * GROUP_THREADS + TID;
if (n < N) {
  const int row = n * E;
  float m = -INFF;
  for (int e = 0; e < E; ++e) {
    m = logits[row + e] > m ? logits[row + e] : m;
  }
  float total = 0.0f;
  for (int e = 0; e < E; ++e) {
    total += EXPF(logits[row + e] - m);
  }
  float chosen_sum = 0.0f;
  int last = -1;
  float last_value = INFF;
  for (int j = 0; j < K; ++j) {  // the j-th largest: below the previous one, or equal to it at a later index
    int best = -1;
    float best_value = -INFF;
    for (int e = 0; e < E; ++e) {
      const float x = logits[row + e];
      const bool after = x < last_value || (x == last_value && e > last);
      if (after && (best < 0 || x > best_value)) {
        best = e;
        best_value = x;
      }
    }
    ids[n * K + j] = best;
    const float p = EXPF(best_value - m) / total;
    weights[n * K + j] = p;
    chosen_sum += p;
    last = best;
    last_value = best_value;
  }
  for (int j = 0; j < K; ++j) {
    weights[n * K + j] = weights[n * K + j] / chosen_sum * scales[ids[n * K + j]];
  }
}
"""

SPEC = KernelSpec(
    name="routing",
    inputs=(("logits", "float32"), ("scales", "float32")),
    outputs=(("ids", "int32"), ("weights", "float32")),
    constants=("N", "E", "K", "GROUP_THREADS"),
    body=BODY,
)
GROUP_THREADS = 64


def reference(logits: mx.array, scales: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """(ids (N, k) largest first, weights (N, k)) as `model.Router` computes them from its logits (N, E)."""
    probs = mx.softmax(logits.astype(mx.float32), axis=-1, precise=True)
    order = mx.argsort(-logits.astype(mx.float32), axis=-1)[..., :k]  # stable: lower index first on ties
    w = mx.take_along_axis(probs, order, axis=-1)
    w = w / w.sum(axis=-1, keepdims=True)
    return order.astype(mx.int32), w * scales[order]
