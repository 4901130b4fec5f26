"""RMSNorm, RoPE, ALiBi and the masks, each against plain math or transformers' own code."""

import math

import pytest
import torch
from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb
from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

import h64lm


def test_rmsnorm_is_x_over_rms_times_gain():
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    norm = h64lm.RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    expected = torch.empty_like(x)
    for idx in torch.cartesian_prod(torch.arange(3), torch.arange(5)):
        row = x[idx[0], idx[1]]
        rms = math.sqrt(sum(v * v for v in row.tolist()) / 16 + 1e-5)
        expected[idx[0], idx[1]] = row / rms * norm.weight.double()
    torch.testing.assert_close(norm(x.float()).double(), expected, rtol=1e-5, atol=1e-6)

    reference = MixtralRMSNorm(16, eps=1e-5)
    reference.weight.data.copy_(norm.weight.data)
    torch.testing.assert_close(norm(x.float()), reference(x.float()))


def test_rope_matches_transformers():
    head_dim, theta = 16, 10000.0
    q, k = torch.randn(2, 4, 7, head_dim), torch.randn(2, 2, 7, head_dim)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [10, 11, 12, 13, 14, 15, 16]])
    cos, sin = h64lm.rope_cos_sin(positions, h64lm.rope_inverse_frequencies(head_dim, theta))
    # transformers' cos/sin, computed independently from the same definition
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    expected_q, expected_k = apply_rotary_pos_emb(q, k, emb.cos(), emb.sin())
    torch.testing.assert_close(h64lm.apply_rope(q, cos, sin), expected_q)
    torch.testing.assert_close(h64lm.apply_rope(k, cos, sin), expected_k)


def test_rope_score_depends_only_on_distance_and_keeps_norms():
    head_dim = 32
    inv_freq = h64lm.rope_inverse_frequencies(head_dim, 10000.0)
    q, k = torch.randn(1, 1, 1, head_dim, dtype=torch.float64), torch.randn(1, 1, 1, head_dim, dtype=torch.float64)

    def rotated(x, pos):
        cos, sin = h64lm.rope_cos_sin(torch.tensor([[pos]]), inv_freq)
        return h64lm.apply_rope(x, cos.double(), sin.double())

    score = lambda m, n: (rotated(q, m) * rotated(k, n)).sum().item()  # noqa: E731
    for m, n in [(5, 2), (40, 7), (3, 3)]:
        for shift in (1, 17, 300):
            assert score(m, n) == pytest.approx(score(m + shift, n + shift), rel=1e-5, abs=1e-6)  # RoPE runs in float32
    assert score(5, 2) != pytest.approx(score(5, 3))  # and it does depend on the distance
    assert rotated(q, 123).norm().item() == pytest.approx(q.norm().item(), rel=1e-6)


@pytest.mark.parametrize("num_heads, expected", [
    # Press et al. 2022, section 3: for 8 heads the slopes are 1/2, 1/4, ..., 1/256.
    (8, [2.0 ** -i for i in range(1, 9)]),
    (4, [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8]),
    (1, [2.0 ** -8]),
    # 12 heads: the 8-head slopes, then slopes 1, 3, 5, 7 of the 16-head sequence 2^(-k/2).
    (12, [2.0 ** -i for i in range(1, 9)] + [2.0 ** -0.5, 2.0 ** -1.5, 2.0 ** -2.5, 2.0 ** -3.5]),
    # 6 heads: the 4-head slopes, then slopes 1, 3 of the 8-head sequence.
    (6, [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]),
])
def test_alibi_slopes_follow_the_paper(num_heads, expected):
    torch.testing.assert_close(h64lm.alibi_slopes(num_heads), torch.tensor(expected))


def test_alibi_bias_is_minus_slope_times_distance():
    slopes = h64lm.alibi_slopes(4)
    q_pos = torch.tensor([[3, 4, 5]])
    k_pos = torch.tensor([[0, 1, 2, 3, 4, 5]])
    bias = h64lm.alibi_bias(slopes, q_pos, k_pos)
    assert bias.shape == (1, 4, 3, 6)
    for h in range(4):
        for i, qi in enumerate(q_pos[0].tolist()):
            for j, kj in enumerate(k_pos[0].tolist()):
                assert bias[0, h, i, j].item() == pytest.approx(-slopes[h].item() * (qi - kj))
    assert (bias[..., :3, :][0, :, 2, :].diff(dim=-1) > 0).all()  # nearer keys are penalised less


def test_causal_and_sliding_window_masks():
    pos = torch.arange(6)[None]
    causal = h64lm.attention_mask(pos, pos, window=None)[0, 0]
    assert torch.equal(causal, torch.ones(6, 6, dtype=torch.bool).tril())
    windowed = h64lm.attention_mask(pos, pos, window=3)[0, 0]
    for i in range(6):
        assert windowed[i].nonzero().flatten().tolist() == [j for j in range(6) if 0 <= i - j < 3]


def test_decode_row_sees_every_cached_key():
    """The one query of a decode step at position 9 sees keys 0..9; the original script's mask let it see key 0."""
    row = h64lm.attention_mask(torch.tensor([[9]]), torch.arange(10)[None], window=None)[0, 0]
    assert row.tolist() == [[True] * 10]
    row = h64lm.attention_mask(torch.tensor([[9]]), torch.arange(10)[None], window=4)[0, 0]
    assert row.tolist() == [[False] * 6 + [True] * 4]


def test_padding_keys_are_hidden_and_padding_queries_stay_finite():
    q_pos = torch.tensor([[-1, -1, 0, 1]])
    mask = h64lm.attention_mask(q_pos, q_pos, window=None)[0, 0]
    assert mask[2].tolist() == [False, False, True, False]
    assert mask[3].tolist() == [False, False, True, True]
    assert mask[0].all() and mask[1].all()  # padding rows see everything, so softmax has no 0/0
