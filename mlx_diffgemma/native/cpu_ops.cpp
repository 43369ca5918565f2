// Native CPU kernels for MLX's CPU backend: the elementwise work of a denoising step, vectorised and spread over
// the machine's cores. MLX's x86 CPU build evaluates exponentials, logarithms and tanh one element at a time on
// one thread per stream (about 26 ns per exp on the project's machine); these primitives run the same arithmetic
// as fastmath.py's (the same polynomials), in SIMD registers (GCC/Clang vector extensions, compiled for the
// building machine) on every core.
//
// Each op is an MLX primitive, so it sits in the lazy graph like any other: evaluated on its stream's thread,
// after its inputs, with no host synchronisation. The pure-MLX reference of each op is in native/__init__.py
// (and is what runs when this module is not built); tests/test_native.py compares the two.
//
// Ops (float32 in, row-contiguous; Python wrappers make them so):
//   softmax_rows(x)                        softmax over the last axis
//   softcap(x, cap)                        cap * tanh(x / cap)
//   rms_norm(x, w, eps)                    mx.fast.rms_norm(x, w, eps) (w optional) bit for bit, as MLX's CPU form
//       computes it: each row's squares added in order, times float32(1/n), plus eps, 1 / sqrt of that, then
//       (x * it) * w; several rows' sums at once (independent chains), rows on every core
//   gelu_tanh(x)                           0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
//   vocab_pass(logits, temps, noise, cap, uniform)
//       the sampler's pass over the vocabulary, per row r of logits (R, V):
//       y = softcap(logits[r], cap) / temps[r] (cap 0: no softcap), probs = softmax(y), entropy of probs,
//       argmax(y), and the sample argmax(y + G) with G = noise[r] (Gumbel draws) or -log(-log(noise[r]))
//       (uniform = true). Outputs: probs (R, V), entropy (R,), argmax (R,) uint32, sample (R,) uint32.
//   experts(x, idx, w, gate_up, down)     a mixture-of-experts layer, float32: for each token n and slot j,
//       y = down[e] (gelu_tanh(g) * u) with (g, u) = gate_up[e] x[n] split in halves, e = idx[n, j]; the output
//       is sum_j w[n, j] y. The (token, slot) pairs are grouped by expert and each expert is one BLAS product
//       over its own rows (cblas_sgemm: the BLAS MLX itself calls), all inside one primitive: no host
//       synchronisation and no per-expert graph nodes. With OpenBLAS the experts are shared out between threads,
//       each product on one BLAS thread (a few dozen rows are too few to split).
//   attention(q, k1, v1, k2, v2)           softmax(q [k1; k2]^T) [v1; v2] (scale 1, no mask), q (B, Hq, L, D) over
//       cached k1, v1 (B, Hk, S1, .) and the queries' own k2, v2 (B, Hk, S2, .), Hq a multiple of Hk: the keys
//       are never joined (the cache's view is read in place) and the scores exist a chunk of rows at a time
//   rope(x, cos, sin)                      rotary embedding (the non-traditional halves form) and the transpose
//       that attention needs in one pass: x (B, L, H, D) -> (B, H, L, D), out[.., :D/2] = x1 cos - x2 sin,
//       out[.., D/2:] = x1 sin + x2 cos, with cos/sin (L, D/2) or (B, L, D/2) as mx.fast.rope's CPU form computes
//       them (each product rounded, as there: the same numbers)
//   uniform(key, shape, low, high)         mx.random.uniform(low, high, shape, key=key), bit for bit: MLX's
//                                          threefry counters and its conversion to float32, vectorised

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace mx = mlx::core;
namespace nb = nanobind;
using namespace nb::literals;

#ifndef NATIVE_DIGEST
#define NATIVE_DIGEST "unknown"
#endif

namespace {

// ----------------------------------------------------------------------------------------------------------------
// SIMD: W floats per vector, one register of the building CPU (GCC 12 handles a 64-byte vector on AVX2 as
// badly as scalar code: softcap ran 2.7x slower than with W = 8 on a Zen 3)

#if defined(__AVX512F__)
constexpr int W = 16;
#elif defined(__AVX__)
constexpr int W = 8;
#else
constexpr int W = 4;  // SSE, NEON
#endif
typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));

inline vf splat(float x) {
  return vf{} + x;
}
inline vi splati(int32_t x) {
  return vi{} + x;
}
inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, vf v) {
  std::memcpy(p, &v, sizeof(v));
}
inline vf select(vi m, vf a, vf b) {
  return m ? a : b;
}
inline vf vmin(vf a, vf b) {
  return a < b ? a : b;
}
inline vf vmax(vf a, vf b) {
  return a > b ? a : b;
}
inline vf vfloor(vf x) {  // |x| < 2^31
  vf t = __builtin_convertvector(__builtin_convertvector(x, vi), vf);
  return t - select(t > x, splat(1.0f), splat(0.0f));
}
inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = std::max(m, v[i]);
  return m;
}

