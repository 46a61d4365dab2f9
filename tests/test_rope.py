import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig
from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj_apply_rotary_pos_emb
from transformers.models.gptj.modeling_gptj import create_sinusoidal_positions
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply_rotary_pos_emb

from pyengine import _C, kernels
from pyengine.kernels import ops
from conftest import isa_params

# Half the head dim takes the awkward sizes (rope needs an even head dim).
HALF_DIMS = [1, 2, 7, 8, 9, 32, 64, 288]


@pytest.fixture(params=isa_params())
def isa(request):
    with ops.use_isa(request.param):
        yield request.param


def tables(num_positions, half, theta=10000.0):
    inv_freq = 1.0 / theta ** (torch.arange(half, dtype=torch.float64) / half)
    angles = torch.arange(num_positions, dtype=torch.float64)[:, None] * inv_freq
    return angles.cos().float(), angles.sin().float()


def random_positions(batch, seq, num_positions, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_positions, (batch, seq), generator=g, dtype=torch.int32)


def rotated(x, cos, sin, positions, interleaved):
    y = x.clone()
    ops.rope(y, cos, sin, positions, interleaved)
    return y


def rope_expected(x, cos, sin, positions, interleaved):
    """The reference's rotation of a copy of x."""
    y = x.clone()
    kernels.rope_reference(y, cos, sin, positions, interleaved)
    return y


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("half", HALF_DIMS)
def test_rope_matches_reference(isa, half, interleaved):
    torch.manual_seed(half)
    cos, sin = tables(100, half)
    x = torch.randn(2, 5, 3, 2 * half)
    positions = random_positions(2, 5, 100, seed=half)
    expected = rope_expected(x, cos, sin, positions, interleaved)
    torch.testing.assert_close(rotated(x, cos, sin, positions, interleaved), expected, rtol=1e-6, atol=1e-6)


