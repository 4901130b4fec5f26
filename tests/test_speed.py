"""The fast paths of section 6, 10 and 13, each proven equal to the readable one: the grouped GEMM operator against
one matrix multiply per block; the MoE training step captured whole by torch.compile (zero graph breaks, no host
sync) with the eager loss and gradients; the static KV cache, a ring under a sliding window, against the growing
cache; and compiled decoding against eager decoding, token for token, without recompiling. No test here asserts a
speed: the developers measure it with tests/speed.py (`python -m tests.speed --targets`, README, Speed), whose
targets, Mixtral and figures are checked at the end."""

import json
import subprocess
import sys

import pytest
import torch

import h64lm
import speed
from conftest import PROCESS_ENV, REPO, run_cli, small_config


def test_grouped_mm_equals_a_matmul_per_block_in_outputs_and_gradients():
    torch.manual_seed(0)
    sizes = [3, 0, 5, 2]  # an empty block, and 2 rows after the last block (dropped assignments)
    x = torch.randn(sum(sizes) + 2, 8, requires_grad=True)
    w = torch.randn(len(sizes), 8, 6, requires_grad=True)
    ends = torch.tensor(sizes).cumsum(0).to(torch.int32)
    out = h64lm.grouped_mm(x, w, ends)
    grad = torch.randn_like(out)
    (out * grad).sum().backward()

    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    blocks, start = [], 0
    for i, n in enumerate(sizes):
        blocks.append(x2[start:start + n] @ w2[i])
        start += n
    expected = torch.cat(blocks + [torch.zeros(2, 6)])
    (expected * grad).sum().backward()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(w.grad, w2.grad, rtol=0, atol=1e-6)
    assert w.grad[1].abs().max() == 0  # the expert without rows gets no gradient
    # torch's own checks of a custom operator: schema, fake (shape-only) kernel, autograd registration
    torch.library.opcheck(h64lm.grouped_mm_loop, (x.detach(), w.detach(), ends))
    torch.library.opcheck(h64lm.grouped_mm_weight_grad, (x.detach(), grad, ends))


def test_the_tiny_training_step_compiles_whole_with_the_eager_loss_and_gradients():
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = h64lm.H64LMConfig.from_preset("tiny")  # the default tiny model: MoE on odd layers, aux_free, chunked loss
    model = h64lm.H64LM(config)
    x = torch.randint(0, config.vocab_size, (2, 33))
    ids, targets = x[:, :-1], x[:, 1:]
    explanation = torch._dynamo.explain(model)(ids, targets)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1

    def loss_and_grads(step_model):
        model.zero_grad(set_to_none=True)
        loss = step_model(ids, targets).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    eager_loss, eager_grads = loss_and_grads(model)
    # fullgraph=True raises at any graph break or host sync (.tolist(), .item()), in forward or backward
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=0, atol=1e-6)
    assert eager_grads.keys() == compiled_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=0, atol=1e-6, msg=name)
    torch._dynamo.reset()


@pytest.mark.parametrize("window", [None, 4, 1])
def test_the_static_cache_gives_the_logits_of_the_growing_cache(window):
    """Prompts longer than the window's ring, left-padded, then 12 decoding steps: logits equal at every step."""
    torch.manual_seed(0)
    config = small_config(attention_type="rope+alibi", sliding_window=window)
    model = h64lm.H64LM(config).eval()
    idx = torch.randint(3, config.vocab_size, (3, 9))
    positions = torch.arange(9)[None] - torch.tensor([[0], [4], [2]])  # rows of 9, 5 and 7 tokens
    positions = positions.masked_fill(positions < 0, -1)
    growing, static = model.new_cache(), h64lm.static_cache(model, 3)
    assert static.slots == min(window or config.max_position_embeddings, config.max_position_embeddings)
    a, b = h64lm.prefill(model, idx, positions, growing), h64lm.prefill(model, idx, positions, static)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    next_pos = positions.amax(dim=1, keepdim=True) + 1
    for _ in range(12):
        token = a.argmax(dim=-1, keepdim=True)
        a = h64lm.decode_one_token(model, token, next_pos, growing)
        b = h64lm.decode_one_token(model, token, next_pos, static)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        next_pos = next_pos + 1
    assert static.keys[0].shape[2] == static.slots  # preallocated: the cache did not grow


