"""Out into the ecosystem: Muon from torch (with the experts orthogonalised one at a time), models that
transformers loads, and the interactive prompt."""

import pytest
import torch

import h64lm
from conftest import small_config


# --- Muon --------------------------------------------------------------------------------------------------------

def test_each_expert_gets_exactly_torchs_muon_step_for_its_matrix_alone():
    # The stacked (E, in, out) tensor against E separate (out, in) matrices (nn.Linear's layout), each with its own
    # torch.optim.Muon: the same weights after every step, bit for bit, with momentum and weight decay at work.
    E, d_in, d_out = 3, 8, 12
    stacked = torch.nn.Parameter(torch.randn(E, d_in, d_out))
    options = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ours = h64lm.ExpertMuon([stacked], **options)
    alone = [torch.nn.Parameter(stacked[e].detach().T.clone()) for e in range(E)]
    theirs = [torch.optim.Muon([w], **options) for w in alone]
    for _ in range(4):
        grad = torch.randn(E, d_in, d_out)
        stacked.grad = grad.clone()
        ours.step()
        for e in range(E):
            alone[e].grad = grad[e].T.clone()
            theirs[e].step()
        for e in range(E):
            assert torch.equal(stacked[e].detach().T, alone[e].detach()), e
    # Orthogonalising the stack as one matrix would have tied the experts together: their updates differ in scale.
    assert not torch.equal(stacked[0].detach(), stacked[1].detach())


def test_a_matrix_gets_exactly_torchs_muon_step():
    w = torch.nn.Parameter(torch.randn(6, 10))
    twin = torch.nn.Parameter(w.detach().clone())
    ours, theirs = h64lm.ExpertMuon([w], lr=0.01), torch.optim.Muon([twin], lr=0.01)
    for _ in range(3):
        w.grad = torch.randn(6, 10)
        twin.grad = w.grad.clone()
        ours.step()
        theirs.step()
    assert torch.equal(w, twin)


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = h64lm.H64LM(small_config(num_shared_experts=1, tie_word_embeddings=False))
    tc = h64lm.TrainConfig(optimizer="muon", weight_decay=0.05)
    lines = []
    opt = h64lm.make_optimizer(model, tc, torch.device("cpu"), lines.append)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.named["muon"].param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt.named["adamw"].param_groups for p in g["params"]}
    assert muon | adamw == set(names.values()) and not muon & adamw
    assert muon == {n for n, p in model.named_parameters()
                    if p.dim() >= 2 and n not in ("embed.weight", "lm_head.weight") and "router" not in n}
    assert {"blocks.1.ffn.w_gate", "blocks.1.ffn.shared.down_proj.weight", "blocks.0.attn.q_proj.weight"} <= muon
    assert {"embed.weight", "lm_head.weight", "blocks.1.ffn.router.weight", "norm.weight"} <= adamw
    # Weight decay on every matrix of both, none on the norm gains; the split is printed.
    for group in opt.param_groups:
        assert group["weight_decay"] == (0.05 if group["params"][0].dim() >= 2 else 0.0)
    assert lines and "Muon for" in lines[0] and "AdamW for" in lines[0]
    assert isinstance(h64lm.make_optimizer(model, h64lm.TrainConfig(), torch.device("cpu")), torch.optim.AdamW)


def test_the_schedule_reaches_both_optimizers_and_the_state_round_trips():
    model = h64lm.H64LM(small_config())
    tc = h64lm.TrainConfig(optimizer="muon", lr=1e-2, min_lr=1e-3, warmup_steps=2, max_steps=10)
    opt = h64lm.make_optimizer(model, tc, torch.device("cpu"))
    x = torch.randint(0, 101, (2, 16))
    for step in range(3):
        for group in opt.param_groups:
            group["lr"] = h64lm.learning_rate(step, tc)
        model(x, x).loss.backward()
        opt.step()
        opt.zero_grad()
    assert {g["lr"] for g in opt.named["muon"].param_groups} == {g["lr"] for g in opt.named["adamw"].param_groups}
    twin = h64lm.make_optimizer(model, tc, torch.device("cpu"))
    twin.load_state_dict(opt.state_dict())
    assert twin.state_dict()["muon"]["state"].keys() == opt.state_dict()["muon"]["state"].keys()
    for key, state in opt.state_dict()["muon"]["state"].items():
        assert torch.equal(twin.state_dict()["muon"]["state"][key]["momentum_buffer"], state["momentum_buffer"])


def test_resuming_with_another_optimizer_is_refused_in_one_sentence():
    tc = h64lm.TrainConfig(optimizer="muon")
    run = type("Run", (), dict(tc=tc, optimizer=None))()
    with pytest.raises(h64lm.H64LMError, match="was trained with --optimizer adamw.*resume it with --optimizer adamw"):
        h64lm.restore_run(run, {"train_config": {}}, "old.pt", print)