// exp: fastmath._exp (Cody-Waite reduction, degree-7 polynomial; relative error below 2e-7); 0 below -87.34
constexpr float EXP_MIN = -87.33654f, EXP_MAX = 88.72283f;
inline vf vexp(vf x) {
  vf xc = vmax(vmin(x, splat(EXP_MAX)), splat(EXP_MIN - 1.0f));
  vf n = vfloor(xc * 1.4426950408889634f + 0.5f);
  vf r = xc - n * 0.693359375f - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  vi e = (__builtin_convertvector(vmax(n, splat(-126.0f)), vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return select(x < EXP_MIN, splat(0.0f), p * scale);
}

// tanh: fastmath._tanh (Eigen's float32 rational approximation on [-7.9, 7.9], saturated beyond)
inline vf vtanh(vf x) {
  const float clip = 7.90531110763549805f;
  vf xc = vmax(vmin(x, splat(clip)), splat(-clip));
  vf x2 = xc * xc;
  vf p = splat(-2.76076847742355e-16f);
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  vf q = splat(1.19825839466702e-06f);
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return xc * p / q;
}

// log for finite x > 0: x = m 2^k with m in [sqrt(1/2), sqrt(2)), log x = k ln2 + log m, log m from
// Cephes' logf polynomial in f = m - 1 (relative error about 1e-7)
inline vf vlog(vf x) {
  vi sub = x < 1.17549435e-38f;  // subnormal: scaled by 2^23 first (MLX's uniforms reach 1.4e-45)
  x = select(sub, x * 8388608.0f, x);
  vi bits;
  std::memcpy(&bits, &x, sizeof(bits));
  vi k = ((bits >> 23) & 0xff) - 127 + (sub & -23);
  vi mb = (bits & 0x007fffff) | 0x3f800000;  // m in [1, 2)
  vf m;
  std::memcpy(&m, &mb, sizeof(m));
  vi big = m > 1.41421356f;
  m = select(big, m * 0.5f, m);
  vf kf = __builtin_convertvector(k - big, vf);  // big is -1 where true
  vf f = m - 1.0f;
  vf z = f * f;
  vf y = splat(7.0376836292e-2f);
  y = y * f + -1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f + -1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f + -1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f + -2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y = y + kf * -2.12194440e-4f;
  y = y - 0.5f * z;
  return f + y + kf * 0.693359375f;
}

inline float sexp(float x) {
  vf v = vexp(splat(x));
  return v[0];
}
inline float slog(float x) {
  vf v = vlog(splat(x));
  return v[0];
}

// ----------------------------------------------------------------------------------------------------------------
// Threads: rows split into contiguous chunks, one per thread (the calling stream thread takes the first)

int max_threads() {
  static int n = [] {
    const char* env = std::getenv("MLX_DIFFGEMMA_NATIVE_THREADS");
    int t = env ? std::atoi(env) : 0;
    if (t <= 0) t = static_cast<int>(std::thread::hardware_concurrency());
    return std::max(1, std::min(t, 64));
  }();
  return n;
}

template <class F>
void parallel_rows(int64_t rows, int64_t work_per_row, F&& fn) {
  constexpr int64_t MIN_WORK = 1 << 15;  // elements per thread below which a thread is not worth starting
  int64_t by_work = std::max<int64_t>(1, rows * work_per_row / MIN_WORK);
  int t = static_cast<int>(std::min<int64_t>({static_cast<int64_t>(max_threads()), rows, by_work}));
  if (t <= 1) {
    fn(0, rows);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(t - 1);
  auto bound = [&](int i) { return rows * i / t; };
  for (int i = 1; i < t; ++i) pool.emplace_back([&, i] { fn(bound(i), bound(i + 1)); });
  fn(0, bound(1));
  for (auto& th : pool) th.join();
}

// ----------------------------------------------------------------------------------------------------------------
// Row kernels

// A row's sums run in order, element by element, as MLX's CPU reduction adds them on x86 (its SIMD width is 1
// there): the same total to the last bit, so that these kernels give fastmath's numbers exactly (a vectorised
// sum would be more accurate, and different; a float32 model amplifies such differences in its gradients).
inline float sum_in_order(const float* x, int64_t n) {
  float total = 0.0f;
  for (int64_t i = 0; i < n; ++i) total += x[i];
  return total;
}

void softmax_row(const float* x, float* out, int64_t n) {
  int64_t nv = n - n % W;
  vf m = splat(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < nv; i += W) m = vmax(m, load(x + i));
  float mx_ = hmax(m);
  for (int64_t i = nv; i < n; ++i) mx_ = std::max(mx_, x[i]);
  for (int64_t i = 0; i < nv; i += W) store(out + i, vexp(load(x + i) - mx_));
  for (int64_t i = nv; i < n; ++i) out[i] = sexp(x[i] - mx_);
  float total = sum_in_order(out, n);
  for (int64_t i = 0; i < nv; i += W) store(out + i, load(out + i) / total);
  for (int64_t i = nv; i < n; ++i) out[i] /= total;
}

// A row's exponentials exp(x - max) in place, unnormalised; returns their sum (vector lanes, then across them):
// attention's probabilities are these over the sum, a division it applies to its output rows instead (Dv values
// a row, not S)
float exp_row(float* x, int64_t n) {
  int64_t nv = n - n % W;
  vf m = splat(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < nv; i += W) m = vmax(m, load(x + i));
  float mx_ = hmax(m);
  for (int64_t i = nv; i < n; ++i) mx_ = std::max(mx_, x[i]);
  vf acc = splat(0.0f);
  for (int64_t i = 0; i < nv; i += W) {
    vf e = vexp(load(x + i) - mx_);
    store(x + i, e);
    acc += e;
  }
  float total = 0.0f;
  for (int64_t i = nv; i < n; ++i) total += (x[i] = sexp(x[i] - mx_));
  for (int i = 0; i < W; ++i) total += acc[i];
  return total;
}

// rows [lo, hi) of x (rows, n) normalised into y (may be x): the sums of squares of up to 8 rows at a time, each
// row's in order (its own chain, as MLX adds them: one chain alone waits on every addition)
void rms_norm_rows(const float* x, const float* w, float* y, int64_t lo, int64_t hi, int64_t n, float eps) {
  const float inv_n = static_cast<float>(1.0 / static_cast<double>(n));
  const int64_t nv = n - n % W;
  for (int64_t r0 = lo; r0 < hi; r0 += 8) {
    const int64_t g = std::min<int64_t>(8, hi - r0);
    float ss[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const float* xr = x + r0 * n;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < g; ++j) {
        float v = xr[j * n + i];
        ss[j] += v * v;
      }
    for (int64_t j = 0; j < g; ++j) {
      const float mean = ss[j] * inv_n;
      const float scale = 1.0f / std::sqrt(mean + eps);
      const float* a = xr + j * n;
      float* o = y + (r0 + j) * n;
      const vf sv = splat(scale);
      if (w) {
        for (int64_t i = 0; i < nv; i += W) store(o + i, (load(a + i) * sv) * load(w + i));
        for (int64_t i = nv; i < n; ++i) o[i] = (a[i] * scale) * w[i];
      } else {
        for (int64_t i = 0; i < nv; i += W) store(o + i, load(a + i) * sv);
        for (int64_t i = nv; i < n; ++i) o[i] = a[i] * scale;
      }
    }
  }
}

void softcap_range(const float* x, float* out, int64_t n, float cap) {
  int64_t nv = n - n % W;
  for (int64_t i = 0; i < nv; i += W) store(out + i, vtanh(load(x + i) / cap) * cap);
  for (int64_t i = nv; i < n; ++i) out[i] = vtanh(splat(x[i] / cap))[0] * cap;
}

inline vf vgelu(vf x) {
  return 0.5f * x * (1.0f + vtanh(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

void gelu_range(const float* x, float* out, int64_t n) {
  int64_t nv = n - n % W;
  for (int64_t i = 0; i < nv; i += W) store(out + i, vgelu(load(x + i)));
  for (int64_t i = nv; i < n; ++i) out[i] = vgelu(splat(x[i]))[0];
}

// argmax with the first index among equal maxima (as MLX's), lane-wise then across lanes
struct ArgMax {
  vf best = splat(-std::numeric_limits<float>::infinity());
  vi where = splati(-1);
  float tail_best = -std::numeric_limits<float>::infinity();
  int32_t tail_where = -1;
  inline void add(vf v, int32_t base, vi lane) {
    vi better = v > best;
    best = select(better, v, best);
    where = better ? (lane + base) : where;
  }
  inline void add_scalar(float v, int32_t i) {
    if (v > tail_best) tail_best = v, tail_where = i;
  }
  int32_t result() const {
    float b = tail_best;
    int32_t w = tail_where;
    for (int i = 0; i < W; ++i) {
      if (where[i] < 0) continue;
      if (best[i] > b || (best[i] == b && (w < 0 || where[i] < w))) b = best[i], w = where[i];
    }
    return w < 0 ? 0 : w;  // an all -inf / NaN row: index 0
  }
};

void vocab_row(
    const float* x,
    const float* noise,
    float temp,
    float cap,
    bool uniform,
    int64_t n,
    float* probs,
    float* ez,  // n floats of scratch
    float* entropy,
    uint32_t* argmax,
    uint32_t* sample) {
  int64_t nv = n - n % W;
  vi lane;
  for (int i = 0; i < W; ++i) lane[i] = i;
  ArgMax am, sm;
  vf m = splat(-std::numeric_limits<float>::infinity());
  // pass 1: y = softcap(x) / temp into probs; max, argmax(y), argmax(y + G)
  for (int64_t i = 0; i < nv; i += W) {
    vf y = load(x + i);
    if (cap > 0.0f) y = vtanh(y / cap) * cap;
    y = y / temp;
    store(probs + i, y);
    vf g = load(noise + i);
    if (uniform) g = -vlog(-vlog(g));
    m = vmax(m, y);
    am.add(y, static_cast<int32_t>(i), lane);
    sm.add(y + g, static_cast<int32_t>(i), lane);
  }
  float mx_ = hmax(m);
  for (int64_t i = nv; i < n; ++i) {
    float y = x[i];
    if (cap > 0.0f) y = vtanh(splat(y / cap))[0] * cap;
    y = y / temp;
    probs[i] = y;
    float g = noise[i];
    if (uniform) g = -slog(-slog(g));
    mx_ = std::max(mx_, y);
    am.add_scalar(y, static_cast<int32_t>(i));
    sm.add_scalar(y + g, static_cast<int32_t>(i));
  }
  // pass 2: e = exp(y - max) into probs, e * z into ez; their sums in order (as MLX adds them)
  for (int64_t i = 0; i < nv; i += W) {
    vf z = load(probs + i) - mx_;
    vf e = vexp(z);
    store(probs + i, e);
    store(ez + i, e * z);
  }
  for (int64_t i = nv; i < n; ++i) {
    float z = probs[i] - mx_;
    float e = sexp(z);
    probs[i] = e;
    ez[i] = e * z;
  }
  float total = 0.0f, total_ez = 0.0f;
  for (int64_t i = 0; i < n; ++i) {  // two independent chains in one loop
    total += probs[i];
    total_ez += ez[i];
  }
  // pass 3: normalise
  for (int64_t i = 0; i < nv; i += W) store(probs + i, load(probs + i) / total);
  for (int64_t i = nv; i < n; ++i) probs[i] /= total;
  *entropy = std::log(total) - total_ez / total;
  *argmax = static_cast<uint32_t>(am.result());
  *sample = static_cast<uint32_t>(sm.result());
}

// MLX's random bits (backend/cpu/primitives.cpp, RandomBits): for one key and N 32-bit words, word c and word
// c + half + (N odd) are the two halves of threefry2x32(key, (c, c + half + (N odd))) for c < half = N / 2, and
// an odd N's middle word is the first half of threefry2x32(key, (half, 0)).
typedef uint32_t vu __attribute__((vector_size(W * 4)));

inline void threefry(uint32_t k0, uint32_t k1, vu& x0, vu& x1) {
  static constexpr uint32_t rot[2][4] = {{13, 15, 26, 6}, {17, 29, 16, 24}};
  const uint32_t ks[3] = {k0, k1, k0 ^ k1 ^ 0x1BD11BDAu};
  x0 += ks[0];
  x1 += ks[1];
  for (int i = 0; i < 5; ++i) {
    for (uint32_t r : rot[i % 2]) {
      x0 += x1;
      x1 = (x1 << r) | (x1 >> (32 - r));
      x1 ^= x0;
    }
    x0 += ks[(i + 1) % 3];
    x1 += ks[(i + 2) % 3] + static_cast<uint32_t>(i + 1);
  }
}

// mx.random.uniform's conversion: float(bits) / float(UINT32_MAX), at most the float below 1, times
// (high - low), plus low (each step rounded as MLX rounds it: no fused multiply-add)
inline vf to_uniform(vu bits, float range, float low) {
  vf u = __builtin_convertvector(bits, vf) / 4294967295.0f;
  u = vmin(u, splat(0.99999994f));
  return u * range + low;
}

void uniform_range(uint32_t k0, uint32_t k1, int64_t n, float low, float high, float* out, int64_t a, int64_t b) {
  // pairs c in [a, b) of [0, half)
  const int64_t half = n / 2;
  const uint32_t shift = static_cast<uint32_t>(half + (n % 2));
  const float range = high - low;
  vu lane;
  for (int i = 0; i < W; ++i) lane[i] = static_cast<uint32_t>(i);
  int64_t c = a;
  for (; c + W <= b; c += W) {
    vu x0 = lane + static_cast<uint32_t>(c), x1 = x0 + shift;
    threefry(k0, k1, x0, x1);
    store(out + c, to_uniform(x0, range, low));
    store(out + c + shift, to_uniform(x1, range, low));
  }
  for (; c < b; ++c) {
    vu x0 = vu{} + static_cast<uint32_t>(c), x1 = x0 + shift;
    threefry(k0, k1, x0, x1);
    out[c] = to_uniform(x0, range, low)[0];
    out[c + shift] = to_uniform(x1, range, low)[0];
  }
}

// ----------------------------------------------------------------------------------------------------------------
// Mixture of experts through the BLAS MLX links (resolved at load time from the process: the preloaded OpenBLAS,
// or the BLAS MLX's wheel bundles)

extern "C" void cblas_sgemm(
    int order,
    int trans_a,
    int trans_b,
    int m,
    int n,
    int k,
    float alpha,
    const float* a,
    int lda,
    const float* b,
    int ldb,
    float beta,
    float* c,
    int ldc);
constexpr int ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112;

// Working memory from MLX's allocator: its buffer cache hands the same pages back call after call (a std::vector
// of this size came from the OS each time, 5 MB of page faults per expert layer at a 256 canvas)
class Scratch {
 public:
  explicit Scratch(int64_t floats) : buf_(mx::allocator::allocator().malloc(std::max<int64_t>(floats, 1) * 4)) {}
  ~Scratch() {
    mx::allocator::allocator().free(buf_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  float* data() {
    return static_cast<float*>(buf_.raw_ptr());
  }

 private:
  mx::allocator::Buffer buf_;
};

// OpenBLAS's thread count, where the BLAS is OpenBLAS (found by name in the process: MLX links libblas, which
// LD_PRELOAD may make OpenBLAS); absent, the experts' products stay one after another
struct BlasThreads {
  void (*set)(int) = nullptr;
  int (*get)() = nullptr;
};
const BlasThreads& blas_threads() {
  static const BlasThreads b = [] {
    BlasThreads t;
    t.set = reinterpret_cast<void (*)(int)>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
    t.get = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
    if (!t.set || !t.get) t = BlasThreads{};
    return t;
  }();
  return b;
}

void experts_forward(
    const float* x,
    const uint32_t* idx,
    const float* w,
    const float* gate_up,  // (E, 2I, H)
    const float* down,  // (E, H, I)
    float* out,  // (N, H)
    int64_t N,
    int64_t k,
    int64_t E,
    int64_t H,
    int64_t I) {
  std::vector<int64_t> counts(E + 1, 0);
  const uint32_t n_experts = static_cast<uint32_t>(E);
  for (int64_t p = 0; p < N * k; ++p)
    if (idx[p] < n_experts) counts[idx[p] + 1]++;  // an id out of range (no router gives one) contributes nothing
  for (int64_t e = 0; e < E; ++e) counts[e + 1] += counts[e];  // offsets
  const int64_t rows = counts[E];
  std::vector<int64_t> pair(rows), fill(counts.begin(), counts.end() - 1);
  for (int64_t p = 0; p < N * k; ++p)  // (token, slot) pairs grouped by expert, in order
    if (idx[p] < n_experts) pair[fill[idx[p]]++] = p;
  auto aligned = [](int64_t n) { return (n + 15) & ~int64_t{15}; };  // each part on a 64-byte boundary
  Scratch scratch(aligned(rows * H) + aligned(rows * 2 * I) + aligned(rows * I) + rows * H);
  float* xs = scratch.data();
  float* g = xs + aligned(rows * H);
  float* a = g + aligned(rows * 2 * I);
  float* ys = a + aligned(rows * I);
  parallel_rows(rows, H, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) std::memcpy(&xs[r * H], x + (pair[r] / k) * H, H * sizeof(float));
  });
  auto gelu_rows = [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float* gr = &g[r * 2 * I];
      float* ar = &a[r * I];
      int64_t iv = I - I % W;
      for (int64_t i = 0; i < iv; i += W) store(ar + i, vgelu(load(gr + i)) * load(gr + I + i));
      for (int64_t i = iv; i < I; ++i) ar[i] = vgelu(splat(gr[i]))[0] * gr[I + i];
    }
  };
  auto gate_up_product = [&](int64_t e) {
    int64_t r0 = counts[e], n = counts[e + 1] - r0;
    cblas_sgemm(ROW_MAJOR, NO_TRANS, TRANS, n, 2 * I, H, 1.0f, &xs[r0 * H], H, gate_up + e * 2 * I * H, H, 0.0f,
                &g[r0 * 2 * I], 2 * I);
  };
  auto down_product = [&](int64_t e) {
    int64_t r0 = counts[e], n = counts[e + 1] - r0;
    cblas_sgemm(ROW_MAJOR, NO_TRANS, TRANS, n, H, I, 1.0f, &a[r0 * I], I, down + e * H * I, I, 0.0f, &ys[r0 * H], H);
  };
  std::vector<int64_t> order;  // the experts with rows, the most first
  for (int64_t e = 0; e < E; ++e)
    if (counts[e + 1] > counts[e]) order.push_back(e);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t x, int64_t y) { return counts[x + 1] - counts[x] > counts[y + 1] - counts[y]; });
  const auto& blas = blas_threads();
  const int T = static_cast<int>(std::min<int64_t>(max_threads(), static_cast<int64_t>(order.size())));
  if (T > 1 && blas.set) {
    // the experts shared out between threads, each running its products on one BLAS thread: OpenBLAS splits a
    // 64-row product between two threads for no gain (76 GFLOP/s on a 2-core Zen 3, 81 on one thread alone)
    const int before = blas.get();
    blas.set(1);
    std::atomic<size_t> next{0};
    auto work = [&] {
      for (size_t j; (j = next++) < order.size();) {
        const int64_t e = order[j];
        gate_up_product(e);
        gelu_rows(counts[e], counts[e + 1]);
        down_product(e);
      }
    };
    std::vector<std::thread> pool;
    for (int t = 1; t < T; ++t) pool.emplace_back(work);
    work();
    for (auto& th : pool) th.join();
    blas.set(before);
  } else {
    // gate and up projections expert by expert, gelu(gate) * up over every row at once, then the down projections
    for (int64_t e : order) gate_up_product(e);
    parallel_rows(rows, I, gelu_rows);
    for (int64_t e : order) down_product(e);
  }
  std::vector<int64_t> where(N * k, -1);  // row of each (token, slot) pair
  for (int64_t r = 0; r < rows; ++r) where[pair[r]] = r;
  parallel_rows(N, H * k, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      float* o = out + t * H;
      std::fill(o, o + H, 0.0f);
      for (int64_t j = 0; j < k; ++j) {  // slots in order, as (y * w).sum(axis=1) adds them
        if (where[t * k + j] < 0) continue;
        const float* y = &ys[where[t * k + j] * H];
        float wj = w[t * k + j];
        for (int64_t i = 0; i < H; ++i) o[i] += y[i] * wj;
      }
    }
  });
}

// Attention of new queries over cached keys and their own, without joining the two: scale 1, no mask. Per KV
// head, a chunk of its query rows (the query heads that share it, stacked) gets its scores over the cached keys
// and then the new ones in one (rows, S) block (cblas_sgemm each), each row's exponentials in place (exp_row),
// then those @ values as two products summed and each output row divided by its row's sum: no (B, H, S, D) copy
// of the joined keys and values per step, and one pass over the scores besides the products.
struct Heads {  // element [b, h, s, d] at p + b * sb + h * sh + s * ss + d * sd (strides as MLX gives them)
  const float* p;
  int64_t sb, sh, ss, sd;
};

// The same array with each (batch, head) block's rows contiguous: itself when so (a cache's view of its first
// positions is), else a copy in `scratch` (a transposed view). Layouts are known only at evaluation.
Heads head_rows(Heads a, int64_t B, int64_t H, int64_t S, int64_t D, std::optional<Scratch>& scratch) {
  if (a.sd == 1 && (S <= 1 || a.ss == D)) return Heads{a.p, a.sb, a.sh, D, 1};
  scratch.emplace(B * H * S * D);
  float* out = scratch->data();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < S; ++s) {
        const float* src = a.p + b * a.sb + h * a.sh + s * a.ss;
        float* dst = out + ((b * H + h) * S + s) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = src[d * a.sd];
      }
  return Heads{out, H * S * D, S * D, D, 1};
}

