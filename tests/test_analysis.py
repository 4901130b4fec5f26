"""Routing analysis and the bench command: what they count is checked against an independent count; bench's
numbers are checked for consistency only (timings are never asserted: the machines are shared and noisy)."""

import json

import numpy as np
import pytest

import h64lm
from conftest import run_cli, small_config


class _ByteTokenizer:
    """Stands in for the real tokenizer: one token per byte, <s> = 1."""

    def __call__(self, text):
        return {"input_ids": [1] + [b % 97 + 3 for b in text.encode()]}


def test_routing_profile_counts_what_the_router_chooses():
    model = h64lm.H64LM(small_config(num_layers=4, moe_layers="odd", vocab_size=101))
    texts = {"a": ["first text", "and another one"], "b": ["12345 67890"]}
    # Independently: the router's own top-k over the inputs the MoE layers receive, captured by hooks.
    inputs = {}
    hooks = [b.ffn.register_forward_hook(lambda mod, args, out, i=i: inputs.setdefault(i, []).append(args[0]))
             for i, b in enumerate(model.blocks) if b.is_moe]
    profile = h64lm.routing_profile(model, _ByteTokenizer(), texts)
    for h in hooks:
        h.remove()
    assert profile["layers"] == [1, 3] and profile["kinds"] == ["a", "b"]
    calls = {"a": [0, 1], "b": [2]}  # which forward passes belong to which kind
    for row, layer in enumerate(profile["layers"]):
        router = model.blocks[layer].ffn.router.weight
        for kind, which in calls.items():
            counts = np.zeros(4)
            for call in which:
                x = inputs[layer][call].reshape(-1, router.shape[1])
                chosen = (x @ router.T).softmax(-1).topk(2, dim=-1).indices
                counts += np.bincount(chosen.flatten().numpy(), minlength=4)
            np.testing.assert_allclose(profile["share"][kind][row], counts / counts.sum())
    assert profile["tokens"] == {"a": 11 + 16, "b": 12}


def test_dead_experts_are_the_ones_under_a_tenth_of_uniform():
    share = np.array([[0.5, 0.49, 0.01, 0.0]])
    profile = {"layers": [1], "kinds": ["x"], "share": {"x": share}, "tokens": {"x": 100}}
    assert h64lm.dead_experts(profile) == [(1, 2), (1, 3)]
    profile["share"]["x"] = np.full((1, 4), 0.25)
    assert h64lm.dead_experts(profile) == []


@pytest.mark.slow
def test_bench_times_train_step_itself_with_the_recipes_optimizer(monkeypatch):
    """bench's training step is the step `train` takes (train_step, with the finite checks, clipping and the
    recipe's optimizer), not a copy of it: a warm-up, the timing's own warm-up, then one call per repeat."""
    calls, real = [], h64lm.train_step
    monkeypatch.setattr(h64lm, "train_step", lambda run, step: calls.append((step, run.tc.optimizer)) or real(run, step))
    result = h64lm.bench("tiny", device="cpu", seq_len=16, batch_size=1, repeats=2, decode_tokens=2, hidden_size=32,
                         num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, expert_intermediate_size=32)
    assert calls == [(0, "muon"), (1, "muon"), (2, "muon"), (3, "muon")]
    assert result["optimizer"] == "muon" and result["tokens_per_s"] == pytest.approx(16 / result["step_seconds"])


def assert_bench_json_is_complete_and_consistent(r: dict, compiled: bool) -> None:
    """bench --json's keys and numbers, checked on the runs of tests/gpu_first_run.py --quick (test_gpu_first_run),
    which runs `bench --preset tiny --batch-size 2 --seq-len 32 --repeats 1 --decode-tokens 2 --json`, with and
    without --compile."""
    for key in ("tokens_per_s", "flops_per_token", "achieved_flops", "utilization", "moe_overhead",
                "peak_memory_bytes", "device", "decode_tokens_per_s", "moe_overhead_spread",
                *(["decode_compiled_tokens_per_s"] if compiled else [])):
        for suffix in ("", "_batch8") if key.startswith("decode") else ("",):
            assert key + suffix in r, key + suffix
    assert compiled or "decode_compiled_tokens_per_s" not in r
    c = r["config"]
    assert c["moe_layers"] == "odd" and c["attention_type"] == "rope+alibi"  # the preset's, as given
    # FLOPs per token by hand (6 per weight a token meets in a matrix multiply, PaLM appendix B, plus attention's
    # 12 x layers x heads x head size x context): per layer q, k, v, o and two RMSNorm gains, then on the odd
    # layers the router and k experts of three matrices, on the even ones a dense SwiGLU of three; the final norm
    # and the LM head. (The norms' gains are counted as the code counts them.)
    D, hd, L, k = c["hidden_size"], c["hidden_size"] // c["num_heads"], c["num_layers"], c["num_experts_per_tok"]
    attention = D * c["num_heads"] * hd * 2 + D * c["num_kv_heads"] * hd * 2
    moe = D * c["num_experts"] + k * 3 * D * c["expert_intermediate_size"]
    dense = 3 * D * c["intermediate_size"]
    per_token = L * (attention + 2 * D) + (L // 2) * moe + (L - L // 2) * dense + D + c["vocab_size"] * D
    assert r["flops_per_token"] == 6 * per_token + 12 * L * c["num_heads"] * hd * r["seq_len"]
    assert (r["batch_size"], r["seq_len"]) == (2, 32)
    assert r["achieved_flops"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"])
    assert r["utilization"] == pytest.approx(r["achieved_flops"] / r["peak_flops"])
    # With one repeat a ratio is the ratio of the two times; the MoE overhead's spread holds its median.
    assert r["moe_overhead"] == pytest.approx(r["moe_layer_seconds"] / r["dense_layer_seconds"])
    low, high = r["moe_overhead_spread"]
    assert low <= r["moe_overhead"] <= high
    for suffix in ("", "_batch8"):
        assert r[f"decode_tokens_per_s{suffix}"] > 0 and r.get(f"decode_compiled_tokens_per_s{suffix}", 1) > 0
    assert r["peak_memory_bytes"] > 0