def test_compiled_decoding_gives_the_eager_tokens_without_recompiling(monkeypatch):
    """A ring shorter than the prompts, batched prompts of different lengths, ALiBi and RoPE, a MoE layer. (The
    tiny shape without a window, through the command line: the demo model, in the test below.)"""
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = small_config(attention_type="rope+alibi", sliding_window=4)
    model = h64lm.H64LM(config)
    prompts = [torch.randint(3, config.vocab_size, (n,)).tolist() for n in (3, 11, 6)]
    eager = h64lm.generate(model, prompts, 20, temperature=0)
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)  # one compile for all 19 steps...
    assert h64lm.generate(model, prompts, 20, temperature=0, compile=True) == eager
    other = [torch.randint(3, config.vocab_size, (n,)).tolist() for n in (5, 2, 9)]
    h64lm.generate(model, other, 20, temperature=0, compile=True)  # ...and for the next prompts of the batch size
    torch._dynamo.reset()


@pytest.mark.slow
def test_generate_compile_writes_the_eager_text():
    """The command line's switch: the demo model, its default repetition penalty, a static cache and a compiled step."""
    def text(*extra):
        result = run_cli("generate", "--ckpt", REPO / "checkpoints" / "demo", "--prompt", "The history of",
                         "--greedy", "--max-new-tokens", 24, *extra)
        assert result.returncode == 0, result.stderr
        return result.stdout
    assert text("--compile") == text()


def test_the_targets_are_judged_on_the_medians_at_their_thresholds():
    def figures(decode=2.0, moe=1.15, train=1.3, breaks=0):
        decoding = {"decode_compiled_speedup_vs_hf": 3.0, "decode_compiled_speedup_vs_hf_batch8": decode}
        return {"graph_breaks": breaks, "moe_h64lm": {"moe_overhead": moe}, "tiny": decoding,
                "small": {"speedup_vs_hf": train, **decoding}}
    assert all(speed.targets_met(figures()).values())  # each threshold itself is met
    assert speed.targets_met(figures(decode=1.99)) == {"decode_vs_transformers": False, "moe_layer_over_dense": True,
                                                        "train_step_vs_transformers": True, "graph_breaks": True}
    assert not speed.targets_met(figures(moe=1.16))["moe_layer_over_dense"]
    assert not speed.targets_met(figures(train=1.29))["train_step_vs_transformers"]
    assert not speed.targets_met(figures(breaks=1))["graph_breaks"]


def test_mixtral_for_the_comparison_has_exactly_our_shape():
    config = h64lm.H64LMConfig.from_preset("tiny", moe_layers="all", attention_type="rope")
    ours, theirs = h64lm.H64LM(config), speed.mixtral_like(config)
    assert ours.num_params() == sum(p.numel() for p in theirs.parameters())
    assert theirs.config.num_local_experts == 8 and theirs.config.num_experts_per_tok == 2