void attention_forward(
    const float* q,  // (B, Hq, L, D), contiguous
    Heads k1,
    Heads v1,
    int64_t S1,  // cached keys and values: (B, Hk, S1, D | Dv)
    Heads k2,
    Heads v2,
    int64_t S2,  // the queries' own
    float* out,  // (B, Hq, L, Dv)
    int64_t B,
    int64_t Hq,
    int64_t Hk,
    int64_t L,
    int64_t D,
    int64_t Dv) {
  std::optional<Scratch> c1, c2, c3, c4;  // copies of any input not laid out in rows
  k1 = head_rows(k1, B, Hk, S1, D, c1);
  v1 = head_rows(v1, B, Hk, S1, Dv, c2);
  k2 = head_rows(k2, B, Hk, S2, D, c3);
  v2 = head_rows(v2, B, Hk, S2, Dv, c4);
  const int64_t G = Hq / Hk, rows = G * L, S = S1 + S2;
  // chunks of at most 512 rows and 16M scores (64 MB), of equal size: 512 rows x 8,448 keys x 512 ran the
  // scores' product at 175 GFLOP/s on a 2-core Zen 3 where 1,024 rows ran it at 144 (OpenBLAS's blocking of the
  // rows), while 256 rows and below lose speed again
  const int64_t most = std::min<int64_t>(512, std::max<int64_t>(64, (int64_t{16} << 20) / std::max<int64_t>(S, 1)));
  const int64_t pieces = std::max<int64_t>(1, (rows + most - 1) / most);
  const int64_t chunk = std::max<int64_t>(1, (rows + pieces - 1) / pieces);
  Scratch scores(std::min(chunk, rows) * S), sums(std::min(chunk, rows));
  float *sc = scores.data(), *inv = sums.data();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hk; ++h) {
      const float* qh = q + (b * Hq + h * G) * L * D;  // its G query heads' rows, one after another
      float* oh = out + (b * Hq + h * G) * L * Dv;
      const float *kc = k1.p + b * k1.sb + h * k1.sh, *vc = v1.p + b * v1.sb + h * v1.sh;
      const float *kn = k2.p + b * k2.sb + h * k2.sh, *vn = v2.p + b * v2.sb + h * v2.sh;
      for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
        const int n = static_cast<int>(std::min(chunk, rows - r0));
        if (S1)
          cblas_sgemm(ROW_MAJOR, NO_TRANS, TRANS, n, S1, D, 1.0f, qh + r0 * D, D, kc, D, 0.0f, sc, S);
        if (S2)
          cblas_sgemm(ROW_MAJOR, NO_TRANS, TRANS, n, S2, D, 1.0f, qh + r0 * D, D, kn, D, 0.0f, sc + S1, S);
        parallel_rows(n, S, [&](int64_t a, int64_t z) {
          for (int64_t r = a; r < z; ++r) inv[r] = 1.0f / exp_row(sc + r * S, S);
        });
        float* o = oh + r0 * Dv;
        if (S1) cblas_sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, n, Dv, S1, 1.0f, sc, S, vc, Dv, 0.0f, o, Dv);
        if (S2)
          cblas_sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, n, Dv, S2, 1.0f, sc + S1, S, vn, Dv, S1 ? 1.0f : 0.0f, o, Dv);
        parallel_rows(n, Dv, [&](int64_t a, int64_t z) {  // the softmax's division, on the output rows
          for (int64_t r = a; r < z; ++r) {
            float* orow = o + r * Dv;
            const vf f = splat(inv[r]);
            int64_t nv = Dv - Dv % W;
            for (int64_t i = 0; i < nv; i += W) store(orow + i, load(orow + i) * f);
            for (int64_t i = nv; i < Dv; ++i) orow[i] *= inv[r];
          }
        });
      }
    }
}

