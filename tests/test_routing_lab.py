"""The routing lab against independent computations: sigmoid routing and the sequence-wise loss written out from
DeepSeek-V3's equations, the aux_free bias update from its formula by hand, global balancing against a hand count
of f over the whole step (and over two processes), shared and fine-grained experts against their definitions,
and the analysis numbers (MaxVio, co-activation, drop-one-expert) against hand counts."""

import json
import math
import subprocess
import sys
from itertools import combinations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import h64lm
from conftest import PROCESS_ENV, REPO, TINY_FLAGS, run_cli, small_config


# --- Routing and the balance losses, by hand -----------------------------------------------------------------------

def test_sigmoid_routing_equals_deepseek_v3_written_out():
    """DeepSeek-V3 eqs. 13-16: s = sigmoid(z); the k largest s (+ bias, for choosing only); g = s / sum of chosen s."""
    N, E, k = 6, 5, 2
    logits = torch.randn(N, E, dtype=torch.float64) * 2
    bias = torch.tensor([0.0, 0.3, -0.2, 0.0, 0.1], dtype=torch.float64)
    probs, ids, weights = h64lm.route(logits, k, "sigmoid", bias)
    for t in range(N):
        s = [1 / (1 + math.exp(-z)) for z in logits[t].tolist()]
        chosen = sorted(range(E), key=lambda i: s[i] + bias[i].item(), reverse=True)[:k]
        assert sorted(ids[t].tolist()) == sorted(chosen)
        for slot, i in enumerate(ids[t].tolist()):
            assert weights[t, slot].item() == pytest.approx(s[i] / sum(s[j] for j in chosen), rel=1e-12)
        assert probs[t].tolist() == pytest.approx([v / sum(s) for v in s], rel=1e-12)


def test_the_bias_changes_which_experts_are_chosen_but_not_the_gate_weights():
    logits = torch.randn(50, 4)
    p = logits.softmax(dim=-1)
    _, plain_ids, _ = h64lm.route(logits, 2)
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])  # expert 3 wins every choice
    _, ids, weights = h64lm.route(logits, 2, bias=bias)
    assert (ids == 3).any(dim=-1).all() and not torch.equal(ids, plain_ids)
    chosen_p = p.gather(1, ids)
    torch.testing.assert_close(weights, chosen_p / chosen_p.sum(dim=-1, keepdim=True))  # unbiased scores


def test_bias_update_equals_the_formula_by_hand():
    """b_i += gamma * sign(mean load - load_i): loads 5, 1, 3, 3 (mean 3) with gamma 0.01."""
    bias = torch.tensor([0.0, 0.1, -0.1, 0.02])
    new = h64lm.updated_bias(bias, torch.tensor([5, 1, 3, 3]), 0.01)
    torch.testing.assert_close(new, torch.tensor([-0.01, 0.11, -0.1, 0.02]))


def test_sequence_loss_equals_deepseek_v3_written_out():
    """Eqs. 17-20 with loops: per sequence f_i = E / (k T) * #{t: i chosen}, P_i = mean_t s'_it; mean over B."""
    B, T, E, k = 3, 7, 4, 2
    probs = torch.rand(B, T, E, dtype=torch.float64)
    probs = probs / probs.sum(-1, keepdim=True)
    ids = probs.topk(k, dim=-1).indices
    expected = 0.0
    for b in range(B):
        for i in range(E):
            f = E / (k * T) * sum(i in ids[b, t].tolist() for t in range(T))
            P = sum(probs[b, t, i].item() for t in range(T)) / T
            expected += f * P / B
    assert h64lm.sequence_balance_loss(probs, ids).item() == pytest.approx(expected, rel=1e-12)


def test_max_violation_by_hand():
    assert h64lm.max_violation(torch.tensor([4, 2, 2, 0])).item() == pytest.approx(4 / 2 - 1)
    assert h64lm.max_violation(torch.tensor([3, 3, 3])).item() == 0


def test_unbalanced_experts_are_named_in_one_sentence_per_layer():
    load = torch.tensor([[10, 10, 10, 10], [0, 1, 25, 14]])  # layer 3: mean 10; 0 and 1 under 10%, 25 over 200%
    assert h64lm.unbalanced_experts(load, [1, 3]) == [
        "layer 3: nearly dead: expert 0 (0%); overloaded: expert 2 (250%) of a uniform share"]
    assert h64lm.unbalanced_experts(None, [1]) == []


