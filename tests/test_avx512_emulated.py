"""The AVX-512 code, run on an emulated AVX-512 VNNI CPU (tests/x86_emulator.py), on any x86-64 machine.

The native tests run the AVX-512 paths only where the CPU has AVX-512; the machines this project is
developed on mostly do not. Here the same sources are compiled with CMakeLists.txt's AVX-512 flags and
run under Bochs: the int8 VNNI block against an exact integer reference, with guard pages that fault on
any read past a row's K bytes; the fp32 prefill panel kernel against the AVX2 one (bitwise) and a float64
reference; the W8A16 (int16-pair) prefill kernel against the AVX2 one and an exact reference, both
bitwise; the W8A16 decode GEMV (int16 x int8 -> exact int64) against the AVX2 one and an exact integer
reference, with guard pages; the W8A16 decode panel kernel (8-16 rows, epilogue fused) against exact
sums and the scalar epilogue, bitwise, with guard pages; and the cpuid / xgetbv detection that decides when they run."""
import faulthandler
import platform
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

if sys.platform != "linux" or platform.machine() != "x86_64":
    pytest.skip("the emulator harness runs x86-64 code on Linux x86-64 only", allow_module_level=True)
pytest.importorskip("bochscpu", reason="bochscpu-python is not installed (the [test] extra installs it on "
                                        "Linux x86-64 with glibc >= 2.35)")

from x86_emulator import (  # noqa: E402
    ROOT, XCR0_AVX512, XCR0_X87_SSE_AVX, EmulatedFault, X86Machine, build_freestanding, cmake_flags,
)

ISA_LEVELS = {0: "scalar", 0x101: "avx2", 0x102: "avx512"}  # pyengine::Isa: (family << 8) | rank
# pyengine::CpuFeature bits, in their order
CPU_FEATURES = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
                "amx_tile", "amx_int8", "amx_bf16"]

I8_BLOCK_ENTRY = """
#include "cpu/int8_matmul_isa.h"
extern "C" void pe_entry(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int32_t* c, int64_t ldc,
                         int64_t M, int64_t N, int64_t K) {
  pyengine::cpu::i8_dot_block_avx512(a, lda, b, ldb, c, ldc, M, N, K);
}
"""

PANEL_ENTRY = """
#include "cpu/int8_matmul_isa.h"
using namespace pyengine::cpu;
extern "C" void pe_entry(int64_t avx512, const float* a_pack, const float* b_pack, int64_t K, float* c, int64_t ldc) {
  if (avx512) {
    panel_kernel_pair_avx512(a_pack, b_pack, K, c, ldc);
  } else {
    panel_kernel_avx2(a_pack, b_pack, K, c, ldc);
    panel_kernel_avx2(a_pack + kPanelRows * K, b_pack, K, c + kPanelRows * ldc, ldc);
  }
}
"""

I16_PANEL_ENTRY = """
#include "cpu/int8_matmul_isa.h"
using namespace pyengine::cpu;
// mode bit 0: the AVX-512 pair kernel (else the AVX2 kernel once per tile); bit 1: with bias.
// scales: row_scale [12], col_scale [16], bias [16].
extern "C" void pe_entry(int64_t mode, const int16_t* a_pack, const int16_t* b_pack, int64_t pairs,
                         const float* scales, float* out, int64_t ldo) {
  const float* col_scale = scales + 2 * kPanelRows;
  const float* bias = (mode & 2) ? col_scale + kPanelCols : nullptr;
  if (mode & 1) {
    i16_panel_kernel_scaled_pair_avx512(a_pack, b_pack, pairs, scales, col_scale, bias, out, ldo);
  } else {
    i16_panel_kernel_scaled_avx2(a_pack, b_pack, pairs, scales, col_scale, bias, out, ldo);
    i16_panel_kernel_scaled_avx2(a_pack + 2 * kPanelRows * pairs, b_pack, pairs, scales + kPanelRows, col_scale,
                                 bias, out + kPanelRows * ldo, ldo);
  }
}
"""

