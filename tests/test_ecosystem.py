"""Out into the ecosystem: Muon from torch (with the experts orthogonalised one at a time), models that
transformers loads, and the interactive prompt."""


import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import h64lm
from conftest import PROCESS_ENV, REPO, TINY_FLAGS, run_cli, small_config

DEMO = REPO / "checkpoints" / "demo"
PROMPT = "The river rises in the hills north of the town and"


# --- Muon --------------------------------------------------------------------------------------------------------

# ExpertMuon orthogonalises in batched bfloat16 multiplies, torch's Muon one matrix at a time. On the machines
# measured the two are equal bit for bit, but a batched and a single bfloat16 multiply may round differently on
# another CPU, so the weights are compared to a few bfloat16 roundings of the steps: MUON_ROUNDING, under a
# hundredth of the farthest any of these weights moves (4 steps at lr 0.02 move them by up to 0.04-0.07).
MUON_ROUNDING = 3e-4


@pytest.mark.parametrize("E, d_in, d_out", [(3, 8, 12), (8, 256, 512), (32, 128, 256), (4, 256, 1024)])  # the lab's
def test_each_expert_gets_torchs_muon_step_for_its_matrix_alone(E, d_in, d_out):
    # The stacked (E, in, out) tensor against E separate (out, in) matrices (nn.Linear's layout), each with its own
    # torch.optim.Muon: the same weights after every step, with momentum and weight decay at work, although
    # ExpertMuon orthogonalises the E matrices as one batch. Orthogonalising the stack as one matrix instead, or
    # scaling the step by the stack's shape, would differ by about as much as the weights move.
    stacked = torch.nn.Parameter(torch.randn(E, d_in, d_out))
    start = stacked.detach().clone()
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
        torch.testing.assert_close(stacked.detach(), torch.stack([w.detach().T for w in alone]), rtol=0,
                                   atol=MUON_ROUNDING)
    assert (stacked.detach() - start).abs().amax() > 100 * MUON_ROUNDING  # the steps moved the weights


def test_each_matrix_gets_torchs_muon_step_though_matrices_of_one_shape_are_batched():
    # Three 2-D weights, two of one shape (orthogonalised as one batch) and a tall one, in one ExpertMuon, against
    # one torch.optim.Muon each.
    weights = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((6, 10), (6, 10), (12, 5))]
    twins = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    ours, theirs = h64lm.ExpertMuon(weights, lr=0.01), [torch.optim.Muon([t], lr=0.01) for t in twins]
    for _ in range(3):
        for w, twin, opt in zip(weights, twins, theirs):
            w.grad = torch.randn_like(w)
            twin.grad = w.grad.clone()
            opt.step()
        ours.step()
        for w, twin in zip(weights, twins):
            torch.testing.assert_close(w, twin, rtol=0, atol=MUON_ROUNDING)


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


# --- A model transformers loads ------------------------------------------------------------------------------------