# --- The MoE layer with each method --------------------------------------------------------------------------------

METHODS = [(b, s) for b in h64lm.BALANCE_METHODS for s in h64lm.ROUTER_SCORINGS]


@pytest.mark.parametrize("balance, scoring", METHODS)
def test_every_method_keeps_the_loop_and_grouped_dispatch_equal(balance, scoring):
    config = small_config(balance=balance, router_scoring=scoring, num_shared_experts=1, num_experts=6,
                          num_experts_per_tok=3)
    loop = h64lm.MoE(h64lm.dataclasses.replace(config, moe_impl="loop"))
    grouped = h64lm.MoE(h64lm.dataclasses.replace(config, moe_impl="grouped"))
    grouped.load_state_dict(loop.state_dict())
    if loop.balance_bias is not None:  # a bias that changes the choices, in both
        loop.balance_bias.copy_(torch.randn(6) * 0.1)
        grouped.balance_bias.copy_(loop.balance_bias)
    x = torch.randn(2, 9, config.hidden_size)
    outs = []
    for moe in (loop, grouped):
        xi = x.clone().requires_grad_()
        y, balance_loss, z = moe(xi)
        (y.square().sum() + balance_loss + z).backward()
        outs.append((y, balance_loss, z, xi.grad, [p.grad for p in moe.parameters()]))
    (y1, b1, z1, g1, p1), (y2, b2, z2, g2, p2) = outs
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(b1, b2)
    torch.testing.assert_close(g1, g2)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b)
    if balance in ("aux_free", "none"):
        assert b1.item() == 0


def test_shared_experts_are_dense_swiglus_added_to_the_routed_output():
    """Two shared experts of width F: the routed output plus two separate SwiGLUs of width F."""
    config = small_config(num_shared_experts=2)
    moe = h64lm.MoE(config)
    x = torch.randn(2, 5, config.hidden_size)
    y, _, _ = moe(x)
    shared, moe.shared = moe.shared, None
    routed, _, _ = moe(x)
    Fh = config.expert_intermediate_size
    total = routed
    for half in (slice(0, Fh), slice(Fh, 2 * Fh)):
        g, u, d = shared.gate_proj.weight[half], shared.up_proj.weight[half], shared.down_proj.weight[:, half]
        total = total + (F.silu(x @ g.T) * (x @ u.T)) @ d.T
    torch.testing.assert_close(y, total)


def test_fine_grained_and_dense_twin_have_the_advertised_size_and_flops():
    """fine_grained(c, 4, shared=1) and dense_twin(c) against the FLOP formula by hand: 6 x active parameters
    (the embedding table aside; norm gains counted, as torchtitan does) + attention; only the router's width may
    differ (D x E per MoE layer)."""
    base = h64lm.H64LMConfig.from_preset("tiny", moe_layers="all")  # 8 experts of 384, top-2, 4 layers
    fine = h64lm.fine_grained(base, 4, shared=1)
    assert (fine.num_experts, fine.num_experts_per_tok, fine.expert_intermediate_size, fine.num_shared_experts) == \
           (31, 7, 96, 1)
    D, L, V, T = 128, 4, 32000, 256
    attention = L * (D * D * 2 + 2 * D * 64)  # q, o: D x D; k, v: D x (2 heads x 32)
    def by_hand(active_ffn_width, routers):
        matmul = attention + L * 3 * D * active_ffn_width + routers + D * V + (2 * L + 1) * D  # LM head, norms
        return 6 * matmul + 12 * L * 4 * 32 * T
    for config, width, routers in [(base, 2 * 384, L * D * 8), (fine, 7 * 96 + 96, L * D * 31),
                                   (h64lm.dense_twin(base), 768, 0), (h64lm.dense_twin(fine), 768, 0)]:
        assert h64lm.H64LM(config).flops_per_token(T) == by_hand(width, routers)
    # The same parameters: 8 experts of 384 = 31 routed + 1 shared of 96, the router aside.
    assert h64lm.H64LM(fine).num_params() - L * D * 31 == h64lm.H64LM(base).num_params() - L * D * 8
    assert "top-7 of 31 experts + 1 shared, 96 wide" in h64lm.H64LM(fine).parameter_table()
    with pytest.raises(ValueError, match="dense twin"):
        h64lm.dense_twin(h64lm.H64LMConfig.from_preset("tiny"))  # odd layers only


