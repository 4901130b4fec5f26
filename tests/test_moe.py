"""The router losses against transformers and their formulas, the two expert dispatch paths against each other,
and capacity dropping against a hand-run of the documented rule."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import h64lm
from conftest import small_config


def routed(probs_or_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = probs_or_logits.softmax(dim=-1)
    return probs, probs.topk(k, dim=-1).indices


@pytest.mark.parametrize("tokens, experts, k", [(64, 8, 2), (37, 4, 1), (100, 16, 4)])
def test_load_balancing_loss_equals_transformers(tokens, experts, k):
    logits = torch.randn(tokens, experts) * 3
    probs, expert_ids = routed(logits, k)
    expected = load_balancing_loss_func((logits,), experts, k)
    torch.testing.assert_close(h64lm.load_balancing_loss(probs, expert_ids), expected)


def test_router_z_loss_is_mean_squared_logsumexp():
    logits = torch.randn(10, 8, dtype=torch.float64) * 4
    expected = sum(math.log(sum(math.exp(z) for z in row)) ** 2 for row in logits.tolist()) / 10
    assert h64lm.router_z_loss(logits).item() == pytest.approx(expected, rel=1e-12)


def test_collapsed_routing_scores_worse_than_uniform():
    E, k, N = 8, 2, 64
    # Uniform: token t strongly prefers experts t mod E and t+1 mod E, so every expert gets the same share.
    uniform = torch.zeros(N, E)
    for t in range(N):
        uniform[t, [t % E, (t + 1) % E]] = 10.0
    # Collapsed: every token prefers experts 0 and 1.
    collapsed = torch.zeros(N, E)
    collapsed[:, :2] = 10.0
    balanced_loss = h64lm.load_balancing_loss(*routed(uniform, k))
    collapsed_loss = h64lm.load_balancing_loss(*routed(collapsed, k))
    assert balanced_loss.item() == pytest.approx(k, rel=1e-6)  # the minimum, k, reached by uniform routing
    assert collapsed_loss.item() == pytest.approx(E, rel=1e-3)  # E * (1 * 0.5 + 1 * 0.5)
    assert collapsed_loss > balanced_loss


def make_moe(**overrides) -> h64lm.MoE:
    """An MoE layer with Switch's balance loss, the one these tests check (tests/test_routing_lab.py has the rest)."""
    model = h64lm.H64LM(small_config(moe_layers="all", **{"balance": "switch", **overrides}))
    return model.blocks[0].ffn