def run_speed(*args) -> subprocess.CompletedProcess:
    """tests/speed.py's command line, as the README runs it: python -m tests.speed, from the repository root."""
    env = PROCESS_ENV
    return subprocess.run([sys.executable, "-m", "tests.speed", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_speed_command_line_names_its_measurements_and_asks_for_one():
    result = run_speed("--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m tests.speed")
    for flag in ("--targets", "--compare-hf", "--tokenize", "--optimizers", "--moe-steps", "--repeats", "--json"):
        assert flag in result.stdout, flag
    result = run_speed("--preset", "tiny")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: say what to measure") and result.stderr.count("\n") == 1


def test_optimizer_cost_times_the_same_training_step_with_each_optimizer(monkeypatch):
    made = []
    start_run = h64lm.start_run
    monkeypatch.setattr(h64lm, "start_run", lambda config, tc, *a, **k: made.append(tc) or start_run(config, tc, *a,
                                                                                                       **k))
    r = speed.optimizer_cost("tiny", batch_size=1, repeats=3, moe_layers="1", device="cpu")
    assert [tc.optimizer for tc in made] == ["muon", "adamw"]
    assert all(tc.batch_size == 1 and tc.lr == h64lm.TRAIN_RECIPES["tiny"]["lr"] for tc in made)
    assert r["moe_layers"] == "1" and r["muon_seconds"] > 0 and r["adamw_seconds"] > 0
    low, high = r["muon_over_adamw_spread"]
    assert low <= r["muon_over_adamw"] <= high
    assert "Muon costs" in speed.optimizer_report(r)


def test_moe_step_cost_times_the_dense_twin_and_two_expert_shapes_of_equal_active_flops(monkeypatch):
    made = []
    start_run = h64lm.start_run
    monkeypatch.setattr(h64lm, "start_run", lambda config, tc, *a, **k: made.append((config, tc)) or start_run(
        config, tc, *a, **k))
    r = speed.moe_step_cost("tiny", batch_size=1, repeats=1, device="cpu")
    configs = [config for config, _ in made]
    assert [c.num_experts for c in configs[1:]] == [8, 32] and not configs[0].moe_layer_ids
    assert [c.num_experts_per_tok for c in configs[1:]] == [2, 8]
    flops = [h64lm.H64LM(c).flops_per_token(128) for c in configs]  # equal but for the routers' widths
    assert max(flops) / min(flops) < 1.01
    assert all(tc.optimizer == "muon" and tc.batch_size == 1 for _, tc in made)  # tiny's recipe
    assert set(r["over_dense"]) == {"8 experts", "32 experts"}
    for ratio, low, high in r["over_dense"].values():
        assert low <= ratio <= high
    assert "x dense" in speed.moe_step_report(r)


@pytest.mark.slow
def test_compare_hf_json_has_every_documented_key_and_consistent_numbers():
    result = run_speed("--compare-hf", "--preset", "tiny", "--batch-size", "1", "--seq-len", "16", "--repeats", "1",
                       "--decode-tokens", "2", "--json", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    for key in ("tokens_per_s", "flops_per_token", "achieved_flops", "utilization", "moe_overhead",
                "peak_memory_bytes", "device", "hf_tokens_per_s", "speedup_vs_hf", "decode_tokens_per_s",
                "decode_compiled_tokens_per_s", "hf_decode_tokens_per_s", "decode_speedup_vs_hf",
                "decode_compiled_speedup_vs_hf", "moe_overhead_spread", "speedup_vs_hf_spread",
                "hf_experts_implementation"):
        for suffix in ("", "_batch8") if key.startswith(("decode", "hf_decode")) else ("",):
            assert key + suffix in r, key + suffix
    c = r["config"]
    assert c["moe_layers"] == "all" and c["attention_type"] == "rope"  # Mixtral's form
    assert r["achieved_flops"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"])
    # With one repeat a ratio is the ratio of the two times; decoding takes 3 repeats, whose median ratio lies
    # within the spread, as does the ratio of the median speeds.
    assert r["speedup_vs_hf"] == pytest.approx(r["tokens_per_s"] / r["hf_tokens_per_s"])
    assert r["moe_overhead"] == pytest.approx(r["moe_layer_seconds"] / r["dense_layer_seconds"])
    for name in ("decode", "decode_compiled"):
        for suffix in ("", "_batch8"):
            low, high = r[f"{name}_speedup_vs_hf{suffix}_spread"]
            assert low <= r[f"{name}_speedup_vs_hf{suffix}"] <= high
            ratio = r[f"{name}_tokens_per_s{suffix}"] / r[f"hf_decode_tokens_per_s{suffix}"]
            assert low - 1e-9 <= ratio <= high + 1e-9
    assert r["peak_memory_bytes"] > 0
