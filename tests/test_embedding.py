"""Token embeddings and the three position schemes, against their textbook formulas."""

import math

import pytest
import torch
from jaxtyping import TypeCheckError

from ftransformer.layers import apply_rotary, embed_tokens, learned_positions, rotary_angles, sinusoidal_positions

VOCAB, D_MODEL, MAX_SEQ = 11, 6, 9


def test_embed_tokens_is_a_row_lookup_for_any_batch_shape(gen):
    w = torch.randn(VOCAB, D_MODEL, generator=gen)
    for shape in [(5,), (2, 5), (3, 2, 4)]:
        tokens = torch.randint(0, VOCAB, shape, generator=gen)
        out = embed_tokens(w, tokens)
        assert out.shape == (*shape, D_MODEL)
        for idx in torch.cartesian_prod(*[torch.arange(n) for n in shape]).reshape(-1, len(shape)):
            idx = tuple(idx.tolist())
            assert torch.equal(out[idx], w[tokens[idx]])


def test_learned_positions_is_a_row_lookup(gen):
    w = torch.randn(MAX_SEQ, D_MODEL, generator=gen)
    positions = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]])
    out = learned_positions(w, positions)
    assert torch.equal(out[1, 2], w[7]) and torch.equal(out[0, 0], w[0])


def test_embedding_gradients_go_to_the_looked_up_rows(gen):
    w = torch.randn(VOCAB, D_MODEL, dtype=torch.float64, generator=gen, requires_grad=True)
    tokens = torch.tensor([[1, 4, 4], [0, 10, 1]])
    assert torch.autograd.gradcheck(lambda w: embed_tokens(w, tokens), (w,))
    embed_tokens(w, tokens).sum().backward()
    counts = torch.bincount(tokens.flatten(), minlength=VOCAB).to(torch.float64)
    torch.testing.assert_close(w.grad, counts[:, None].expand(VOCAB, D_MODEL))


def test_sinusoidal_positions_match_the_formula():
    d_model, base = 10, 10000.0
    positions = torch.arange(7)
    pe = sinusoidal_positions(positions, d_model, base=base, dtype=torch.float64)
    assert pe.shape == (7, d_model) and pe.dtype == torch.float64
    for pos in range(7):
        for i in range(d_model // 2):
            angle = pos / base ** (2 * i / d_model)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoidal_positions_follow_the_position_tensor():
    positions = torch.tensor([[3, 4, 5], [0, 1, 2]])
    pe = sinusoidal_positions(positions, 8)
    table = sinusoidal_positions(torch.arange(6), 8)
    assert pe.shape == (2, 3, 8)
    torch.testing.assert_close(pe[0], table[3:6])
    torch.testing.assert_close(pe[1], table[0:3])


def rotate_with_complex_numbers(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE written independently: channel pairs (i, i + head_dim/2) as complex numbers times e^(i pos theta_i)."""
    half = x.shape[-1] // 2
    theta = base ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    z = z * torch.polar(torch.ones_like(theta), positions.double()[:, None] * theta)
    return torch.cat([z.real, z.imag], dim=-1)


def test_rotary_matches_complex_multiplication(gen):
    heads, seq, head_dim = 3, 5, 8
    x = torch.randn(2, heads, seq, head_dim, generator=gen)
    positions = torch.tensor([0, 1, 2, 7, 13])
    cos, sin = rotary_angles(positions.expand(2, seq), head_dim, base=500.0)
    assert cos.shape == sin.shape == (2, seq, head_dim // 2)
    out = apply_rotary(x, cos, sin)
    torch.testing.assert_close(out.double(), rotate_with_complex_numbers(x, positions, 500.0), atol=1e-5, rtol=1e-5)
    # Position 0 is no rotation at all.
    torch.testing.assert_close(out[..., 0, :], x[..., 0, :])


def test_rotary_preserves_norms(gen):
    x = torch.randn(4, 2, 6, 10, generator=gen)
    cos, sin = rotary_angles((torch.arange(6) * 17).expand(4, 6), 10)
    torch.testing.assert_close(apply_rotary(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


def test_rotary_dot_product_depends_only_on_relative_position(gen):
    head_dim = 12
    q = torch.randn(1, 1, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, head_dim, generator=gen, dtype=torch.float64)

    def score(m: int, n: int) -> float:
        cos_q, sin_q = rotary_angles(torch.tensor([m]), head_dim)
        cos_k, sin_k = rotary_angles(torch.tensor([n]), head_dim)
        return float((apply_rotary(q, cos_q, sin_q) * apply_rotary(k, cos_k, sin_k)).sum())

    for m, n in [(5, 2), (9, 9), (3, 11)]:
        for shift in (1, 4, 30):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)  # but it does depend on the offset


def test_rotary_gradcheck(gen):
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    cos, sin = rotary_angles(torch.arange(3), 4)
    assert torch.autograd.gradcheck(lambda x: apply_rotary(x, cos, sin), (x,))


def test_wrong_shaped_tables_raise_a_type_error_naming_the_axis(gen):
    w = torch.randn(VOCAB, D_MODEL, generator=gen)
    with pytest.raises(TypeCheckError, match="tokens"):
        embed_tokens(w, torch.zeros(3, 4))  # float ids
    x = torch.randn(2, 3, 5, 8, generator=gen)
    cos, sin = rotary_angles(torch.arange(4), 8)  # 4 positions for a seq of 5
    with pytest.raises(TypeCheckError, match="seq=5"):
        apply_rotary(x, cos, sin)