def test_a_config_saved_before_balance_was_a_choice_loads_as_switch(tmp_path):
    """Checkpoints written before the routing lab have no `balance` and were trained with Switch's loss; today's
    default (aux_free) would add a bias buffer their weights do not have."""
    config = small_config(balance="switch")
    old = {k: v for k, v in config.to_dict().items()
           if k not in ("balance", "router_scoring", "num_shared_experts", "bias_update_rate")}
    torch.save({"format": h64lm.CHECKPOINT_FORMAT, "version": h64lm.CHECKPOINT_VERSION,
                "model": h64lm.H64LM(config).state_dict(), "config": old}, tmp_path / "old.pt")
    assert h64lm.open_trained(tmp_path / "old.pt").model.config.balance == "switch"
    assert h64lm.H64LMConfig().balance == "aux_free"


# --- global and aux_free in training steps -------------------------------------------------------------------------

def lab_run(corpus, tmp_path, **overrides):
    config = h64lm.H64LMConfig(**{**dict(max_position_embeddings=64, hidden_size=32, num_layers=2, num_heads=2,
                                         num_kv_heads=1, intermediate_size=64, expert_intermediate_size=32,
                                         num_experts=4, moe_layers="all"), **overrides.pop("model", {})})
    tc = h64lm.TrainConfig(**{**dict(data=str(corpus), cache_dir=str(tmp_path / "cache"), seq_len=32, batch_size=4,
                                     grad_accum=1, max_steps=10, warmup_steps=2, out_dir=str(tmp_path)), **overrides})
    return h64lm.start_run(config, tc, h64lm.setup_runtime("cpu"), tmp_path / "run", log=lambda *a, **k: None)


def test_global_equals_switch_with_one_micro_batch_and_one_process(corpus, tmp_path):
    runs = [lab_run(corpus, tmp_path, model=dict(balance=b)) for b in ("switch", "global")]
    for step in range(3):
        a, b = (h64lm.train_step(run, step) for run in runs)
        assert a["aux_loss"] == b["aux_loss"] and a["lm_loss"] == b["lm_loss"]
    for p, q in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        assert torch.equal(p, q)


def test_global_with_accumulation_counts_f_over_the_whole_step(corpus, tmp_path):
    """With 2 micro-batches, the balance loss train_step reports is mean_m E sum_i f_i P_i^m with f counted over
    both micro-batches, here counted by hand from each layer's router input; switch would count per micro-batch."""
    run = lab_run(corpus, tmp_path, batch_size=2, grad_accum=2, model=dict(balance="global"))
    E, k = run.config.num_experts, run.config.num_experts_per_tok
    indices = h64lm.train_window_indices(0, run.global_batch, run.windows.count, run.tc.seed)
    layers = run.model.moe_layers()
    inputs = {}  # (layer, micro) -> (N, D): what each MoE layer received
    with torch.no_grad():
        for micro in range(2):
            hooks = [m.register_forward_pre_hook(lambda m, args, key=(i, micro): inputs.__setitem__(
                key, args[0].flatten(0, 1))) for i, m in layers.items()]
            run.model(*h64lm.micro_batch(run, indices, micro))
            for h in hooks:
                h.remove()
    probs = {key: (x @ layers[key[0]].router.weight.T).softmax(-1) for key, x in inputs.items()}  # (N, E)
    global_loss, switch_loss = [], []
    for i in layers:
        chosen = [probs[i, m].topk(k, dim=-1).indices for m in range(2)]
        f_step = sum(F.one_hot(c, E).sum(1).sum(0) for c in chosen).double() / sum(len(c) for c in chosen)
        for m in range(2):
            P = probs[i, m].double().mean(0)
            f_micro = F.one_hot(chosen[m], E).sum(1).sum(0).double() / len(chosen[m])
            global_loss.append(E * (f_step * P).sum().item() / 2)
            switch_loss.append(E * (f_micro * P).sum().item() / 2)
    expected = sum(global_loss) / len(layers)
    assert abs(expected - sum(switch_loss) / len(layers)) > 1e-4  # the two differ here
    assert h64lm.train_step(run, 0)["aux_loss"] == pytest.approx(expected, rel=1e-5)


