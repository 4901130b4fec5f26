"""The model learns: a tiny H64LM overfits one fixed batch, and every parameter, routers included, gets a gradient."""

import torch

import h64lm
from conftest import small_config


def test_tiny_preset_overfits_one_batch():
    torch.manual_seed(0)
    config = h64lm.H64LMConfig.from_preset("tiny")
    model = h64lm.H64LM(config)
    batch = torch.randint(0, config.vocab_size, (4, 33))
    x, y = batch[:, :-1], batch[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        out = model(x, y)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.lm_loss.item())
    assert losses[0] > 10  # about ln(32000) = 10.4 at the start
    assert losses[-1] < 0.5, losses[-10:]


def test_every_parameter_gets_a_gradient():
    model = h64lm.H64LM(small_config(moe_layers="odd", num_layers=2))
    ids = torch.randint(0, 101, (2, 16))
    model(ids, ids).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_loss_is_cross_entropy_plus_weighted_router_losses():
    config = small_config(router_aux_loss_coef=0.1, router_z_loss_coef=0.01)
    model = h64lm.H64LM(config)
    ids = torch.randint(0, 101, (2, 16))
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -100  # ignored
    out = model(ids, targets)
    ce = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 101), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, ce)
    torch.testing.assert_close(out.loss, ce + 0.1 * out.aux_loss + 0.01 * out.z_loss)
    assert out.aux_loss > 0 and out.z_loss > 0