I16I8_BLOCK_ENTRY = """
#include "cpu/int8_matmul_isa.h"
#include <cstddef>
using namespace pyengine::cpu;
// The AVX2 kernel copies its tails with memcpy / std::copy, and freestanding there is no libc to provide
// them. Byte loops through volatile, which the compiler cannot turn back into memcpy calls.
extern "C" void* memcpy(void* dst, const void* src, size_t n) {
  volatile unsigned char* d = static_cast<unsigned char*>(dst);
  const volatile unsigned char* s = static_cast<const unsigned char*>(src);
  for (size_t i = 0; i < n; ++i) d[i] = s[i];
  return dst;
}
extern "C" void* memmove(void* dst, const void* src, size_t n) {
  volatile unsigned char* d = static_cast<unsigned char*>(dst);
  const volatile unsigned char* s = static_cast<const unsigned char*>(src);
  if (d < s) {
    for (size_t i = 0; i < n; ++i) d[i] = s[i];
  } else {
    for (size_t i = n; i > 0; --i) d[i - 1] = s[i - 1];
  }
  return dst;
}
// The W8A16 decode GEMV: the AVX-512 block when avx512 is set, else the AVX2 one.
extern "C" void pe_entry(int64_t avx512, const int16_t* a, int64_t lda, const int8_t* b, int64_t ldb, int64_t* c,
                         int64_t ldc, int64_t M, int64_t N, int64_t K) {
  (avx512 ? i16i8_dot_block_avx512 : i16i8_dot_block_avx2)(a, lda, b, ldb, c, ldc, M, N, K);
}
"""

I16I8_PANELS_ENTRY = """
#include "cpu/int8_matmul_isa.h"
// The W8A16 decode panel kernel; its 11 arguments from p[0 .. 10], in its order.
extern "C" void pe_entry(const int64_t* p) {
  pyengine::cpu::i16i8_linear_panels_avx512(
      reinterpret_cast<const int32_t*>(p[0]), p[1], reinterpret_cast<const float*>(p[2]),
      reinterpret_cast<const int8_t*>(p[3]), reinterpret_cast<const float*>(p[4]),
      reinterpret_cast<const float*>(p[5]), reinterpret_cast<float*>(p[6]), p[7], p[8], p[9],
      reinterpret_cast<int8_t*>(p[10]));
}
"""

DETECT_ENTRY = """
#include "cpu/isa_detect.h"
// features != 0: the CpuFeature bits; else the level.
extern "C" int pe_entry(int64_t features) {
  return features ? static_cast<int>(pyengine::cpu::features_from_cpuid().bits)
                  : static_cast<int>(pyengine::cpu::isa_from_cpuid());
}
"""


# Data: each operand at the end of its own region, so a read past it faults.
A_REGION, B_REGION, C_REGION = 0x1000_0000, 0x2000_0000, 0x3000_0000
D_REGION = 0x4000_0000  # the panel kernel's scales, bias, scratch and argument block
REGION_BYTES = 256 * 1024  # mapped; the page after each region is not
C_SENTINEL = -0x5A5A5A5A
EMULATION_DEADLINE_S = 600  # the whole module takes ~10 s

# Each program: its entry source and the csrc/cpu files it links, with the CMakeLists.txt flags variable
# each is compiled with (None: no ISA flags, as CMakeLists.txt builds isa_detect.cpp). The panel program
# links the AVX2 kernel too, run on the same emulated CPU: the AVX-512 kernel must equal it bitwise.
PROGRAMS = {
    "i8_block": (I8_BLOCK_ENTRY, [("int8_matmul_avx512.cpp", "AVX512_FLAGS")]),
    "panel": (PANEL_ENTRY, [("int8_matmul_avx512.cpp", "AVX512_FLAGS"), ("int8_matmul_avx2.cpp", "AVX2_FLAGS")]),
    "i16_panel": (I16_PANEL_ENTRY, [("int8_matmul_avx512.cpp", "AVX512_FLAGS"),
                                    ("int8_matmul_avx2.cpp", "AVX2_FLAGS")]),
    "i16i8_block": (I16I8_BLOCK_ENTRY, [("int8_matmul_avx512.cpp", "AVX512_FLAGS"),
                                        ("int8_matmul_avx2.cpp", "AVX2_FLAGS")]),
    "i16i8_panels": (I16I8_PANELS_ENTRY, [("int8_matmul_avx512.cpp", "AVX512_FLAGS")]),
    "detect": (DETECT_ENTRY, [("isa_detect.cpp", None)]),
}


