"""One kernel source, three targets: Metal (`mx.fast.metal_kernel`), CUDA (`mx.fast.cuda_kernel`) and C++ that
runs on the CPU with one OS thread per simulated GPU thread and real barriers (how the test suite executes the
very logic the GPU runs).

A kernel body is written once against these names, which each target defines:

    TID, GROUP          this thread's index in its group, the group's index in the grid (int)
    GROUP_THREADS       threads per group (a compile-time constant)
    SHARED(T, name, n)  an array of n T shared by the group (threadgroup / __shared__ memory)
    BARRIER()           every thread of the group waits here, and sees the others' shared writes
    EXPF LOGF TANHF     float32 exp, log, tanh;  INFF: +infinity

Inputs are read-only arrays, outputs writable arrays, named as the op declares them; compile-time integer
constants (template arguments in MLX) are available by name. Nothing else: no SIMD-group intrinsics, no atomics,
so that the three expansions mean the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass

_DTYPES = {"float32": ("float", "float", "float"), "int32": ("int", "int", "int32_t")}  # metal, cuda, c++


@dataclass(frozen=True)
class KernelSpec:
    """What a kernel takes and gives: (name, dtype) of inputs and outputs, and its integer constants."""

    name: str
    inputs: tuple[tuple[str, str], ...]
    outputs: tuple[tuple[str, str], ...]
    constants: tuple[str, ...]
    body: str


METAL_PRELUDE = """
#define TID ((int)thread_position_in_threadgroup.x)
#define GROUP ((int)threadgroup_position_in_grid.x)
#define SHARED(T, name, n) threadgroup T name[n]
#define BARRIER() threadgroup_barrier(metal::mem_flags::mem_threadgroup)
#define EXPF(x) metal::precise::exp(x)
#define LOGF(x) metal::precise::log(x)
#define TANHF(x) metal::precise::tanh(x)
#define INFF INFINITY
"""

CUDA_PRELUDE = """
#define TID ((int)threadIdx.x)
#define GROUP ((int)blockIdx.x)
#define SHARED(T, name, n) __shared__ T name[n]
#define BARRIER() __syncthreads()
#define EXPF(x) expf(x)
#define LOGF(x) logf(x)
#define TANHF(x) tanhf(x)
#define INFF __int_as_float(0x7f800000)
"""

CPU_PRELUDE = """
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

namespace {
struct Group {  // what the threads of one group share: the shared-memory arena and the barrier
  std::vector<unsigned char> arena;
  std::barrier<> bar;
  explicit Group(int threads) : arena(1 << 16), bar(threads) {}
};
struct Thread {
  Group* group;
  size_t cursor = 0;  // every thread declares the same SHARED arrays in the same order: same offsets
  template <class T> T* shared(size_t n) {
    size_t at = (cursor + alignof(T) - 1) / alignof(T) * alignof(T);
    cursor = at + n * sizeof(T);
    return reinterpret_cast<T*>(group->arena.data() + at);
  }
};
}  // namespace

#define SHARED(T, name, n) T* name = _thread.shared<T>(n)
#define BARRIER() _thread.group->bar.arrive_and_wait()
#define EXPF(x) std::exp(x)
#define LOGF(x) std::log(x)
#define TANHF(x) std::tanh(x)
#define INFF std::numeric_limits<float>::infinity()
"""


def metal_body(spec: KernelSpec) -> tuple[str, str]:
    """(header, source) for `mx.fast.metal_kernel`: the index names appear in the source itself, which is how
    MLX decides to add them to the signature it writes."""
    touch = "(void)thread_position_in_threadgroup; (void)threadgroup_position_in_grid;\n"
    return METAL_PRELUDE, touch + spec.body


def cuda_body(spec: KernelSpec) -> tuple[str, str]:
    """(header, source) for `mx.fast.cuda_kernel`."""
    return CUDA_PRELUDE, spec.body


def cuda_translation_unit(spec: KernelSpec, constants: dict[str, int]) -> str:
    """The whole CUDA source MLX builds around the body (its signature, the constants in front of the body),
    without MLX's own device header: what NVRTC compiles in the checks."""
    args = [f"    const {_DTYPES[d][1]}* {n}" for n, d in spec.inputs]
    args += [f"    {_DTYPES[d][1]}* {n}" for n, d in spec.outputs]
    consts = "".join(f"  constexpr int {k} = {constants[k]};\n" for k in spec.constants)
    return (f"{CUDA_PRELUDE}\nextern \"C\" __global__ void custom_kernel_{spec.name}(\n" + ",\n".join(args)
            + ") {\n" + consts + spec.body + "\n}\n")  # fmt: skip


def metal_translation_unit(spec: KernelSpec, constants: dict[str, int]) -> str:
    """The Metal source MLX builds around the body (template constants, buffers, thread attributes), instantiated
    for `constants` (without the host_name attribute MLX adds there, which only Apple's compiler parses)."""
    args = [f"    const device {_DTYPES[d][0]}* {n} [[buffer({i})]]" for i, (n, d) in enumerate(spec.inputs)]
    args += [f"    device {_DTYPES[d][0]}* {n} [[buffer({len(spec.inputs) + i})]]"
             for i, (n, d) in enumerate(spec.outputs)]  # fmt: skip
    args += [
        "    uint3 thread_position_in_threadgroup [[thread_position_in_threadgroup]]",
        "    uint3 threadgroup_position_in_grid [[threadgroup_position_in_grid]]",
    ]
    header, source = metal_body(spec)
    template = ", ".join(f"int {k}" for k in spec.constants)
    inst_args = ", ".join(str(constants[k]) for k in spec.constants)
    return (
        f"#include <metal_stdlib>\nusing namespace metal;\n{header}\ntemplate <{template}>\n"
        f"[[kernel]] void custom_kernel_{spec.name}(\n" + ",\n".join(args) + ") {\n" + source + "\n}\n"
        f"template decltype(custom_kernel_{spec.name}<{inst_args}>) custom_kernel_{spec.name}<{inst_args}>;\n"
    )


def cpu_translation_unit(spec: KernelSpec) -> str:
    """C++ for the CPU: the body as a function of (arrays, constants, TID, GROUP, thread state), and an entry
    point that runs `groups` groups one after the other, each with `threads` OS threads meeting at the barriers.
    Constants are run-time arguments here (one compiled library serves every shape)."""
    params = [f"const {_DTYPES[d][2]}* {n}" for n, d in spec.inputs]
    params += [f"{_DTYPES[d][2]}* {n}" for n, d in spec.outputs]
    params += [f"int {k}" for k in spec.constants]
    names = [n for n, _ in spec.inputs] + [n for n, _ in spec.outputs] + list(spec.constants)
    return (
        CPU_PRELUDE
        + f"\nstatic void body_{spec.name}(" + ", ".join(params) + ", int TID, int GROUP, Thread& _thread) {\n"
        + spec.body
        + "\n}\n\n"
        + f"extern \"C\" void run_{spec.name}(" + ", ".join(params) + ", int groups, int threads) {\n"
        + "  for (int g = 0; g < groups; ++g) {\n"
        + "    Group group(threads);\n"
        + "    std::vector<std::thread> pool;\n"
        + "    for (int t = 0; t < threads; ++t)\n"
        + "      pool.emplace_back([&, t] { Thread th{&group}; body_" + spec.name + "(" + ", ".join(names)
        + ", t, g, th); });\n"
        + "    for (auto& th : pool) th.join();\n"
        + "  }\n}\n"
    )  # fmt: skip