def test_aux_free_bias_follows_each_steps_load(corpus, tmp_path):
    run = lab_run(corpus, tmp_path, model=dict(balance="aux_free", bias_update_rate=0.01))
    before = {i: m.balance_bias.clone() for i, m in run.model.moe_layers().items()}
    stats = h64lm.train_step(run, 0)
    for row, (i, m) in enumerate(run.model.moe_layers().items()):
        load = stats["load"][row]
        expected = before[i] + 0.01 * torch.sign(load.float().mean() - load.float())
        torch.testing.assert_close(m.balance_bias, expected)
        assert stats["load"][row].sum() == run.tokens_per_step * run.config.num_experts_per_tok
    assert stats["aux_loss"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("balance", ["global", "aux_free"])
def test_two_processes_give_the_same_loss_and_bias_as_one_process(corpus, tmp_path, balance):
    """torchrun with 2 gloo processes of batch 2 against one process of batch 4: the same windows each step."""
    # The balancing is under test, so the optimizer is pinned to the one this test was written with (tiny's recipe
    # was AdamW at 2e-3). With Muon, whose Newton-Schulz runs in bfloat16, the last-bit differences between one
    # process's and two processes' gradient sums grow past this test's tolerance.
    common = [*TINY_FLAGS, "--max-steps", "4", "--eval-every", "4", "--data", corpus, "--out-dir", tmp_path,
              "--cache-dir", tmp_path / "cache", "--balance", balance, "--bias-update-rate", "0.01",
              "--optimizer", "adamw", "--lr", "2e-3", "--min-lr", "2e-4"]
    one = run_cli("train", *common, "--batch-size", "4", "--run-name", "one")
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(REPO / "h64lm.py"), "train", *map(str, common), "--batch-size", "2", "--run-name",
                          "two"], capture_output=True, text=True, env=PROCESS_ENV,
                         timeout=300)
    assert two.returncode == 0, two.stderr
    a, b = (h64lm.read_checkpoint(tmp_path / name / "latest.pt") for name in ("one", "two"))
    history = [[r["aux_loss"] for r in c["history"]["train"]] for c in (a, b)]
    assert history[0] == pytest.approx(history[1], rel=1e-5)
    assert (history[0][0] > 0) == (balance == "global")  # aux_free has no loss
    for name in a["model"]:
        if name.endswith("balance_bias"):
            assert torch.equal(a["model"][name], b["model"][name]) and a["model"][name].abs().sum() > 0
        else:
            torch.testing.assert_close(a["model"][name], b["model"][name], rtol=1e-4, atol=1e-5)


# --- Analysis ------------------------------------------------------------------------------------------------------

def test_routing_profile_maxvio_and_coactivation_equal_a_hand_count(tokenizer):
    model = h64lm.H64LM(h64lm.H64LMConfig.from_preset("tiny", num_experts_per_tok=3))
    texts = {"prose": ["The river rises in the hills north of the town."], "code": ["def f(x):\n    return x\n"]}
    chosen = {i: [] for i in model.config.moe_layer_ids}
    hooks = [m.register_forward_hook(lambda m, a, o, i=i: chosen[i].append(m.stats.expert_ids.tolist()))
             for i, m in model.moe_layers().items()]
    profile = h64lm.routing_profile(model, tokenizer, texts)
    for h in hooks:
        h.remove()
    E = model.config.num_experts
    for row, layer in enumerate(profile["layers"]):
        tokens = [ids for batch in chosen[layer] for ids in batch]
        pairs = np.zeros((E, E))
        for ids in tokens:
            for i in ids:
                pairs[i, i] += 1
            for i, j in combinations(ids, 2):
                pairs[i, j] += 1
                pairs[j, i] += 1
        np.testing.assert_allclose(profile["coactivation"][row], pairs / len(tokens))
        load = pairs.diagonal()
        assert profile["max_vio"][row] == pytest.approx(load.max() / load.mean() - 1)
    assert "MaxVio" in h64lm.routing_table(profile) and "most frequent pair" in h64lm.routing_table(profile)