@pytest.fixture(scope="module")
def machine(tmp_path_factory):
    """One emulated machine for the module, every program loaded (4 MB apart), and the data regions
    mapped. Yields (machine, {program name: entry address})."""
    folder = tmp_path_factory.mktemp("emulated")
    elves = {}
    for i, (name, (entry_source, sources)) in enumerate(PROGRAMS.items()):
        entry = folder / f"{name}_entry.cpp"
        entry.write_text(entry_source)
        compiled = [(entry, [])] + [(ROOT / "csrc/cpu" / path, cmake_flags(flags) if flags else [])
                                    for path, flags in sources]
        try:
            elves[name] = build_freestanding(compiled, "pe_entry", folder / f"{name}.elf", base=0x400000 * (i + 1))
        except FileNotFoundError as error:
            pytest.skip(str(error))
    # The emulator has no instruction limit and cannot be interrupted from Python: a kernel that
    # never returns would hang the run. Past this deadline the process prints its stack and exits.
    faulthandler.dump_traceback_later(EMULATION_DEADLINE_S, exit=True)
    try:
        with X86Machine() as m:
            entries = {name: m.load_elf(elf) for name, elf in elves.items()}
            for region in (A_REGION, B_REGION, C_REGION, D_REGION):
                m.map(region, REGION_BYTES)
            yield m, entries
    finally:
        faulthandler.cancel_dump_traceback_later()


# ---- detection -------------------------------------------------------------------------------


AVX2_FEATURES = ["avx2", "fma", "f16c"]
AVX512_FEATURES = AVX2_FEATURES + ["avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"]


# The emulated Tiger Lake has AVX-512 with VNNI, neither AVX512_BF16 nor AMX.
@pytest.mark.parametrize("osxsave, xcr0, expected, features", [
    (True, XCR0_AVX512, "avx512", AVX512_FEATURES),
    (True, XCR0_X87_SSE_AVX, "avx2", AVX2_FEATURES),  # an OS that does not save the zmm / opmask state
    (False, 1, "scalar", []),  # an OS that enabled no extended state at all: xgetbv must not run
])
def test_isa_detection_on_an_avx512_vnni_cpu(machine, osxsave, xcr0, expected, features):
    m, entries = machine
    level = m.call(entries["detect"], 0, xcr0=xcr0, osxsave=osxsave) & 0xFFFFFFFF
    assert ISA_LEVELS[level] == expected
    bits = m.call(entries["detect"], 1, xcr0=xcr0, osxsave=osxsave) & 0xFFFFFFFF
    assert [name for i, name in enumerate(CPU_FEATURES) if bits >> i & 1] == features
    assert bits >> len(CPU_FEATURES) == 0


def test_feature_bits_are_in_the_modules_order():
    _C = pytest.importorskip("pyengine._C")
    assert [name for name, _ in _C.cpu_features()] == CPU_FEATURES


# ---- i8_dot_block_avx512: exact against an integer reference ----------------------------------


def run_i8_block(machine, entry, a, b, lda, ldb, ldc):
    """c = a @ b.T on the emulated CPU. a: (M, K) int8, b: (N, K) int8, stored with row strides lda / ldb,
    each buffer ending exactly at the end of its mapped region. Returns c and the whole c buffer."""
    (M, K), N = a.shape, b.shape[0]
    a_addr = A_REGION + REGION_BYTES - ((M - 1) * lda + K)
    b_addr = B_REGION + REGION_BYTES - ((N - 1) * ldb + K)
    c_words = (M - 1) * ldc + N
    c_addr = C_REGION + REGION_BYTES - 4 * c_words
    for base, rows, ld in ((a_addr, a, lda), (b_addr, b, ldb)):
        for i, row in enumerate(rows):
            machine.write(base + i * ld, row.tobytes())
    machine.write(c_addr, np.full(c_words, C_SENTINEL, np.int32).tobytes())
    machine.call(entry, a_addr, lda, b_addr, ldb, c_addr, ldc, M, N, K)
    c_buffer = np.frombuffer(machine.read(c_addr, 4 * c_words), np.int32)
    c = np.stack([c_buffer[m * ldc:m * ldc + N] for m in range(M)])
    return c, c_buffer


def check_i8_block(machine, a, b, lda_pad=0, ldb_pad=0, ldc_pad=0):
    m, entries = machine
    (M, K), N = a.shape, b.shape[0]
    c, c_buffer = run_i8_block(m, entries["i8_block"], a, b, K + lda_pad, K + ldb_pad, N + ldc_pad)
    expected = a.astype(np.int64) @ b.astype(np.int64).T
    np.testing.assert_array_equal(c, expected, err_msg=f"M={M} N={N} K={K}")
    # Nothing written between the rows of c.
    written = np.zeros(c_buffer.size, bool)
    for m in range(M):
        written[m * (N + ldc_pad):m * (N + ldc_pad) + N] = True
    assert (c_buffer[~written] == C_SENTINEL).all()


