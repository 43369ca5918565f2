"""Exponential, tanh, softmax and GELU for MLX's CPU backend, written in MLX operations and compiled.

On x86 Linux, MLX's CPU build evaluates transcendental functions one element at a time (about 26 ns per exp and
34 ns per tanh on the project's machine, against 0.4 ns for a multiply-add in the same kernel), and a denoising
step runs tens of millions of them: the softmax of every attention layer, the sampler's pass over the vocabulary,
the GELU of every MLP. These versions do the same arithmetic with multiplies and adds that MLX compiles into one
loop, and are at least as accurate in float32 (exp: relative error below 2e-7, MLX's own is 3.5e-6; tanh: below
5e-7). On a GPU MLX's own functions are fast, and `enabled()` is false there. MLX_DIFFGEMMA_FASTMATH=0 turns them
off everywhere.

Where the native CPU kernels are built (native/), softmax, the softcap and GELU run there instead: the same
polynomials, vectorised and on every core; the forms below are their references.
"""

from __future__ import annotations

import functools
import os

import mlx.core as mx

from . import native

_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 split so that n * _LN2_HI is exact (Cody-Waite)
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_EXP_MIN, _EXP_MAX = -87.33654, 88.72283  # below: 0 (no subnormals: they are slow in BLAS); above: clamped
# tanh(x) = x P(x^2) / Q(x^2) on [-7.9, 7.9] (Eigen's float32 rational approximation); saturated beyond
_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
           1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)  # fmt: skip
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)
_TANH_CLIP = 7.90531110763549805


def enabled() -> bool:
    """Whether to use these instead of MLX's own: on the CPU, unless MLX_DIFFGEMMA_FASTMATH=0."""
    return os.environ.get("MLX_DIFFGEMMA_FASTMATH", "1") != "0" and mx.default_device() == mx.cpu


def _exp(x: mx.array) -> mx.array:
    xc = mx.minimum(x, _EXP_MAX)
    n = mx.floor(xc * _LOG2E + 0.5)  # x = n ln2 + r, |r| <= ln2 / 2
    r = xc - n * _LN2_HI - n * _LN2_LO
    p = _EXP_POLY[0]
    for c in _EXP_POLY[1:]:
        p = p * r + c
    p = p * (r * r) + r + 1.0  # e^r
    scale = ((mx.maximum(n, -126.0).astype(mx.int32) + 127) << 23).view(mx.float32)  # 2^n
    return mx.where(x < _EXP_MIN, 0.0, p * scale)


def _tanh(x: mx.array) -> mx.array:
    xc = mx.clip(x, -_TANH_CLIP, _TANH_CLIP)
    x2 = xc * xc
    p = _TANH_P[0]
    for c in _TANH_P[1:]:
        p = p * x2 + c
    q = _TANH_Q[0]
    for c in _TANH_Q[1:]:
        q = q * x2 + c
    return xc * p / q


exp = mx.compile(_exp)
tanh = mx.compile(_tanh, shapeless=True)


@mx.compile
def _shifted_exp(x: mx.array, m: mx.array) -> mx.array:
    return _exp(x - m)


# The public functions carry their exact derivatives (written from their outputs, or MLX's own where that is
# simpler), so training differentiates through them as it does through MLX's versions: the bit-level 2^n of exp has
# no derivative of its own, and the derivative of a polynomial approximation is not the function's.


@mx.custom_function
def _softmax_last(x: mx.array) -> mx.array:
    if native.available():  # the same polynomial, vectorised on every core (native/cpu_ops.cpp)
        return native.softmax_rows(x)
    e = _shifted_exp(x, mx.max(x, axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@_softmax_last.vjp
def _softmax_last_vjp(primals, cotangent, output):
    return output * (cotangent - (cotangent * output).sum(axis=-1, keepdims=True))


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """softmax along `axis`, float32."""
    x = x.astype(mx.float32)
    if axis in (-1, x.ndim - 1):
        return _softmax_last(x)
    return mx.swapaxes(_softmax_last(mx.swapaxes(x, axis, -1)), axis, -1)


@mx.compile
def _softcap_fwd(x: mx.array, cap: mx.array) -> mx.array:
    return _tanh(x / cap) * cap


@mx.custom_function
def _softcap(x: mx.array, cap: mx.array) -> mx.array:
    return _softcap_fwd(x, cap)


@_softcap.vjp
def _softcap_vjp(primals, cotangent, output):
    cap = primals[1]
    t = output / cap
    return cotangent * (1.0 - t * t), mx.zeros_like(cap)


def softcap(x: mx.array, cap: float) -> mx.array:
    """cap * tanh(x / cap), float32 (the final logit softcap)."""
    if native.available():
        return _native_softcap(float(cap))(x.astype(mx.float32))
    return _softcap(x.astype(mx.float32), mx.array(cap, dtype=mx.float32))


@functools.lru_cache(maxsize=8)
def _native_softcap(cap: float):
    """The native kernel's softcap for one cap, with the derivative of `_softcap`."""

    @mx.custom_function
    def fn(x: mx.array) -> mx.array:
        return native.softcap(x, cap)

    @fn.vjp
    def fn_vjp(primals, cotangent, output):
        t = output / cap
        return cotangent * (1.0 - t * t)

    return fn


_GELU_C, _GELU_A = 0.7978845608028654, 0.044715


@mx.compile
def _gelu_approx_fwd(x: mx.array) -> mx.array:
    return 0.5 * x * (1.0 + _tanh(_GELU_C * (x + _GELU_A * x * x * x)))


@mx.custom_function
def _gelu_approx(x: mx.array) -> mx.array:
    return native.gelu_tanh(x) if native.available() else _gelu_approx_fwd(x)


@_gelu_approx.vjp
def _gelu_approx_vjp(primals, cotangent, output):
    x = primals[0] if isinstance(primals, (tuple, list)) else primals
    t = mx.tanh(_GELU_C * (x + _GELU_A * x * x * x))
    return cotangent * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 3 * _GELU_A * x * x))


def gelu_approx(x: mx.array) -> mx.array:
    """GELU with the tanh approximation (transformers' gelu_pytorch_tanh), in x's dtype."""
    return _gelu_approx(x.astype(mx.float32)).astype(x.dtype) if x.dtype != mx.float32 else _gelu_approx(x)