// ----------------------------------------------------------------------------------------------------------------
// Primitives

void check_f32(const mx::array& a, const char* what) {
  if (a.dtype() != mx::float32) throw std::invalid_argument(std::string(what) + ": float32 input expected");
}

mx::Stream cpu_stream(mx::StreamOrDevice s) {
  auto stream = mx::to_stream(s);
  if (stream.device != mx::Device::cpu) throw std::invalid_argument("native kernels run on the CPU stream only");
  return stream;
}

class CpuOnly : public mx::Primitive {
 public:
  using mx::Primitive::Primitive;
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("mlx_diffgemma native kernels run on the CPU only");
  }

 protected:
  // Allocates each output that has no buffer yet (one that took its input's, in place, keeps it) and registers
  // the arrays with the stream's encoder, which it returns for the dispatch.
  mx::cpu::CommandEncoder& encoder(const std::vector<mx::array>& in, std::vector<mx::array>& out) {
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& a : in) enc.set_input_array(a);
    for (auto& o : out) {
      if (o.data_shared_ptr() == nullptr) o.set_data(mx::allocator::malloc(o.nbytes()));
      enc.set_output_array(o);
    }
    return enc;
  }

  // An op over the rows of x's last axis writing y of x's shape: y takes x's buffer when nothing else holds x (no
  // new allocation; call before encoder()); returns (rows, row length)
  static std::pair<int64_t, int64_t> rows_in_place(const mx::array& x, mx::array& y) {
    if (x.is_donatable() && x.flags().row_contiguous && x.data_size() == x.size()) y.copy_shared_buffer(x);
    int64_t n = x.shape().empty() ? 1 : x.shape().back();
    return {n == 0 ? 0 : static_cast<int64_t>(x.size()) / n, n};
  }
};