# Every tile shape (1-4 rows of a x 1-4 rows of b) and partial tiles after full ones; K around the
# 64-byte vector (tail masks of 1, 63 and 0 bytes) and the model's widths.
@pytest.mark.parametrize("K", [1, 3, 63, 64, 65, 127, 200, 576, 1536])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 9])
def test_i8_block_exact_random(machine, M, K):
    rng = np.random.default_rng(M * 10_000 + K)
    for N in range(1, 10):
        a = rng.integers(-127, 128, (M, K), dtype=np.int8)
        b = rng.integers(-127, 128, (N, K), dtype=np.int8)
        check_i8_block(machine, a, b, lda_pad=N % 3 * 17, ldb_pad=M % 2 * 5, ldc_pad=N % 2 * 3)


@pytest.mark.parametrize("K", [64, 577, 4096])
def test_i8_block_exact_extremes(machine, K):
    # +-127 everywhere: the largest sums the +128 offset trick must undo exactly (K * 127^2 = 66e6 at
    # K = 4096, and 128 * sum(b) near 2^26), in every sign combination.
    rng = np.random.default_rng(K)
    full = lambda v, n: np.full((n, K), v, np.int8)  # noqa: E731
    signs = lambda n: np.where(rng.random((n, K)) < 0.5, -127, 127).astype(np.int8)  # noqa: E731
    for a, b in [(full(127, 5), full(127, 6)), (full(-127, 5), full(127, 6)), (full(127, 3), full(-127, 7)),
                 (full(-127, 4), full(-127, 4)), (signs(5), signs(9)), (full(-127, 1), signs(3))]:
        check_i8_block(machine, a, b)


@settings(max_examples=60, deadline=None)
@given(M=st.integers(1, 9), N=st.integers(1, 9), K=st.integers(1, 700), lda_pad=st.integers(0, 70),
       ldb_pad=st.integers(0, 70), ldc_pad=st.integers(0, 5), seed=st.integers(0, 2**32 - 1))
