"""The kernels release the GIL: while a worker thread is inside a long kernel call, the main thread
runs Python.

A worker repeats one call (~30-100 ms, on one kernel thread) and records when each call began and
ended; meanwhile the main thread wakes every millisecond and records the time, which takes the GIL.
A call that keeps the GIL leaves no main-thread timestamp in its middle (the main thread can only
run in the handoffs at either end); a call that releases it has them in nearly every call. This
does not depend on how much CPU the main thread gets, only that it is scheduled at all in a window
of tens of ms, so it holds on a loaded 2-vCPU host, where counting loop iterations does not.

The control runs the same harness on a C call known to keep the GIL (builtin sum over a range, a C
loop that never drops it): it must come out with no overlap, so the harness tells the two apart.
"""
import bisect
import threading
import time

import pytest
import torch

from pyengine import _C
from pyengine.kernels import ops

RUN_S = 0.5  # how long the worker keeps calling


@pytest.fixture(autouse=True)
def one_kernel_thread():
    before_ours, before_torch = _C.num_threads(), torch.get_num_threads()
    ops.set_num_threads(1)
    yield
    _C.set_num_threads(before_ours)
    torch.set_num_threads(before_torch)


def overlapped_fraction(call):
    """Fraction of the worker's calls during whose middle 40% the main thread ran Python."""
    intervals, errors = [], []

    def worker():
        try:
            # The fixture's one kernel thread reaches this thread too (test_set_num_threads_reaches_
            # kernels_called_from_other_threads), leaving the other CPU to the main thread.
            deadline = time.perf_counter() + RUN_S
            while time.perf_counter() < deadline or len(intervals) < 3:  # 3 calls even on a slow host
                start = time.perf_counter()
                call()
                intervals.append((start, time.perf_counter()))
        except BaseException as e:  # re-raised in the main thread below
            errors.append(e)

    thread = threading.Thread(target=worker)
    stamps = []
    thread.start()
    while thread.is_alive():
        stamps.append(time.perf_counter())
        time.sleep(0.001)  # sleeping, not spinning: it needs only to be scheduled now and then, not a CPU
    thread.join()
    if errors:
        raise errors[0]
    hit = 0
    for start, end in intervals:
        lo, hi = start + 0.3 * (end - start), start + 0.7 * (end - start)
        i = bisect.bisect_right(stamps, lo)
        hit += i < len(stamps) and stamps[i] < hi
    return hit / len(intervals)


def _linear_f32():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2048, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    out = torch.empty(2048, 1024)
    return lambda: _C.linear_f32(x, w, out, None)


def _int8_linear_a16():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2048, 2048, generator=g)
    w_q, w_scale = ops.quantize_rows(torch.randn(768, 2048, generator=g))
    out = torch.empty(2048, 768)
    return lambda: _C.int8_linear_a16(x, w_q, w_scale, out, None)


def _attention():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2048, 8, 64, generator=g)  # a 2048-token prefill, 8 query heads over 4 KV heads
    k, v = torch.randn(1, 4, 2048, 64, generator=g), torch.randn(1, 4, 2048, 64, generator=g)
    out = torch.empty_like(q)
    q_start, kv_len = torch.zeros(1, dtype=torch.int32), torch.full((1,), 2048, dtype=torch.int32)
    return lambda: _C.attention(q, k, v, out, q_start, kv_len, 0.125, 0)


def _sum_words():
    words = torch.ones(48 << 20, dtype=torch.int64)  # 384 MB: ~30 ms a read on one thread
    return lambda: _C.sum_words(words)


@pytest.mark.parametrize("make_call", [_linear_f32, _int8_linear_a16, _attention, _sum_words],
                         ids=["linear_f32", "int8_linear_a16", "attention", "sum_words"])
def test_kernel_call_lets_python_threads_run(make_call):
    call = make_call()
    call()  # warm up: first touch of the output, thread-local buffers
    fraction = overlapped_fraction(call)
    assert fraction >= 0.5, f"the main thread ran during only {fraction:.0%} of the calls: is the GIL held?"


def test_control_a_call_holding_the_gil_shows_no_overlap():
    n = 5_000_000
    start = time.perf_counter()
    sum(range(n))
    assert time.perf_counter() - start > 0.02, "the control call must be long next to the 1 ms wake-ups"
    fraction = overlapped_fraction(lambda: sum(range(n)))
    assert fraction <= 0.2, f"the main thread ran during {fraction:.0%} of calls that keep the GIL"


def test_set_num_threads_reaches_kernels_called_from_other_threads():
    """ops.set_num_threads promises 'threads for both our kernels and torch's pool'; a kernel called
    from another thread (a server's worker, a generation thread) must see the same count. (It did
    not while the count was only OpenMP's, which is per thread: every parallel region now asks
    pyengine::num_threads().)"""
    seen = []
    thread = threading.Thread(target=lambda: seen.append((_C.num_threads(), torch.get_num_threads())))
    thread.start()
    thread.join()
    assert seen == [(1, 1)]  # the fixture set 1 in the main thread