def test_drop_one_expert_masks_exactly_that_expert():
    model = h64lm.H64LM(small_config(moe_layers="all", num_experts=4))
    tokens = np.random.default_rng(0).integers(0, 101, 400).astype(np.uint16)
    rt = h64lm.Runtime(device=torch.device("cpu"))
    seen = []
    for m in model.moe_layers().values():
        m.register_forward_hook(lambda m, a, o: seen.append((None if m.allowed is None else m.allowed.tolist(),
                                                             m.stats.load.tolist())))
    delta = h64lm.drop_one_expert(model, tokens, 16, 4, rt, max_batches=2)
    assert delta.shape == (2, 4) and np.isfinite(delta).all() and (delta != 0).any()
    for allowed, load in seen:
        if allowed is not None:
            masked = allowed.index(False)
            assert load[masked] == 0 and sum(load) > 0  # nothing routed to it, the tokens went elsewhere
    assert all(m.allowed is None for m in model.moe_layers().values())  # put back


# --- The study command ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_compare_trains_each_variant_and_seed_and_reuses_finished_runs(corpus, tmp_path):
    args = ["compare", *TINY_FLAGS, "--data", corpus, "--out-dir", tmp_path, "--cache-dir", tmp_path / "cache",
            "--max-steps", "3", "--eval-every", "3", "--batch-size", "2", "--variants", "dense,aux_free",
            "--variant", "wide:granularity=2,shared=1", "--seeds", "2", "--run-name", "study"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    result = json.loads((tmp_path / "study" / "compare.json").read_text())
    assert [(r["variant"], r["seed"]) for r in result["runs"]] == [
        (v, s) for s in (1337, 1338) for v in ("dense", "aux_free", "wide")]
    flops = {r["variant"]: r["flops_per_token"] for r in result["runs"]}
    D, L = 32, 2  # the router, D x E per MoE layer, is the only difference in FLOPs
    assert flops["aux_free"] - flops["dense"] == 6 * L * D * 4
    assert flops["wide"] - flops["dense"] == 6 * L * D * 7
    table = (tmp_path / "study" / "compare.md").read_text()
    assert "(n=2)" in table and "Gap to dense" in table and (tmp_path / "study" / "compare.png").stat().st_size > 0
    latest = tmp_path / "study" / "dense-seed1337" / "latest.pt"
    mtime = latest.stat().st_mtime_ns
    again = run_cli(*args)  # every run is finished: nothing is trained again, the same table comes out
    assert again.returncode == 0, again.stderr
    assert latest.stat().st_mtime_ns == mtime and "training:" not in again.stderr
    assert (tmp_path / "study" / "compare.md").read_text() == table


@pytest.mark.slow
def test_a_stopped_study_goes_on_where_it_stopped(corpus, tmp_path):
    args = ["compare", *TINY_FLAGS, "--data", corpus, "--out-dir", tmp_path, "--cache-dir", tmp_path / "cache",
            "--max-steps", "4", "--eval-every", "2", "--batch-size", "2", "--variants", "switch", "--seeds", "1"]
    first = run_cli(*args, "--stop-at", "2")
    assert first.returncode == 0 and "the same command goes on where it stopped" in first.stdout, first.stderr
    assert not (tmp_path / "compare" / "compare.md").exists()  # no table from a run that is not finished
    assert h64lm.read_checkpoint(tmp_path / "compare" / "switch-seed1337" / "latest.pt")["step"] == 2
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    assert "switch-seed1337: going on from step 2" in second.stdout
    assert json.loads((tmp_path / "compare" / "compare.json").read_text())["runs"][0]["tokens"] == 4 * 2 * 32


def test_compare_refuses_unknown_variants_in_one_sentence(tmp_path):
    for bad in (["--variants", "dense,nope"], ["--variant", "x:colour=red"], ["--variant", "x:balance=sideways"]):
        result = run_cli("compare", "--data", "sample", "--out-dir", tmp_path, *bad)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())