def test_i8_block_exact_hypothesis(machine, M, N, K, lda_pad, ldb_pad, ldc_pad, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(-127, 128, (M, K), dtype=np.int8)
    b = rng.integers(-127, 128, (N, K), dtype=np.int8)
    check_i8_block(machine, a, b, lda_pad, ldb_pad, ldc_pad)


def test_guard_pages_catch_an_over_read(machine):
    # The harness itself: a row that claims more bytes than are mapped must fault, not pass.
    m, entries = machine
    K = 64
    end = B_REGION + REGION_BYTES
    with pytest.raises(EmulatedFault, match="vector 14"):
        m.call(entries["i8_block"], A_REGION, K, end - K + 1, K, C_REGION, 1, 1, 1, K)


# ---- panel_kernel_pair_avx512: the prefill GEMM micro-kernel ----------------------------------

PANEL_ROWS, PANEL_COLS = 6, 16  # cpu::kPanelRows, cpu::kPanelCols


def run_panel(machine, entry, avx512, a_pack, b_pack, ldc):
    """a_pack: [2, K, 6] fp32 (two packed tiles), b_pack: [K, 16]; both end where their region ends, b
    64-byte aligned as panel_gemm aligns it. Returns c [12, 16] and the whole c buffer."""
    K = b_pack.shape[0]
    a_addr = A_REGION + REGION_BYTES - a_pack.nbytes
    b_addr = B_REGION + REGION_BYTES - b_pack.nbytes
    assert b_addr % 64 == 0
    c_words = (2 * PANEL_ROWS - 1) * ldc + PANEL_COLS
    c_addr = C_REGION + REGION_BYTES - 4 * c_words
    machine.write(a_addr, a_pack.tobytes())
    machine.write(b_addr, b_pack.tobytes())
    machine.write(c_addr, np.full(c_words, np.nan, np.float32).tobytes())
    machine.call(entry, int(avx512), a_addr, b_addr, K, c_addr, ldc)
    c_buffer = np.frombuffer(machine.read(c_addr, 4 * c_words), np.float32)
    c = np.stack([c_buffer[m * ldc:m * ldc + PANEL_COLS] for m in range(2 * PANEL_ROWS)])
    return c, c_buffer


@pytest.mark.parametrize("K", [1, 2, 7, 64, 576, 1536])
@pytest.mark.parametrize("ldc_pad", [0, 5])
def test_panel_pair_kernel_matches_avx2_bitwise(machine, K, ldc_pad):
    m, entries = machine
    rng = np.random.default_rng(K + ldc_pad)
    a_pack = rng.standard_normal((2, K, PANEL_ROWS), dtype=np.float32)
    b_pack = rng.standard_normal((K, PANEL_COLS), dtype=np.float32)
    ldc = PANEL_COLS + ldc_pad
    c512, buffer512 = run_panel(m, entries["panel"], True, a_pack, b_pack, ldc)
    c256, _ = run_panel(m, entries["panel"], False, a_pack, b_pack, ldc)
    # Row r of tile h is token h * 6 + r: a_pack[h, k, r] against weight column n = b_pack[k, n].
    tokens = a_pack.transpose(0, 2, 1).reshape(2 * PANEL_ROWS, K).astype(np.float64)
    expected = tokens @ b_pack.astype(np.float64)
    bound = np.abs(tokens) @ np.abs(b_pack.astype(np.float64))
    assert (np.abs(c512 - expected) <= 1e-6 * bound + 1e-30).all()
    np.testing.assert_array_equal(c512, c256)  # same multiply-adds in the same order
    written = np.zeros(buffer512.size, bool)
    for m in range(2 * PANEL_ROWS):
        written[m * ldc:m * ldc + PANEL_COLS] = True
    assert np.isnan(buffer512[~written]).all()  # nothing written between the rows


# ---- i16_panel_kernel_scaled_pair_avx512: the W8A16 prefill GEMM micro-kernel -----------------


def run_i16_panel(machine, entry, avx512, a_pack, b_pack, scales, with_bias, ldc):
    """a_pack: [2, pairs, 6, 2] int16 (two packed tiles), b_pack: [pairs, 16, 2] int16, scales: fp32
    row_scale [12] + col_scale [16] + bias [16]. Operands end where their regions end (b 64-byte
    aligned, as panel_gemm aligns it). Returns out [12, 16] and the whole out buffer."""
    pairs = b_pack.shape[0]
    a_addr = A_REGION + REGION_BYTES - a_pack.nbytes
    b_addr = B_REGION + REGION_BYTES - b_pack.nbytes
    s_addr = A_REGION  # the scales at the start of a's region, far below a_pack
    assert b_addr % 64 == 0 and s_addr + scales.nbytes <= a_addr
    c_words = (2 * PANEL_ROWS - 1) * ldc + PANEL_COLS
    c_addr = C_REGION + REGION_BYTES - 4 * c_words
    machine.write(a_addr, a_pack.tobytes())
    machine.write(b_addr, b_pack.tobytes())
    machine.write(s_addr, scales.tobytes())
    machine.write(c_addr, np.full(c_words, np.nan, np.float32).tobytes())
    machine.call(entry, int(avx512) | (2 if with_bias else 0), a_addr, b_addr, pairs, s_addr, c_addr, ldc)
    c_buffer = np.frombuffer(machine.read(c_addr, 4 * c_words), np.float32)
    return np.stack([c_buffer[m * ldc:m * ldc + PANEL_COLS] for m in range(2 * PANEL_ROWS)]), c_buffer


def i16_panel_reference(a_pack, b_pack, scales, with_bias):
    """Exact integer sums, then the epilogue in float32 (IEEE rounding, as the kernels round)."""
    tokens = a_pack.transpose(0, 2, 1, 3).reshape(2 * PANEL_ROWS, -1).astype(np.int64)  # [12, 2 * pairs]
    weights = b_pack.transpose(1, 0, 2).reshape(PANEL_COLS, -1).astype(np.int64)  # [16, 2 * pairs]
    sums = tokens @ weights.T
    assert np.abs(sums).max() < 2**31  # the kernels' precondition
    row_scale, col_scale, bias = scales[:12], scales[12:28], scales[28:44]
    out = sums.astype(np.float32) * (row_scale[:, None] * col_scale[None, :])
    return out + bias[None, :] if with_bias else out


@pytest.mark.parametrize("pairs", [1, 2, 7, 64, 288, 768])
@pytest.mark.parametrize("with_bias, ldc_pad", [(False, 0), (True, 5)])
def test_i16_panel_pair_kernel_matches_avx2_and_exact_reference(machine, pairs, with_bias, ldc_pad):
    m, entries = machine
    rng = np.random.default_rng(pairs * 10 + ldc_pad)
    # Activations at up to a tenth of full scale, so that even 768 pairs (K = 1536) stay inside int32.
    a_pack = rng.integers(-3276, 3277, (2, pairs, PANEL_ROWS, 2), dtype=np.int16)
    b_pack = rng.integers(-127, 128, (pairs, PANEL_COLS, 2), dtype=np.int16)
    scales = np.concatenate([rng.random(12) * 1e-3, rng.random(16) * 1e-2, rng.standard_normal(16)]).astype(np.float32)
    ldc = PANEL_COLS + ldc_pad
    c512, buffer512 = run_i16_panel(m, entries["i16_panel"], True, a_pack, b_pack, scales, with_bias, ldc)
    c256, _ = run_i16_panel(m, entries["i16_panel"], False, a_pack, b_pack, scales, with_bias, ldc)
    np.testing.assert_array_equal(c512, i16_panel_reference(a_pack, b_pack, scales, with_bias))
    np.testing.assert_array_equal(c512, c256)
    written = np.zeros(buffer512.size, bool)
    for row in range(2 * PANEL_ROWS):
        written[row * ldc:row * ldc + PANEL_COLS] = True
    assert np.isnan(buffer512[~written]).all()  # nothing written between the rows


def test_i16_panel_pair_kernel_exact_at_the_int32_edge(machine):
    # 256 pairs (K = 512) of full-scale products: sums of +-512 * 32767 * 127 (2.13e9), the largest
    # the caller's int32 bound lets through, come out exact (and their float conversion rounds as the
    # reference's does).
    m, entries = machine
    pairs = 256
    a_pack = np.full((2, pairs, PANEL_ROWS, 2), 32767, np.int16)
    a_pack[1] = -32767
    b_pack = np.full((pairs, PANEL_COLS, 2), 127, np.int16)
    b_pack[:, 1::2] = -127
    scales = np.ones(44, np.float32)
    c512, _ = run_i16_panel(m, entries["i16_panel"], True, a_pack, b_pack, scales, False, PANEL_COLS)
    expected = i16_panel_reference(a_pack, b_pack, scales, False)
    assert abs(expected).max() == np.float32(512 * 32767 * 127)
    np.testing.assert_array_equal(c512, expected)


# ---- i16i8_dot_block_avx512: the W8A16 decode GEMV, exact against an integer reference ----------


def run_i16i8_block(machine, entry, avx512, a, b, lda, ldb, ldc, rng):
    """c = a @ b.T (int64) on the emulated CPU. a: (M, K) int16, b: (N, K) int8, stored with row strides
    lda / ldb (elements; the gaps between rows filled with random values the kernel must not use), each
    buffer ending exactly at the end of its mapped region. Returns c and the whole c buffer."""
    (M, K), N = a.shape, b.shape[0]
    a_buffer = rng.integers(-32767, 32768, (M - 1) * lda + K).astype(np.int16)
    b_buffer = rng.integers(-128, 128, (N - 1) * ldb + K).astype(np.int8)
    for m in range(M):
        a_buffer[m * lda:m * lda + K] = a[m]
    for n in range(N):
        b_buffer[n * ldb:n * ldb + K] = b[n]
    a_addr = A_REGION + REGION_BYTES - a_buffer.nbytes
    b_addr = B_REGION + REGION_BYTES - b_buffer.nbytes
    c_words = (M - 1) * ldc + N
    c_addr = C_REGION + REGION_BYTES - 8 * c_words
    machine.write(a_addr, a_buffer.tobytes())
    machine.write(b_addr, b_buffer.tobytes())
    machine.write(c_addr, np.full(c_words, C_SENTINEL, np.int64).tobytes())
    machine.call(entry, int(avx512), a_addr, lda, b_addr, ldb, c_addr, ldc, M, N, K)
    c_buffer = np.frombuffer(machine.read(c_addr, 8 * c_words), np.int64)
    return np.stack([c_buffer[m * ldc:m * ldc + N] for m in range(M)]), c_buffer


def check_i16i8_block(machine, a, b, lda_pad=0, ldb_pad=0, ldc_pad=0, seed=0):
    m, entries = machine
    (M, K), N = a.shape, b.shape[0]
    rng = np.random.default_rng(seed)
    ld = (K + lda_pad, K + ldb_pad, N + ldc_pad)
    c512, buffer512 = run_i16i8_block(m, entries["i16i8_block"], True, a, b, *ld, rng)
    c256, _ = run_i16i8_block(m, entries["i16i8_block"], False, a, b, *ld, rng)
    expected = a.astype(np.int64) @ b.astype(np.int64).T
    np.testing.assert_array_equal(c512, expected, err_msg=f"M={M} N={N} K={K}")
    np.testing.assert_array_equal(c512, c256, err_msg=f"M={M} N={N} K={K}")
    written = np.zeros(buffer512.size, bool)
    for row in range(M):
        written[row * ld[2]:row * ld[2] + N] = True
    assert (buffer512[~written] == C_SENTINEL).all()  # nothing written between the rows of c


# M: the two-stream kernel (1, 2 tokens) and the row groups (3, 4, 16: four groups of 4); N: every
# split of the two streams (rows1 = 0, 1, 2) and partial groups of 4 weight rows; K: tails of 1, 5, 31
# and 1 values past a 32-value step, two steps and a bit, a model width, and 1536 + 7.
@pytest.mark.parametrize("K", [1, 5, 31, 33, 576, 1536 + 7])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 16])
def test_i16i8_block_exact_random(machine, M, K):
    rng = np.random.default_rng(M * 100_000 + K)
    for N in [*range(1, 10), 33]:
        a = rng.integers(-32767, 32768, (M, K), dtype=np.int16)
        b = rng.integers(-128, 128, (N, K), dtype=np.int8)
        check_i16i8_block(machine, a, b, lda_pad=N % 3 * 9, ldb_pad=M % 2 * 5, ldc_pad=N % 2 * 3, seed=N)


