"""The CUDA backend against the CPU one.

Without a GPU (or without CuPy) the checks that need neither run: the CUDA primitives mirror the
CPU signatures, the .cu files compile with nvcc (when nvcc is on PATH), importing espresso does
not import CuPy, set_mode_gpu fails with an install hint, and the primitive tests below run on
the .cu kernels built for the host by g++ (the "emulated" device, see EMULATION_SHIM).
With a GPU (marked `gpu`):
- every primitive, CPU vs CUDA, on random inputs over several geometries (odd sizes, padding,
  stride > kernel, dilation, 1-3 spatial axes), float32 and float64, outputs poisoned with NaN
  first so an unwritten element fails: relative error ||gpu - cpu|| / ||cpu|| under 1e-5
  (float32) / 1e-12 (float64), indices equal;
- a catalogue of layers, CPU vs CUDA from identical params: forward tops, param data after
  forward, backward bottom and param diffs;
- LeNet's train net: forward_backward on both devices from identical weights.
Set ESPRESSO_GPU_ERRORS=path to append every measured relative error to a file.
"""

import ctypes
import inspect
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from devices import GPU_MISSING, gpu_test, needs_gpu

import espresso
from espresso import backend as backends
from espresso.backend import FUSED_KERNELS
from espresso.backend.cpu import kernels as CPU
from espresso.backend.cuda import kernels as CUDA
from espresso.blob import Blob
from espresso.errors import BackendError, GraphCaptureError
from espresso.proto import caffe_pb2
from espresso.proto.text import parse_text
from espresso.testing import TEST, TRAIN, LayerRun

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
DTYPES = [np.float32, np.float64]


class Device:
    """What the primitive tests need from the device: copies both ways and the primitives."""

    def __init__(self, backend):
        self.backend, self.k = backend, CUDA

    def put(self, array):
        return self.backend.to_device(np.array(array))

    def get(self, array):
        return np.array(self.backend.to_host(array))

    def poisoned(self, shape, dtype):
        """An output buffer full of NaN (or -7 for integers): unwritten elements show up."""
        dtype = np.dtype(dtype)
        return self.put(np.full(shape, np.nan if dtype.kind == "f" else -7, dtype))


# Host emulation, so that CI (which has no GPU) still runs the kernels' logic: each .cu file is
# compiled by g++ with this shim for the CUDA built-ins it uses, and kernels._launch calls the
# instantiation through ctypes as one block of EMULATED_THREADS threads (real threads, gridDim 1,
# so every grid-stride loop walks the whole grid).  __syncthreads and __syncwarp wait at a
# barrier of the block, a shuffle exchanges values through a slot per thread between two such
# waits, and atomicCAS is atomic: lanes sharing an item, warps and barriers run as on a GPU
# (every thread of a block must reach each of them, as there).  It checks indexing, windows,
# summation order and the lanes' cooperation; not the GPU's speed or memory model.
EMULATED_THREADS = 64  # two warps
EMULATED_BLOCKS = 3  # at most, run one after another: grid-stride loops over several blocks
EMULATION_SHIM = """
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <math.h>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>
struct EmuDim3 { unsigned x, y, z; };
static EmuDim3 blockIdx = {0, 0, 0}, gridDim = {1, 1, 1};
static EmuDim3 blockDim = {1, 1, 1};
static thread_local EmuDim3 threadIdx = {0, 0, 0};
#define __global__
#define __device__
#define __shared__ static
#define __forceinline__ inline
struct EmuBarrier {  // waiting threads yield the CPU: a block outnumbers the cores
    std::atomic<unsigned> waiting{0}, generation{0}, exited{0};
    void wait() {
        unsigned gen = generation.load();
        if (waiting.fetch_add(1) + 1 == blockDim.x) {
            waiting.store(0);
            generation.fetch_add(1);
            return;
        }
        auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
        while (generation.load() == gen) {
            unsigned gone = exited.load();  // threads that left the kernel without this barrier:
            if ((gone && waiting.load() + gone == blockDim.x) || std::chrono::steady_clock::now() > deadline) {
                std::fprintf(stderr, "emulated kernel: a barrier or shuffle that not every thread of the block "
                                     "reaches (a GPU would hang there too)\\n");
                std::abort();  // (fails the test run loudly instead of hanging it)
            }
            std::this_thread::yield();
        }
    }
};
static EmuBarrier emu_barrier;
inline void __syncthreads() { emu_barrier.wait(); }
inline void __syncwarp() { emu_barrier.wait(); }
template <typename T>
T emu_exchange(T value, unsigned source) {  // every thread of the block takes part
    static T slots[1024];
    slots[threadIdx.x] = value;
    emu_barrier.wait();
    T got = slots[source];
    emu_barrier.wait();
    return got;
}
template <typename T>
T __shfl_down_sync(unsigned, T value, int offset, int width = 32) {
    unsigned lane = threadIdx.x % width;
    return emu_exchange(value, lane + offset < (unsigned)width ? threadIdx.x + offset : threadIdx.x);
}
template <typename T>
T __shfl_xor_sync(unsigned, T value, int mask, int width = 32) {
    return emu_exchange(value, threadIdx.x / width * width + (threadIdx.x % width ^ mask));
}
inline unsigned long long atomicCAS(unsigned long long* at, unsigned long long expected, unsigned long long value) {
    __atomic_compare_exchange_n(at, &expected, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return expected;  // (the old value, whether or not it was swapped)
}
using std::min;
struct int4 { int x, y, z, w; };
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline double __longlong_as_double(long long i) { double d; std::memcpy(&d, &i, 8); return d; }
template <typename... A, size_t... I>
void emu_call(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*reinterpret_cast<std::remove_reference_t<A>*>(args[I])...);
}
template <typename... A>
void emu_call(void (*f)(A...), void** args, unsigned threads, unsigned blocks) {  // blocks of `threads`
    blockDim.x = threads;
    gridDim.x = blocks;
    for (unsigned b = 0; b < blocks; ++b) {  // one after another
        blockIdx.x = b;
        emu_barrier.waiting = 0;
        emu_barrier.exited = 0;
        std::vector<std::thread> block;
        for (unsigned t = 0; t < threads; ++t)
            block.emplace_back([=] {
                threadIdx.x = t;
                emu_call(f, args, std::index_sequence_for<A...>{});
                ++emu_barrier.exited;
            });
        for (auto& thread : block) thread.join();
    }
}
"""
_C_SCALARS = {np.int32: ctypes.c_int32, np.int64: ctypes.c_int64, np.float32: ctypes.c_float,
              np.float64: ctypes.c_double}


def _symbol(expression):
    return "emu_" + "".join(c if c.isalnum() else "_" for c in expression)