class Elementwise : public CpuOnly {
 public:
  enum Kind { SOFTMAX, SOFTCAP, GELU };
  Elementwise(mx::Stream s, Kind kind, float cap) : CpuOnly(s), kind_(kind), cap_(cap) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const auto& x = in[0];
    auto& y = out[0];
    auto [rows, n] = rows_in_place(x, y);
    auto& enc = encoder(in, out);
    enc.dispatch([xp = x.data<float>(), yp = y.data<float>(), n, rows, kind = kind_, cap = cap_]() {
      if (kind == SOFTMAX) {
        parallel_rows(rows, n, [&](int64_t a, int64_t b) {
          for (int64_t r = a; r < b; ++r) softmax_row(xp + r * n, yp + r * n, n);
        });
      } else {  // elementwise: any split of the flat range
        int64_t total = rows * n, chunk = 4096;
        int64_t pieces = (total + chunk - 1) / chunk;
        parallel_rows(pieces, chunk, [&](int64_t a, int64_t b) {
          int64_t lo = a * chunk, hi = std::min(total, b * chunk);
          if (kind == SOFTCAP)
            softcap_range(xp + lo, yp + lo, hi - lo, cap);
          else
            gelu_range(xp + lo, yp + lo, hi - lo);
        });
      }
    });
  }
  const char* name() const override {
    return kind_ == SOFTMAX ? "NativeSoftmax" : kind_ == SOFTCAP ? "NativeSoftcap" : "NativeGeluTanh";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Elementwise&>(other);
    return kind_ == o.kind_ && cap_ == o.cap_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    return {in[0].shape()};
  }

 private:
  Kind kind_;
  float cap_;
};