# 3 * 4096 + 5 values of k: three full int32 blocks and a tail, each lane's block sum at the largest
# the bound allows; the row totals (5.2e10 at the extreme) only fit the int64 they are widened into.
@pytest.mark.parametrize("K", [64, 577, 3 * 4096 + 5])
def test_i16i8_block_exact_extremes(machine, K):
    rng = np.random.default_rng(K)
    full = lambda dtype, v, n: np.full((n, K), v, dtype)  # noqa: E731
    a_signs = lambda n: np.where(rng.random((n, K)) < 0.5, -32767, 32767).astype(np.int16)  # noqa: E731
    b_signs = lambda n: np.where(rng.random((n, K)) < 0.5, -128, 127).astype(np.int8)  # noqa: E731
    cases = [(full(np.int16, 32767, 1), full(np.int8, -128, 5)), (full(np.int16, -32767, 2), full(np.int8, -128, 4)),
             (full(np.int16, 32767, 3), full(np.int8, 127, 5)), (full(np.int16, -32767, 1), full(np.int8, 127, 3)),
             (a_signs(2), b_signs(7)), (a_signs(4), b_signs(2))]
    if K < 4096:
        cases.append((a_signs(16), b_signs(6)))
    for a, b in cases:
        check_i16i8_block(machine, a, b)


