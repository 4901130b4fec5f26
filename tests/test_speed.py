"""The fast paths of section 6, 10 and 13, each proven equal to the readable one: the grouped GEMM operator against
one matrix multiply per block; the MoE training step captured whole by torch.compile (zero graph breaks, no host
sync) with the eager loss and gradients; the static KV cache, a ring under a sliding window, against the growing
cache; and compiled decoding against eager decoding, token for token, without recompiling. No test here times
anything: the speed is measured by `python h64lm.py bench --targets` (README, Speed)."""

import pytest
import torch

import h64lm
from conftest import REPO, run_cli, small_config


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
    growing, static = model.new_cache(), model.new_cache(static_batch=3)
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
    assert all(h64lm.targets_met(figures()).values())  # each threshold itself is met
    assert h64lm.targets_met(figures(decode=1.99)) == {"decode_vs_transformers": False, "moe_layer_over_dense": True,
                                                       "train_step_vs_transformers": True, "graph_breaks": True}
    assert not h64lm.targets_met(figures(moe=1.16))["moe_layer_over_dense"]
    assert not h64lm.targets_met(figures(train=1.29))["train_step_vs_transformers"]
    assert not h64lm.targets_met(figures(breaks=1))["graph_breaks"]
