"""The model learns: a tiny H64LM overfits one fixed batch, and every parameter, routers included, gets a gradient.
The loss is cross-entropy plus the router losses, and the chunked LM loss equals F.cross_entropy exactly."""

import pytest
import torch
import torch.nn.functional as F

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
    config = small_config(router_aux_loss_coef=0.1, router_z_loss_coef=0.01, balance="switch")
    model = h64lm.H64LM(config)
    ids = torch.randint(0, 101, (2, 16))
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -100  # ignored
    out = model(ids, targets)
    assert out.logits is None  # the default chunked loss never forms them
    logits = model(ids).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 101), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, ce)
    torch.testing.assert_close(out.loss, ce + 0.1 * out.aux_loss + 0.01 * out.z_loss)
    assert out.aux_loss > 0 and out.z_loss > 0


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])
def test_chunked_linear_cross_entropy_equals_cross_entropy(monkeypatch, chunk_rows):
    """Loss and both gradients against F.cross_entropy on the full logits, in float64, with ignored targets, for
    chunks of one row, chunks that do not divide the rows, and one chunk for everything."""
    monkeypatch.setattr(h64lm, "_chunk_rows", lambda device, vocab_size: chunk_rows)
    torch.manual_seed(0)
    x = torch.randn(90, 16, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(300, 16, dtype=torch.float64) * 2).requires_grad_()  # logits of a few units, as after training
    targets = torch.randint(0, 300, (90,))
    targets[::4] = -100
    expected = F.cross_entropy(x @ w.T, targets, ignore_index=-100)
    (expected * 0.5).backward()
    expected_grads = x.grad, w.grad
    x.grad = w.grad = None
    loss = h64lm.linear_cross_entropy(x, w, targets)
    (loss * 0.5).backward()  # an upstream factor, as gradient accumulation gives
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((x.grad, w.grad), expected_grads, rtol=1e-10, atol=1e-12)


def test_chunked_and_plain_loss_agree_in_the_model(monkeypatch):
    monkeypatch.setattr(h64lm, "_chunk_rows", lambda device, vocab_size: 5)
    torch.manual_seed(0)
    chunked = h64lm.H64LM(small_config(loss_impl="chunked", tie_word_embeddings=True))
    plain = h64lm.H64LM(small_config(loss_impl="plain", tie_word_embeddings=True))
    plain.load_state_dict(chunked.state_dict())
    ids = torch.randint(0, 101, (3, 12))
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -100
    a, b = chunked(ids, targets), plain(ids, targets)
    assert a.logits is None and b.logits.shape == (3, 12, 101)
    torch.testing.assert_close((a.loss, a.lm_loss), (b.loss, b.lm_loss))
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(chunked.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_chunked_loss_under_bf16_autocast_matches_the_plain_path():
    """Under autocast both paths multiply in bf16 and take the loss in float32; the gradients come back in the
    parameters' dtype."""
    torch.manual_seed(0)
    x = torch.randn(40, 32, requires_grad=True)
    w = (torch.randn(101, 32) * 0.3).requires_grad_()
    targets = torch.randint(0, 101, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.cross_entropy(F.linear(x, w).float(), targets)
        loss = h64lm.linear_cross_entropy(x, w, targets)
    expected.backward()
    expected_grads = x.grad, w.grad
    x.grad = w.grad = None
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == w.grad.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close((x.grad, w.grad), expected_grads, rtol=2e-2, atol=2e-4)


def test_chunked_loss_without_gradients_computes_none():
    x, w = torch.randn(6, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    targets = torch.randint(0, 20, (6,))
    with torch.no_grad():
        loss = h64lm.linear_cross_entropy(x, w, targets)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(x @ w.T, targets))
