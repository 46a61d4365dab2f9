import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyengine import _C, kernels
from pyengine.kernels import ops
from conftest import isa_params

# (num_q_heads, num_kv_heads): plain MHA, SmolLM2's 9/3, and a GQA ratio of 8.
HEADS = [(4, 4), (9, 3), (16, 2)]


@pytest.fixture(params=isa_params())
def isa(request):
    with ops.use_isa(request.param):
        yield request.param


def make_inputs(batch, q_len, heads, head_dim, cache_len, kv_len, q_start, seed=0, logit_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    num_q_heads, num_kv_heads = heads
    q = torch.randn(batch, q_len, num_q_heads, head_dim, generator=g) * logit_scale
    k = torch.randn(batch, num_kv_heads, cache_len, head_dim, generator=g)
    v = torch.randn(batch, num_kv_heads, cache_len, head_dim, generator=g)
    return q, k, v, torch.tensor(q_start, dtype=torch.int32), torch.tensor(kv_len, dtype=torch.int32)


_expected_outputs = {}


def reference_output(q, k, v, q_start, kv_len, scale, window=0):
    """attention_reference in float64, computed once per input set (the ISA variants share it)."""
    key = (q.shape, k.shape, tuple(q_start.tolist()), tuple(kv_len.tolist()), scale, window,
           q.sum().item(), k.sum().item(), v.sum().item())
    if key not in _expected_outputs:
        _expected_outputs[key] = kernels.attention_reference(
            q.double(), k.double(), v.double(), q_start, kv_len, scale, window).float()
    return _expected_outputs[key]


def check_against_reference(q, k, v, q_start, kv_len, scale, tol=1e-5, window=0):
    expected = reference_output(q, k, v, q_start, kv_len, scale, window)
    # Poison the cache past each sequence's kv_len, and behind every query's window: the kernel
    # must never read it.
    k_poisoned, v_poisoned = k.clone(), v.clone()
    for b, (start, n) in enumerate(zip(q_start.tolist(), kv_len.tolist())):
        k_poisoned[b, :, n:] = float("nan")
        v_poisoned[b, :, n:] = float("inf")
        if window:
            behind = min(max(0, start + 1 - window), n - 1)  # the first query's first key
            k_poisoned[b, :, :behind] = float("nan")
            v_poisoned[b, :, :behind] = float("inf")
    out = torch.full_like(q, float("nan"))
    _C.attention(q, k_poisoned, v_poisoned, out, q_start, kv_len, scale, window)
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


def ragged_lengths(batch, q_len):
    """Real prompt lengths per sequence: the full block, one shorter, about half."""
    return [max(1, [q_len, q_len - 1, q_len // 2][b % 3]) for b in range(batch)]


@pytest.mark.parametrize("head_dim", [64, 128, 80, 3])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("q_len", [2, 17, 130])
def test_prefill_from_start(isa, q_len, heads, head_dim, batch=3):
    """A prompt from position 0; sequences of the batch have different real lengths (padding)."""
    real = ragged_lengths(batch, q_len)
    inputs = make_inputs(batch, q_len, heads, head_dim, q_len + 5, kv_len=real, q_start=[0] * batch)
    check_against_reference(*inputs, scale=1 / math.sqrt(head_dim))


@pytest.mark.parametrize("head_dim", [64, 128, 80, 3])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("q_len", [2, 17, 130])
def test_chunked_prefill(isa, q_len, heads, head_dim, batch=3):
    """A later prompt chunk: queries start at q_start > 0 and see the earlier cache too."""
    starts = [[5, 70, 1][b % 3] for b in range(batch)]
    real = ragged_lengths(batch, q_len)
    kv_len = [s + n for s, n in zip(starts, real)]
    inputs = make_inputs(batch, q_len, heads, head_dim, max(kv_len) + 3, kv_len, starts, seed=1)
    check_against_reference(*inputs, scale=1 / math.sqrt(head_dim))


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("prefix", [0, 173])
@pytest.mark.parametrize("q_len", [300, 700])
def test_long_prefill(isa, q_len, prefix, head_dim, batch=2):
    """Prompts of hundreds of tokens, crossing many query and key tiles, GQA ratio 3: from position 0
    and after a cached prefix (the second sequence's prefix shorter, and its prompt ragged)."""
    starts = [prefix, prefix // 2]
    real = [q_len, q_len - 37]
    kv_len = [s + n for s, n in zip(starts, real)]
    inputs = make_inputs(batch, q_len, (6, 2), head_dim, max(kv_len) + 3, kv_len, starts, seed=q_len + prefix)
    check_against_reference(*inputs, scale=1 / math.sqrt(head_dim))


@pytest.mark.parametrize("head_dim", [64, 128, 80, 3])
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("cache_len", [1, 70, 2048])
def test_decode(isa, cache_len, heads, head_dim, batch=3):
    """One new token per sequence over ragged contexts (the batch's shorter ones end earlier)."""
    kv_len = [max(1, cache_len - 37 * b) for b in range(batch)]
    q_start = [n - 1 for n in kv_len]
    inputs = make_inputs(batch, 1, heads, head_dim, cache_len, kv_len, q_start, seed=2)
    check_against_reference(*inputs, scale=1 / math.sqrt(head_dim))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_decode_split_is_thread_count_independent(isa, threads, batch):
    """The KV split depends on the thread count (and batch); every split must be right."""
    kv_len = [1500, 333][:batch]
    inputs = make_inputs(batch, 1, (9, 3), 64, 1500, kv_len=kv_len, q_start=[n - 1 for n in kv_len], seed=3)
    previous = _C.num_threads()
    _C.set_num_threads(threads)
    try:
        check_against_reference(*inputs, scale=0.125)
    finally:
        _C.set_num_threads(previous)


@pytest.mark.parametrize("q_len", [1, 17])
def test_large_logits_stay_finite(isa, q_len):
    """Scores in the hundreds: the online softmax must rescale, not overflow."""
    inputs = make_inputs(2, q_len, (9, 3), 64, 300, kv_len=[300, 150], q_start=[300 - q_len, 10],
                         seed=4, logit_scale=3.0)
    check_against_reference(*inputs, scale=10.0, tol=1e-4)


def test_queries_past_kv_len_see_all_valid_keys(isa):
    """Padded rows (position >= kv_len) see the kv_len valid keys, never NaN."""
    inputs = make_inputs(2, 9, (4, 2), 64, 16, kv_len=[5, 1], q_start=[3, 0], seed=5)
    check_against_reference(*inputs, scale=0.125)


# ---- sliding window (Mistral): a query at position p sees keys j in (p - window, p] ---------------


@pytest.mark.parametrize("head_dim", [64, 3])
@pytest.mark.parametrize("heads", [(9, 3), (16, 2)])
@pytest.mark.parametrize("window", [1, 5, 16, 63, 64, 65, 100, 1000])
def test_prefill_sliding_window(isa, window, heads, head_dim, batch=3):
    """From position 0 and as a later chunk, ragged: windows shorter than a key block, across block
    edges, longer than the prompt; rows of one tile then start their windows in different blocks."""
    q_len = 150
    starts = [0, 40, 7]
    kv_len = [s + n for s, n in zip(starts, ragged_lengths(batch, q_len))]
    inputs = make_inputs(batch, q_len, heads, head_dim, max(kv_len) + 3, kv_len, starts, seed=window)
    check_against_reference(*inputs, scale=1 / math.sqrt(head_dim), window=window)


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("window", [1, 2, 37, 64, 100, 1499, 1500, 4096])
def test_decode_sliding_window(isa, window, heads, batch=3):
    """One new token per sequence; the split across threads covers only the window."""
    kv_len = [1500, 333, 40]
    inputs = make_inputs(batch, 1, heads, 64, 1500, kv_len, [n - 1 for n in kv_len], seed=window + 7)
    check_against_reference(*inputs, scale=0.125, window=window)


def test_sliding_window_padding_queries_stay_finite(isa):
    """Padded rows far past kv_len + window see only key kv_len - 1, as the reference says."""
    inputs = make_inputs(2, 40, (4, 2), 64, 48, kv_len=[5, 1], q_start=[3, 0], seed=6)
    check_against_reference(*inputs, scale=0.125, window=4)


def test_custom_op_matches_reference():
    q, k, v, q_start, kv_len = make_inputs(2, 3, (9, 3), 64, 10, kv_len=[10, 4], q_start=[7, 1])
    torch.testing.assert_close(ops.attention(q, k, v, q_start, kv_len, 0.125),
                               kernels.attention_reference(q, k, v, q_start, kv_len, 0.125), rtol=1e-5, atol=1e-5)
    torch.library.opcheck(ops.attention, (q, k, v, q_start, kv_len, 0.125))
    torch.testing.assert_close(ops.attention(q, k, v, q_start, kv_len, 0.125, 3),
                               kernels.attention_reference(q, k, v, q_start, kv_len, 0.125, 3), rtol=1e-5, atol=1e-5)
    torch.library.opcheck(ops.attention, (q, k, v, q_start, kv_len, 0.125, 3))


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    q_len=st.integers(1, 40),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 3, 8]),
    head_dim=st.integers(1, 140),
    extra_cache=st.integers(0, 20),
    window=st.sampled_from([0, 0, 1, 2, 3, 8, 30, 64, 65, 200]),
    data=st.data(),
)
def test_random_shapes(batch, q_len, kv_heads, group, head_dim, extra_cache, window, data):
    q_start = [data.draw(st.integers(0, 100)) for _ in range(batch)]
    kv_len = [data.draw(st.integers(1, s + q_len)) for s in q_start]
    cache_len = max(kv_len) + extra_cache
    isa = data.draw(st.sampled_from(ops.supported_isas()))
    inputs = make_inputs(batch, q_len, (kv_heads * group, kv_heads), head_dim, cache_len, kv_len, q_start,
                         seed=data.draw(st.integers(0, 2**31 - 1)))
    with ops.use_isa(isa):
        check_against_reference(*inputs, scale=1 / math.sqrt(head_dim), window=window)


def good_args():
    q, k, v, q_start, kv_len = make_inputs(2, 3, (4, 2), 8, 10, kv_len=[10, 4], q_start=[7, 1])
    return dict(q=q, k_cache=k, v_cache=v, out=torch.empty_like(q), q_start=q_start, kv_len=kv_len, scale=0.5)


def with_(**changes):
    def build():
        args = good_args()
        for name, change in changes.items():
            args[name] = change(args)
        return args
    return build


@pytest.mark.parametrize(
    "build, error, message",
    [
        (with_(q=lambda a: a["q"].double()), TypeError, "q: expected dtype float32"),
        (with_(k_cache=lambda a: a["k_cache"].half()), TypeError, "k_cache: expected dtype float32"),
        (with_(v_cache=lambda a: a["v_cache"].bfloat16()), TypeError, "v_cache: expected dtype float32"),
        (with_(out=lambda a: a["out"].double()), TypeError, "out: expected dtype float32"),
        (with_(q_start=lambda a: a["q_start"].long()), TypeError, "q_start: expected dtype int32"),
        (with_(kv_len=lambda a: a["kv_len"].float()), TypeError, "kv_len: expected dtype int32"),
        (with_(q=lambda a: [1.0]), TypeError, "q: expected a torch.Tensor"),
        (with_(q=lambda a: a["q"][0]), ValueError, "q: expected 4 dimensions"),
        (with_(k_cache=lambda a: a["k_cache"][0]), ValueError, "k_cache: expected 4 dimensions"),
        (with_(q_start=lambda a: a["q_start"][None]), ValueError, "q_start: expected 1 dimensions"),
        (with_(q=lambda a: a["q"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError,
         "q: must be contiguous"),
        (with_(v_cache=lambda a: a["v_cache"].transpose(2, 3).contiguous().transpose(2, 3)), ValueError,
         "v_cache: must be contiguous"),
        (with_(k_cache=lambda a: a["k_cache"][:1].contiguous()), ValueError, "k_cache: dimension 0"),
        (with_(k_cache=lambda a: a["k_cache"][..., :4].contiguous()), ValueError, "k_cache: dimension 3"),
        (with_(v_cache=lambda a: a["v_cache"][:, :, :5].contiguous()), ValueError, "v_cache: dimension 2"),
        (with_(v_cache=lambda a: a["v_cache"][:, :1].contiguous()), ValueError, "v_cache: dimension 1"),
        (with_(out=lambda a: a["out"][:, :2].contiguous()), ValueError, "out: dimension 1"),
        (with_(q_start=lambda a: a["q_start"][:1].contiguous()), ValueError, "q_start: dimension 0"),
        (with_(kv_len=lambda a: torch.ones(3, dtype=torch.int32)), ValueError, "kv_len: dimension 0"),
        (with_(q=lambda a: a["q"][:, :, :3].contiguous(), out=lambda a: a["out"][:, :, :3].contiguous()),
         ValueError, r"q: number of query heads \(3\) must be a multiple"),
        (with_(kv_len=lambda a: torch.tensor([10, 11], dtype=torch.int32)), ValueError, "kv_len: entry 1 is 11"),
        (with_(kv_len=lambda a: torch.tensor([0, 4], dtype=torch.int32)), ValueError, "kv_len: entry 0 is 0"),
        (with_(q_start=lambda a: torch.tensor([7, -1], dtype=torch.int32)), ValueError, "q_start: entry 1 is -1"),
        (with_(q=lambda a: torch.empty(2, 0, 4, 8), out=lambda a: torch.empty(2, 0, 4, 8)), ValueError,
         "q: must not be empty"),
        (with_(k_cache=lambda a: torch.empty(2, 2, 0, 8), v_cache=lambda a: torch.empty(2, 2, 0, 8)), ValueError,
         "k_cache: must not be empty"),
        (with_(out=lambda a: a["q"]), ValueError, "out: must not share memory with q"),
        (with_(out=lambda a: a["k_cache"].view(-1)[: a["q"].numel()].view_as(a["q"])), ValueError,
         "out: must not share memory with k_cache"),
        (with_(scale=lambda a: float("nan")), ValueError, "scale must be finite"),
        (with_(window=lambda a: -1), ValueError, "window must be >= 0"),
        (with_(q=lambda a: a["q"].to("meta")), ValueError, "q: tensors on device .meta. are not supported"),
    ],
)
def test_rejects_bad_arguments(build, error, message):
    args = build()
    with pytest.raises(error, match=message):
        _C.attention(**args)