class Emulator:
    """The CUDA kernel families built for the host; `launch` stands in for kernels._launch."""

    def __init__(self, folder):
        self.folder, self.libraries = folder, {}

    def library(self, family):
        if family not in self.libraries:
            names = dict.fromkeys(n for ctype in ("float", "double") for d in range(1, CUDA.MAX_AXES + 1)
                                  for n in CUDA.name_expressions(family, ctype, d))
            lines = [EMULATION_SHIM, f'#include "{CUDA.SOURCES / (family + ".cu")}"']
            lines += [f'extern "C" void {_symbol(n)}(void** a, unsigned t, unsigned b) {{ emu_call(&{n}, a, t, b); }}'
                      for n in names]
            source, library = self.folder / f"{family}.cpp", self.folder / f"lib{family}.so"
            source.write_text("\n".join(lines) + "\n")
            flags = ["-std=c++17", "-O1", "-ffp-contract=off", "-Wno-unknown-pragmas", "-shared", "-fPIC", "-pthread"]
            subprocess.run(["g++", *flags, "-o", str(library), str(source)], check=True, capture_output=True)
            self.libraries[family] = ctypes.CDLL(str(library))
        return self.libraries[family]

    def launch(self, family, expression, ctype, ndim, count, args):
        assert expression in CUDA.name_expressions(family, ctype, ndim or 1), expression
        if count == 0:
            return
        values = [ctypes.c_void_p(a.ctypes.data) if isinstance(a, np.ndarray) else _C_SCALARS[type(a)](a)
                  for a in args]
        pointers = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        blocks = max(1, min(-(-count // EMULATED_THREADS), EMULATED_BLOCKS))  # (count: the threads asked for)
        getattr(self.library(family), _symbol(expression))(pointers, ctypes.c_uint(EMULATED_THREADS),
                                                            ctypes.c_uint(blocks))


class HostArrays:
    """A stand-in backend for the emulated kernels: NumPy arrays play device arrays."""

    def to_device(self, array):
        return np.array(array)

    def to_host(self, array):
        return array


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    return Emulator(tmp_path_factory.mktemp("cuda_emulation"))


NO_GPP = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH")


@pytest.fixture(params=[
    pytest.param("cuda", marks=needs_gpu),
    pytest.param("emulated", marks=NO_GPP),
])
def dev(request, monkeypatch):
    """The CUDA primitives on the GPU, or emulated on the host.  The CPU reference is the NumPy
    path of the CPU primitives (the Numba one is checked against it in test_cpu_kernels.py)."""
    monkeypatch.setattr(CPU, "fast", None)
    if request.param == "cuda":
        return Device(backends.get("cuda:0"))
    monkeypatch.setattr(CUDA, "_launch", request.getfixturevalue("emulator").launch)
    return Device(HostArrays())


# *** comparisons ***
def record(label, error):
    path = os.environ.get("ESPRESSO_GPU_ERRORS")
    if path:
        with open(path, "a") as f:
            f.write(f"{label}\t{error:.3e}\n")


def relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / (scale if scale else 1.0))


def assert_matches(got, want, dtype, what, tolerance=None):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.isfinite(got).all() == np.isfinite(want).all(), f"{what}: non-finite values (unwritten?)"
    error = relative_error(got, want)
    record(what, error)
    assert error < (tolerance or TOLERANCE[np.dtype(dtype)]), f"{what}: relative error {error:.3e}"


def assert_same_indices(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    record(what, float(np.abs(got.astype(np.float64) - want).max(initial=0)))
    np.testing.assert_array_equal(got.astype(np.float64), want.astype(np.float64), err_msg=what)


def rand(shape, seed, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# *** no GPU needed ***
def _public_functions(module):
    return {name: obj for name, obj in vars(module).items()
            if inspect.isfunction(obj) and not name.startswith("_") and obj.__module__ == module.__name__}


def test_cuda_primitives_mirror_the_cpu_signatures():
    """Every CPU primitive is on CUDA with its signature, but the fused fast paths CUDA leaves
    None (the contract lets a backend have none: the CPU's im2row, say)."""
    cpu, cuda = _public_functions(CPU), _public_functions(CUDA)
    mirrored = set(cpu) - {name for name in FUSED_KERNELS if getattr(CUDA, name) is None}
    assert mirrored <= set(cuda), f"missing on CUDA: {sorted(mirrored - set(cuda))}"
    for name in mirrored:
        assert inspect.signature(cuda[name]) == inspect.signature(cpu[name]), name
    assert CUDA.FLT_MIN == CPU.FLT_MIN


def test_gemm_plan_reads_views_in_place():
    """The cuBLAS GEMM's layout logic (no GPU needed): transposed views are read as cuBLAS ops,
    batch axes collapse to one strided-batched call when their strides allow, else the longest
    axis is batched and the others looped."""
    from espresso.backend.cuda import blas

    a = np.zeros((6, 4), np.float32)
    assert blas._layout(a) == "row" and blas._layout(a.T) == "col" and blas._layout(a[:, ::2]) is None
    assert blas._op_ld(a) == (blas.OP_N, 4) and blas._op_ld(a.T) == (blas.OP_T, 4)
    assert blas._gemm_operand(a[:, ::2]).flags.c_contiguous
    weights, cols, out = np.zeros((1, 5, 7)), np.zeros((8, 1, 7, 3)), np.zeros((8, 1, 5, 3))
    batch = out.shape[:-2]
    strides = [blas._batch_strides(x, batch) for x in (weights, cols, out)]
    assert blas._batch_plan(batch, strides) == [({}, (8, (0, 21, 15)))]  # one call, weights broadcast
    weights, cols, out = np.zeros((2, 5, 7)), np.zeros((8, 2, 7, 3)), np.zeros((8, 2, 5, 3))
    strides = [blas._batch_strides(x, out.shape[:-2]) for x in (weights, cols, out)]
    plan = blas._batch_plan(out.shape[:-2], strides)
    assert [p[0] for p in plan] == [{1: 0}, {1: 1}] and plan[0][1] == (8, (0, 42, 30))  # groups looped


def test_cublaslt_structures_and_alignment():
    """cuBLASLt's heuristic result as cublasLt.h lays it out (an algorithm of 8 words, the
    workspace size, a status, the waves, 4 reserved ints: 96 bytes), and the address alignment
    that decides which matmul_bias plans apply (no GPU needed)."""
    from types import SimpleNamespace

    from espresso.backend.cuda import blas

    assert ctypes.sizeof(blas._LtHeuristic) == 96 and blas._LtHeuristic.workspace_size.offset == 64

    def at(ptr):
        return SimpleNamespace(data=SimpleNamespace(ptr=ptr))

    assert [blas._alignment(at(p)) for p in (0x7f0000000000, 0x7f0000000104, 0x7f0000000010, 0x7f0000000008)] == \
        [256, 4, 16, 8]


def test_every_cu_file_opens_with_a_description():
    sources = sorted(CUDA.SOURCES.glob("*.cu"))
    assert [p.stem for p in sources] == ["channels", "direct", "fused", "im2col", "int8", "lrn", "pooling"]
    for path in sources:
        lines = path.read_text().splitlines()
        header = lines[: next(i for i, line in enumerate(lines) if not line.startswith("//"))]
        assert len(header) >= 5, f"{path.name}: no header comment"
        assert any("Launch" in line for line in header), f"{path.name}: no launch layout in its header"
        assert any("Assumptions" in line for line in header), f"{path.name}: no assumptions in its header"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cu_files_compile_with_nvcc():
    result = subprocess.run(["bash", str(ROOT / "tools" / "check_cu.sh")], capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable}, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok ") == len(list(CUDA.SOURCES.glob("*.cu"))), result.stdout


def test_importing_espresso_does_not_import_cupy():
    code = ("import sys, espresso, espresso.backend.cuda, espresso.backend.cuda.kernels, espresso.layers; "
            "sys.exit('cupy' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr or "cupy was imported"


@pytest.mark.skipif(GPU_MISSING is None, reason="a GPU is present")
def test_set_mode_gpu_without_a_gpu_says_why():
    with pytest.raises(BackendError) as info:
        espresso.set_mode_gpu()
    message = str(info.value)
    assert "cuda:0" in message
    if "CuPy, which is not installed" in GPU_MISSING:
        assert "pip install cupy-cuda13x" in message
    espresso.set_mode_cpu()


def test_workspace_sizes_are_zero():
    assert CUDA.im2col_workspace_size((2, 3, 5, 5), (1, 1), True) == 0
    assert CUDA.pool_workspace_size((2, 3, 5, 5), (2, 3, 3, 3), (2, 2), (2, 2), (1, 1)) == 0
    assert CUDA.lrn_workspace_size((2, 3, 5, 5), 5) == 0


def test_name_expressions_cover_every_kernel_of_the_sources():
    for family in ("im2col", "pooling", "lrn"):
        source = (CUDA.SOURCES / f"{family}.cu").read_text()
        kernels = {line.split("void ")[1].split("(")[0] for line in source.splitlines()
                   if line.startswith("__global__ void")}
        named = {name.split("<")[0] for name in CUDA.name_expressions(family, "float", 2)}
        assert kernels == named, family


# *** primitives, CPU vs CUDA ***
# x shape, kernel, stride, pad, dilation: odd sizes, padding, stride > kernel, dilation, 1-D and 3-D
CONV_GEOMETRIES = [
    ((2, 3, 5, 7), (3, 2), (1, 2), (1, 0), (1, 1)),
    ((3, 2, 7, 6), (2, 3), (3, 2), (1, 2), (2, 1)),
    ((2, 2, 9, 8), (2, 2), (3, 4), (0, 1), (1, 1)),
    ((1, 1, 4, 4), (1, 1), (1, 1), (0, 0), (1, 1)),
    ((2, 2, 6, 5), (3, 3), (2, 1), (2, 2), (2, 2)),
    ((5, 3, 13, 11), (5, 5), (1, 1), (2, 2), (1, 1)),
    ((2, 3, 11), (3,), (2,), (1,), (3,)),
    ((2, 2, 4, 5, 3), (2, 3, 2), (1, 2, 1), (1, 0, 1), (1, 1, 2)),
]
CONV_IDS = [f"{'x'.join(map(str, g[0]))}-k{''.join(map(str, g[1]))}" for g in CONV_GEOMETRIES]


def conv_out(spatial, kernel, stride, pad, dilation):
    return tuple((s + 2 * p - d * (k - 1) - 1) // t + 1
                 for s, k, t, p, d in zip(spatial, kernel, stride, pad, dilation))


def col_shape(x_shape, kernel, out, batch_last):
    n, c = x_shape[:2]
    rows = c * math.prod(kernel)
    return (rows, math.prod(out) * n) if batch_last else (n, rows, math.prod(out))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_last", [False, True])
@pytest.mark.parametrize("shape, kernel, stride, pad, dilation", CONV_GEOMETRIES, ids=CONV_IDS)
def test_im2col_col2im(dev, shape, kernel, stride, pad, dilation, batch_last, dtype):
    out = conv_out(shape[2:], kernel, stride, pad, dilation)
    x = rand(shape, 1, dtype)
    want = np.empty(col_shape(shape, kernel, out, batch_last), dtype)
    CPU.im2col(x, want, kernel, stride, pad, dilation, batch_last)
    col = dev.poisoned(want.shape, dtype)
    dev.k.im2col(dev.put(x), col, kernel, stride, pad, dilation, batch_last, None)
    what = f"im2col {shape} {dtype.__name__} batch_last={batch_last}"
    assert_matches(dev.get(col), want, dtype, what)
    assert np.array_equal(dev.get(col), want), f"{what}: not bit-identical"  # copies only

    y = rand(want.shape, 2, dtype)
    back = np.empty(shape, dtype)
    CPU.col2im(y, back, kernel, stride, pad, dilation, batch_last)
    image = dev.poisoned(shape, dtype)
    dev.k.col2im(dev.put(y), image, kernel, stride, pad, dilation, batch_last, None)
    assert_matches(dev.get(image), back, dtype, f"col2im {shape} {dtype.__name__} batch_last={batch_last}")


# x shape, kernel, stride, pad (output sizes by Caffe's ceil rule, clipped)
POOL_GEOMETRIES = [
    ((2, 3, 7, 6), (3, 3), (2, 2), (1, 1)),
    ((2, 2, 10, 8), (2, 3), (3, 2), (0, 1)),
    ((3, 2, 6, 5), (2, 2), (2, 2), (0, 0)),
    ((2, 2, 5, 7), (3, 2), (1, 1), (1, 0)),
    ((2, 3, 4, 4), (4, 4), (1, 1), (0, 0)),
    ((2, 2, 8, 10), (2, 2), (3, 3), (0, 0)),
    ((2, 3, 7, 5), (2, 2), (2, 2), (1, 1)),  # windows that never overlap, some in the padding
    ((2, 3, 8, 6), (2, 3), (2, 3), (0, 0)),  # windows that tile the input
    ((2, 2, 3, 5), (4, 4), (2, 2), (0, 0)),  # a kernel wider than the input, clipped as in Caffe
    ((2, 2, 11), (3,), (2,), (1,)),
    ((2, 2, 5, 4, 3), (2, 3, 2), (2, 1, 2), (1, 1, 0)),
]
POOL_IDS = [f"{'x'.join(map(str, g[0]))}-k{''.join(map(str, g[1]))}-s{''.join(map(str, g[2]))}"
            for g in POOL_GEOMETRIES]


def pool_out(spatial, kernel, stride, pad):
    out = []
    for s, k, t, p in zip(spatial, kernel, stride, pad):
        o = -(-(s + 2 * p - k) // t) + 1
        if p and (o - 1) * t >= s + p:
            o -= 1
        out.append(o)
    return tuple(out)


def pool_case(shape, kernel, stride, pad):
    out = pool_out(shape[2:], kernel, stride, pad)
    assert all((o - 1) * t - p < s for o, t, p, s in zip(out, stride, pad, shape[2:])), "an empty window"
    return (*shape[:2], *out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_dtype", [np.int32, np.int64, "data"])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape, kernel, stride, pad", POOL_GEOMETRIES, ids=POOL_IDS)
def test_max_pool(dev, shape, kernel, stride, pad, ties, mask_dtype, dtype):
    """ties: small integer values, so the first-maximum rule decides most windows."""
    mask_dtype = dtype if mask_dtype == "data" else mask_dtype
    y_shape = pool_case(shape, kernel, stride, pad)
    x = np.random.default_rng(3).integers(-2, 2, shape).astype(dtype) if ties else rand(shape, 3, dtype)
    y, mask = np.empty(y_shape, dtype), np.empty(y_shape, mask_dtype)
    CPU.max_pool_forward(x, y, mask, kernel, stride, pad)
    gy, gmask = dev.poisoned(y_shape, dtype), dev.poisoned(y_shape, mask_dtype)
    dev.k.max_pool_forward(dev.put(x), gy, gmask, kernel, stride, pad, None)
    what = f"max pool {shape} {dtype.__name__} mask {np.dtype(mask_dtype)} ties={ties}"
    assert_matches(dev.get(gy), y, dtype, what + " y")
    assert_same_indices(dev.get(gmask), mask, what + " mask")

    dy = rand(y_shape, 4, dtype)
    dx = np.empty(shape, dtype)
    CPU.max_pool_backward(dy, mask, dx, kernel, stride, pad)
    gdx = dev.poisoned(shape, dtype)
    dev.k.max_pool_backward(dev.put(dy), dev.put(mask), gdx, kernel, stride, pad, None)
    assert_matches(dev.get(gdx), dx, dtype, what + " dx")


@pytest.mark.parametrize("mask_dtype", [np.int32, np.float32])
def test_max_pool_skips_nan_and_minus_infinity_as_the_cpu(dev, mask_dtype):
    """Caffe's rule on both devices: NaN never picked; a window of -inf and NaN alone gives
    -FLT_MAX and mask -1, whose gradient backward drops (test_cpu_kernels.py states the values)."""
    x = rand((2, 3, 6, 5), 7, np.float32)
    x[0, 0, :2, :2], x[0, 1, 2, 2], x[1, 2, :, 0] = np.nan, -np.inf, np.nan
    x[1, 0, 2:4, 2:4] = [[-np.inf, np.nan], [np.nan, -np.inf]]
    for kernel, stride, pad in [((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 2), (1, 1))]:
        out = pool_case(x.shape, kernel, stride, pad)
        y, mask, dx = np.empty(out, np.float32), np.empty(out, mask_dtype), np.empty(x.shape, np.float32)
        CPU.max_pool_forward(x, y, mask, kernel, stride, pad)
        assert (mask == -1).any() and (y == -CPU.FLT_MAX).any()
        gy, gmask, gdx = dev.poisoned(out, np.float32), dev.poisoned(out, mask_dtype), dev.poisoned(x.shape, np.float32)
        dev.k.max_pool_forward(dev.put(x), gy, gmask, kernel, stride, pad, None)
        np.testing.assert_array_equal(dev.get(gy), y)
        np.testing.assert_array_equal(dev.get(gmask), mask)
        dy = rand(out, 8, np.float32)
        CPU.max_pool_backward(dy, mask, dx, kernel, stride, pad)
        dev.k.max_pool_backward(dev.put(dy), gmask, gdx, kernel, stride, pad, None)
        assert_matches(dev.get(gdx), dx, np.float32, f"max pool dx with NaN and -inf, kernel {kernel}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, kernel, stride, pad", POOL_GEOMETRIES, ids=POOL_IDS)
def test_ave_pool(dev, shape, kernel, stride, pad, dtype):
    y_shape = pool_case(shape, kernel, stride, pad)
    x = rand(shape, 5, dtype)
    y = np.empty(y_shape, dtype)
    CPU.ave_pool_forward(x, y, kernel, stride, pad)
    gy = dev.poisoned(y_shape, dtype)
    dev.k.ave_pool_forward(dev.put(x), gy, kernel, stride, pad, None)
    assert_matches(dev.get(gy), y, dtype, f"ave pool {shape} {dtype.__name__} y")

    dy = rand(y_shape, 6, dtype)
    dx = np.empty(shape, dtype)
    CPU.ave_pool_backward(dy, dx, kernel, stride, pad)
    gdx = dev.poisoned(shape, dtype)
    dev.k.ave_pool_backward(dev.put(dy), gdx, kernel, stride, pad, None)
    assert_matches(dev.get(gdx), dx, dtype, f"ave pool {shape} {dtype.__name__} dx")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, kernel, stride, pad", [g for g in POOL_GEOMETRIES if not any(g[3])],
                         ids=[i for g, i in zip(POOL_GEOMETRIES, POOL_IDS) if not any(g[3])])
def test_stochastic_pool(dev, shape, kernel, stride, pad, dtype):
    y_shape = pool_case(shape, kernel, stride, pad)
    rng = np.random.default_rng(7)
    x = rng.random(shape).astype(dtype) + dtype(0.01)  # non-negative, as Caffe expects
    r = rng.random(y_shape).astype(dtype)
    y, index = np.empty(y_shape, dtype), np.empty(y_shape, np.int32)
    CPU.stochastic_pool_forward_train(x, y, index, r, kernel, stride)
    gy, gindex = dev.poisoned(y_shape, dtype), dev.poisoned(y_shape, np.int32)
    dev.k.stochastic_pool_forward_train(dev.put(x), gy, gindex, dev.put(r), kernel, stride, None)
    what = f"stochastic pool {shape} {dtype.__name__}"
    assert_matches(dev.get(gy), y, dtype, what + " train y")
    assert_same_indices(dev.get(gindex), index, what + " train index")

    dy = rand(y_shape, 8, dtype)
    dx = np.empty(shape, dtype)
    CPU.stochastic_pool_backward(dy, index, dx, kernel, stride)
    gdx = dev.poisoned(shape, dtype)
    dev.k.stochastic_pool_backward(dev.put(dy), dev.put(index), gdx, kernel, stride, None)
    assert_matches(dev.get(gdx), dx, dtype, what + " dx")

    x = rng.standard_normal(shape).astype(dtype)  # signed: windows summing to <= 0 give 0
    CPU.stochastic_pool_forward_test(x, y, kernel, stride)
    gy = dev.poisoned(y_shape, dtype)
    dev.k.stochastic_pool_forward_test(dev.put(x), gy, kernel, stride, None)
    assert_matches(dev.get(gy), y, dtype, what + " test y")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, size, alpha, beta, k", [
    ((2, 7, 4, 5), 5, 0.1, 0.75, 2.0),
    ((3, 4, 3, 3), 3, 1e-2, 0.5, 1.0),
    ((2, 1, 5, 3), 5, 0.3, 1.25, 1.5),
    ((2, 6, 3), 1, 0.2, 0.75, 1.0),
    ((1, 9, 2, 2, 2), 7, 1e-4, 0.75, 1.0),
])
def test_lrn_across(dev, shape, size, alpha, beta, k, dtype):
    x = rand(shape, 9, dtype)
    y, scale = np.empty(shape, dtype), np.empty(shape, dtype)
    CPU.lrn_across_forward(x, y, scale, size, alpha, beta, k)
    gx, gy, gscale = dev.put(x), dev.poisoned(shape, dtype), dev.poisoned(shape, dtype)
    dev.k.lrn_across_forward(gx, gy, gscale, size, alpha, beta, k, None)
    what = f"lrn {shape} size {size} {dtype.__name__}"
    assert_matches(dev.get(gy), y, dtype, what + " y")
    assert_matches(dev.get(gscale), scale, dtype, what + " scale")

    dy = rand(shape, 10, dtype)
    dx = np.empty(shape, dtype)
    CPU.lrn_across_backward(x, y, dy, scale, dx, size, alpha, beta)
    gdx = dev.poisoned(shape, dtype)
    dev.k.lrn_across_backward(gx, dev.put(y), dev.put(dy), dev.put(scale), gdx, size, alpha, beta, None)
    assert_matches(dev.get(gdx), dx, dtype, what + " dx")


@pytest.mark.parametrize("regularization", [0, 1, 2])
def test_fused_sgd_update_follows_caffes_order(dev, regularization):
    """Bit for bit the xp steps of ArenaUpdater + SGD (same float32 operations, same order)."""
    f, rng = np.float32, np.random.default_rng(regularization)
    counts, lr_mult, decay = [5, 1, 7], np.array([1, 2, 0.5], f), np.array([5e-4, 0, 1e-3], f)
    w, g, h = (rng.standard_normal(sum(counts)).astype(f) for _ in range(3))
    rate, momentum, normalize = f(0.01), f(0.9), f(1) / f(2)
    local_lr, local_decay = np.repeat(lr_mult, counts), np.repeat(decay, counts)
    rw, rg, rh = w.copy(), g * normalize, h * momentum
    if regularization:
        rg = rg + (rw if regularization == 1 else np.sign(rw)) * local_decay
    rh = rh + rg * (local_lr * rate)
    rw = rw - rh
    dw, dg, dh = dev.put(w), dev.put(g), dev.put(h)
    segments = (dev.put(np.cumsum(counts).astype(np.int64)), dev.put(lr_mult), dev.put(decay))
    dev.k.sgd_update(dw, dg, dh, segments, dev.put(np.array(rate)), momentum, normalize, regularization)
    for got, want in ((dw, rw), (dg, rh), (dh, rh)):
        np.testing.assert_array_equal(dev.get(got), want)


def test_split_k_rule():
    """Small outputs with long inner dimensions are split into slices that divide k."""
    from espresso.backend.cuda.blas import Blas

    blas = Blas.__new__(Blas)
    blas.processors = 132
    assert blas.split_parts(64, 500, 800) == 8  # LeNet's ip1 forward: 32 tiles, at most 9 parts, 8 | 800
    assert blas.split_parts(64, 800, 500) == 5  # its bottom gradient: 50 tiles, at most 6 parts, 5 | 500
    assert blas.split_parts(256, 1024, 4096) == 1  # 256 tiles: enough blocks already
    assert blas.split_parts(256, 500, 800) == 1  # 128 tiles: most multiprocessors busy
    assert blas.split_parts(64, 500, 100) == 1  # too short to split
    assert blas.split_parts(64, 64, 4099) == 1  # a prime k: no slice divides it
    assert blas.split_parts(1, 4096, 9216) == 1  # a GEMV: memory-bound, not split


@pytest.mark.parametrize("mode", ["plain", "accumulate", "bias"])
@pytest.mark.parametrize("transposed", [False, True])
@gpu_test
def test_split_k_gemm_matches_the_plain_product(mode, transposed):
    """LeNet's ip1 forward at batch 64 (split in 8), with the bias of matmul_bias added in the sum."""
    gpu = backends.get("cuda:0")
    a, w = rand((64, 800), 8, np.float32), rand((500, 800), 9, np.float32)
    b = w.T if transposed else np.ascontiguousarray(w.T)
    out, bias = rand((64, 500), 10, np.float32), rand((500,), 11, np.float32)
    want = (out if mode == "accumulate" else 0) + a.astype(np.float64) @ b + (bias if mode == "bias" else 0)
    assert gpu.blas.split_parts(64, 500, 800) > 1
    got, ga, gb = gpu.to_device(out), gpu.to_device(a), gpu.to_device(w).T if transposed else gpu.to_device(b)
    if mode == "bias":
        gpu.blas.matmul_bias(ga, gb, gpu.to_device(bias), got)
    else:
        gpu.blas.matmul(ga, gb, got, mode == "accumulate")
    assert_matches(gpu.to_host(got), want, np.float32, f"split-K GEMM {mode}")


@gpu_test
@pytest.mark.parametrize("batch", [64, 256])
@pytest.mark.parametrize("slope", [0.0, 0.25])
def test_matmul_bias_relu_on_a_gpu(batch, slope):
    """LeNet's ip1 forward and its ReLU in one: at batch 64 in the split-K sum, at 256 in
    cuBLASLt's epilogue (slope 0) or after it (a leaky ReLU)."""
    gpu = backends.get("cuda:0")
    a, w, bias = rand((batch, 800), 12, np.float32), rand((500, 800), 13, np.float32), rand((500,), 14, np.float32)
    want = a.astype(np.float64) @ w.T.astype(np.float64) + bias
    want = np.maximum(want, 0) + slope * np.minimum(want, 0)
    assert (gpu.blas.split_parts(batch, 500, 800) > 1) == (batch == 64)
    got = gpu.xp.full((batch, 500), np.nan, np.float32)
    gpu.k.matmul_bias_relu(gpu.to_device(a), gpu.to_device(w).T, gpu.to_device(bias), got, slope)
    assert_matches(gpu.to_host(got), want, np.float32, f"matmul_bias_relu batch {batch} slope {slope}")


def test_small_product_rule():
    """Products with few rows, columns or terms and little work run in small_gemm; GEMVs and
    products that fill cuBLAS's tiles do not."""
    def small(m, n, k, dtype=np.float32):
        return CUDA._small_product(np.zeros((m, k), dtype), np.zeros((k, n), dtype), np.zeros((m, n), dtype))

    assert small(64, 10, 500) and small(64, 500, 10) and small(10, 500, 64)  # LeNet's ip2 at batch 64
    assert small(256, 10, 500) and small(2, 3, 4, np.float64)
    assert not small(64, 500, 800) and not small(500, 800, 64)  # ip1: cuBLAS's tiles fill
    assert not small(1, 10, 500) and not small(1, 4096, 9216) and not small(64, 1, 500)  # GEMVs
    assert not small(16, 4096, 9216) and not small(2, 2, 8192)  # over SMALL_GEMM_WORK, SMALL_GEMM_TERMS
    assert not small(8, 8, 8, np.float16)  # (cuBLAS says what it takes)
    a = np.zeros((8, 8), np.float32)
    assert not CUDA._small_product(a, a, a.T)  # an output that is not C-contiguous


# lanes per output: 32 (k 300), 1 (k 9) and 4 (k 20)
@pytest.mark.parametrize("m, n, k", [(6, 5, 300), (7, 40, 9), (5, 33, 20)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["plain", "accumulate", "bias", "bias_relu", "transposed"])
def test_small_products_through_matmul(dev, m, n, k, dtype, mode):
    """matmul, matmul_bias and matmul_bias_relu run small products in small_gemm (the emulated
    device has no cuBLAS to fall back on): out = a @ b, out += a @ b, a @ b + bias, that through a
    leaky ReLU, and transposed views."""
    a, b, old, bias = rand((m, k), 1, dtype), rand((k, n), 2, dtype), rand((m, n), 3, dtype), rand((n,), 4, dtype)
    if mode == "transposed":
        ga, gb = dev.put(a.T.copy()).T, dev.put(b.T.copy()).T
    else:
        ga, gb = dev.put(a), dev.put(b)
    out = dev.put(old) if mode == "accumulate" else dev.poisoned((m, n), dtype)
    if mode == "bias":
        dev.k.matmul_bias(ga, gb, dev.put(bias), out)
    elif mode == "bias_relu":
        dev.k.matmul_bias_relu(ga, gb, dev.put(bias), out, 0.25)
    else:
        dev.k.matmul(ga, gb, out, accumulate=mode == "accumulate")
    want = a @ b + (old if mode == "accumulate" else bias if mode.startswith("bias") else 0)
    if mode == "bias_relu":
        want = np.maximum(want, 0) + 0.25 * np.minimum(want, 0)
    assert_matches(dev.get(out), want, dtype, f"small GEMM {m}x{n}x{k} {mode}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["plain", "accumulate", "bias", "bias_relu"])
def test_sum_parts_adds_the_split_products_in_order(dev, dtype, mode):
    """The split-K GEMM's last step: bit for bit the parts added in order, then the bias or the old
    output, then (a ReLU folded in) the ReLU as relu_forward computes it."""
    products, old, bias = rand((5, 4, 7), 1, dtype), rand((4, 7), 2, dtype), rand((7,), 3, dtype)
    want = products[0].copy()
    for part in products[1:]:
        want += part
    want = old + want if mode == "accumulate" else want + bias if mode.startswith("bias") else want
    slope = dtype(0.25) if mode == "bias_relu" else None
    if slope is not None:
        want = np.where(want < 0, 0, want) + slope * np.where(want < 0, want, 0)
    out = dev.put(old) if mode == "accumulate" else dev.poisoned((4, 7), dtype)
    dev.k.sum_parts(dev.put(products), out, mode == "accumulate", dev.put(bias) if mode.startswith("bias") else None,
                    slope)
    np.testing.assert_array_equal(dev.get(out), want)


# on a GPU: 4, 8, 8 and 32 lanes (threads) per position, the last two sharing 37 and 1000 classes
@pytest.mark.parametrize("dims", [(6, 5, 1), (3, 4, 5), (1, 10, 1), (2, 37, 3), (1, 1000, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_place", [False, True])
def test_fused_softmax_forward(dev, dims, dtype, in_place):
    x = rand(dims, 5, dtype) * 4
    shifted = np.exp(x - x.max(axis=1, keepdims=True))
    want = shifted / shifted.sum(axis=1, keepdims=True)
    gx = dev.put(x)
    gy = gx if in_place else dev.poisoned(dims, dtype)
    dev.k.softmax_forward(gx, gy, dims)
    assert_matches(dev.get(gy), want, dtype, f"softmax {dims}")


@pytest.mark.parametrize("dims, ignore, fixed", [((6, 5, 1), None, None), ((3, 4, 5), 2, None), ((2, 3, 4), 1, 8.0),
                                                 ((4, 300, 1), 7, None), ((100, 10, 1), 3, None)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("one_block", [True, False])
def test_fused_softmax_loss(dev, dims, ignore, fixed, dtype, one_block, monkeypatch):
    """one_block: the forward in one kernel (few positions), else two."""
    monkeypatch.setattr(CUDA, "ONE_BLOCK_SOFTMAX_LOSS", CUDA.ONE_BLOCK_SOFTMAX_LOSS if one_block else 0)
    outer, classes, inner = dims
    x = rand(dims, 3, dtype) * 4
    labels = np.random.default_rng(4).integers(0, classes, (outer, inner)).astype(dtype)
    shifted = np.exp(x - x.max(axis=1, keepdims=True))
    prob = shifted / shifted.sum(axis=1, keepdims=True)
    valid = labels != ignore if ignore is not None else np.ones(labels.shape, bool)
    safe = np.where(valid, labels, 0).astype(int)
    picked = np.take_along_axis(prob, safe[:, None, :], axis=1)[:, 0, :]
    norm = max(valid.sum(), 1) if fixed is None else fixed
    loss = -(np.log(np.maximum(picked, CPU.FLT_MIN)) * valid).sum() / norm
    dx = (prob - (np.arange(classes)[None, :, None] == safe[:, None, :])) * valid[:, None, :] * (2.0 / norm)
    gprob, gdx = dev.poisoned(dims, dtype), dev.poisoned(dims, dtype)
    scratch = [dev.poisoned((outer * inner,), dtype) for _ in range(2)]
    gloss, gnorm = dev.put(np.array(0, dtype)), dev.put(np.array(0, dtype))
    gx, glabels, problem = dev.put(x), dev.put(labels), dev.put(np.zeros(2, np.int64))
    dev.k.softmax_loss_forward(gx, glabels, gprob, *scratch, gloss, gnorm, dims, ignore, fixed, problem)
    dev.k.softmax_loss_backward(gprob, glabels, dev.put(np.array(2, dtype)), gnorm, gdx, dims, ignore)
    what = f"softmax loss {dims} {dtype.__name__}"
    assert_matches(dev.get(gprob), prob, dtype, what + " prob")
    assert_matches(dev.get(gloss), loss, dtype, what + " loss")
    assert_matches(dev.get(gdx), dx, dtype, what + " dx")
    assert dev.get(problem).tolist() == [0, 0]
    labels.ravel()[3] = -1 if ignore != -1 else classes  # not a class: recorded, and read as ignored
    dev.k.softmax_loss_forward(gx, dev.put(labels), gprob, *scratch, gloss, gnorm, dims, ignore, fixed, problem)
    assert dev.get(problem).tolist() == [4, -1]


# (outer, channels, inner): inner 1 and 3 (a block's step wraps rows), 700 (a step within a row),
# 9000 cells a channel (two parts)
CHANNEL_DIMS = [(2, 3, 5), (7, 2, 1), (30, 2, 3), (8, 1, 700), (1, 4, 9000)]


@pytest.mark.parametrize("dims", CHANNEL_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_sums(dev, dims, dtype):
    x, y, shift = rand(dims, 1, dtype), rand(dims, 2, dtype), rand(dims[1], 3, dtype)
    old = rand(dims[1], 4, dtype)
    work = dev.poisoned((CUDA.channel_sums_workspace_size(dims),), dtype)
    gx, gy, gshift = dev.put(x), dev.put(y), dev.put(shift)
    sums, dots = dev.poisoned(dims[1:2], dtype), dev.put(old)
    dev.k.channel_sums(gx, dims, work, sums=sums, dots=dots, y=gy, scale=0.5, accumulate=False)
    assert_matches(dev.get(sums), 0.5 * x.sum(axis=(0, 2), dtype=np.float64), dtype, f"channel sums {dims}")
    assert_matches(dev.get(dots), 0.5 * (x * y).sum(axis=(0, 2), dtype=np.float64), dtype, f"channel dots {dims}")
    dots, a = dev.put(old), x.astype(np.float64) - shift[:, None]
    dev.k.channel_sums(gx, dims, work, dots=dots, shift=gshift, accumulate=True)  # no y: a * a
    assert_matches(dev.get(dots), old + (a * a).sum(axis=(0, 2)), dtype, f"channel squares about a shift {dims}")


def test_channel_sums_launch_counts_do_not_wrap(monkeypatch):
    """2^23 channels of one cell: the blocks' count passes int32 (NumPy keeps int32 products)."""
    launched = []
    monkeypatch.setattr(CUDA, "_launch", lambda family, expression, ctype, ndim, count, args: launched.append(count))
    dims = (1, 2 ** 23 + 5, 1)
    x, work = np.zeros(dims[1], np.float32), np.zeros(CUDA.channel_sums_workspace_size(dims), np.float32)
    CUDA.channel_sums(x, dims, work, sums=np.zeros(dims[1], np.float32))
    assert launched == [dims[1] * CUDA.BLOCK, dims[1]]


@pytest.mark.parametrize("dims", CHANNEL_DIMS + [(5, 7, 13)])  # (the last: a row and a channel wrap in one step)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_place", [False, True])
def test_batch_norm_and_scale_maps(dev, dims, dtype, in_place):
    """The elementwise channel passes, over arrays of fewer elements than threads and of many
    grid-stride steps (each thread tracks its element's channel as it steps)."""
    x, dy = rand(dims, 5, dtype), rand(dims, 6, dtype)
    mean, std, scale, bias = (rand(dims[1], seed, dtype) for seed in (7, 8, 9, 10))
    std, col = np.abs(std) + 0.5, lambda v: v[:, None]  # noqa: E731
    gx = dev.put(x)
    y = gx if in_place else dev.poisoned(dims, dtype)
    x_norm = dev.poisoned(dims, dtype)
    dev.k.batch_norm_forward(gx, dev.put(mean), dev.put(std), y, x_norm, dims)
    want = (x - col(mean)) / col(std)
    assert_matches(dev.get(y), want, dtype, f"batch norm forward {dims}")
    assert_matches(dev.get(x_norm), want, dtype, f"batch norm's copy {dims}")
    for b, slope in ((bias, None), (None, None), (bias, 0.0), (None, -0.5)):  # a Scale folded in, a ReLU
        y, x_norm = dev.poisoned(dims, dtype), dev.poisoned(dims, dtype)
        dev.k.batch_norm_forward(dev.put(x), dev.put(mean), dev.put(std), y, x_norm, dims, dev.put(scale),
                                 None if b is None else dev.put(b), slope=slope)
        scaled = want * col(scale) + (0 if b is None else col(b))
        if slope is not None:
            scaled = np.maximum(scaled, 0) + slope * np.minimum(scaled, 0)
        assert_matches(dev.get(y), scaled, dtype, f"folded {dims}, ReLU slope {slope}")
        assert_matches(dev.get(x_norm), want, dtype, f"folded batch norm's copy {dims}")
    m = dims[0] * dims[2]
    sum_dy, sum_dyy = dy.sum(axis=(0, 2)), (dy * want).sum(axis=(0, 2))
    gdy = dev.put(dy)
    dx = gdy if in_place else dev.poisoned(dims, dtype)
    dev.k.batch_norm_backward(gdy, x_norm, dev.put(sum_dy), dev.put(sum_dyy), dev.put(std), dx, dims)
    want_dx = (dy - (want * col(sum_dyy) + col(sum_dy)) / m) / col(std)
    assert_matches(dev.get(dx), want_dx, dtype, f"batch norm backward {dims}")
    for b in (bias, None):
        gx = dev.put(x)
        y = gx if in_place else dev.poisoned(dims, dtype)
        dev.k.scale_forward(gx, dev.put(scale), None if b is None else dev.put(b), y, dims)
        assert_matches(dev.get(y), x * col(scale) + (0 if b is None else col(b)), dtype, f"scale forward {dims}")


CHANNEL_KERNELS = ("channel_sums_workspace_size", "channel_sums", "batch_norm_forward", "batch_norm_backward",
                   "scale_forward")
CHANNEL_LAYERS = [  # (snippet, bottom shapes); every Scale and Bias with >= 32 cells a channel
    ('type: "BatchNorm"', [(4, 3, 10, 10)]),
    ('type: "BatchNorm" batch_norm_param { use_global_stats: true }', [(4, 3, 10, 10)]),
    ('type: "BatchNorm"', [(64, 5)]),
    ('type: "Scale" scale_param { axis: 1 num_axes: 1 bias_term: true }', [(4, 3, 4, 4)]),
    ('type: "Scale" scale_param { axis: 1 }', [(4, 3, 16), (3,)]),
    ('type: "Bias" bias_param { axis: 1 num_axes: 1 }', [(4, 3, 16)]),
]


@NO_GPP
@pytest.mark.parametrize("snippet, shapes, in_place", [  # (in place: the one-bottom layers)
    (snippet, shapes, in_place) for snippet, shapes in CHANNEL_LAYERS
    for in_place in ((False, True) if len(shapes) == 1 else (False,))])
def test_layers_through_the_emulated_channel_kernels_match_their_xp_code(snippet, shapes, in_place, monkeypatch,
                                                                        request):
    """BatchNorm, Scale and Bias on the CPU backend with the CUDA channel kernels (emulated) in
    place of its None: their fused path against their xp code, forward and backward."""
    rng = np.random.default_rng(12)
    bottoms = [rng.standard_normal(shape) for shape in shapes]
    dy = rng.standard_normal(shapes[0])
    params = {}

    def results():
        run = LayerRun(snippet, bottoms, inplace=in_place)
        for k, blob in enumerate(run.layer.blobs):
            blob.data[...] = params.setdefault(k, rng.random(blob.shape) + 0.5)
        y = np.array(run.forward()[0])
        run.zero_param_diffs()
        return [y, *run.backward([dy], [True] * len(shapes)), *run.param_diffs()]

    want = results()  # (before the patch: a layer looks its kernels up as it runs)
    monkeypatch.setattr(CUDA, "_launch", request.getfixturevalue("emulator").launch)
    for name in CHANNEL_KERNELS:
        monkeypatch.setattr(CPU, name, getattr(CUDA, name))
    got = results()
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert_matches(g, w, np.float64, f"{snippet} result {k} (top, bottom diffs, param diffs)")


FOLD_NET = """{force}
    layer {{ name: "data" type: "Input" top: "x" top: "label"
             input_param {{ shape {{ dim: 4 dim: 3 dim: 6 dim: 6 }} shape {{ dim: 4 }} }} }}
    {below}
    layer {{ name: "bn" type: "BatchNorm" bottom: "c" top: "{top}" {bn} }}
    layer {{ name: "scale" type: "Scale" bottom: "{top}" top: "{top}" scale_param {{ bias_term: {bias} {scale} }} }}
    layer {{ name: "relu" type: "ReLU" bottom: "{top}" top: "{relu_top}" {relu} }}
    layer {{ name: "ip" type: "InnerProduct" bottom: "{relu_top}" top: "ip"
             inner_product_param {{ num_output: 2 weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
    {loss}"""
FOLD_CONV = ('layer { name: "conv" type: "Convolution" bottom: "x" top: "c" '
             'convolution_param { num_output: 5 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }')
FOLD_LOSS = 'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }'
FOLD_CASES = {  # name: (phase, net fields, a callback, how many layers BatchNorm folds in: Scale, ReLU)
    "train": (TRAIN, {}, False, 2),
    "deploy, no bias": (TEST, {"force": "", "loss": "", "bias": "false"}, False, 2),
    "a leaky ReLU": (TRAIN, {"relu": "relu_param { negative_slope: 0.25 }"}, False, 2),
    "a ReLU keeping its bottom": (TRAIN, {"relu": "relu_param { negative_slope: -0.5 }"}, False, 1),
    "a ReLU not in place": (TRAIN, {"relu_top": "r"}, False, 1),
    "a callback": (TRAIN, {}, True, 0),
    # BatchNorm's backward does not run (nothing below learns, its statistics say lr_mult 0: Caffe
    # reads the net's specs), so it keeps no copy; Scale's does
    "input-fed": (TRAIN, {"force": "", "below": 'layer { name: "conv" type: "Power" bottom: "x" top: "c" }',
                          "bn": "param { lr_mult: 0 } param { lr_mult: 0 } param { lr_mult: 0 }"}, False, 0),
    "scale over two axes": (TRAIN, {"scale": "axis: 1 num_axes: 2"}, False, 0),
    "batch norm not in place": (TRAIN, {"top": "b"}, False, 0),
}


def _fold_net(phase, fields, backend=None):
    text = FOLD_NET.format(**{"force": "force_backward: true", "below": FOLD_CONV, "top": "c", "bias": "true",
                              "scale": "", "bn": "", "relu": "", "relu_top": fields.get("top", "c"), "loss": FOLD_LOSS,
                              **fields})
    return espresso.Net(parse_text(text, caffe_pb2.NetParameter()), phase, dtype=np.float64, backend=backend)


@NO_GPP
@pytest.mark.parametrize("case", FOLD_CASES)
def test_batch_norm_folds_the_layers_after_it_with_the_results_of_each(case, monkeypatch, request):
    """BatchNorm, Scale and ReLU in place (ResNet's): with the channel kernels (emulated,
    patched into the CPU backend) BatchNorm's kernel does the Scale's and the ReLU's work too
    where it may; outputs and gradients are those of the layers apart (the CPU's xp code), and
    so are forwards that stop at the BatchNorm or the Scale (folding less) or start at the Scale
    or the ReLU (folding nothing).  Where it may not, nothing folds."""
    phase, fields, callback, folds = FOLD_CASES[case]
    rng = np.random.default_rng(13)
    x, label = rng.standard_normal((4, 3, 6, 6)), np.array([0, 1, 1, 0])
    params, top = {}, fields.get("top", "c")

    def results():
        """The outputs and gradients of a whole pass, then the blob after forwards that stop at
        the BatchNorm and at the Scale, then the output of ones that start at the Scale and at
        the ReLU; BatchNorm's folds in each of these, then the Scale's and the ReLU's; the net."""
        net = _fold_net(phase, fields)
        for name, blobs in net.params.items():
            params.setdefault(name, [rng.random(b.data.shape) + 0.5 for b in blobs])
            for blob, values in zip(blobs, params[name]):
                blob.data[...] = values
        net.blobs["x"].data[...] = x
        net.blobs["label"].data[...] = label
        if callback:
            net.after_forward(lambda i: None)
        net.forward()
        out = [net.blobs["ip"].data.copy()]
        if phase == TRAIN:
            net.backward()
            out += [b.diff.copy() for blobs in net.params.values() for b in blobs] + [net.blobs["x"].diff.copy()]
        bn, scale, relu = (net.layer_dict[name] for name in ("bn", "scale", "relu"))
        flags = [bn.fold]
        for end in ("bn", "scale"):
            net.forward(end=end)
            out.append(net.blobs[top].data.copy())
            flags.append(bn.fold)
        for start in ("scale", "relu"):
            net.forward(start=start)
            out.append(net.blobs["ip"].data.copy())
            flags += [scale.fold, relu.fold]
        return out, flags, net

    apart, apart_folds, _ = results()  # (before the patch: a layer looks its kernels up as it runs)
    monkeypatch.setattr(CUDA, "_launch", request.getfixturevalue("emulator").launch)
    for name in CHANNEL_KERNELS:
        monkeypatch.setattr(CPU, name, getattr(CUDA, name))
    folded, fold_flags, net = results()
    links = [layer.fold_followers or layer.fold_leader for layer in map(net.layer_dict.get, ("bn", "scale", "relu"))]
    paired = folds or (2 if callback else 0)  # (paired at build; a callback stops it per call)
    assert links == [paired, min(paired, 1), 2 if paired > 1 else 0]
    assert fold_flags == [folds, 0, min(folds, 1)] + [False] * 4 and not any(apart_folds)
    assert len(folded) == len(apart)
    for k, (g, w) in enumerate(zip(folded, apart)):  # (absolute: conv's bias gradient cancels to rounding)
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12, err_msg=f"result {k}")


@NO_GPP
def test_a_stand_in_for_any_layer_of_a_fold_undoes_it(monkeypatch, request):
    monkeypatch.setattr(CUDA, "_launch", request.getfixturevalue("emulator").launch)
    for name in CHANNEL_KERNELS:
        monkeypatch.setattr(CPU, name, getattr(CUDA, name))
    def links(net):
        return [(layer.fold_followers, layer.fold_leader) for layer in net.engine_layers[2:5]]

    for index in (2, 3, 4):  # the BatchNorm, the Scale, the ReLU
        net = _fold_net(TRAIN, {})
        assert links(net) == [(2, 0), (0, 1), (0, 2)]
        layer = net.engine_layers[index]
        stand_in = type(layer)(layer.lp, layer.backend, layer.phase, dtype=layer.dtype)
        stand_in.setup_all(net.bottom_vecs[index], net.top_vecs[index])
        net.replace_layer(index, stand_in)
        assert links(net) == [(0, 0)] * 3
        net.forward()
        assert not any(layer.fold for layer in net.engine_layers)


class _Delegate:
    """A stand-in that runs the layer it replaces (as the compressed runtime's wrappers do)."""

    def __init__(self, inner):
        self.inner, self.loss_weights, self.is_loss = inner, inner.loss_weights, inner.is_loss

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, bottom, top):
        self.inner.forward(bottom, top)


def _filled_fold_net():
    net = _fold_net(TRAIN, {})
    rng = np.random.default_rng(18)
    for blobs in net.params.values():
        for blob in blobs:
            blob.data[...] = rng.random(blob.shape) + 0.5
    net.blobs["x"].data[...] = rng.standard_normal((4, 3, 6, 6))
    net.blobs["label"].data[...] = [0, 1, 1, 0]
    return net


def _pass(net):
    net.forward()
    net.backward()
    return [net.blobs["ip"].data.copy()] + [b.diff.copy() for blobs in net.params.values() for b in blobs]


@NO_GPP
@pytest.mark.parametrize("index", [2, 3, 4])  # the BatchNorm, the Scale, the ReLU
def test_a_stand_in_running_the_replaced_layer_does_that_layers_work_alone(index, monkeypatch, request):
    """After a forward that folded, a stand-in running the replaced layer: that layer must not
    keep its fold (BatchNorm would apply the Scale and ReLU twice, a Scale or ReLU skip its work)
    nor another layer's copy of its bottom."""
    want = _pass(_filled_fold_net())  # the CPU's xp code, nothing folded
    monkeypatch.setattr(CUDA, "_launch", request.getfixturevalue("emulator").launch)
    for name in CHANNEL_KERNELS:
        monkeypatch.setattr(CPU, name, getattr(CUDA, name))
    net = _filled_fold_net()
    net.forward()
    assert net.layer_dict["bn"].fold == 2
    net.replace_layer(index, _Delegate(net.engine_layers[index]))
    for k, (g, w) in enumerate(zip(_pass(net), want)):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12, err_msg=f"result {k}")


@NO_GPP
def test_a_replayed_forward_sets_what_the_backward_reads(monkeypatch, request):
    """A graph replay runs no Python, so the per-call decisions (which copy Scale's gradient
    reads, what folds) are made before it: after a replayed forward that starts at the Scale,
    the Scale reads its own copy, not BatchNorm's from the forward before."""
    monkeypatch.setattr(CUDA, "_launch", request.getfixturevalue("emulator").launch)
    for name in CHANNEL_KERNELS:
        monkeypatch.setattr(CPU, name, getattr(CUDA, name))
    net = _filled_fold_net()
    scale = net.layer_dict["scale"]
    net.forward()
    assert scale.bottom_copy is net.layer_dict["bn"].x_norm and scale.fold
    monkeypatch.setattr(net, "eager_reason", lambda start, end: None)
    monkeypatch.setattr(net._graphs, "run", lambda key, run: None)  # a replay: no layer's Python runs
    net.forward(start="scale")
    assert scale.bottom_copy is None and not scale.fold


SUM_RELU_NET = """force_backward: true
    layer { name: "data" type: "Input" top: "x" top: "label"
            input_param { shape { dim: 4 dim: 3 dim: 6 dim: 6 } shape { dim: 4 } } }
    layer { name: "conv" type: "Convolution" bottom: "x" top: "c"
            convolution_param { num_output: 3 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 } } }
    layer { name: "sum" type: "Eltwise" bottom: "c" bottom: "x" %s top: "s" %s }
    layer { name: "relu" type: "ReLU" bottom: "s" top: "%s" %s }
    layer { name: "ip" type: "InnerProduct" bottom: "%s" top: "ip"
            inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.3 } } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }"""
SUM_RELU_CASES = {  # name: (a third bottom, eltwise_param, the ReLU's top, relu_param, whether it folds)
    "ResNet's": ("", "", "s", "", True),
    "a leaky ReLU": ("", "", "s", "relu_param { negative_slope: 0.25 }", True),
    "weighted": ("", "eltwise_param { coeff: 1 coeff: 2 }", "s", "", False),
    "three bottoms": ('bottom: "c"', "", "s", "", False),
    "a ReLU keeping its bottom": ("", "", "s", "relu_param { negative_slope: -0.5 }", False),
    "a ReLU not in place": ("", "", "r", "", False),
}


def _add_relu_on_the_host(a, b, y, slope):
    """A stand-in for the CUDA add_relu (a CuPy kernel, not emulated): the two layers' steps."""
    np.add(a, b, out=y)
    np.add(np.maximum(y, 0), slope * np.minimum(y, 0), out=y)


def _filled_sum_relu_net(text, backend=None):
    """A SUM_RELU_NET or IP_RELU_NET in float64 with its params, input and labels set (the same every call)."""
    net = espresso.Net(parse_text(text, caffe_pb2.NetParameter()), TRAIN, dtype=np.float64, backend=backend)
    for k, blobs in enumerate(net.params.values()):
        for blob in blobs:
            blob.data[...] = np.random.default_rng(k).standard_normal(blob.shape)
    net.blobs["x"].data[...] = np.random.default_rng(15).standard_normal((4, 3, 6, 6))
    net.blobs["label"].data[...] = [0, 1, 1, 0]
    return net


def _check_relu_fold(text, leader, folds, monkeypatch, kernel, stand_in):
    """Layer `leader` of `text` and the ReLU "relu" after it, run as one where the CPU backend
    takes `stand_in` as its fused kernel `kernel` (when `folds`), give the results of the two
    layers apart; a forward that stops at the leader or starts at the ReLU does not fold."""
    def results():
        net = _filled_sum_relu_net(text)
        net.forward()
        net.backward()
        out = [net.blobs["ip"].data.copy(), net.blobs["x"].diff.copy()]
        out += [b.diff.copy() for blobs in net.params.values() for b in blobs]
        first, relu = net.layer_dict[leader], net.layer_dict["relu"]
        flags = [first.fold, relu.fold]
        net.forward(end=leader)
        flags.append(first.fold)
        net.forward(start="relu")
        return out + [net.blobs["ip"].data.copy()], flags + [relu.fold], [first.fold_followers, relu.fold_leader]

    apart, apart_flags, apart_links = results()
    monkeypatch.setattr(CPU, kernel, stand_in)
    folded, flags, links = results()
    assert links == [folds, folds] and apart_links == [0, 0] and not any(apart_flags)
    assert flags == [folds, folds, 0, False]
    for k, (g, w) in enumerate(zip(folded, apart)):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14, err_msg=f"result {k}")


@pytest.mark.parametrize("case", SUM_RELU_CASES)
def test_an_eltwise_sum_folds_the_relu_after_it(case, monkeypatch):
    """An unweighted two-bottom Eltwise SUM then an in-place ReLU (ResNet's shortcut): on a
    backend with add_relu the sum does the ReLU's work too, in a forward that runs both; the
    results are the layers' apart.  Weighted sums, more bottoms and ReLUs that keep their bottom
    or write elsewhere do not fold."""
    third, param, relu_top, relu_param, folds = SUM_RELU_CASES[case]
    text = SUM_RELU_NET % (third, param, relu_top, relu_param, relu_top)
    _check_relu_fold(text, "sum", folds, monkeypatch, "add_relu", _add_relu_on_the_host)


IP_RELU_NET = """force_backward: true
    layer { name: "data" type: "Input" top: "x" top: "label"
            input_param { shape { dim: 4 dim: 3 dim: 6 dim: 6 } shape { dim: 4 } } }
    layer { name: "hidden" type: "InnerProduct" bottom: "x" top: "h"
            inner_product_param { num_output: 7 %s weight_filler { type: "gaussian" std: 0.3 } } }
    layer { name: "relu" type: "ReLU" bottom: "h" top: "%s" %s }
    layer { name: "ip" type: "InnerProduct" bottom: "%s" top: "ip"
            inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.3 } } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }"""
IP_RELU_CASES = {  # name: (inner_product_param, the ReLU's top, relu_param, whether it folds)
    "LeNet's": ("bias_filler { type: 'gaussian' }", "h", "", True),
    "a leaky ReLU": ("bias_filler { type: 'gaussian' }", "h", "relu_param { negative_slope: 0.25 }", True),
    "no bias": ("bias_term: false", "h", "", False),
    "a ReLU keeping its bottom": ("", "h", "relu_param { negative_slope: -0.5 }", False),
    "a ReLU not in place": ("", "r", "", False),
}


def _matmul_bias_relu_on_the_host(a, b, bias, out, slope):
    """A stand-in for the CUDA matmul_bias_relu: the InnerProduct's and the ReLU's steps."""
    CPU.matmul_bias(a, b, bias, out)
    np.add(np.maximum(out, 0), slope * np.minimum(out, 0), out=out)


@pytest.mark.parametrize("case", IP_RELU_CASES)
def test_an_inner_product_folds_the_relu_after_it(case, monkeypatch):
    """An InnerProduct with a bias then an in-place ReLU (LeNet's ip1): on a backend with
    matmul_bias_relu the product does the ReLU's work too, as the Eltwise SUM above."""
    param, relu_top, relu_param, folds = IP_RELU_CASES[case]
    text = IP_RELU_NET % (param, relu_top, relu_param, relu_top)
    _check_relu_fold(text, "hidden", folds, monkeypatch, "matmul_bias_relu", _matmul_bias_relu_on_the_host)


@pytest.mark.parametrize("name", ["hidden", "relu"])
def test_a_stand_in_for_a_folded_inner_product_or_relu_undoes_the_fold(name, monkeypatch):
    """The compressed runtime replaces an InnerProduct and its ReLU by stand-ins that run them:
    after that, each does its own work (no ReLU skipped, none applied twice)."""
    text = IP_RELU_NET % ("", "h", "", "h")

    def results(net):
        net.forward()
        net.backward()
        return [net.blobs["ip"].data.copy(), net.blobs["x"].diff.copy()]

    want = results(_filled_sum_relu_net(text))
    monkeypatch.setattr(CPU, "matmul_bias_relu", _matmul_bias_relu_on_the_host)
    net = _filled_sum_relu_net(text)
    results(net)
    assert net.layer_dict["hidden"].fold == 1
    index = list(net.layer_dict).index(name)
    net.replace_layer(index, _Delegate(net.engine_layers[index]))
    got = results(net)
    assert not net.layer_dict["hidden"].fold and not net.layer_dict["relu"].fold
    for k, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14, err_msg=f"result {k}")


@gpu_test
@pytest.mark.parametrize("text, leader", [(SUM_RELU_NET % ("", "", "s", "", "s"), "sum"),
                                          (IP_RELU_NET % ("", "h", "", "h"), "hidden")])
def test_a_relu_folds_on_a_gpu_as_the_cpu_computes_both_layers(text, leader):
    nets = []
    for device in ("cpu", "cuda:0"):
        net = _filled_sum_relu_net(text, backends.get(device))
        net.forward()
        net.backward()
        nets.append(net)
    cpu, gpu = nets
    assert gpu.layer_dict[leader].fold and not cpu.layer_dict[leader].fold
    assert_matches(gpu.blobs["ip"].host_data(), cpu.blobs["ip"].host_data(), np.float64, f"{leader} + ReLU: ip")
    np.testing.assert_allclose(gpu.blobs["x"].host_diff(), cpu.blobs["x"].host_diff(), rtol=1e-9, atol=1e-12)


@gpu_test
@pytest.mark.parametrize("slope", [0.0, 0.25])
def test_add_relu_on_a_gpu(slope):
    """Also ReLU's own kernel; a NaN stays a NaN in both, as in Caffe (std::max) and on the CPU."""
    gpu = backends.get("cuda:0")
    rng = np.random.default_rng(16)
    a, b = (rng.standard_normal(1000).astype(np.float32) for _ in range(2))
    a[7] = np.nan
    want = a + b
    want = np.maximum(want, 0) + np.float32(slope) * np.minimum(want, 0)
    ga = gpu.to_device(a)
    gpu.k.add_relu(ga, gpu.to_device(b), ga, slope)  # in place, as the Eltwise runs
    np.testing.assert_array_equal(gpu.to_host(ga), want)
    y = gpu.xp.empty_like(ga)
    gpu.k.relu_forward(gpu.to_device(a + b), y, slope)
    np.testing.assert_array_equal(gpu.to_host(y), want)


@pytest.mark.parametrize("slope", [0.0, 0.25])
def test_batch_norms_folded_relu_keeps_nan(dev, slope):
    """The ReLU folded into BatchNorm's kernel: a NaN stays a NaN, as in Caffe and on the CPU."""
    x = rand((2, 3, 5), 17, np.float32)
    x[1, 2, 3] = np.nan
    want = np.maximum(x, 0) + np.float32(slope) * np.minimum(x, 0)
    ones, zeros = np.ones(3, np.float32), np.zeros(3, np.float32)
    y = dev.poisoned(x.shape, np.float32)
    dev.k.batch_norm_forward(dev.put(x), dev.put(zeros), dev.put(ones), y, None, x.shape, dev.put(ones),
                             dev.put(zeros), slope)
    np.testing.assert_array_equal(dev.get(y), want)


def test_a_folding_net_is_freed_without_the_cycle_collector(monkeypatch):
    """BatchNorm holds its Scale's blobs, not the Scale: no reference cycle keeps a deleted net's
    memory (on a GPU, what the next net's memory limit is read from)."""
    import gc
    import weakref

    for name in CHANNEL_KERNELS:  # (enough to fold: nothing runs)
        monkeypatch.setattr(CPU, name, getattr(CUDA, name))
    net = _fold_net(TRAIN, {})
    assert net.layer_dict["bn"].fold_followers == 2
    layer = weakref.ref(net.layer_dict["bn"])
    gc.disable()
    try:
        del net
        assert layer() is None
    finally:
        gc.enable()


@gpu_test
@pytest.mark.parametrize("phase", [TRAIN, TEST])
def test_batch_norm_folds_its_scale_on_a_gpu_as_the_cpu_computes_both(phase):
    train = phase == TRAIN
    rng = np.random.default_rng(14)
    x, label = rng.standard_normal((4, 3, 6, 6)), np.array([0, 1, 1, 0])
    nets = []
    for device in ("cpu", "cuda:0"):
        net = _fold_net(phase, {} if train else {"force": "", "loss": ""}, backends.get(device))
        for blobs in net.params.values():
            for blob in blobs:
                blob.data[...] = np.random.default_rng(blob.count).random(blob.shape) + 0.5
        net.blobs["x"].data[...] = x
        net.blobs["label"].data[...] = label
        net.forward()
        if train:
            net.backward()
        nets.append(net)
    cpu, gpu = nets
    assert gpu.layer_dict["bn"].fold and not cpu.layer_dict["bn"].fold
    assert_matches(gpu.blobs["ip"].host_data(), cpu.blobs["ip"].host_data(), np.float64, "folded on a GPU: ip")
    if train:
        for name in cpu.params:
            for a, b in zip(cpu.params[name], gpu.params[name]):
                np.testing.assert_allclose(b.host_diff(), a.host_diff(), rtol=1e-9, atol=1e-12, err_msg=name)


def _reference_convolution(x, w, bias, stride, pad, dilation, groups):
    """The 2-D convolution in float64, a tap at a time over the zero-padded image."""
    n, _, height, width = x.shape
    filters, group_channels, kernel_h, kernel_w = w.shape
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad[0],) * 2, (pad[1],) * 2))
    out = [(s + 2 * p - d * (k - 1) - 1) // t + 1
           for s, k, t, p, d in zip((height, width), (kernel_h, kernel_w), stride, pad, dilation)]
    y = np.zeros((n, groups, filters // groups, *out))
    for ky in range(kernel_h):
        for kx in range(kernel_w):
            top, left = ky * dilation[0], kx * dilation[1]
            patch = padded[:, :, top:top + stride[0] * (out[0] - 1) + 1:stride[0],
                           left:left + stride[1] * (out[1] - 1) + 1:stride[1]]
            taps = w[:, :, ky, kx].reshape(groups, filters // groups, group_channels)
            y += np.einsum("gmc,ngcyx->ngmyx", taps, patch.reshape(n, groups, group_channels, *out))
    y = y.reshape(n, filters, *out)
    return y if bias is None else y + bias[:, None, None]


# x, w shapes, stride, pad, dilation, groups; with the lanes (threads per position) each takes
DIRECT_CASES = [((2, 3, 9, 8), (4, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1),  # 4 lanes
                ((1, 4, 11, 7), (6, 2, 5, 3), (2, 1), (0, 2), (1, 2), 2),  # groups, strides, dilation: 4
                ((64, 1, 28, 28), (20, 1, 5, 5), (1, 1), (0, 0), (1, 1), 1),  # LeNet's conv1 at b64: 1
                ((1, 20, 12, 12), (50, 20, 5, 5), (1, 1), (0, 0), (1, 1), 1),  # LeNet's conv2 at b1: 32
                ((2, 48, 6, 6), (3, 48, 5, 5), (1, 1), (1, 1), (1, 1), 1)]  # 1200 taps: two tables, 32


@pytest.mark.parametrize("x_shape, w_shape, stride, pad, dilation, groups", DIRECT_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_direct_conv_forward(dev, x_shape, w_shape, stride, pad, dilation, groups, dtype, with_bias):
    x, w = rand(x_shape, 1, dtype), rand(w_shape, 2, dtype)
    bias = rand(w_shape[:1], 3, dtype) if with_bias else None
    want = _reference_convolution(x, w, bias, stride, pad, dilation, groups)
    y = dev.poisoned(want.shape, dtype)
    dev.k.direct_conv_forward(dev.put(x), dev.put(w), None if bias is None else dev.put(bias), y, stride, pad,
                              dilation, groups)
    assert_matches(dev.get(y), want, dtype, f"direct convolution {x_shape} * {w_shape} {dtype.__name__}")


# x, dw shapes, stride, pad, dilation, groups: filters of at most 32 taps
GRAD_CASES = [((2, 1, 9, 8), (4, 1, 3, 3), (1, 1), (1, 1), (1, 1), 1),
              ((2, 4, 7, 6), (6, 2, 2, 3), (2, 1), (1, 0), (1, 2), 2),
              ((8, 1, 28, 28), (20, 1, 5, 5), (1, 1), (0, 0), (1, 1), 1)]  # LeNet's conv1 at b8: 2 slices


@pytest.mark.parametrize("x_shape, w_shape, stride, pad, dilation, groups", GRAD_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_direct_conv_weight_grad(dev, x_shape, w_shape, stride, pad, dilation, groups, dtype, with_bias):
    x, w = rand(x_shape, 1, dtype), rand(w_shape, 2, dtype)
    dy = rand(_reference_convolution(x, w, None, stride, pad, dilation, groups).shape, 3, dtype)
    dw, db = rand(w_shape, 4, dtype), rand(w_shape[:1], 5, dtype)  # accumulated into, as Caffe's diffs
    want_dw = dw + _reference_weight_grad(x, dy, w_shape, stride, pad, dilation, groups)
    want_db = db + dy.astype(np.float64).sum(axis=(0, 2, 3))
    got_dw, got_db = dev.put(dw), dev.put(db)
    dev.k.direct_conv_weight_grad(dev.put(x), dev.put(dy), got_dw, got_db if with_bias else None, stride, pad,
                                  dilation, groups)
    what = f"direct weight gradient {x_shape} * {w_shape} {dtype.__name__}"
    assert_matches(dev.get(got_dw), want_dw, dtype, what)
    assert_matches(dev.get(got_db), want_db if with_bias else db, dtype, what + " bias")


def _reference_weight_grad(x, dy, w_shape, stride, pad, dilation, groups):
    """The weight gradient in float64, a tap at a time (as _reference_convolution)."""
    n, filters, out_h, out_w = dy.shape
    group_channels, kernel_h, kernel_w = w_shape[1:]
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad[0],) * 2, (pad[1],) * 2))
    dw = np.zeros(w_shape)
    g = dy.astype(np.float64).reshape(n, groups, filters // groups, out_h, out_w)
    for ky in range(kernel_h):
        for kx in range(kernel_w):
            top, left = ky * dilation[0], kx * dilation[1]
            patch = padded[:, :, top:top + stride[0] * (out_h - 1) + 1:stride[0],
                           left:left + stride[1] * (out_w - 1) + 1:stride[1]]
            patch = patch.reshape(n, groups, group_channels, out_h, out_w)
            dw[:, :, ky, kx] = np.einsum("ngmyx,ngcyx->gmc", g, patch).reshape(filters, group_channels)
    return dw


def test_direct_convolution_lanes_and_checks():
    # positions (images x groups x blocks of 4 filters x output pixels) and taps of DIRECT_CASES
    assert [CUDA._direct_lanes(*case) for case in [(144, 27), (56, 30), (184320, 25), (832, 500)]] == [4, 4, 1, 32]
    x, w = np.zeros((1, 4, 8, 8), np.float32), np.zeros((6, 2, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"y should be \(1, 6, 6, 6\)"):
        CUDA.direct_conv_forward(x, w, None, np.zeros((1, 6, 8, 8), np.float32), (1, 1), (0, 0), (1, 1), 2)
    with pytest.raises(ValueError, match="do not fit"):  # 4 channels are not 3 groups of 2
        CUDA.direct_conv_forward(x, w, None, np.zeros((1, 6, 6, 6), np.float32), (1, 1), (0, 0), (1, 1), 3)
    with pytest.raises(ValueError, match="4-D"):
        CUDA.direct_conv_forward(x[0], w, None, np.zeros((6, 6, 6), np.float32), (1, 1), (0, 0), (1, 1), 2)
    big = np.zeros((6, 4, 3, 3), np.float32)  # 36 taps: more than the weight gradient's 32
    with pytest.raises(ValueError, match="at most 32 taps"):
        CUDA.direct_conv_weight_grad(x, np.zeros((1, 6, 6, 6), np.float32), big, None, (1, 1), (0, 0), (1, 1), 1)


def test_primitive_argument_checks(dev):
    x = dev.put(rand((2, 3, 5, 5), 0, np.float32))
    with pytest.raises(TypeError, match="one float type"):
        dev.k.ave_pool_forward(x, dev.poisoned((2, 3, 2, 2), np.float64), (2, 2), (2, 2), (0, 0))
    with pytest.raises(ValueError, match="elements"):
        dev.k.im2col(x, dev.poisoned((2, 10), np.float32), (2, 2), (1, 1), (0, 0), (1, 1))
    with pytest.raises(ValueError, match="spatial"):
        dev.k.ave_pool_forward(dev.put(rand((1, 1, 2, 2, 2, 2), 0, np.float32)),
                               dev.poisoned((1, 1, 1, 1, 1, 1), np.float32), (2,) * 4, (2,) * 4, (0,) * 4)
    strided = dev.poisoned((2, 3, 4, 4), np.float32)[:, :, ::2, ::2]
    with pytest.raises(ValueError, match="contiguous"):
        dev.k.ave_pool_forward(x, strided, (2, 2), (2, 2), (0, 0))
    y = dev.poisoned((2, 3, 2, 2), np.float32)  # a strided input is copied, not refused
    strided = dev.put(rand((2, 3, 10, 10), 1, np.float32))[:, :, ::2, ::2]
    dev.k.ave_pool_forward(strided, y, (2, 2), (2, 2), (0, 0))
    assert np.isfinite(dev.get(y)).all()


# *** the backend object ***
@gpu_test
def test_backend_contract():
    import cupy

    gpu = backends.get("cuda:0")
    assert gpu.xp is cupy and gpu.k is CUDA and gpu.name == "cuda:0"
    scalar = gpu.to_device(np.float64(2.5))
    assert isinstance(scalar, cupy.ndarray) and scalar.shape == ()
    a = gpu.to_device(np.arange(12.0).reshape(3, 4).T, np.float32)
    assert a.dtype == np.float32 and a.flags.c_contiguous
    assert isinstance(gpu.to_host(a), np.ndarray)
    assert np.array_equal(gpu.to_host(a), np.arange(12.0).reshape(3, 4).T)
    gpu.seed(5)
    first = gpu.to_host(gpu.rng.random(8))
    out = cupy.empty(8, np.float32)
    gpu.rng.random(out=out, dtype=np.float32)
    gpu.seed(5)
    assert np.array_equal(gpu.to_host(gpu.rng.random(8)), first)
    gpu.synchronize()
    info = gpu.describe()
    assert {"Device", "Memory", "Driver", "Runtime", "CuPy"} <= set(info), info
    espresso.set_mode_gpu()
    try:
        assert isinstance(Blob((2, 3)).data, cupy.ndarray)
    finally:
        espresso.set_mode_cpu()


# *** layers, CPU vs CUDA ***
GAUSS = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 }'


def normal(*shape):
    return lambda r: r.standard_normal(shape)


def positive(*shape):
    return lambda r: r.random(shape) + 0.1


def labels(classes, *shape):
    return lambda r: r.integers(0, classes, shape).astype(np.float64)


def case(name, snippet, bottoms, down=None, phase=TRAIN, tops=None, grad=True, positive_params=False):
    """One layer configuration: bottoms are functions of a Generator; down says which bottoms
    get gradients (default: all); grad False skips backward."""
    return pytest.param(snippet, bottoms, down, phase, tops, grad, positive_params, id=name)


def recurrent(kind):
    fillers = 'weight_filler { type: "gaussian" std: 0.6 } bias_filler { type: "uniform" min: -0.5 max: 0.5 }'
    cont = lambda r: np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])  # noqa: E731
    return case(kind, f'type: "{kind}" recurrent_param {{ num_output: 3 {fillers} }}',
                [normal(3, 2, 4), cont], down=[True, False])


def conv(params, kind="Convolution"):
    return f'type: "{kind}" convolution_param {{ {params} {GAUSS} }}'


def pool(params):
    return f'type: "Pooling" pooling_param {{ {params} }}'


LAYERS = [
    case("conv", conv("num_output: 4 kernel_size: 3 pad: 1 stride: 2"), [normal(2, 3, 9, 8)]),
    case("conv-batch-major", conv("num_output: 3 kernel_size: 3"), [normal(2, 2, 20, 20)]),
    case("conv-group-dilation", conv("num_output: 6 kernel_size: 3 group: 3 dilation: 2 pad: 2"),
         [normal(2, 6, 8, 7)]),
    case("conv-1x1", conv("num_output: 5 kernel_size: 1"), [normal(2, 4, 16, 17)]),
    case("conv-hw", conv("num_output: 3 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0"),
         [normal(2, 3, 7, 6)]),
    case("conv-1d", conv("num_output: 4 kernel_size: 3 pad: 1"), [normal(2, 3, 11)]),
    case("conv-3d", conv("num_output: 3 kernel_size: 2 pad: 1"), [normal(2, 2, 4, 5, 3)]),
    case("deconv", conv("num_output: 3 kernel_size: 3 stride: 2 pad: 1", "Deconvolution"),
         [normal(2, 4, 5, 4)]),
    case("deconv-group", conv("num_output: 4 kernel_size: 2 stride: 2 group: 2", "Deconvolution"),
         [normal(2, 4, 3, 3)]),
    case("im2col", 'type: "Im2col" convolution_param { kernel_size: 3 stride: 2 pad: 1 }',
         [normal(2, 3, 7, 6)]),
    case("pool-max", pool("pool: MAX kernel_size: 3 stride: 2"), [normal(2, 3, 9, 8)]),
    case("pool-max-pad-mask", pool("pool: MAX kernel_size: 3 stride: 2 pad: 1"), [normal(2, 3, 7, 6)],
         tops=2),
    case("pool-max-stride>kernel", pool("pool: MAX kernel_size: 2 stride: 3"), [normal(2, 2, 8, 10)]),
    case("pool-ave-pad", pool("pool: AVE kernel_size: 3 stride: 2 pad: 1"), [normal(2, 3, 7, 6)]),
    case("pool-ave-global", pool("pool: AVE global_pooling: true"), [normal(2, 3, 5, 4)]),
    case("pool-stochastic-test", pool("pool: STOCHASTIC kernel_size: 2 stride: 2"), [positive(2, 3, 6, 5)],
         phase=TEST, grad=False),
    case("spp", 'type: "SPP" spp_param { pyramid_height: 2 pool: MAX }', [normal(2, 3, 7, 6)]),
    case("lrn-across", 'type: "LRN" lrn_param { local_size: 5 alpha: 0.1 beta: 0.75 k: 2 }',
         [normal(2, 7, 4, 5)]),
    case("lrn-within", 'type: "LRN" lrn_param { local_size: 3 alpha: 0.1 beta: 0.75 '
         'norm_region: WITHIN_CHANNEL }', [normal(2, 3, 5, 4)]),
    case("crop", 'type: "Crop" crop_param { axis: 2 offset: 1 }', [normal(2, 3, 7, 6), normal(2, 3, 4, 4)],
         down=[True, False]),
    case("inner-product", f'type: "InnerProduct" inner_product_param {{ num_output: 5 {GAUSS} }}',
         [normal(3, 4, 2, 2)]),
    case("inner-product-transpose",
         f'type: "InnerProduct" inner_product_param {{ num_output: 5 transpose: true {GAUSS} }}',
         [normal(3, 6)]),
    case("relu", 'type: "ReLU"', [normal(2, 3, 4)]),
    case("relu-leaky", 'type: "ReLU" relu_param { negative_slope: 0.1 }', [normal(2, 3, 4)]),
    case("prelu", 'type: "PReLU"', [normal(2, 3, 4)]),
    case("prelu-shared", 'type: "PReLU" prelu_param { channel_shared: true }', [normal(2, 3, 4)]),
    case("elu", 'type: "ELU" elu_param { alpha: 0.7 }', [normal(2, 3, 4)]),
    case("sigmoid", 'type: "Sigmoid"', [normal(2, 3, 4)]),
    case("tanh", 'type: "TanH"', [normal(2, 3, 4)]),
    case("absval", 'type: "AbsVal"', [normal(2, 3, 4)]),
    case("power", 'type: "Power" power_param { power: 2 scale: 0.5 shift: 1 }', [normal(2, 3, 4)]),
    case("exp", 'type: "Exp" exp_param { base: 2 scale: 0.5 }', [normal(2, 3, 4)]),
    case("log", 'type: "Log" log_param { shift: 1 }', [positive(2, 3, 4)]),
    case("bnll", 'type: "BNLL"', [normal(2, 3, 4)]),
    case("threshold", 'type: "Threshold" threshold_param { threshold: 0.2 }', [normal(2, 3, 4)], grad=False),
    case("clip", 'type: "Clip" clip_param { min: -0.5 max: 0.5 }', [normal(2, 3, 4)]),
    case("swish", 'type: "Swish"', [normal(2, 3, 4)]),
    case("softmax", 'type: "Softmax"', [normal(3, 5, 2)]),
    case("softmax-axis2", 'type: "Softmax" softmax_param { axis: 2 }', [normal(2, 3, 4)]),
    case("softmax-loss", 'type: "SoftmaxWithLoss"', [normal(4, 5), labels(5, 4)], down=[True, False]),
    case("softmax-loss-ignore", 'type: "SoftmaxWithLoss" loss_weight: 1 loss_weight: 0 '
         'loss_param { ignore_label: 1 normalization: VALID }',
         [normal(2, 4, 3), labels(4, 2, 3)], down=[True, False], tops=2),
    case("euclidean-loss", 'type: "EuclideanLoss"', [normal(4, 3), normal(4, 3)]),
    case("sigmoid-cross-entropy", 'type: "SigmoidCrossEntropyLoss"',
         [normal(4, 3), lambda r: r.random((4, 3))],
         down=[True, False]),
    case("hinge-loss", 'type: "HingeLoss" hinge_loss_param { norm: L2 }', [normal(4, 5), labels(5, 4)],
         down=[True, False]),
    case("infogain-loss", 'type: "InfogainLoss"', [normal(4, 3), labels(3, 4), positive(3, 3)],
         down=[True, False, False]),
    case("multinomial-logistic", 'type: "MultinomialLogisticLoss"', [positive(4, 5), labels(5, 4, 1, 1, 1)],
         down=[True, False]),
    case("contrastive", 'type: "ContrastiveLoss" contrastive_loss_param { margin: 2 }',
         [normal(4, 3, 1, 1), normal(4, 3, 1, 1), labels(2, 4, 1, 1, 1)], down=[True, True, False]),
    case("accuracy", 'type: "Accuracy" accuracy_param { top_k: 2 }', [normal(6, 5), labels(5, 6)], tops=2,
         grad=False),
    # one top: the fused kernels; positions along an inner axis, ties (rounded scores), an ignored class
    case("accuracy-fused", 'type: "Accuracy" accuracy_param { top_k: 2 ignore_label: 1 }',
         [lambda r: np.round(r.standard_normal((7, 5, 3))), labels(5, 7, 3)], grad=False),
    case("accuracy-fused-top1", 'type: "Accuracy"', [normal(64, 10), labels(10, 64)], grad=False),
    case("batchnorm-train", 'type: "BatchNorm"', [normal(4, 3, 2, 2)], positive_params=True),
    case("batchnorm-test", 'type: "BatchNorm"', [normal(4, 3, 2, 2)], phase=TEST, positive_params=True),
    case("batchnorm-train-parts", 'type: "BatchNorm"', [normal(2, 3, 70, 70)], positive_params=True),  # 2 parts
    case("scale-learned", 'type: "Scale" scale_param { axis: 1 num_axes: 1 bias_term: true }',
         [normal(2, 3, 4)]),
    case("scale-bottom", 'type: "Scale" scale_param { axis: 1 }', [normal(2, 3, 4), normal(3)]),
    case("bias", 'type: "Bias" bias_param { axis: 1 num_axes: 1 }', [normal(2, 3, 4)]),
    # 64 cells a channel: the sums by channel_sums (the cases above have too few, and take xp code)
    case("scale-learned-sums", 'type: "Scale" scale_param { axis: 1 num_axes: 1 bias_term: true }',
         [normal(4, 3, 4, 4)]),
    case("scale-bottom-sums", 'type: "Scale" scale_param { axis: 1 }', [normal(4, 3, 16), normal(3)]),
    case("bias-sums", 'type: "Bias" bias_param { axis: 1 num_axes: 1 }', [normal(4, 3, 16)]),
    case("mvn", 'type: "MVN"', [normal(2, 3, 4, 5)]),
    case("mvn-across", 'type: "MVN" mvn_param { across_channels: true normalize_variance: true }',
         [normal(2, 3, 4, 5)]),
    case("eltwise-sum", 'type: "Eltwise" eltwise_param { operation: SUM coeff: 1 coeff: -0.5 coeff: 2 }',
         [normal(2, 3, 4)] * 3),
    case("eltwise-prod", 'type: "Eltwise" eltwise_param { operation: PROD }', [normal(2, 3, 4)] * 3),
    case("eltwise-max", 'type: "Eltwise" eltwise_param { operation: MAX }', [normal(2, 3, 4)] * 3),
    case("concat", 'type: "Concat" concat_param { axis: 1 }',
         [normal(2, 1, 3), normal(2, 4, 3), normal(2, 2, 3)]),
    case("slice", 'type: "Slice" slice_param { axis: 1 slice_point: 1 slice_point: 3 }',
         [normal(2, 5, 3)], tops=3),
    case("split", 'type: "Split"', [normal(2, 3)], tops=2),
    case("flatten", 'type: "Flatten"', [normal(2, 3, 2, 2)]),
    case("reshape", 'type: "Reshape" reshape_param { shape { dim: 0 dim: -1 dim: 2 } }',
         [normal(2, 3, 2, 2)]),
    case("tile", 'type: "Tile" tile_param { axis: 1 tiles: 3 }', [normal(2, 3, 2)]),
    case("permute", 'type: "Permute" permute_param { order: 0 order: 3 order: 1 order: 2 }', [normal(2, 3, 4, 5)]),
    case("pad-constant", 'type: "Pad" pad_param { pad: [0, 0, 1, 2, 0, 1, 2, 0] value: 0.5 }',
         [normal(2, 3, 4, 5)]),
    case("pad-reflect", 'type: "Pad" pad_param { pad: [0, 0, 2, 1, 0, 0, 1, 3] mode: "reflect" }',
         [normal(2, 3, 4, 5)]),
    case("pad-edge", 'type: "Pad" pad_param { pad: [0, 0, 2, 1, 0, 0, 1, 3] mode: "edge" }', [normal(2, 3, 4, 5)]),
    case("upsample-nearest", 'type: "Upsample" upsample_param { height: 8 width: 7 }', [normal(2, 3, 4, 5)]),
    case("upsample-linear", 'type: "Upsample" upsample_param { height: 9 width: 10 mode: "linear" }',
         [normal(2, 3, 4, 5)]),
    case("reduction-sumsq", 'type: "Reduction" reduction_param { operation: SUMSQ axis: 1 coeff: 0.5 }',
         [normal(2, 3, 4)]),
    case("reduction-asum", 'type: "Reduction" reduction_param { operation: ASUM axis: 0 }',
         [normal(2, 3, 4)]),
    case("argmax", 'type: "ArgMax" argmax_param { top_k: 2 out_max_val: true }', [normal(3, 7)], grad=False),
    case("argmax-axis", 'type: "ArgMax" argmax_param { axis: 1 }', [normal(3, 7, 2)], grad=False),
    case("dropout-test", 'type: "Dropout" dropout_param { dropout_ratio: 0.3 }',
         [normal(2, 3, 4)], phase=TEST),
    case("dropout-train-keep-all", 'type: "Dropout" dropout_param { dropout_ratio: 0 }', [normal(2, 3, 4)]),
    case("embed", f'type: "Embed" embed_param {{ num_output: 3 input_dim: 5 {GAUSS} }}',
         [lambda r: np.array([[0.0, 3.0, 3.0], [4.0, 0.0, 1.0]])], down=[False]),
    case("batch-reindex", 'type: "BatchReindex"',
         [normal(4, 2, 3), lambda r: np.array([3.0, 0.0, 3.0, 1.0, 0.0])],
         down=[True, False]),
    case("filter", 'type: "Filter"', [normal(4, 2), lambda r: np.array([[1.0], [0.0], [1.0], [1.0]])],
         down=[True, False]),
    recurrent("RNN"),
    recurrent("LSTM"),
    case("lstm-unit", 'type: "LSTMUnit"',
         [normal(1, 3, 2), normal(1, 3, 8), lambda r: np.array([[0.0, 1.0, 1.0]])],
         tops=2, down=[True, True, False]),
    case("parameter", 'type: "Parameter" parameter_param { shape { dim: 2 dim: 3 } }', []),
]


def _copy_params(cpu, gpu, rng, positive_params):
    """Random params (never all zero) on the CPU run, copied to the GPU run."""
    assert len(cpu.layer.blobs) == len(gpu.layer.blobs)
    for a, b in zip(cpu.layer.blobs, gpu.layer.blobs):
        values = rng.random(a.shape) + 0.5 if positive_params else rng.standard_normal(a.shape)
        a.data[...] = values
        b.data[...] = gpu.backend.to_device(a.data)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("snippet, bottoms, down, phase, tops, grad, positive_params", LAYERS)
@gpu_test
def test_layer_cpu_vs_cuda(snippet, bottoms, down, phase, tops, grad, positive_params, dtype):
    rng = np.random.default_rng(11)
    arrays = [make(rng) for make in bottoms]
    cpu = LayerRun(snippet, arrays, phase=phase, dtype=dtype, tops=tops)
    gpu = LayerRun(snippet, arrays, phase=phase, dtype=dtype, tops=tops, device="cuda:0")
    _copy_params(cpu, gpu, rng, positive_params)
    name = f"layer {snippet[:70]} {np.dtype(dtype)}"
    want, got = cpu.forward(), gpu.forward()
    for k, (g, w) in enumerate(zip(got, want)):
        assert_matches(g, w, dtype, f"{name} top {k}")
    for k, (a, b) in enumerate(zip(cpu.layer.blobs, gpu.layer.blobs)):
        assert_matches(b.host_data(), a.host_data(), dtype, f"{name} param {k} data after forward")
    if not grad:
        return
    diffs = [rng.standard_normal(w.shape) for w in want]
    down = down if down is not None else [True] * len(arrays)
    cpu.zero_param_diffs()
    gpu.zero_param_diffs()
    want_dx, got_dx = cpu.backward(diffs, down), gpu.backward(diffs, down)
    for k, flag in enumerate(down):
        if flag:
            assert_matches(got_dx[k], want_dx[k], dtype, f"{name} bottom {k} diff")
    for k, (g, w) in enumerate(zip(gpu.param_diffs(), cpu.param_diffs())):
        assert_matches(g, w, dtype, f"{name} param {k} diff")


CONV_CASES = [c for c in LAYERS if c.id.startswith(("conv", "deconv"))]


@pytest.mark.parametrize("snippet, bottoms, down, phase, tops, grad, positive_params", CONV_CASES)
@gpu_test
def test_conv_without_cudnn_cpu_vs_cuda(snippet, bottoms, down, phase, tops, grad, positive_params, monkeypatch):
    """The im2col + GEMM path, which runs where cuDNN is absent (the cases above take cuDNN
    where the GPU machine has it)."""
    monkeypatch.setattr(backends.get("cuda:0"), "cudnn", None)
    test_layer_cpu_vs_cuda(snippet, bottoms, down, phase, tops, grad, positive_params, np.float32)


@gpu_test
def test_matmul_bias_is_the_gemm_plus_the_bias_at_any_alignment(rng):
    """cuBLASLt's bias epilogue (InnerProduct's forward) on param-arena views at any offset,
    and the GEMM-and-add where the output is split (LeNet's ip1 at batch 64) or the bias is
    less than 16-byte aligned (offsets 1 and 3)."""
    gpu = backends.get("cuda:0")
    xp = gpu.xp
    for m, n, k, offset in [(1, 500, 800, 0), (1, 10, 500, 1), (64, 10, 500, 3), (5, 7, 3, 1), (64, 500, 800, 2)]:
        arena = xp.asarray(rng.standard_normal(n * k + n + 8).astype(np.float32))
        w, bias = arena[offset:offset + n * k].reshape(n, k), arena[offset + n * k:offset + n * k + n]
        x = xp.asarray(rng.standard_normal((m, k)).astype(np.float32))
        out = xp.full((m, n), np.nan, np.float32)
        gpu.blas.matmul_bias(x, w.T, bias, out)
        want = x.get().astype(np.float64) @ w.get().T.astype(np.float64) + bias.get()
        assert relative_error(out.get(), want) < 1e-6, (m, n, k, offset)
    plans = gpu.blas.biased.values()
    assert any(plan is not None for plan in plans) and any(plan is None for plan in plans)


@gpu_test
def test_accuracy_with_one_top_takes_the_fused_kernels():
    rng = np.random.default_rng(3)
    bottoms = [rng.standard_normal((8, 4)), rng.integers(0, 4, 8).astype(np.float64)]
    assert LayerRun('type: "Accuracy"', bottoms, device="cuda:0").layer.fused
    assert not LayerRun('type: "Accuracy"', bottoms, tops=2, device="cuda:0").layer.fused  # per-class: xp code
    assert not LayerRun('type: "Accuracy"', bottoms).layer.fused  # the CPU has no fused kernels


@gpu_test
def test_a_module_compiled_ahead_is_the_one_used():
    backends.get("cuda:0")
    family = ("lrn", "double", None)  # one no earlier test needed: compiled here
    CUDA._module.cache_clear()
    CUDA.compile_ahead(0, [family])
    ahead = CUDA._AHEAD[("lrn", 0, "double", None)]
    CUDA.finish_ahead()
    assert ahead.done() and ahead.exception() is None
    assert CUDA._module("lrn", 0, "double", None) is ahead.result()


@gpu_test
def test_2d_convolutions_take_cudnn_where_present():
    gpu = backends.get("cuda:0")
    if gpu.cudnn is None:
        pytest.skip("no libcudnn.so.9 on this GPU machine (install espresso-nn[cudnn])")
    run = LayerRun(conv("num_output: 4 kernel_size: 3 group: 2"), [np.ones((2, 4, 6, 6))], device="cuda:0")
    assert run.layer.plan is not None and run.layer.engines == [None, None]
    run.forward()
    assert run.layer.engines[0] in ("cudnn", "gemm", "direct") and run.layer.engines[1] is None
    assert "cuDNN" in gpu.describe() and gpu.describe()["cuDNN"].startswith("9.")


@gpu_test
def test_cudnns_explicit_gemm_and_outsized_workspaces_are_left_untimed():
    """CaffeNet's conv2 at batch 64: cuDNN offers its explicit GEMM there with more than
    TIMED_COLUMNS of columns (427 MiB on an H100); the plan leaves it out, and every
    option it keeps takes at most WORKSPACE_RATIO times the operands' bytes, Winograd (the
    fastest there, 139 MiB) among them."""
    from espresso.backend.cuda import cudnn

    gpu = backends.get("cuda:0")
    if gpu.cudnn is None:
        pytest.skip("no libcudnn.so.9 on this GPU machine (install espresso-nn[cudnn])")
    image, data, weights = (64, 96, 27, 27), (64, 256, 27, 27), (256, 48, 5, 5)
    plan = gpu.cudnn.plan(image, data, weights, (1, 1), (2, 2), (1, 1), 2, np.dtype(np.float32))
    size = ctypes.c_size_t()
    gpu.cudnn.call("cudnnGetConvolutionForwardWorkspaceSize", gpu.cudnn.handle, plan.tensor["image"],
                   plan.weights, plan.conv, plan.tensor["data"], cudnn.EXPLICIT_GEMM, ctypes.byref(size))
    assert size.value > cudnn.TIMED_COLUMNS
    options = dict(plan.options("Forward"))
    operands = 4 * sum(math.prod(shape) for shape in (image, data, weights))
    assert cudnn.EXPLICIT_GEMM not in options and max(options.values()) <= cudnn.WORKSPACE_RATIO * operands
    winograd = [algo for algo in options if cudnn.ALGORITHM_CLASS["Forward"][algo] == "winograd"]
    assert winograd or gpu.cudnn.policy != "all"


@gpu_test
def test_a_convolution_takes_its_timed_choice_from_the_cache(monkeypatch, rng):
    """A second process (here: a fresh read of the cache file) running a convolution of a shape
    timed before takes the kept choice instead of timing again, and runs as the first did."""
    from espresso import graphs
    from espresso.backend.cuda.choices import Choices
    from espresso.layers.vision import ConvolutionLayer

    gpu = backends.get("cuda:0")
    if gpu.cudnn is None:
        pytest.skip("no libcudnn.so.9 on this GPU machine (install espresso-nn[cudnn])")
    snippet, x = conv("num_output: 6 kernel_size: 3 pad: 1"), rng.standard_normal((3, 5, 7, 9))
    dy = rng.standard_normal((3, 6, 7, 9))
    first = LayerRun(snippet, [x], device="cuda:0")
    first.forward()
    first.backward([dy], [True])
    assert gpu.choices.path is not None and gpu.choices.path.exists()
    monkeypatch.setattr(gpu, "choices", Choices(gpu.choices.path.parent, gpu._setup()))
    monkeypatch.setattr(ConvolutionLayer, "_time_choices", lambda *args: pytest.fail("timed again"))
    monkeypatch.setattr(gpu.cudnn, "_plans", {})  # a new plan, whose algorithms the cache alone sets
    gpu.cudnn.lanes[False][1] = gpu.xp.empty(0, np.uint8)  # as in a new process (graphs made void)
    graphs.invalidate(gpu)
    second = LayerRun(snippet, [x], device="cuda:0")
    second.layer.blobs[0].data[...] = first.layer.blobs[0].data
    second.layer.blobs[1].data[...] = first.layer.blobs[1].data
    np.testing.assert_array_equal(second.forward()[0], first.forward()[0])
    assert second.layer.engines[0] == first.layer.engines[0]
    second.backward([dy], [True])
    assert second.layer.engines == first.layer.engines and second.layer.plan is not first.layer.plan
    assert second.layer.plan.algo == first.layer.plan.algo
    # the workspace holds what the chosen algorithms need, not the largest candidate's
    chosen = max(size for _, size in second.layer.plan.algo.values())
    assert gpu.cudnn.lanes[False][1].nbytes == chosen


@gpu_test
def test_a_timed_first_run_keeps_no_candidates_workspace(monkeypatch, rng):
    """A layer's timing leaves cuDNN's workspaces as large as they were: its own run grows them to
    what its chosen algorithms need, never to the largest candidate tried, and a layer timed
    later shrinks none that an earlier one needs (so a net's first, eager pass ends with every
    workspace it needs, and the graph captured after it grows none)."""
    from espresso.backend.cuda.choices import Choices

    gpu = backends.get("cuda:0")
    if gpu.cudnn is None:
        pytest.skip("no libcudnn.so.9 on this GPU machine (install espresso-nn[cudnn])")
    monkeypatch.setattr(gpu, "choices", Choices(None, gpu._setup()))  # nothing cached: it times
    gpu.cudnn.resize_workspaces((0, 0))  # (what earlier tests left)
    runs, grads = [], []
    for snippet, x_shape, dy_shape in [("num_output: 32 kernel_size: 5", (16, 8, 24, 24), (16, 32, 20, 20)),
                                       ("num_output: 16 kernel_size: 3 pad: 1", (8, 32, 20, 20), (8, 16, 20, 20))]:
        runs.append(LayerRun(conv(snippet), [rng.standard_normal(x_shape)], device="cuda:0", dtype=np.float32))
        grads.append([rng.standard_normal(dy_shape)])

    def passes():
        for run, dy in zip(runs, grads):
            run.forward()
            run.backward(dy, [True])  # (the chosen algorithms run after the choice)
        return [(lane[1].nbytes, lane[1].data.ptr) for lane in gpu.cudnn.lanes.values()]

    runs[0].forward()
    runs[0].backward(grads[0], [True])
    algo, lanes = runs[0].layer.plan.algo, gpu.cudnn.lanes
    chosen = max(size for _, size in algo.values())
    assert lanes[False][1].nbytes <= chosen and lanes[True][1].nbytes == 0  # (the weights' gradient on main)
    assert passes() == passes()  # the second layer's timing (in the first) moved nothing the first needs
    gpu.cudnn.resize_workspaces((0, 0))
    with gpu.overlapping():  # (the filter gradient aside, on the side lane, as in a net's pass)
        runs[0].forward()
        runs[0].backward(grads[0], [True])
    assert lanes[False][1].nbytes <= chosen and lanes[True][1].nbytes <= algo["BackwardFilter"][1]


@gpu_test
def test_a_capture_that_would_grow_a_workspace_fails():
    """Growing a cuDNN workspace frees the old one, which the kernels captured so far hold: inside
    a capture it raises GraphCaptureError (GraphCache then runs that pass eagerly), and the
    workspace keeps the size the eager run gave it."""
    gpu = backends.get("cuda:0")
    if gpu.cudnn is None:
        pytest.skip("no libcudnn.so.9 on this GPU machine (install espresso-nn[cudnn])")
    size = gpu.cudnn.workspace_sizes()[0]
    wanted = iter([size + 4096, size + 8192])  # the eager run's, then the captured run's
    with pytest.raises(GraphCaptureError):
        gpu.capture(lambda: gpu.cudnn.grow_workspace(next(wanted)))
    assert gpu.cudnn.workspace_sizes()[0] == size + 4096 and not gpu.capturing


def _engines_chosen_as(monkeypatch, forward, backward):
    """Convolutions take cuDNN's first candidate algorithms and the given engines instead of
    timing them (nothing kept in the cache for later tests); the engines each choice was
    offered are listed in the returned list."""
    from espresso.backend.cuda.choices import Choices
    from espresso.layers.vision import ConvolutionLayer

    gpu = backends.get("cuda:0")
    if gpu.cudnn is None:
        pytest.skip("no libcudnn.so.9 on this GPU machine (install espresso-nn[cudnn])")
    offered = []

    def chosen(layer, which, directions, options, engines, args):
        offered.append(sorted(engines))
        for direction in directions:
            layer.plan.algo[direction] = options[direction][0]
        layer.engines[which] = backward if which else forward

    monkeypatch.setattr(ConvolutionLayer, "_time_choices", chosen)
    monkeypatch.setattr(gpu, "choices", Choices(None, gpu._setup()))
    return offered


@gpu_test
def test_a_test_nets_cudnn_convolution_holds_no_columns_and_still_runs_backward(monkeypatch, rng):
    """Where cuDNN is, the column buffers are made only when im2col + GEMM runs (timed or chosen)."""
    _engines_chosen_as(monkeypatch, "cudnn", "cudnn")
    snippet, x = conv("num_output: 4 kernel_size: 3"), rng.standard_normal((2, 3, 6, 6))
    dy = rng.standard_normal((2, 4, 4, 4))
    cpu, run = LayerRun(snippet, [x], phase=TEST), LayerRun(snippet, [x], phase=TEST, device="cuda:0")
    _copy_params(cpu, run, rng, False)
    assert run.layer.cores is None and run.layer.gemm_ok
    assert_matches(run.forward()[0], cpu.forward()[0], np.float64, "forward")
    assert run.layer.cores is None and run.layer.engines == ["cudnn", None]
    assert_matches(run.backward([dy], [True])[0], cpu.backward([dy], [True])[0], np.float64, "bottom diff")
    assert run.layer.engines == ["cudnn", "cudnn"]


@gpu_test
@pytest.mark.parametrize("phase", [TRAIN, TEST])
def test_a_convolution_whose_timing_picks_the_direct_kernel(monkeypatch, rng, phase):
    """The direct kernel is offered to a small forward (not to a backward); where it wins, the
    forward matches the CPU, no columns are held, and backward runs as before."""
    offered = _engines_chosen_as(monkeypatch, "direct", "cudnn")
    snippet, x = conv("num_output: 50 kernel_size: 5 group: 2 pad: 1"), rng.standard_normal((1, 20, 12, 12))
    dy = rng.standard_normal((1, 50, 10, 10))
    cpu, run = LayerRun(snippet, [x], phase=phase), LayerRun(snippet, [x], phase=phase, device="cuda:0")
    _copy_params(cpu, run, rng, False)
    assert_matches(run.forward()[0], cpu.forward()[0], np.float64, "direct forward")
    assert run.layer.engines == ["direct", None] and run.layer.cores is None
    assert_matches(run.backward([dy], [True])[0], cpu.backward([dy], [True])[0], np.float64, "bottom diff")
    for got, want in zip(run.param_diffs(), cpu.param_diffs()):
        assert_matches(got, want, np.float64, "param diff")
    assert offered == [["cudnn", "direct", "gemm"], ["cudnn", "gemm"]]


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES)
def test_cudnn_adds_the_bias_in_the_convolutions_kernel_where_it_can(rng, dtype):
    """With the precomputed implicit GEMM, the forward's bias goes into cuDNN's fused call (its
    output poisoned first: with alpha2 0 the call must not read it)."""
    from espresso.backend.cuda import cudnn

    gpu = backends.get("cuda:0")
    if gpu.cudnn is None:
        pytest.skip("no libcudnn.so.9 on this GPU machine (install espresso-nn[cudnn])")
    x, w, bias = rng.standard_normal((2, 3, 9, 8)), rng.standard_normal((5, 3, 3, 3)), rng.standard_normal(5)
    plan = gpu.cudnn.plan((2, 3, 9, 8), (2, 5, 7, 6), (5, 3, 3, 3), (1, 1), (0, 0), (1, 1), 1, np.dtype(dtype))
    options = dict(plan.options("Forward"))
    if cudnn.FUSED_BIAS_ALGO not in options:
        pytest.skip("cuDNN does not offer the precomputed implicit GEMM here")
    plan.algo["Forward"] = (cudnn.FUSED_BIAS_ALGO, options[cudnn.FUSED_BIAS_ALGO])
    y = gpu.to_device(np.full((2, 5, 7, 6), np.nan), dtype)
    plan.forward(*(gpu.to_device(a, dtype) for a in (x, w)), y, gpu.to_device(bias, dtype))
    assert plan.fuses_bias  # cuDNN took the fused call
    want = _reference_convolution(x, w, bias, (1, 1), (0, 0), (1, 1), 1)
    assert_matches(gpu.to_host(y), want, dtype, f"cuDNN forward with its bias {np.dtype(dtype).name}")


@gpu_test
def test_a_first_convolution_whose_timing_picks_the_direct_weight_gradient(monkeypatch, rng):
    """A backward that wants no bottom gradient, of filters of few taps, is offered the direct
    weight gradient; where it wins, the param diffs match the CPU and the columns go."""
    offered = _engines_chosen_as(monkeypatch, "direct", "direct")
    snippet, x = conv("num_output: 6 kernel_size: 5 pad: 1"), rng.standard_normal((4, 1, 10, 10))
    dy = rng.standard_normal((4, 6, 8, 8))
    cpu, run = LayerRun(snippet, [x]), LayerRun(snippet, [x], device="cuda:0")
    _copy_params(cpu, run, rng, False)
    for r in (cpu, run):
        r.zero_param_diffs()
        r.forward()
        r.backward([dy], [False])
    for got, want in zip(run.param_diffs(), cpu.param_diffs()):
        assert_matches(got, want, np.float64, "direct param diff")
    assert run.layer.engines == ["direct", "direct"] and run.layer.cores is None
    assert offered == [["cudnn", "direct", "gemm"], ["cudnn", "direct", "gemm"]]


# *** the numerics policy of cuDNN's algorithms (docs/gpu_numerics.md) ***
# (n, Ci, H, W), (Co, kernel), stride, pad: LeNet's conv1 and conv2, a 3x3 layer of CaffeNet's
# kind (Winograd's), CaffeNet's conv1 (11x11, stride 4)
ALGO_GEOMETRIES = [((16, 1, 28, 28), (20, 5), 1, 0), ((16, 20, 12, 12), (50, 5), 1, 0),
                   ((8, 64, 13, 13), (96, 3), 1, 1), ((4, 3, 67, 67), (32, 11), 4, 0)]
# the relative error (||gpu - exact|| / ||exact||) each policy promises in float32 (FMA math);
# measured on an H100: at most 2.3e-6 for what "accurate" allows, 9.2e-4 for Winograd on 5x5
POLICY_BOUND = {"accurate": 1e-5, "all": 2e-3}


def _exact_convolution(x, w, dy, stride, pad):
    """Float64 forward, bottom and weight gradients of a 2-D convolution (the CPU's kernels)."""
    n, ci, height, width = x.shape
    co, _, k, _ = w.shape
    out = tuple((s + 2 * pad - k) // stride + 1 for s in (height, width))
    geometry = ((k, k), (stride, stride), (pad, pad), (1, 1))
    col = np.empty((n, ci * k * k, math.prod(out)))
    CPU.im2col(x, col, *geometry)
    flat_w = w.reshape(co, -1)
    y = np.matmul(flat_w, col).reshape(n, co, *out)
    dcol = np.matmul(flat_w.T, dy.reshape(n, co, -1))
    dx = np.empty_like(x)
    CPU.col2im(dcol, dx, *geometry)
    dw = np.einsum("ncp,nkp->ck", dy.reshape(n, co, -1), col).reshape(w.shape)
    return y, dx, dw


@pytest.mark.parametrize("image, conv_shape, stride, pad", ALGO_GEOMETRIES)
@gpu_test
def test_every_cudnn_algorithm_keeps_its_policys_error(image, conv_shape, stride, pad):
    """Every algorithm cuDNN offers, run directly: its error against the exact result stays within
    the bound of the strictest policy that allows it; the default policy is "all"."""
    from espresso.backend.cuda import cudnn

    gpu = backends.get("cuda:0")
    if gpu.cudnn is None:
        pytest.skip("no libcudnn.so.9 on this GPU machine (install espresso-nn[cudnn])")
    (co, k), f32 = conv_shape, np.float32
    out = tuple((s + 2 * pad - k) // stride + 1 for s in image[2:])
    x, w, dy = rand(image, 1), rand((co, image[1], k, k), 2) * 0.1, rand((image[0], co, *out), 3)
    y, dx, dw = _exact_convolution(x, w, dy, stride, pad)
    gx, gw, gdy = (gpu.to_device(a.astype(f32)) for a in (x, w, dy))
    assert gpu.cudnn.policy == "all"
    gpu.cudnn.set_policy("accurate")
    plan = gpu.cudnn.plan(image, (image[0], co, *out), (co, image[1], k, k), (stride, stride), (pad, pad), (1, 1),
                          1, np.dtype(f32))
    runs = {"Forward": (lambda: plan.forward(gx, gw, result), y),
            "BackwardData": (lambda: plan.backward_data(gw, gdy, result), dx),
            "BackwardFilter": (lambda: plan.backward_filter(gx, gdy, result), dw)}
    try:
        for which, (run, exact) in runs.items():
            accurate = [algo for algo, _ in plan.options(which)]
            gpu.cudnn.set_policy("all")
            for algo, size in plan.options(which):
                result = gpu.xp.zeros(exact.shape, f32)  # the filter gradient accumulates onto it
                plan.algo[which] = (algo, size)
                run()
                policy = "accurate" if algo in accurate else "all"
                assert (policy == "accurate") == cudnn.allowed("accurate", which, algo, (k, k))
                error = relative_error(gpu.to_host(result), exact)
                record(f"cuDNN {which} algo {algo} ({cudnn.ALGORITHM_CLASS[which][algo]}, {policy}) "
                       f"on {image} {conv_shape}", error)
                assert error < POLICY_BOUND[policy], f"{which} algorithm {algo}: relative error {error:.3e}"
            gpu.cudnn.set_policy("accurate")
    finally:
        gpu.cudnn.set_policy("all")


def test_conv_algorithm_policy_from_the_environment(monkeypatch):
    from espresso.backend.cuda import cudnn

    for text, policy in (("", "all"), ("accurate", "accurate"), ("all", "all")):
        monkeypatch.setenv("ESPRESSO_CONV_ALGOS", text)
        assert cudnn.policy_from_environment() == policy
    monkeypatch.setenv("ESPRESSO_CONV_ALGOS", "fast")
    with pytest.raises(BackendError, match="ESPRESSO_CONV_ALGOS='fast'"):
        cudnn.policy_from_environment()
    # Winograd's large tiles only under "all"; its 3x3 tiles, FFT and GEMM under both
    assert not cudnn.allowed("accurate", "Forward", 7, (5, 5)) and cudnn.allowed("all", "Forward", 7, (5, 5))
    assert cudnn.allowed("accurate", "BackwardData", 5, (3, 3))
    assert cudnn.allowed("accurate", "BackwardFilter", 2, (5, 5))


# *** a whole net ***
def lenet_train_param(batch):
    """Caffe's LeNet train net with its Data layers replaced by one Input layer."""
    text = (ROOT / "examples" / "lenet" / "lenet_train_test.prototxt").read_text()
    param = parse_text(text, caffe_pb2.NetParameter(), "lenet_train_test.prototxt")
    layers = [lp for lp in param.layer if lp.type != "Data"]
    del param.layer[:]
    data = param.layer.add(name="data", type="Input", top=["data", "label"])
    data.input_param.shape.add(dim=[batch, 1, 28, 28])
    data.input_param.shape.add(dim=[batch])
    param.layer.extend(layers)
    return param


# cuDNN sums a weight gradient over the batch and the image in its own order: over conv1's
# 9,216 terms per weight, float32 rounding reaches 1.7e-5 of the largest gradient
CUDNN_PARAM_DIFF_TOLERANCE = 5e-5


@pytest.mark.parametrize("mode", ["im2col", "accurate", "all"])
@pytest.mark.parametrize("dtype", DTYPES)
@gpu_test
def test_lenet_forward_backward_cpu_vs_cuda(dtype, mode, monkeypatch):
    """Each GPU numerics mode (docs/gpu_numerics.md) within its promise of the CPU: im2col (the
    deterministic mode) and "accurate" 1e-5 on blobs, "all" (the default) 2e-3 in float32."""
    gpu_backend = backends.get("cuda:0")
    monkeypatch.setattr(gpu_backend, "deterministic", mode == "im2col")
    if gpu_backend.cudnn is not None:
        gpu_backend.cudnn.set_policy("all" if mode == "im2col" else mode)
    name, loose = f"lenet {np.dtype(dtype)} {mode}", mode == "all" and dtype == np.float32
    bound = POLICY_BOUND["all"] if loose else TOLERANCE[np.dtype(dtype)]
    try:
        cpu, gpu = _lenet_on_both(dtype, bound)
    finally:
        if gpu_backend.cudnn is not None:
            gpu_backend.cudnn.set_policy("all")
    param_diffs = gpu.backend.to_host(gpu.arena_diff)
    if mode == "im2col" or dtype != np.float32:
        assert_matches(param_diffs, cpu.arena_diff, dtype, f"{name} all param diffs")
    else:
        assert relative_error(param_diffs, cpu.arena_diff) < max(bound, CUDNN_PARAM_DIFF_TOLERANCE)
    for blob_name, blob in cpu.blobs.items():
        other = gpu.blobs[blob_name]
        assert_matches(other.host_data(), blob.host_data(), dtype, f"{name} blob {blob_name} data", bound)
        if blob_name not in ("data", "label"):
            assert_matches(other.host_diff(), blob.host_diff(), dtype, f"{name} blob {blob_name} diff", bound)


def _lenet_on_both(dtype, bound):
    """LeNet's train net on the CPU and the GPU from identical weights, after one forward and
    backward of the same random batch (the GPU's max-pool routes made the CPU's where they tie)."""
    from espresso.net import Net

    param = lenet_train_param(16)
    cpu = Net(param, phase=TRAIN, backend=backends.get("cpu"), dtype=dtype)
    gpu = Net(param, phase=TRAIN, backend=backends.get("cuda:0"), dtype=dtype)
    rng = np.random.default_rng(13)
    gpu.arena_data[...] = gpu.backend.to_device(cpu.arena_data)  # identical weights
    images, digits = rng.random((16, 1, 28, 28)), rng.integers(0, 10, 16).astype(np.float64)
    for net in (cpu, gpu):  # pycaffe's views: host arrays on both backends
        net.blobs["data"].data[...] = images
        net.blobs["label"].data[...] = digits
        net.clear_param_diffs()
    loss_cpu, loss_gpu = cpu.forward_backward(), gpu.forward_backward()
    assert_matches(loss_gpu, loss_cpu, dtype, f"lenet {np.dtype(dtype)} loss", bound)
    assert 1.0 < loss_cpu < 10.0
    if not gpu.backend.deterministic and _route_ties_as_the_cpu(cpu, gpu):
        gpu.clear_param_diffs()
        gpu.backward_range(len(gpu.layers) - 1, 0)
    return cpu, gpu


def _route_ties_as_the_cpu(cpu, gpu):
    """cuDNN's timed algorithms (FFT, Winograd) round a convolution's outputs otherwise than the
    CPU's GEMM, so a max-pool window whose two largest values lie within that rounding may route
    its gradient to the other one.  Check that every window routed otherwise is such a tie, then
    give the GPU the CPU's routes (for a backward to compare); True when any differed."""
    flipped = False
    for i, layer in enumerate(cpu.layers):
        if layer.type != "Pooling":
            continue
        routes, other = layer.pooler.index, gpu.backend.to_host(gpu.layers[i].pooler.index)
        if (routes == other).all():
            continue
        x = cpu.bottom_vecs[i][0].data
        planes = x.reshape(x.shape[0] * x.shape[1], -1)
        rows = np.arange(planes.shape[0])[:, None]
        chosen = planes[rows, routes.reshape(len(planes), -1)]
        instead = planes[rows, other.reshape(len(planes), -1)]
        gaps = np.abs(chosen - instead)[routes.reshape(len(planes), -1) != other.reshape(len(planes), -1)]
        assert gaps.max() <= 1e-5 * np.abs(x).max(), f"{layer.name}: a route differs by {gaps.max():.3g}, not a tie"
        assert gaps.size <= 1e-3 * routes.size, f"{layer.name}: {gaps.size} of {routes.size} routes differ"
        gpu.layers[i].pooler.index[...] = gpu.backend.to_device(routes)
        flipped = True
    return flipped


class _FailingLibrary:
    """A stand-in for libcublas / libcudnn whose calls fail: status 7 / 3, with the texts the
    real libraries give for them."""

    @staticmethod  # (plain functions: the code under test sets their ctypes restype)
    def cublasSgemm_v2(*args):
        return 7

    @staticmethod
    def cublasGetStatusName(status):
        return b"CUBLAS_STATUS_INVALID_VALUE"

    @staticmethod
    def cublasGetStatusString(status):
        return b"an invalid value was used as an argument"

    @staticmethod
    def cudnnConvolutionForward(*args):
        return 3

    @staticmethod
    def cudnnGetErrorString(status):
        return b"CUDNN_STATUS_BAD_PARAM"


def test_library_failures_name_the_call_and_the_status_text():
    from espresso.backend.cuda.blas import Blas
    from espresso.backend.cuda.cudnn import Cudnn

    blas, cudnn = Blas.__new__(Blas), Cudnn.__new__(Cudnn)
    blas.lib = cudnn.lib = _FailingLibrary()
    with pytest.raises(BackendError, match="cublasSgemm_v2 failed with status 7: CUBLAS_STATUS_INVALID_VALUE, "
                                           "an invalid value was used as an argument"):
        blas._check(blas.lib.cublasSgemm_v2(), "cublasSgemm_v2")
    with pytest.raises(BackendError, match="cudnnConvolutionForward failed with status 3: CUDNN_STATUS_BAD_PARAM"):
        cudnn.call("cudnnConvolutionForward")