class RmsNorm : public CpuOnly {
 public:
  RmsNorm(mx::Stream s, float eps) : CpuOnly(s), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const auto& x = in[0];
    auto& y = out[0];
    auto [rows, n] = rows_in_place(x, y);
    auto& enc = encoder(in, out);
    enc.dispatch([xp = x.data<float>(), wp = in.size() > 1 ? in[1].data<float>() : nullptr, yp = y.data<float>(), n,
                  rows, eps = eps_]() {
      parallel_rows((rows + 7) / 8, 8 * n, [&](int64_t a, int64_t b) {
        rms_norm_rows(xp, wp, yp, a * 8, std::min(rows, b * 8), n, eps);
      });
    });
  }
  const char* name() const override {
    return "NativeRmsNorm";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const RmsNorm&>(other).eps_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    return {in[0].shape()};
  }

 private:
  float eps_;
};

class VocabPass : public CpuOnly {
 public:
  VocabPass(mx::Stream s, float cap, bool uniform) : CpuOnly(s), cap_(cap), uniform_(uniform) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const auto &x = in[0], &temps = in[1], &noise = in[2];
    auto& enc = encoder(in, out);
    int64_t n = x.shape().back(), rows = x.shape()[0];
    enc.dispatch([xp = x.data<float>(),
                  tp = temps.data<float>(),
                  gp = noise.data<float>(),
                  pp = out[0].data<float>(),
                  hp = out[1].data<float>(),
                  ap = out[2].data<uint32_t>(),
                  sp = out[3].data<uint32_t>(),
                  n,
                  rows,
                  cap = cap_,
                  uniform = uniform_]() {
      parallel_rows(rows, n, [&](int64_t a, int64_t b) {
        std::vector<float> ez(n);
        for (int64_t r = a; r < b; ++r)
          vocab_row(xp + r * n, gp + r * n, tp[r], cap, uniform, n, pp + r * n, ez.data(), hp + r, ap + r, sp + r);
      });
    });
  }
  const char* name() const override {
    return "NativeVocabPass";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const VocabPass&>(other);
    return cap_ == o.cap_ && uniform_ == o.uniform_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    int r = in[0].shape()[0];
    return {in[0].shape(), {r}, {r}, {r}};
  }

 private:
  float cap_;
  bool uniform_;
};

