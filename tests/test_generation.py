"""Sampling rules on hand-made logits, and generation: cached greedy decoding reproduces a cache-free recomputation,
batched prompts equal single ones, EOS stops a row, and bad requests are refused with a clear message."""

import pytest
import torch

import h64lm
from conftest import small_config


def support(logits, n=400, **options) -> set[int]:
    """The set of tokens that sampling ever returns from logits (1, V)."""
    gen = torch.Generator().manual_seed(0)
    return {h64lm.sample(logits, generator=gen, **options).item() for _ in range(n)}


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 50)
    assert torch.equal(h64lm.sample(logits, temperature=0), logits.argmax(dim=-1))


def test_top_k_keeps_the_k_most_likely():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5, 2.5]])
    assert support(logits, top_k=2) == {1, 4}
    assert support(logits, top_k=1, temperature=5.0) == {1}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert support(logits, top_p=0.7) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert support(logits, top_p=0.8) == {0, 1}  # 0.8 reaches p exactly
    assert support(logits, top_p=0.81) == {0, 1, 2}
    assert support(logits, top_p=0.1) == {0}  # the most likely token always stays
    assert support(logits) == {0, 1, 2, 3}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.5]])
    seen = torch.tensor([[True, True, False]])
    # CTRL's rule: 2 / 2 = 1 and -2 * 2 = -4, so token 2 (1.5, unseen) wins the argmax.
    assert h64lm.sample(logits, temperature=0, repetition_penalty=2.0, seen=seen).item() == 2
    assert h64lm.sample(logits, temperature=0, repetition_penalty=1.0, seen=seen).item() == 0


@pytest.mark.parametrize("attention_type, window", [("rope", None), ("alibi", 6), ("rope+alibi", 6)])
def test_greedy_generation_equals_recomputing_without_a_cache(attention_type, window):
    config = small_config(attention_type=attention_type, sliding_window=window)
    model = h64lm.H64LM(config)
    prompt = torch.randint(3, config.vocab_size, (7,)).tolist()
    new = h64lm.generate(model, [prompt], 25, temperature=0)[0]
    assert len(new) == 25
    model.eval()
    with torch.no_grad():
        sequence = prompt[:]
        for _ in range(25):  # no cache: the whole sequence every step
            sequence.append(model(torch.tensor([sequence])).logits[0, -1].argmax().item())
    assert new == sequence[len(prompt):]


def test_batched_prompts_equal_single_prompts():
    config = small_config(attention_type="rope+alibi", sliding_window=8)
    model = h64lm.H64LM(config)
    prompts = [torch.randint(3, config.vocab_size, (n,)).tolist() for n in (3, 11, 6)]
    together = h64lm.generate(model, prompts, 12, temperature=0)
    alone = [h64lm.generate(model, [p], 12, temperature=0)[0] for p in prompts]
    assert together == alone


def test_eos_stops_a_row():
    config = small_config()
    model = h64lm.H64LM(config)
    prompt = [5, 17, 42]
    free = h64lm.generate(model, [prompt], 10, temperature=0)[0]
    eos = free[3]  # pretend the 4th generated token is end-of-sequence
    first = free.index(eos)
    assert h64lm.generate(model, [prompt], 10, temperature=0, eos_id=eos)[0] == free[:first + 1]
    # In a batch each row stops at its own end-of-sequence, and the stream ends when every row has (or at 10).
    other = h64lm.generate(model, [[7, 8]], 10, temperature=0)[0]
    ends = [first + 1, other.index(eos) + 1 if eos in other else 10]
    steps = list(h64lm.stream_generate(model, [prompt, [7, 8]], 10, temperature=0, eos_id=eos))
    assert len(steps) == max(ends)
    rows = torch.stack(steps, dim=1).tolist()  # (2, steps)
    for row, alone, end in zip(rows, [free, other], ends):
        assert row[:end] == alone[:end]
        assert row[end:] == [eos] * (len(row) - end)  # a finished row repeats the end-of-sequence token


def test_sampling_is_reproducible_with_a_seed():
    model = h64lm.H64LM(small_config())
    options = dict(temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=123)
    assert h64lm.generate(model, [[1, 2, 3]], 15, **options) == h64lm.generate(model, [[1, 2, 3]], 15, **options)


def test_generation_leaves_the_training_mode_alone():
    model = h64lm.H64LM(small_config()).train()
    h64lm.generate(model, [[1, 2]], 3)
    assert model.training


def test_long_prompt_keeps_its_last_tokens_with_a_warning():
    config = small_config(max_position_embeddings=32)
    model = h64lm.H64LM(config)
    prompt = torch.randint(3, config.vocab_size, (40,)).tolist()
    with pytest.warns(UserWarning, match="only its last 22 tokens"):
        new = h64lm.generate(model, [prompt], 10, temperature=0)[0]
    assert new == h64lm.generate(model, [prompt[-22:]], 10, temperature=0)[0]


@pytest.mark.parametrize("prompts, max_new_tokens, message", [
    ([[]], 5, "at least one token"),
    ([], 5, "at least one token"),
    ([[1, 2]], 0, "max_new_tokens must be between 1 and 63"),
    ([[1, 2]], 64, "max_new_tokens must be between 1 and 63"),
])
def test_bad_generation_requests_are_refused(prompts, max_new_tokens, message):
    model = h64lm.H64LM(small_config())
    with pytest.raises(ValueError, match=message):
        h64lm.generate(model, prompts, max_new_tokens)


def test_after_a_left_padded_prefill_each_row_continues_from_its_own_position():
    torch.manual_seed(0)
    model = h64lm.H64LM(small_config()).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 0, 11, 12]])  # the second prompt, [11, 12], left-padded
    positions = torch.tensor([[0, 1, 2, 3, 4], [-1, -1, -1, 0, 1]])
    cache = model.new_cache()
    with torch.no_grad():
        model(ids, positions=positions, cache=cache)
        continued = model(torch.tensor([[3], [4]]), cache=cache).logits[:, -1]  # positions from the cache
        # The reference: each row alone, unpadded, without a cache.
        alone = [model(torch.tensor([[5, 6, 7, 8, 9, 3]])).logits[0, -1], model(torch.tensor([[11, 12, 4]])).logits[0, -1]]
    assert cache.next_position.tolist() == [[6], [3]]
    for row in range(2):
        torch.testing.assert_close(continued[row], alone[row], rtol=1e-5, atol=1e-5)