def test_rope_matches_transformers_llama_with_gqa(isa):
    # q and k with different head counts, rotated one call each as the engine does.
    torch.manual_seed(0)
    batch, seq, head_dim = 2, 7, 64
    cos, sin = tables(64, head_dim // 2)
    positions = random_positions(batch, seq, 64)
    q, k = torch.randn(batch, seq, 8, head_dim), torch.randn(batch, seq, 2, head_dim)
    cos_full = torch.cat((cos, cos), -1)[positions.long()]  # HF layout: [B, T, D], angles repeated
    sin_full = torch.cat((sin, sin), -1)[positions.long()]
    q_hf, k_hf = llama_apply_rotary_pos_emb(q, k, cos_full, sin_full, unsqueeze_dim=2)
    torch.testing.assert_close(rotated(q, cos, sin, positions, False), q_hf, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rotated(k, cos, sin, positions, False), k_hf, rtol=1e-6, atol=1e-6)


def test_rope_with_llama3_scaled_tables_from_transformers(isa):
    # The caller builds the tables: here transformers' own Llama-3.x rope (theta 5e5, factor 8).
    head_dim, heads = 64, 4
    config = LlamaConfig(hidden_size=head_dim * heads, num_attention_heads=heads, max_position_embeddings=131072,
                         rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    rotary = LlamaRotaryEmbedding(config)
    num_positions = 20000  # past the original context, where the scaling matters
    cos_full, sin_full = rotary(torch.zeros(1), torch.arange(num_positions)[None])
    cos, sin = cos_full[0, :, : head_dim // 2].contiguous(), sin_full[0, :, : head_dim // 2].contiguous()
    positions = torch.tensor([[0, 1, 8191, 8192, 12345, 19999]], dtype=torch.int32)
    torch.manual_seed(1)
    q = torch.randn(1, 6, heads, head_dim)
    q_hf, _ = llama_apply_rotary_pos_emb(q, q, cos_full[:, positions[0].long()], sin_full[:, positions[0].long()],
                                         unsqueeze_dim=2)
    torch.testing.assert_close(rotated(q, cos, sin, positions, False), q_hf, rtol=1e-6, atol=1e-5)


def test_rope_interleaved_matches_transformers_gptj(isa):
    torch.manual_seed(2)
    head_dim, num_positions = 64, 50
    sincos = create_sinusoidal_positions(num_positions, head_dim)
    sin, cos = sincos[:, : head_dim // 2].contiguous(), sincos[:, head_dim // 2 :].contiguous()
    positions = random_positions(3, 4, num_positions)
    x = torch.randn(3, 4, 5, head_dim)
    expected = gptj_apply_rotary_pos_emb(x, sin[positions.long()], cos[positions.long()])
    torch.testing.assert_close(rotated(x, cos, sin, positions, True), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_large_batch_uses_threads(isa, interleaved):
    torch.manual_seed(3)
    cos, sin = tables(4096, 64)
    x = torch.randn(2, 97, 6, 128)
    positions = random_positions(2, 97, 4096)
    expected = rope_expected(x, cos, sin, positions, interleaved)
    torch.testing.assert_close(rotated(x, cos, sin, positions, interleaved), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", [-1, 100, 2**31 - 1, -(2**31)])
def test_rope_rejects_out_of_range_positions_without_touching_x(isa, bad):
    cos, sin = tables(100, 8)
    x = torch.randn(1, 3, 2, 16)
    before = x.clone()
    positions = torch.tensor([[0, bad, 5]], dtype=torch.int32)
    with pytest.raises(ValueError, match=rf"positions: position {bad} \(token 1\) is outside .* \[0, 100\)"):
        _C.rope(x, cos, sin, positions, False)
    assert torch.equal(x, before)


def test_rope_position_zero_is_identity(isa):
    cos, sin = tables(4, 9)
    x = torch.randn(2, 3, 2, 18)
    torch.testing.assert_close(rotated(x, cos, sin, torch.zeros(2, 3, dtype=torch.int32), False), x,
                               rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), seq=st.integers(1, 9), heads=st.integers(1, 5), half=st.integers(1, 70),
       interleaved=st.booleans(), isa_name=st.sampled_from(ops.supported_isas()), seed=st.integers(0, 1000))
def test_rope_random_shapes(batch, seq, heads, half, interleaved, isa_name, seed):
    torch.manual_seed(seed)
    cos, sin = tables(32, half)
    x = torch.randn(batch, seq, heads, 2 * half)
    positions = random_positions(batch, seq, 32, seed)
    with ops.use_isa(isa_name):
        out = rotated(x, cos, sin, positions, interleaved)
    torch.testing.assert_close(out, rope_expected(x, cos, sin, positions, interleaved), rtol=1e-6, atol=1e-6)


def _args(x=None, cos=None, sin=None, positions=None):
    c, s = tables(10, 4)
    return (torch.randn(2, 3, 2, 8) if x is None else x, c if cos is None else cos, s if sin is None else sin,
            torch.zeros(2, 3, dtype=torch.int32) if positions is None else positions)


@pytest.mark.parametrize(
    "args, error, message",
    [
        (lambda: _args(x=torch.randn(2, 3, 2, 8).double()), TypeError, "x: expected dtype float32"),
        (lambda: _args(x=torch.randn(2, 3, 16)), ValueError, "x: expected 4 dimensions"),
        (lambda: _args(x=torch.randn(2, 3, 8, 2).transpose(2, 3)), ValueError, "x: must be contiguous"),
        (lambda: _args(x=torch.randn(2, 3, 2, 7)), ValueError, "x: the head dimension .* must be even"),
        (lambda: _args(x=torch.randn(0, 3, 2, 8), positions=torch.zeros(0, 3, dtype=torch.int32)), ValueError,
         "x: must not be empty"),
        (lambda: _args(cos=torch.randn(10, 5)), ValueError, "sin: expected the shape of cos"),
        (lambda: _args(cos=torch.randn(10, 5), sin=torch.randn(10, 5)), ValueError, "cos: dimension 1 must be 4"),
        (lambda: _args(cos=torch.randn(10, 4).half()), TypeError, "cos: expected dtype float32"),
        (lambda: _args(sin=torch.randn(4, 10).t()), ValueError, "sin: must be contiguous"),
        (lambda: _args(cos=torch.randn(40)), ValueError, "cos: expected 2 dimensions"),
        (lambda: _args(cos=torch.randn(0, 4), sin=torch.randn(0, 4)), ValueError, "cos: must not be empty"),
        (lambda: _args(positions=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "positions: expected dtype int32"),
        (lambda: _args(positions=torch.zeros(6, dtype=torch.int32)), ValueError, "positions: expected 2 dimensions"),
        (lambda: _args(positions=torch.zeros(3, 3, dtype=torch.int32)), ValueError, "positions: dimension 0 must be 2"),
        (lambda: _args(positions=torch.zeros(2, 4, dtype=torch.int32)), ValueError, "positions: dimension 1 must be 3"),
        (lambda: _args(positions=torch.zeros(3, 2, dtype=torch.int32).t()), ValueError, "positions: must be contiguous"),
        (lambda: _args(positions=[[0, 0, 0]] * 2), TypeError, "positions: expected a torch.Tensor"),
    ],
)
def test_rope_rejects_bad_arguments(args, error, message):
    with pytest.raises(error, match=message):
        _C.rope(*args(), False)


def test_rope_rejects_x_overlapping_its_tables():
    buf = torch.randn(2 * 3 * 2 * 8)
    x = buf.view(2, 3, 2, 8)
    cos, sin = buf[:40].view(10, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="x: must not share memory with cos"):
        _C.rope(x, cos, sin, torch.zeros(2, 3, dtype=torch.int32), False)