class Attention : public CpuOnly {
 public:
  using CpuOnly::CpuOnly;
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const auto &q = in[0], &k1 = in[1], &v1 = in[2], &k2 = in[3], &v2 = in[4];
    auto& enc = encoder(in, out);
    auto heads = [](const mx::array& a) {
      const auto& st = a.strides();
      return Heads{a.data<float>(), st[0], st[1], st[2], st[3]};
    };
    enc.dispatch([qp = q.data<float>(), k1h = heads(k1), v1h = heads(v1), k2h = heads(k2), v2h = heads(v2),
                  op = out[0].data<float>(), S1 = static_cast<int64_t>(k1.shape()[2]),
                  S2 = static_cast<int64_t>(k2.shape()[2]), B = static_cast<int64_t>(q.shape()[0]),
                  Hq = static_cast<int64_t>(q.shape()[1]), Hk = static_cast<int64_t>(k1.shape()[1]),
                  L = static_cast<int64_t>(q.shape()[2]), D = static_cast<int64_t>(q.shape()[3]),
                  Dv = static_cast<int64_t>(v1.shape()[3])]() {
      attention_forward(qp, k1h, v1h, S1, k2h, v2h, S2, op, B, Hq, Hk, L, D, Dv);
    });
  }
  const char* name() const override {
    return "NativeAttention";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

class Experts : public CpuOnly {
 public:
  using CpuOnly::CpuOnly;
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const auto &x = in[0], &idx = in[1], &w = in[2], &gu = in[3], &dn = in[4];
    auto& y = out[0];
    auto& enc = encoder(in, out);
    enc.dispatch([xp = x.data<float>(), ip = idx.data<uint32_t>(), wp = w.data<float>(), gp = gu.data<float>(),
                  dp = dn.data<float>(), yp = y.data<float>(), N = static_cast<int64_t>(x.shape()[0]),
                  k = static_cast<int64_t>(idx.shape()[1]), E = static_cast<int64_t>(gu.shape()[0]),
                  H = static_cast<int64_t>(x.shape()[1]), I = static_cast<int64_t>(dn.shape()[2])]() {
      experts_forward(xp, ip, wp, gp, dp, yp, N, k, E, H, I);
    });
  }
  const char* name() const override {
    return "NativeExperts";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

class Rope : public CpuOnly {
 public:
  using CpuOnly::CpuOnly;
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const auto &x = in[0], &c = in[1], &sn = in[2];
    auto& y = out[0];
    auto& enc = encoder(in, out);
    enc.dispatch([xp = x.data<float>(), cp = c.data<float>(), sp = sn.data<float>(), yp = y.data<float>(),
                  B = static_cast<int64_t>(x.shape()[0]), L = static_cast<int64_t>(x.shape()[1]),
                  H = static_cast<int64_t>(x.shape()[2]), D = static_cast<int64_t>(x.shape()[3]),
                  per_batch = c.ndim() == 3]() {
      const int64_t half = D / 2, hv = half - half % W;
      parallel_rows(B * H * L, D, [&](int64_t lo, int64_t hi) {
        for (int64_t r = lo; r < hi; ++r) {  // r = (b, h, l), the output's row
          int64_t l = r % L, h = (r / L) % H, b = r / (L * H);
          const float* src = xp + ((b * L + l) * H + h) * D;
          const float* cr = cp + (per_batch ? b * L + l : l) * half;
          const float* sr = sp + (per_batch ? b * L + l : l) * half;
          float* dst = yp + r * D;
          for (int64_t i = 0; i < hv; i += W) {
            vf x1 = load(src + i), x2 = load(src + half + i), cv = load(cr + i), sv = load(sr + i);
            store(dst + i, x1 * cv - x2 * sv);
            store(dst + half + i, x1 * sv + x2 * cv);
          }
          for (int64_t i = hv; i < half; ++i) {
            float x1 = src[i], x2 = src[half + i];
            dst[i] = x1 * cr[i] - x2 * sr[i];
            dst[half + i] = x1 * sr[i] + x2 * cr[i];
          }
        }
      });
    });
  }
  const char* name() const override {
    return "NativeRope";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

class Uniform : public CpuOnly {
 public:
  Uniform(mx::Stream s, float low, float high) : CpuOnly(s), low_(low), high_(high) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& out) override {
    const auto& key = in[0];
    auto& y = out[0];
    auto& enc = encoder(in, out);
    enc.dispatch([kp = key.data<uint32_t>(), yp = y.data<float>(), n = static_cast<int64_t>(y.size()), low = low_,
                  high = high_]() {
      uint32_t k0 = kp[0], k1 = kp[1];
      int64_t half = n / 2;
      parallel_rows((half + 1023) / 1024, 2048, [&](int64_t a, int64_t b) {
        uniform_range(k0, k1, n, low, high, yp, a * 1024, std::min(half, b * 1024));
      });
      if (n % 2) {  // the middle word: threefry(key, (half, 0)).first
        vu x0 = vu{} + static_cast<uint32_t>(half), x1 = vu{};
        threefry(k0, k1, x0, x1);
        yp[half] = to_uniform(x0, high - low, low)[0];
      }
    });
  }
  const char* name() const override {
    return "NativeUniform";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Uniform&>(other);
    return low_ == o.low_ && high_ == o.high_;
  }

 private:
  float low_, high_;
};

// ----------------------------------------------------------------------------------------------------------------
// Ops

mx::array elementwise(const mx::array& x, Elementwise::Kind kind, float cap, mx::StreamOrDevice s) {
  check_f32(x, "native");
  auto stream = cpu_stream(s);
  auto xc = mx::contiguous(x, false, stream);
  return mx::array(xc.shape(), mx::float32, std::make_shared<Elementwise>(stream, kind, cap), {xc});
}

mx::array softmax_rows(const mx::array& x, mx::StreamOrDevice s) {
  if (x.ndim() == 0) throw std::invalid_argument("softmax_rows: at least one dimension");
  return elementwise(x, Elementwise::SOFTMAX, 0.0f, s);
}

mx::array softcap(const mx::array& x, float cap, mx::StreamOrDevice s) {
  if (!(cap > 0.0f)) throw std::invalid_argument("softcap: cap must be positive");
  return elementwise(x, Elementwise::SOFTCAP, cap, s);
}

mx::array gelu_tanh(const mx::array& x, mx::StreamOrDevice s) {
  return elementwise(x, Elementwise::GELU, 0.0f, s);
}

std::vector<mx::array> vocab_pass(
    const mx::array& logits,
    const mx::array& temps,
    const mx::array& noise,
    float cap,
    bool uniform,
    mx::StreamOrDevice s) {
  auto stream = cpu_stream(s);
  if (logits.ndim() != 2 || noise.shape() != logits.shape() || temps.ndim() != 1 ||
      temps.shape()[0] != logits.shape()[0])
    throw std::invalid_argument("vocab_pass: logits (R, V), temps (R,), noise (R, V)");
  check_f32(logits, "vocab_pass logits");
  check_f32(temps, "vocab_pass temps");
  check_f32(noise, "vocab_pass noise");
  std::vector<mx::array> in = {
      mx::contiguous(logits, false, stream), mx::contiguous(temps, false, stream),
      mx::contiguous(noise, false, stream)};
  int r = logits.shape()[0];
  return mx::array::make_arrays(
      {logits.shape(), {r}, {r}, {r}},
      {mx::float32, mx::float32, mx::uint32, mx::uint32},
      std::make_shared<VocabPass>(stream, cap, uniform),
      in);
}

mx::array attention(
    const mx::array& q,
    const mx::array& k1,
    const mx::array& v1,
    const mx::array& k2,
    const mx::array& v2,
    mx::StreamOrDevice s) {
  auto stream = cpu_stream(s);
  for (const auto* a : {&q, &k1, &v1, &k2, &v2}) {
    if (a->ndim() != 4) throw std::invalid_argument("attention: (B, heads, positions, dim) arrays expected");
    check_f32(*a, "attention");
  }
  const auto B = q.shape()[0], Hk = k1.shape()[1];
  bool ok = Hk > 0 && q.shape()[1] % Hk == 0 && k1.shape()[3] == q.shape()[3] && k2.shape()[3] == q.shape()[3] &&
            v2.shape()[3] == v1.shape()[3] && k2.shape()[1] == Hk && v1.shape()[1] == Hk && v2.shape()[1] == Hk &&
            v1.shape()[2] == k1.shape()[2] && v2.shape()[2] == k2.shape()[2];
  for (const auto* a : {&k1, &v1, &k2, &v2}) ok = ok && a->shape()[0] == B;
  if (!ok)
    throw std::invalid_argument(
        "attention: q (B, Hq, L, D), cached k, v (B, Hk, S1, D | Dv), own k, v (B, Hk, S2, D | Dv), Hq a multiple of "
        "Hk");
  // k and v as they are (their layouts are known at evaluation, where any but rows is copied)
  std::vector<mx::array> in = {mx::contiguous(q, false, stream), k1, v1, k2, v2};
  return mx::array({B, q.shape()[1], q.shape()[2], v1.shape()[3]}, mx::float32, std::make_shared<Attention>(stream), in);
}

mx::array experts(
    const mx::array& x,
    const mx::array& idx,
    const mx::array& w,
    const mx::array& gate_up,
    const mx::array& down,
    mx::StreamOrDevice s) {
  auto stream = cpu_stream(s);
  if (x.ndim() != 2 || idx.ndim() != 2 || w.shape() != idx.shape() || idx.shape()[0] != x.shape()[0] ||
      gate_up.ndim() != 3 || down.ndim() != 3 || gate_up.shape()[2] != x.shape()[1] ||
      down.shape()[0] != gate_up.shape()[0] || down.shape()[1] != x.shape()[1] ||
      gate_up.shape()[1] != 2 * down.shape()[2])
    throw std::invalid_argument("experts: x (N, H), idx and w (N, k), gate_up (E, 2I, H), down (E, H, I)");
  for (const auto* a : {&x, &w, &gate_up, &down}) check_f32(*a, "experts");
  if (idx.dtype() != mx::uint32 && idx.dtype() != mx::int32)
    throw std::invalid_argument("experts: integer expert ids expected");
  std::vector<mx::array> in = {
      mx::contiguous(x, false, stream),
      mx::contiguous(mx::astype(idx, mx::uint32, stream), false, stream),
      mx::contiguous(w, false, stream),
      mx::contiguous(gate_up, false, stream),
      mx::contiguous(down, false, stream)};
  return mx::array(x.shape(), mx::float32, std::make_shared<Experts>(stream), in);
}

mx::array rms_norm(const mx::array& x, const std::optional<mx::array>& w, float eps, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s);
  check_f32(x, "rms_norm");
  std::vector<mx::array> in = {mx::contiguous(x, false, stream)};
  if (w) {
    check_f32(*w, "rms_norm");
    if (w->ndim() != 1 || x.ndim() == 0 || w->shape()[0] != x.shape().back())
      throw std::invalid_argument("rms_norm: the weight is (n,) for x (..., n)");
    in.push_back(mx::contiguous(*w, false, stream));
  }
  return mx::array(x.shape(), mx::float32, std::make_shared<RmsNorm>(stream, eps), in);
}

mx::array rope(const mx::array& x, const mx::array& cos, const mx::array& sin, mx::StreamOrDevice s) {
  auto stream = cpu_stream(s);
  for (const auto* a : {&x, &cos, &sin}) check_f32(*a, "rope");
  if (x.ndim() != 4 || x.shape()[3] % 2 != 0 || cos.shape() != sin.shape() || cos.shape().back() != x.shape()[3] / 2 ||
      !((cos.ndim() == 2 && cos.shape()[0] == x.shape()[1]) ||
        (cos.ndim() == 3 && cos.shape()[0] == x.shape()[0] && cos.shape()[1] == x.shape()[1])))
    throw std::invalid_argument("rope: x (B, L, H, D) with D even, cos and sin (L, D/2) or (B, L, D/2)");
  mx::Shape out = {x.shape()[0], x.shape()[2], x.shape()[1], x.shape()[3]};
  return mx::array(
      out,
      mx::float32,
      std::make_shared<Rope>(stream),
      {mx::contiguous(x, false, stream), mx::contiguous(cos, false, stream), mx::contiguous(sin, false, stream)});
}

mx::array uniform(const mx::array& key, const std::vector<int>& dims, float low, float high, mx::StreamOrDevice s) {
  mx::Shape shape(dims.begin(), dims.end());
  auto stream = cpu_stream(s);
  if (key.dtype() != mx::uint32 || key.shape() != mx::Shape{2})
    throw std::invalid_argument("uniform: a key is a uint32 array of shape (2,)");
  int64_t n = 1;
  for (auto d : shape) {
    if (d < 0) throw std::invalid_argument("uniform: negative dimension");
    n *= d;
  }
  if (n >= (int64_t{1} << 32)) throw std::invalid_argument("uniform: at most 2^32 numbers per key");
  if (!(low < high)) throw std::invalid_argument("uniform: low must be below high");
  return mx::array(shape, mx::float32, std::make_shared<Uniform>(stream, low, high), {mx::contiguous(key, false, stream)});
}

}  // namespace

NB_MODULE(_native, m) {
  m.doc() = "mlx-diffgemma's native CPU kernels (see cpu_ops.cpp)";
  m.attr("DIGEST") = NATIVE_DIGEST;
  m.def("threads", &max_threads);
  m.def("softmax_rows", &softmax_rows, "x"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def("softcap", &softcap, "x"_a, "cap"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def("gelu_tanh", &gelu_tanh, "x"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def("attention", &attention, "q"_a, "k1"_a, "v1"_a, "k2"_a, "v2"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def("experts", &experts, "x"_a, "idx"_a, "w"_a, "gate_up"_a, "down"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def("rms_norm", &rms_norm, "x"_a, "w"_a.none(), "eps"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def("rope", &rope, "x"_a, "cos"_a, "sin"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def("uniform", &uniform, "key"_a, "shape"_a, "low"_a, "high"_a, nb::kw_only(), "stream"_a = nb::none());
  m.def(
      "vocab_pass",
      &vocab_pass,
      "logits"_a,
      "temps"_a,
      "noise"_a,
      "cap"_a,
      "uniform"_a,
      nb::kw_only(),
      "stream"_a = nb::none());
}