@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.0])
def test_loop_and_grouped_dispatch_agree_with_gradients(capacity_factor):
    loop = make_moe(moe_impl="loop", capacity_factor=capacity_factor, num_experts=6, num_experts_per_tok=2)
    grouped = make_moe(moe_impl="grouped", capacity_factor=capacity_factor, num_experts=6, num_experts_per_tok=2)
    grouped.load_state_dict(loop.state_dict())
    x = torch.randn(3, 11, 32)
    x[..., -1] = 1.0  # a constant input channel ...
    with torch.no_grad():  # ... through which expert 5 scores -100 for every token, so it receives none
        for moe in (loop, grouped):
            moe.router.weight[:, -1] = 0.0
            moe.router.weight[5, -1] = -100.0
    x.requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    (y1, b1, z1), (y2, b2, z2) = loop(x), grouped(x2)
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((b2, z2), (b1, z1))
    assert loop.stats.tokens_per_expert[5] == 0
    (y1.square().sum() + b1 + z1).backward()
    (y2.square().sum() + b2 + z2).backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(loop.named_parameters(), grouped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def swiglu(moe, i, x):
    """Expert i's output, written from its weights, independently of MoE.expert."""
    return (F.silu(x @ moe.w_gate[i]) * (x @ moe.w_up[i])) @ moe.w_down[i]


@pytest.mark.parametrize("impl", ["loop", "grouped"])
def test_capacity_drops_assignments_in_token_order(impl):
    """6 tokens, 4 experts, top-2, capacity factor 0.5: each expert takes ceil(0.5 * 6 * 2 / 4) = 2 assignments,
    served in token order; later ones are dropped and contribute nothing."""
    E, k, N, D = 4, 2, 6, 32
    moe = make_moe(moe_impl=impl, num_experts=E, num_experts_per_tok=k, capacity_factor=0.5).train()
    # Token t's input is the unit vector e_t, so its router logits are router.weight[:, t]: we choose the routing.
    choices = [(0, 1), (1, 0), (0, 2), (1, 2), (2, 3), (2, 0)]  # (first, second) choice of each token
    with torch.no_grad():
        moe.router.weight.zero_()
        for t, (first, second) in enumerate(choices):
            moe.router.weight[first, t] = 3.0
            moe.router.weight[second, t] = 2.0
    x = torch.eye(N, D)[None]  # (1, N, D)
    y, _, _ = moe(x)

    # The documented rule, run by hand: walk the assignments token by token.
    taken = [0] * E
    expected = torch.zeros(N, D)
    w_first, w_second = math.exp(3) / (math.exp(3) + math.exp(2)), math.exp(2) / (math.exp(3) + math.exp(2))
    kept = 0
    for t, pair in enumerate(choices):
        for expert, weight in zip(pair, (w_first, w_second)):
            if taken[expert] < 2:
                taken[expert] += 1
                kept += 1
                expected[t] += weight * swiglu(moe, expert, x[0, t:t + 1])[0]
    # By hand: expert 0 serves tokens 0 and 1 and drops tokens 2 and 5; expert 1 serves tokens 0 and 1 and drops
    # token 3; expert 2 serves tokens 2 and 3 and drops tokens 4 and 5; expert 3 serves token 4. Token 5 gets nothing.
    assert kept == 7 and taken == [2, 2, 2, 1]
    torch.testing.assert_close(y[0], expected.detach(), rtol=1e-5, atol=1e-6)
    assert y[0, 5].abs().max() == 0
    assert moe.stats.tokens_per_expert.tolist() == taken
    assert moe.stats.dropped_fraction.item() == pytest.approx(5 / 12)

    moe.eval()  # no dropping at inference: every assignment is served
    y_eval, _, _ = moe(x)
    assert moe.stats.dropped_fraction.item() == 0
    assert moe.stats.tokens_per_expert.sum().item() == N * k
    assert not torch.allclose(y_eval, y)


def test_dropless_output_is_the_weighted_sum_of_chosen_experts():
    moe = make_moe(moe_impl="grouped")
    x = torch.randn(1, 5, 32)
    y, _, _ = moe(x)
    probs = (x[0] @ moe.router.weight.T).softmax(dim=-1)
    top, ids = probs.topk(2, dim=-1)
    expected = torch.stack([sum(top[t, s] / top[t].sum() * swiglu(moe, ids[t, s].item(), x[0, t:t + 1])[0]
                                for s in range(2)) for t in range(5)])
    torch.testing.assert_close(y[0], expected, rtol=1e-5, atol=1e-6)


def test_routing_statistics_after_every_forward():
    model = h64lm.H64LM(small_config(moe_layers="odd", num_layers=4))
    ids = torch.randint(0, 101, (2, 10))
    model(ids)
    stats = model.routing_stats()
    assert sorted(stats) == [1, 3]
    for layer_stats in stats.values():
        assert layer_stats.tokens_per_expert.sum().item() == 2 * 10 * 2
        assert layer_stats.dropped_fraction.item() == 0
        assert 0 < layer_stats.router_entropy.item() <= math.log(4) + 1e-6


def test_jitter_noise_only_while_training():
    moe = make_moe(router_jitter_noise=0.5)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        moe.eval()
        a, b = moe(x)[0], moe(x)[0]
        moe.train()
        noisy = [moe(x)[0] for _ in range(5)]
    torch.testing.assert_close(a, b)
    assert any(not torch.allclose(n, a) for n in noisy)


def test_router_softmax_is_float32_under_bf16_autocast():
    moe = make_moe()
    x = torch.randn(2, 7, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, balance, z = moe(x)
    assert balance.dtype == torch.float32 and z.dtype == torch.float32


def test_without_losses_the_output_is_the_same():
    moe = make_moe()
    x = torch.randn(2, 9, 32)
    y, balance, z = moe(x)
    y_bare, no_balance, no_z = moe(x, with_losses=False)
    torch.testing.assert_close(y_bare, y)
    assert no_balance is None and no_z is None and balance > 0 and z > 0
