"""The AVX-512 code, run on an emulated AVX-512 VNNI CPU (tests/x86_emulator.py), on any x86-64 machine.

The native tests run the AVX-512 paths only where the CPU has AVX-512; the machines this project is
developed on mostly do not. Here the same sources are compiled with CMakeLists.txt's AVX-512 flags and
run under Bochs: the int8 VNNI block against an exact integer reference, with guard pages that fault on
any read past a row's K bytes, and the cpuid / xgetbv detection that decides when that block runs."""
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

ISA_LEVELS = {0: "scalar", 1: "avx2", 2: "avx512"}  # pyengine::Isa

I8_BLOCK_ENTRY = """
#include "cpu/int8_matmul_isa.h"
extern "C" void pe_entry(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, int32_t* c, int64_t ldc,
                         int64_t M, int64_t N, int64_t K) {
  pyengine::cpu::i8_dot_block_avx512(a, lda, b, ldb, c, ldc, M, N, K);
}
"""

DETECT_ENTRY = """
#include "cpu/isa_detect.h"
extern "C" int pe_entry() { return static_cast<int>(pyengine::cpu::isa_from_cpuid()); }
"""


def _build(tmp_path_factory, name, entry_source, sources, flags):
    folder = tmp_path_factory.mktemp(name)
    entry = folder / "entry.cpp"
    entry.write_text(entry_source)
    try:
        return build_freestanding([entry, *sources], "pe_entry", folder / f"{name}.elf", flags)
    except FileNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def i8_block_elf(tmp_path_factory):
    return _build(tmp_path_factory, "i8_block", I8_BLOCK_ENTRY, [ROOT / "csrc/cpu/int8_matmul_avx512.cpp"],
                  cmake_flags("AVX512_FLAGS"))


@pytest.fixture(scope="module")
def detect_elf(tmp_path_factory):
    # Built without ISA flags, as CMakeLists.txt builds it: detection must run on any x86-64.
    return _build(tmp_path_factory, "detect", DETECT_ENTRY, [ROOT / "csrc/cpu/isa_detect.cpp"], [])


# ---- detection -------------------------------------------------------------------------------


@pytest.mark.parametrize("osxsave, xcr0, expected", [
    (True, XCR0_AVX512, "avx512"),
    (True, XCR0_X87_SSE_AVX, "avx2"),  # an OS that does not save the zmm / opmask state
    (False, 1, "scalar"),  # an OS that enabled no extended state at all: xgetbv must not run
])
def test_isa_detection_on_an_avx512_vnni_cpu(detect_elf, osxsave, xcr0, expected):
    with X86Machine() as machine:
        entry = machine.load_elf(detect_elf)
        level = machine.call(entry, xcr0=xcr0, osxsave=osxsave) & 0xFFFFFFFF
    assert ISA_LEVELS[level] == expected


# ---- i8_dot_block_avx512: exact against an integer reference ----------------------------------

A_REGION, B_REGION, C_REGION = 0x1000_0000, 0x2000_0000, 0x3000_0000
REGION_BYTES = 256 * 1024  # mapped; the page after each region is not, so over-reads fault
C_SENTINEL = -0x5A5A5A5A


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


@pytest.fixture(scope="module")
def i8_machine(i8_block_elf):
    with X86Machine() as machine:
        entry = machine.load_elf(i8_block_elf)
        for region in (A_REGION, B_REGION, C_REGION):
            machine.map(region, REGION_BYTES)
        yield machine, entry


def check_i8_block(i8_machine, a, b, lda_pad=0, ldb_pad=0, ldc_pad=0):
    machine, entry = i8_machine
    (M, K), N = a.shape, b.shape[0]
    c, c_buffer = run_i8_block(machine, entry, a, b, K + lda_pad, K + ldb_pad, N + ldc_pad)
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
def test_i8_block_exact_random(i8_machine, M, K):
    rng = np.random.default_rng(M * 10_000 + K)
    for N in range(1, 10):
        a = rng.integers(-127, 128, (M, K), dtype=np.int8)
        b = rng.integers(-127, 128, (N, K), dtype=np.int8)
        check_i8_block(i8_machine, a, b, lda_pad=N % 3 * 17, ldb_pad=M % 2 * 5, ldc_pad=N % 2 * 3)


@pytest.mark.parametrize("K", [64, 577, 4096])
def test_i8_block_exact_extremes(i8_machine, K):
    # +-127 everywhere: the largest sums the +128 offset trick must undo exactly (K * 127^2 = 66e6 at
    # K = 4096, and 128 * sum(b) near 2^26), in every sign combination.
    rng = np.random.default_rng(K)
    full = lambda v, n: np.full((n, K), v, np.int8)  # noqa: E731
    signs = lambda n: np.where(rng.random((n, K)) < 0.5, -127, 127).astype(np.int8)  # noqa: E731
    for a, b in [(full(127, 5), full(127, 6)), (full(-127, 5), full(127, 6)), (full(127, 3), full(-127, 7)),
                 (full(-127, 4), full(-127, 4)), (signs(5), signs(9)), (full(-127, 1), signs(3))]:
        check_i8_block(i8_machine, a, b)


@settings(max_examples=60, deadline=None)
@given(M=st.integers(1, 9), N=st.integers(1, 9), K=st.integers(1, 700), lda_pad=st.integers(0, 70),
       ldb_pad=st.integers(0, 70), ldc_pad=st.integers(0, 5), seed=st.integers(0, 2**32 - 1))
def test_i8_block_exact_hypothesis(i8_machine, M, N, K, lda_pad, ldb_pad, ldc_pad, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(-127, 128, (M, K), dtype=np.int8)
    b = rng.integers(-127, 128, (N, K), dtype=np.int8)
    check_i8_block(i8_machine, a, b, lda_pad, ldb_pad, ldc_pad)


def test_guard_pages_catch_an_over_read(i8_machine):
    # The harness itself: a row that claims more bytes than are mapped must fault, not pass.
    machine, entry = i8_machine
    K = 64
    end = B_REGION + REGION_BYTES
    with pytest.raises(EmulatedFault, match="vector 14"):
        machine.call(entry, A_REGION, K, end - K + 1, K, C_REGION, 1, 1, 1, K)