@settings(max_examples=60, deadline=None)
@given(M=st.integers(1, 16), N=st.integers(1, 40), K=st.integers(1, 1600), lda_pad=st.integers(0, 70),
       ldb_pad=st.integers(0, 70), ldc_pad=st.integers(0, 5), extremes=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_i16i8_block_exact_hypothesis(machine, M, N, K, lda_pad, ldb_pad, ldc_pad, extremes, seed):
    rng = np.random.default_rng(seed)
    if extremes:  # only the largest magnitudes, both signs
        a = np.where(rng.random((M, K)) < 0.5, -32767, 32767).astype(np.int16)
        b = np.where(rng.random((N, K)) < 0.5, -128, 127).astype(np.int8)
    else:
        a = rng.integers(-32767, 32768, (M, K), dtype=np.int16)
        b = rng.integers(-128, 128, (N, K), dtype=np.int8)
    check_i16i8_block(machine, a, b, lda_pad, ldb_pad, ldc_pad, seed)


# ---- i16i8_linear_panels_avx512: W8A16 decode at 8..16 rows, weight panels, epilogue fused ---------


def panel_slot(pair):
    """i16_panel_slot (int8_matmul_isa.h): pair 8q + r of a 32-pair block at slot 4r + q."""
    j = pair % 32
    return pair - j + 4 * (j % 8) + j // 8


def check_i16i8_panels(machine, a, b, with_bias, ldo_pad=0, seed=0):
    """The kernel on the emulated CPU against exact int64 sums and scale_tile's fp32 epilogue, bitwise.
    The weights end at the end of their mapped region (a read past row N - 1's K bytes faults), as does
    out; out's gaps between rows must stay untouched."""
    m, entries = machine
    (M, K), N = a.shape, b.shape[0]
    rng = np.random.default_rng(seed)
    padded = (((K + 1) // 2 + 31) // 32) * 32
    a_even = np.zeros((M, 2 * padded), np.int16)
    a_even[:, :K] = a
    pairs = a_even.view(np.int32)  # (M, padded): pair j of row m, the low half x[2j]
    x_pairs = np.zeros((padded, M), np.int32)
    for j in range((K + 1) // 2):
        x_pairs[panel_slot(j)] = pairs[:, j]
    x_scale = (rng.random(M) * 1e-3 + 1e-5).astype(np.float32)
    w_scale = (rng.random(N) * 1e-2 + 1e-4).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    ldo = N + ldo_pad
    x_addr = A_REGION + REGION_BYTES - x_pairs.nbytes
    w_addr = B_REGION + REGION_BYTES - b.nbytes
    out_words = (M - 1) * ldo + N
    out_addr = C_REGION + REGION_BYTES - 4 * out_words
    xs_addr, ws_addr, bias_addr = D_REGION, D_REGION + 0x1000, D_REGION + 0x2000
    args_addr, panel_addr = D_REGION + 0x3000, D_REGION + 0x4000  # 64-byte aligned scratch
    sentinel = np.frombuffer(np.uint32(0x7FC0DEAD).tobytes(), np.float32)[0]  # a NaN no result can be
    m.write(x_addr, x_pairs.tobytes())
    m.write(w_addr, np.ascontiguousarray(b).tobytes())
    m.write(out_addr, np.full(out_words, sentinel, np.float32).tobytes())
    m.write(xs_addr, x_scale.tobytes())
    m.write(ws_addr, w_scale.tobytes())
    m.write(bias_addr, bias.tobytes())
    args = [x_addr, M, xs_addr, w_addr, ws_addr, bias_addr if with_bias else 0, out_addr, ldo, N, K, panel_addr]
    m.write(args_addr, np.array(args, np.int64).tobytes())
    m.call(entries["i16i8_panels"], args_addr)
    buffer = np.frombuffer(m.read(out_addr, 4 * out_words), np.float32)
    out = np.stack([buffer[r * ldo:r * ldo + N] for r in range(M)])
    sums = a.astype(np.int64) @ b.astype(np.int64).T
    expected = sums.astype(np.float32) * (x_scale[:, None] * w_scale[None, :])
    if with_bias:
        expected = expected + bias
    np.testing.assert_array_equal(out.view(np.uint32), expected.astype(np.float32).view(np.uint32),
                                  err_msg=f"M={M} N={N} K={K}")
    written = np.zeros(buffer.size, bool)
    for r in range(M):
        written[r * ldo:r * ldo + N] = True
    assert (buffer[~written].view(np.uint32) == np.uint32(0x7FC0DEAD)).all()


# M: row counts inside and around the driver's range (8 .. 16) and past one pass (17: a second pass of
# one row); N: partial panels of 1, 15 and 17 rows and two whole ones; K: 1 (half a pair), a
# block's tail, odd K past a 64-byte block, a model width, and past the 256-pair int32 chunks.
@pytest.mark.parametrize("K", [1, 63, 65, 576, 1543])
@pytest.mark.parametrize("M", [1, 4, 16, 17])
def test_i16i8_panels_exact_random(machine, M, K):
    rng = np.random.default_rng(M * 100_000 + K)
    for N in (1, 15, 17, 32):
        a = rng.integers(-32767, 32768, (M, K), dtype=np.int16)
        b = rng.integers(-128, 128, (N, K), dtype=np.int8)
        check_i16i8_panels(machine, a, b, with_bias=bool(N % 2), ldo_pad=N % 3 * 5, seed=N)


# Every product at its largest magnitude: each 256-pair int32 chunk sums to 2^31 - 65536 at most,
# the row totals (3.4e10 at K = 4100) only fit the int64 they are added into.
@pytest.mark.parametrize("K", [512, 513, 4100])
def test_i16i8_panels_exact_extremes(machine, K):
    rng = np.random.default_rng(K)
    full = lambda dtype, v, n: np.full((n, K), v, dtype)  # noqa: E731
    signs = lambda n: np.where(rng.random((n, K)) < 0.5, -128, 127).astype(np.int8)  # noqa: E731
    for a in (full(np.int16, 32767, 16), full(np.int16, -32767, 5)):
        for b in (full(np.int8, -128, 17), full(np.int8, 127, 3), signs(16)):
            check_i16i8_panels(machine, a, b, with_bias=False)