def greedy_cli(ckpt, new_tokens: int = 24) -> str:
    result = run_cli("generate", "--ckpt", ckpt, "--prompt", PROMPT, "--greedy", "--max-new-tokens", new_tokens)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def assert_transformers_matches(out, ckpt, expected_class: str, trust_remote_code: bool):
    """Logits of the transformers-loaded folder equal H64LM's (float32, 1e-5), and its greedy generate() writes
    what `h64lm.py generate --greedy` writes, with the same repetition penalty (the CLI's default 1.1: CTRL's, in
    both)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=trust_remote_code)
    assert type(hf).__name__ == expected_class and hf.dtype == torch.float32
    model = h64lm.open_trained(ckpt).model
    model.eval()
    ids = tokenizer([PROMPT], return_tensors="pt").input_ids
    assert ids[0].tolist() == h64lm.load_tokenizer()(PROMPT)["input_ids"]  # the same tokenizer, BOS included
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    generated = hf.generate(ids, max_new_tokens=24, do_sample=False, repetition_penalty=1.1)  # with its KV cache
    assert tokenizer.decode(generated[0], skip_special_tokens=True).strip() == greedy_cli(ckpt)
    assert torch.equal(hf.generate(ids, max_new_tokens=24, do_sample=False, repetition_penalty=1.1,
                                   use_cache=False), generated)
    # transformers' pipeline, as the README calls it: the same new tokens.
    from transformers import pipeline
    continuation = pipeline("text-generation", model=hf, tokenizer=tokenizer)(
        PROMPT, max_new_tokens=24, do_sample=False, repetition_penalty=1.1, return_full_text=False)
    assert continuation[0]["generated_text"] == tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_the_demo_exports_as_remote_code_that_transformers_runs_like_h64lm(tmp_path):
    result = run_cli("export", "--ckpt", DEMO, "--out", tmp_path / "hf", "--format", "hf")
    assert result.returncode == 0, result.stderr
    assert "trust_remote_code=True" in result.stdout
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "h64lm.py", "modeling_h64lm.py", "tokenizer.json"} <= files
    # The model code is this file, not a second implementation.
    assert (tmp_path / "hf" / "h64lm.py").read_bytes() == (REPO / "h64lm.py").read_bytes()
    assert_transformers_matches(tmp_path / "hf", DEMO, "H64LMForCausalLM", trust_remote_code=True)


@pytest.mark.slow
def test_a_mixtral_shaped_run_exports_as_a_native_mixtral(corpus, tmp_path):
    run = run_cli("train", *TINY_FLAGS, "--attention-type", "rope", "--moe-layers", "all", "--balance", "switch",
                  "--max-steps", "3", "--eval-every", "3", "--batch-size", "4", "--data", corpus, "--out-dir",
                  tmp_path, "--cache-dir", tmp_path / "cache", "--run-name", "mixtral")
    assert run.returncode == 0, run.stderr
    result = run_cli("export", "--ckpt", tmp_path / "mixtral", "--out", tmp_path / "hf", "--format", "hf")
    assert result.returncode == 0, result.stderr
    assert "native transformers Mixtral" in result.stdout
    assert not (tmp_path / "hf" / "h64lm.py").exists()  # transformers' own code runs it
    assert_transformers_matches(tmp_path / "hf", tmp_path / "mixtral", "MixtralForCausalLM", trust_remote_code=False)


def test_only_a_model_that_is_exactly_mixtral_or_mistral_is_exported_natively():
    mixtral = dict(attention_type="rope", moe_layers="all", balance="switch")
    assert h64lm.native_architecture(h64lm.H64LM(small_config(**mixtral))) == "mixtral"
    assert h64lm.native_architecture(h64lm.H64LM(small_config(attention_type="rope", moe_layers="none"))) == "mistral"
    for change in (dict(attention_type="rope+alibi"), dict(attention_type="alibi"), dict(moe_layers="odd"),
                   dict(router_scoring="sigmoid"), dict(num_shared_experts=1)):
        assert h64lm.native_architecture(h64lm.H64LM(small_config(**{**mixtral, **change}))) is None, change
    # aux_free's bias changes which experts are chosen, which Mixtral cannot express; an all-zero bias does not.
    model = h64lm.H64LM(small_config(**{**mixtral, "balance": "aux_free"}))
    assert h64lm.native_architecture(model) == "mixtral"
    model.blocks[0].ffn.balance_bias[1] = 0.5
    assert h64lm.native_architecture(model) is None


@pytest.mark.parametrize("architecture, change", [("mistral", dict(moe_layers="none", sliding_window=5)),
                                                  ("mixtral", dict(moe_layers="all", tie_word_embeddings=True))])
def test_native_models_compute_what_h64lm_computes(architecture, change):
    model = h64lm.H64LM(small_config(attention_type="rope", balance="switch", **change)).eval()
    hf = h64lm.to_transformers(model)
    assert type(hf).__name__ == architecture.capitalize() + "ForCausalLM"
    ids = torch.randint(0, 101, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_the_remote_code_model_handles_left_and_right_padding_like_separate_sequences():
    model = h64lm.H64LM(small_config(attention_type="rope+alibi", sliding_window=6)).eval()
    config_cls, model_cls = h64lm.transformers_classes()
    hf = model_cls(config_cls(h64lm=model.config.to_dict())).eval()
    hf.model.load_state_dict(model.state_dict())
    short, long = torch.randint(3, 101, (1, 5)), torch.randint(3, 101, (1, 12))
    with torch.no_grad():
        expected = model(short).logits[0]
        for side in ("left", "right"):
            pad = torch.zeros(1, 7, dtype=torch.long)
            ids = torch.cat([torch.cat([pad, short], 1) if side == "left" else torch.cat([short, pad], 1), long])
            mask = (torch.cat([torch.cat([pad, pad[:, :5] + 1], 1) if side == "left" else
                               torch.cat([pad[:, :5] + 1, pad], 1), torch.ones(1, 12, dtype=torch.long)]))
            logits = hf(ids, attention_mask=mask).logits
            got = logits[0, 7:] if side == "left" else logits[0, :5]
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
            torch.testing.assert_close(logits[1], model(long).logits[0], rtol=0, atol=1e-5)
        # labels, as transformers' convention has them: the inputs, shifted inside.
        ids = torch.randint(0, 101, (2, 9))
        loss = hf(ids, labels=ids).loss
        torch.testing.assert_close(loss, model(ids[:, :-1], ids[:, 1:]).lm_loss, rtol=1e-5, atol=1e-6)


def remote_code_model(config: h64lm.H64LMConfig):
    """(H64LM, its transformers twin with the same weights), both in eval mode."""
    torch.manual_seed(0)
    model = h64lm.H64LM(config).eval()
    config_cls, model_cls = h64lm.transformers_classes()
    hf = model_cls(config_cls(h64lm=config.to_dict(), bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    hf.model.load_state_dict(model.state_dict())
    return model, hf


@pytest.mark.parametrize("change", [dict(), dict(sliding_window=5, attention_type="alibi")])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_cached_generate_equals_uncached_and_h64lm_generate(change, cache):
    # transformers' generate() keeps its cache in a DynamicCache (or a StaticCache: every slot returned, the
    # empty ones masked); without it, every step runs the whole sequence again.
    model, hf = remote_code_model(small_config(**change))
    ids = torch.randint(3, 101, (1, 7), generator=torch.Generator().manual_seed(1))
    options = dict(max_new_tokens=20, cache_implementation=cache)
    uncached = hf.generate(ids, do_sample=False, use_cache=False, max_new_tokens=20)
    lengths, forward = [], hf.model.forward
    hf.model.forward = lambda idx, *args, **kwargs: lengths.append(idx.shape[1]) or forward(idx, *args, **kwargs)
    cached = hf.generate(ids, do_sample=False, **options)
    del hf.model.forward
    assert torch.equal(cached, uncached)
    assert lengths == [7] + [1] * 19  # the prompt once, then each new token alone: the cache holds the rest
    assert cached[0, 7:].tolist() == h64lm.generate(model, [ids[0].tolist()], 20, temperature=0.0)[0]
    draws = []
    for use_cache in (True, False):  # seeded sampling draws the same tokens from the same distributions
        torch.manual_seed(5)
        draws.append(hf.generate(ids, do_sample=True, top_k=20, temperature=1.3, use_cache=use_cache,
                                 **({"cache_implementation": cache} if use_cache else {}), max_new_tokens=20))
    assert torch.equal(*draws) and not torch.equal(draws[0], cached)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_cached_generate_of_a_left_padded_batch_equals_each_prompt_alone(cache):
    _, hf = remote_code_model(small_config(attention_type="rope+alibi", sliding_window=6))
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 101, (1, n), generator=generator) for n in (4, 9, 6)]
    width = max(p.shape[1] for p in prompts)
    ids = torch.cat([torch.cat([torch.zeros(1, width - p.shape[1], dtype=torch.long), p], 1) for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([[width - p.shape[1]] for p in prompts])).long()
    together = hf.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=False, cache_implementation=cache)
    for row, prompt in zip(together, prompts):
        alone = hf.generate(prompt, max_new_tokens=15, do_sample=False, cache_implementation=cache)
        assert row[width:].tolist() == alone[0, prompt.shape[1]:].tolist()


def test_a_forward_with_use_cache_returns_a_cache_that_the_next_forward_continues():
    # transformers' own convention outside generate(): the cache comes back in the output, and the next call
    # gives only the new tokens (with the mask of all of them).
    _, hf = remote_code_model(small_config(attention_type="rope+alibi"))
    ids = torch.randint(3, 101, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = hf(ids).logits
        first = hf(ids[:, :6], use_cache=True)
        rest = hf(ids[:, 6:], attention_mask=torch.ones(2, 10, dtype=torch.long), cache=first.cache)
    assert type(first.cache).__name__ == "DynamicCache" and first.cache.get_seq_length() == 10
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), whole, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_lm_evaluation_harness_scores_the_demo_as_h64lm_eval_does(tmp_path):
    # lm-eval's own rolling windows, on the h64lm_stream task (tests/lm_eval_task.py) over the sample's first 12
    # test articles, against h64lm's evaluate on the same articles' tokens with the same windows (256: the demo's
    # context, which `h64lm.py eval` uses for an exported model). add_bos_token=False: lm-eval puts its own <s>
    # before each text; with the tokenizer's too, the first token scored is a <s> after a <s>.
    import lm_eval
    from lm_eval.tasks import TaskManager

    from tests.lm_eval_task import write_tasks

    counts = write_tasks("sample", "test", tmp_path / "tasks", articles=12)
    assert run_cli("export", "--ckpt", DEMO, "--out", tmp_path / "hf", "--format", "hf").returncode == 0
    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tmp_path / 'hf'},trust_remote_code=True,max_length=256,dtype=float32,"
                               "add_bos_token=False",
        tasks=["h64lm_stream", "h64lm_documents"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
        batch_size=8, device="cpu")["results"]
    trained = h64lm.open_trained(DEMO, tokenizer="recorded")
    source = h64lm.open_text_source("sample", log=lambda *a: None)
    articles = list(h64lm.documents(source.read("test")))[:12]
    tokens = h64lm.tokenize_documents(articles, trained.tokenizer, desc="tokenizing")
    nll, _ = h64lm.evaluate(trained.model, tokens, 256, 8, h64lm.setup_runtime("cpu"))
    ours = math.exp(nll / counts["words"])
    assert results["h64lm_stream"]["word_perplexity,none"] == pytest.approx(ours, rel=1e-4)
    assert results["h64lm_stream"]["byte_perplexity,none"] == pytest.approx(math.exp(nll / counts["bytes"]), rel=1e-4)
    # lm-eval's own convention, each article alone from its <s>, is another number: close, not the same.
    assert results["h64lm_documents"]["word_perplexity,none"] != pytest.approx(ours, rel=1e-4)
    assert results["h64lm_documents"]["word_perplexity,none"] == pytest.approx(ours, rel=0.1)


# --- The interactive prompt ----------------------------------------------------------------------------------------

def test_the_prompt_line_takes_settings_between_turns_and_leaves_at_the_end_of_input():
    lines = ["/settings", "/temperature -1", "/top-k many", "/max-new-tokens 9999", "/bogus", "/greedy",
             "/max-new-tokens 12", PROMPT, "", "/repetition-penalty 1.0", PROMPT]
    result = subprocess.run([sys.executable, str(REPO / "h64lm.py"), "generate", "--ckpt", str(DEMO), "--interactive"],
                            input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=300,
                            env=PROCESS_ENV)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    # The help says what a base model does with a question, and how to leave.
    assert "does not answer" in result.stderr and "Ctrl-D" in result.stderr
    # Bad settings: one line each, checked as the flags are, and the session goes on.
    assert "max-new-tokens=100  temperature=0.8  top-k=50" in result.stderr
    assert "error: /temperature: must be a finite number of at least 0, got -1.0" in result.stderr
    assert "error: /top-k: 'many' is not an integer" in result.stderr
    assert "error: /max-new-tokens: --max-new-tokens must be between 1 and 255" in result.stderr
    assert "error: unknown command '/bogus'" in result.stderr
    assert "temperature = 0.0" in result.stderr and "max-new-tokens = 12" in result.stderr
    # Each continuation is what generate --greedy writes with the settings of its turn.
    turns = [t.strip() for t in result.stdout.split("> ") if t.strip()]
    expected = [run_cli("generate", "--ckpt", DEMO, "--prompt", PROMPT, "--greedy", "--max-new-tokens", 12,
                        *extra).stdout.strip() for extra in ([], ["--repetition-penalty", "1.0"])]
    assert turns == expected and expected[0] != expected[1]


@pytest.mark.slow
def test_ctrl_c_stops_one_continuation_and_ctrl_d_leaves(tmp_path):
    # A model slow enough to interrupt mid-way on any machine: the small preset, 500 new tokens.
    from safetensors.torch import save_file

    model = h64lm.H64LM(h64lm.H64LMConfig.from_preset("small"))
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    process = subprocess.Popen([sys.executable, str(REPO / "h64lm.py"), "generate", "--ckpt", str(tmp_path),
                                "--interactive", "--max-new-tokens", "500", "--no-eos"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=PROCESS_ENV)
    os.set_blocking(process.stdout.fileno(), False)
    seen = b""

    def read_until(marker: bytes, after: int) -> None:
        nonlocal seen
        deadline = time.monotonic() + 120
        while marker not in seen[after:]:
            assert time.monotonic() < deadline and process.poll() is None, seen
            seen += process.stdout.read() or b""
            time.sleep(0.01)

    read_until(b"> ", 0)
    process.stdin.write(b"Once upon a time\n")
    process.stdin.flush()
    read_until(b"Once upon a time", 0)
    start = len(seen)
    read_until(b" ", start + 1)  # the continuation has begun
    process.send_signal(signal.SIGINT)
    read_until(b"[stopped]", start)
    read_until(b"> ", seen.index(b"[stopped]"))  # back at the prompt, still running
    process.send_signal(signal.SIGINT)  # Ctrl-C at the prompt: a fresh line, not an exit
    time.sleep(0.5)
    assert process.poll() is None
    process.stdin.write(b"/max-new-tokens 3\nThe end\n")
    process.stdin.close()  # Ctrl-D
    assert process.wait(timeout=120) == 0
    seen += process.stdout.read() or b""
    stderr = process.stderr.read().decode()
    assert "Traceback" not in stderr and "interrupted" not in stderr
    assert b"The end" in seen.split(b"[stopped]")[1]
