"""Attention: the fused and plain paths agree, ALiBi matches a from-scratch loop, the model is causal, and cached
decoding equals a full forward pass for every attention type, GQA ratio and a window shorter than the sequence."""

import itertools
import math

import pytest
import torch

import h64lm
from conftest import small_config

ATTENTION_TYPES = ["rope", "alibi", "rope+alibi"]


@pytest.mark.parametrize("attention_type, window, num_kv_heads",
                         itertools.product(ATTENTION_TYPES, [None, 4], [4, 2, 1]))
def test_sdpa_and_plain_attention_agree_with_gradients(attention_type, window, num_kv_heads):
    config = small_config(attention_type=attention_type, sliding_window=window, num_kv_heads=num_kv_heads,
                          attn_impl="plain")
    plain = h64lm.H64LM(config)
    fused = h64lm.H64LM(small_config(attention_type=attention_type, sliding_window=window,
                                     num_kv_heads=num_kv_heads, attn_impl="sdpa"))
    fused.load_state_dict(plain.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, 13))
    out_plain, out_fused = plain(ids, ids), fused(ids, ids)
    torch.testing.assert_close(out_fused.logits, out_plain.logits, rtol=1e-4, atol=1e-5)
    out_plain.loss.backward()
    out_fused.loss.backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("window", [None, 3])
def test_alibi_attention_equals_a_from_scratch_loop(window):
    """One ALiBi attention layer against softmax_j(q_i . k_j / sqrt(d) - m_h (i - j)) written with Python loops."""
    config = small_config(attention_type="alibi", sliding_window=window, num_heads=4, num_kv_heads=2)
    model = h64lm.H64LM(config)
    attn = model.blocks[0].attn
    T, d, H = 6, config.head_dim, config.num_heads
    x = torch.randn(1, T, config.hidden_size, dtype=torch.float64)
    pos = torch.arange(T)[None]
    attn.double()
    got = attn(x, None, model.attention_bias(pos, pos, plain_causal=False).double(), None)

    q = (x[0] @ attn.q_proj.weight.T).view(T, H, d)
    k = (x[0] @ attn.k_proj.weight.T).view(T, config.num_kv_heads, d)
    v = (x[0] @ attn.v_proj.weight.T).view(T, config.num_kv_heads, d)
    slopes = [2.0 ** (-8 * (h + 1) / H) for h in range(H)]  # H = 4 is a power of two
    out = torch.zeros(T, H, d, dtype=torch.float64)
    for h in range(H):
        g = h // (H // config.num_kv_heads)  # the KV head serving query head h
        for i in range(T):
            visible = [j for j in range(i + 1) if window is None or i - j < window]
            scores = torch.stack([q[i, h] @ k[j, g] / math.sqrt(d) - slopes[h] * (i - j) for j in visible])
            weights = scores.softmax(dim=0)
            out[i, h] = sum(w * v[j, g] for w, j in zip(weights, visible))
    expected = out.reshape(T, H * d) @ attn.o_proj.weight.T
    torch.testing.assert_close(got[0], expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("attention_type, window, capacity_factor",
                         itertools.product(ATTENTION_TYPES, [None, 3], [None, 1.0]))
def test_changing_token_t_never_changes_earlier_logits(attention_type, window, capacity_factor):
    config = small_config(attention_type=attention_type, sliding_window=window, capacity_factor=capacity_factor,
                          moe_layers="all")
    model = h64lm.H64LM(config)
    model.train(capacity_factor is not None)  # capacity dropping only happens in training mode
    T = 12
    ids = torch.randint(0, config.vocab_size, (1, T))
    with torch.no_grad():
        base = model(ids).logits
        for t in range(T):
            changed = ids.clone()
            changed[0, t] = (changed[0, t] + 1 + t) % config.vocab_size
            logits = model(changed).logits
            torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=1e-6)
            assert not torch.allclose(logits[:, t:], base[:, t:])  # and token t does matter from t on


@pytest.mark.parametrize("attention_type, num_kv_heads, window",
                         itertools.product(ATTENTION_TYPES, [4, 2, 1], [None, 5]))
def test_cached_decoding_equals_full_forward(attention_type, num_kv_heads, window):
    config = small_config(attention_type=attention_type, num_kv_heads=num_kv_heads, sliding_window=window)
    model = h64lm.H64LM(config).eval()
    T = 20
    ids = torch.randint(0, config.vocab_size, (2, T))
    with torch.no_grad():
        full = model(ids).logits  # (2, T, V)

        cache = model.new_cache()
        pieces = [model(ids[:, :7], cache=cache).logits]  # prefill 7 tokens
        for t in range(7, T):  # then one token at a time
            pieces.append(model(ids[:, t:t + 1], cache=cache).logits)
            assert cache.keys[0].shape[1] == num_kv_heads  # only the KV heads are cached
            if window is not None:
                assert len(cache) <= window - 1  # and only what the window can still see
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-5)

    with torch.no_grad():  # chunked prefill, chunks longer than the window included
        cache = model.new_cache()
        chunks = [model(ids[:, s:s + 6], cache=cache).logits for s in range(0, T, 6)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_left_padded_rows_compute_what_they_would_alone(attention_type):
    config = small_config(attention_type=attention_type, sliding_window=4)
    model = h64lm.H64LM(config).eval()
    short, long = torch.randint(0, config.vocab_size, (1, 5)), torch.randint(0, config.vocab_size, (1, 9))
    padded = torch.cat((torch.zeros(1, 4, dtype=torch.long), short), dim=1)
    positions = torch.tensor([[-1, -1, -1, -1, 0, 1, 2, 3, 4], list(range(9))])
    with torch.no_grad():
        together = model(torch.cat((padded, long)), positions=positions).logits
        torch.testing.assert_close(together[0, 4:], model(short).logits[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(together[1], model(long).logits[0], rtol=1e-4, atol=1e-5)


def test_positions_beyond_the_context_are_refused():
    config = small_config(max_position_embeddings=16)
    model = h64lm.H64LM(config)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 17, dtype=torch.long))
