"""The pretraining pipeline: data sources, tokenizing and its cache, packed windows, evaluation, the command line,
and DistributedDataParallel with two gloo processes against one process with the same global batch."""

import argparse
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import h64lm

from conftest import PROCESS_ENV, REPO, TINY_FLAGS, run_cli, run_process  # noqa: E402


# --- Data sources -----------------------------------------------------------------------------------------------

def test_raw_folder_is_read_by_split_and_documents_start_at_article_headings(corpus):
    source = h64lm.open_text_source(str(corpus))
    for split in h64lm.SPLITS:
        lines = source.read(split)
        assert lines == (corpus / f"wiki.{split}.raw").read_text(encoding="utf-8").splitlines()
    docs = list(h64lm.documents(source.read("train")))
    assert len(docs) == 40
    assert sum(h64lm.is_article_heading(line) for d in docs for line in d.splitlines()) == 40
    assert all(sum(h64lm.is_article_heading(line) for line in d.splitlines()) == 1 for d in docs)


def test_article_headings_are_told_from_section_headings():
    assert h64lm.is_article_heading(" = Valkyrie = ")
    assert not h64lm.is_article_heading(" = = Early life = = ")
    assert not h64lm.is_article_heading(" The equation a = b holds =")


def test_tokens_are_bos_plus_each_document_in_order(corpus, tokenizer, tmp_path):
    source, splits = h64lm.load_token_splits(str(corpus), tokenizer, tmp_path, log=lambda *a: None)
    docs = list(h64lm.documents(source.read("test")))
    expected = [t for d in docs for t in [tokenizer.bos_token_id] + tokenizer.encode(d, add_special_tokens=False)]
    assert splits["test"].tokens.dtype == np.uint16
    assert splits["test"].tokens.tolist() == expected


def test_parquet_shards_give_the_same_tokens_as_raw_files(corpus, tokenizer, tmp_path):
    datasets = pytest.importorskip("datasets")
    # The hub's layout for WikiText-103: wikitext-103-raw-v1/{train,validation,test}-0000k-of-0000n.parquet,
    # one row per line, in a column named "text" (each with its newline).
    shards = tmp_path / "wikitext-103-raw-v1"
    shards.mkdir()
    for split, hub_name in [("train", "train"), ("valid", "validation"), ("test", "test")]:
        lines = (corpus / f"wiki.{split}.raw").read_text(encoding="utf-8").splitlines()
        half = len(lines) // 2
        for i, chunk in enumerate([lines[:half], lines[half:]]):
            ds = datasets.Dataset.from_dict({"text": [line + "\n" for line in chunk]})
            ds.to_parquet(str(shards / f"{hub_name}-{i:05d}-of-00002.parquet"))
    _, from_parquet = h64lm.load_token_splits(str(tmp_path), tokenizer, tmp_path / "cache", log=lambda *a: None)
    _, from_raw = h64lm.load_token_splits(str(corpus), tokenizer, tmp_path / "cache", log=lambda *a: None)
    for split in h64lm.SPLITS:
        assert from_parquet[split].tokens.tolist() == from_raw[split].tokens.tolist()
        assert from_parquet[split].words == from_raw[split].words


def test_the_cache_is_reused_and_keyed_by_the_text(corpus, tokenizer, tmp_path, monkeypatch):
    _, first = h64lm.load_token_splits(str(corpus), tokenizer, tmp_path, log=lambda *a: None)
    assert len(list(tmp_path.iterdir())) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again although the cache holds the splits")
    monkeypatch.setattr(h64lm, "tokenize_documents", no_tokenizing)
    _, second = h64lm.load_token_splits(str(corpus), tokenizer, tmp_path, log=lambda *a: None)
    for split in h64lm.SPLITS:
        assert isinstance(second[split].tokens, np.memmap)
        assert second[split].tokens.tolist() == first[split].tokens.tolist()
    # Changed text means a new cache entry, so a stale cache is never read.
    changed = tmp_path / "changed"
    changed.mkdir()
    for split in h64lm.SPLITS:
        text = (corpus / f"wiki.{split}.raw").read_text(encoding="utf-8")
        (changed / f"wiki.{split}.raw").write_text(text + " = Extra = \n", encoding="utf-8")
    with pytest.raises(AssertionError, match="tokenized again"):
        h64lm.load_token_splits(str(changed), tokenizer, tmp_path, log=lambda *a: None)


def test_bundled_sample_loads(tokenizer, tmp_path):
    source, splits = h64lm.load_token_splits("sample", tokenizer, tmp_path, log=lambda *a: None)
    assert "sample" in source.name
    assert len(splits["train"].tokens) > 1_000_000 and len(splits["valid"].tokens) > 50_000
    assert splits["train"].tokens[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("layout, message", [
    ("missing", "no such folder"),
    ("empty", "holds no wiki"),
    ("no-test", "no file for the test split"),
    ("latin-1", "not UTF-8"),
    ("a-file", "is a file"),
])
def test_bad_data_folders_are_clear_errors(tmp_path, layout, message):
    folder = tmp_path / "data"
    if layout != "missing":
        folder.mkdir()
    if layout in ("no-test", "latin-1"):
        (folder / "wiki.train.raw").write_text(" = A = \n text \n")
        (folder / "wiki.valid.raw").write_text(" = B = \n text \n")
    if layout == "latin-1":
        (folder / "wiki.test.raw").write_bytes(" = C = \n caf\xe9 \n".encode("latin-1"))
    if layout == "a-file":
        folder = folder / "wiki.train.raw"
        folder.write_text("x")
    with pytest.raises(h64lm.H64LMError, match=message):
        h64lm.open_text_source(str(folder)).read("test")


def test_wikitext103_unreachable_names_the_way_out_and_auto_falls_back(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setattr(h64lm, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(h64lm.H64LMError, match="--data sample") as e:
        h64lm.open_text_source("wikitext-103")
    assert "--data FOLDER" in str(e.value)
    said = []
    assert "sample" in h64lm.open_text_source("auto", log=said.append).name
    assert len(said) == 1 and said[0].startswith("--data auto: WikiText-103 could not be loaded"), said
    assert "uses the bundled Wikipedia sample instead" in said[0]


# --- Windows and their order ---------------------------------------------------------------------------------------

def test_packed_windows_tile_the_tokens_with_targets_shifted_by_one():
    tokens = np.arange(103, dtype=np.uint16)
    windows = h64lm.PackedWindows(tokens, seq_len=10)
    assert windows.count == 10
    x, y = windows.batch(range(windows.count))
    assert x.shape == y.shape == (10, 10)
    assert x.flatten().tolist() == list(range(100))
    assert y.flatten().tolist() == list(range(1, 101))


def test_each_epoch_visits_every_window_once_in_a_seeded_order():
    n, batch = 50, 8
    order = np.concatenate([h64lm.train_window_indices(step, batch, n, seed=3) for step in range(25)])  # 4 epochs
    for epoch in range(4):
        assert sorted(order[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert not np.array_equal(order[:n], order[n:2 * n])
    again = np.concatenate([h64lm.train_window_indices(step, batch, n, seed=3) for step in range(25)])
    assert np.array_equal(order, again)
    other = np.concatenate([h64lm.train_window_indices(step, batch, n, seed=4) for step in range(25)])
    assert not np.array_equal(order, other)


# --- Evaluation ---------------------------------------------------------------------------------------------------

def test_word_count_follows_wikitext():
    lines = [" = Alan Turing = ", " ", " Alan Turing was a mathematician . ", ""]
    # 4 words + 1 end-of-line, 0 + 1, 6 + 1, 0 + 1
    assert h64lm.count_words(lines) == 14


def test_evaluate_scores_every_token_once():
    from conftest import small_config

    model = h64lm.H64LM(small_config(vocab_size=200, max_position_embeddings=64))
    tokens = np.random.default_rng(0).integers(0, 200, size=150).astype(np.uint16)
    rt = h64lm.Runtime(device=torch.device("cpu"))
    nll, count = h64lm.evaluate(model, tokens, seq_len=32, batch_size=2, rt=rt)
    assert count == len(tokens) - 1
    # Independently: windows [0, 32), [32, 64), ... each scored from its own start; the last 21 tokens that do not
    # fill a window are scored with the 32 tokens before them as context.
    t = torch.from_numpy(tokens.astype(np.int64))
    expected = 0.0
    with torch.no_grad():
        for start in range(0, 128, 32):
            logits = model(t[None, start:start + 32]).logits[0]
            expected += F.cross_entropy(logits, t[start + 1:start + 33], reduction="sum").item()
        logits = model(t[None, -33:-1]).logits[0]
        expected += F.cross_entropy(logits[-21:], t[-21:], reduction="sum").item()
    assert nll == pytest.approx(expected, rel=1e-5)


# --- The command line ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")  # a real process: the one place `python h64lm.py train` itself is run
    result = run_process("train", *TINY_FLAGS, "--data", corpus, "--out-dir", out, "--run-name", "cli",
                         "--batch-size", "4", "--max-steps", "6", "--eval-every", "3", "--cache-dir", out / "cache")
    assert result.returncode == 0, result.stderr
    return out / "cli", result


def test_train_writes_checkpoints_history_and_plots(trained_run):
    run_dir, result = trained_run
    for name in ("latest.pt", "best.pt", "training_history.json", "loss.png", "lr.png", "expert_load.png"):
        assert (run_dir / name).stat().st_size > 0, name
    history = json.loads((run_dir / "training_history.json").read_text())
    assert [r["step"] for r in history["train"]] == list(range(6))
    assert [r["step"] for r in history["val"]] == [3, 6]
    assert history["train"][-1]["lm_loss"] < history["train"][0]["lm_loss"]
    assert set(history["train"][0]["expert_load"]) == {"1"}  # layer 1 is the MoE layer
    assert sum(history["train"][0]["expert_load"]["1"]) == pytest.approx(1.0)
    for record in history["train"]:  # MaxVio of the step's load, by its definition; entropy at most ln E
        share = record["expert_load"]["1"]
        assert record["max_vio"]["1"] == pytest.approx(max(share) / (sum(share) / len(share)) - 1, abs=1e-6)
        assert 0 <= record["router_entropy"]["1"] <= math.log(len(share)) + 1e-6
    assert all(isinstance(r["routing_flags"], list) for r in history["val"])
    assert history["val"][-1]["tokens"] == 6 * 4 * 32 and history["val"][-1]["seconds"] > 0
    assert "validation loss" in result.stdout + result.stderr
    trained = h64lm.open_trained(run_dir)
    assert trained.ckpt["step"] == 6 and trained.model.config.hidden_size == 32


@pytest.mark.parametrize("plot_seconds, drawn_at", [(1e9, [1, 5]), (0.0, [1, 2, 3, 4, 5])])
def test_a_run_that_saves_every_step_draws_its_plots_first_last_and_every_plot_seconds(
        corpus, tmp_path, monkeypatch, plot_seconds, drawn_at):
    drawn = []
    draw = h64lm.save_plots
    monkeypatch.setattr(h64lm, "save_plots", lambda history, folder: (drawn.append(len(history["train"])),
                                                                      draw(history, folder)))
    monkeypatch.setattr(h64lm, "PLOT_SECONDS", plot_seconds)
    collectives, on_rank0 = [], h64lm.on_rank0
    monkeypatch.setattr(h64lm, "on_rank0", lambda rt, fn: (collectives.append(fn), on_rank0(rt, fn))[1])
    result = run_cli("train", *TINY_FLAGS, "--data", corpus, "--out-dir", tmp_path, "--cache-dir", tmp_path / "cache",
                     "--batch-size", "2", "--max-steps", "5", "--save-every", "1", "--eval-every", "5")
    assert result.returncode == 0, result.stderr
    assert drawn == drawn_at  # steps in the history when the plots were drawn
    # Whether the plots are due is rank 0's clock alone: every save calls on_rank0 (a broadcast under torchrun, which
    # a process that skipped it would leave the others waiting in) as often, due or not: the run folder's claim,
    # then each of the 5 saves' files and its plots' turn.
    assert len(collectives) == 1 + 2 * 5
    history = json.loads((tmp_path / "tiny" / "training_history.json").read_text())
    assert len(history["train"]) == 5 and (tmp_path / "tiny" / "loss.png").stat().st_size > 0


def test_eval_json_word_perplexity_is_exp_nll_over_words(trained_run, corpus, tokenizer):
    run_dir, _ = trained_run
    # A hand-made test split: 2 articles, 20 words + 6 lines = 26 WikiText words.
    folder = corpus.parent / "hand"
    folder.mkdir(exist_ok=True)
    for split in ("train", "valid"):
        (folder / f"wiki.{split}.raw").write_text((corpus / f"wiki.{split}.raw").read_text())
    text = " = Ada = \n Ada Lovelace wrote the first program . \n \n = Bob = \n Bob built a very small boat . \n \n"
    (folder / "wiki.test.raw").write_text(text)
    result = run_cli("eval", "--ckpt", run_dir, "--data", folder, "--split", "test", "--seq-len", "64", "--json",
                     "--cache-dir", folder / "cache")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["words"] == 26
    ids = [tokenizer.bos_token_id] + tokenizer.encode(" = Ada = \n Ada Lovelace wrote the first program . \n \n",
                                                      add_special_tokens=False)
    ids += [tokenizer.bos_token_id] + tokenizer.encode(" = Bob = \n Bob built a very small boat . \n \n",
                                                       add_special_tokens=False)
    assert report["tokens"] == len(ids) - 1
    model = h64lm.open_trained(run_dir / "best.pt").model
    model.eval()
    t = torch.tensor(ids)
    with torch.no_grad():
        nll = F.cross_entropy(model(t[None, :-1]).logits[0], t[1:], reduction="sum").item()
    assert report["nll"] == pytest.approx(nll, rel=1e-5)
    assert report["loss"] == pytest.approx(nll / report["tokens"], rel=1e-5)
    assert report["token_ppl"] == pytest.approx(math.exp(nll / report["tokens"]), rel=1e-5)
    assert report["word_ppl"] == pytest.approx(math.exp(nll / 26), rel=1e-5)


def test_generate_streams_a_continuation(trained_run):
    run_dir, _ = trained_run
    result = run_cli("generate", "--ckpt", run_dir, "--prompt", "The history of", "--max-new-tokens", "8",
                     "--seed", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The history of") and len(result.stdout.strip()) > len("The history of")
    again = run_cli("generate", "--ckpt", run_dir, "--prompt", "The history of", "--max-new-tokens", "8",
                    "--seed", "0")
    assert again.stdout == result.stdout
    batch = run_cli("generate", "--ckpt", run_dir, "--prompt", "One", "--prompt", "Two words", "--greedy",
                    "--max-new-tokens", "4")
    assert batch.returncode == 0, batch.stderr
    assert batch.stdout.startswith("One") and "\n\nTwo words" in batch.stdout


def test_export_writes_safetensors_that_eval_reads(trained_run, tmp_path):
    run_dir, _ = trained_run
    result = run_cli("export", "--ckpt", run_dir, "--out", tmp_path / "export")
    assert result.returncode == 0, result.stderr
    exported = h64lm.open_trained(tmp_path / "export").model
    original = h64lm.open_trained(run_dir).model
    for (name, a), (_, b) in zip(original.state_dict().items(), exported.state_dict().items()):
        assert torch.equal(a, b), name


# --- --help is accurate -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["train", "compare", "eval", "generate", "analyze", "bench", "doctor", "export"])
def test_help_of_every_command_names_every_flag_and_says_what_the_command_does(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: h64lm.py " + command)
    sub = h64lm.build_parser()._subparsers._group_actions[0].choices[command]
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert " ".join(sub.description.split()) in text
    for action in sub._actions:
        for flag in action.option_strings:
            assert flag in result.stdout, flag
        if action.help and action.help != argparse.SUPPRESS:
            assert " ".join(action.help.replace("%%", "%").split())[:40] in text, action.option_strings


def test_train_help_lists_every_field_with_its_comment_and_true_default():
    # Compared with all whitespace removed: argparse wraps lines at spaces and after hyphens.
    text = "".join(h64lm.build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    for cls in (h64lm.H64LMConfig, h64lm.TrainConfig):
        comments = h64lm.field_comments(cls)
        for f in h64lm.fields(cls):
            if not f.init:
                continue
            assert "--" + f.name.replace("_", "-") in text, f.name
            assert "".join(comments[f.name].split()) in text, f.name
            assert f"(default:{f.default}".replace(" ", "") in text, f.name


def test_flags_reach_the_configs_over_preset_and_recipe():
    args = h64lm.build_parser().parse_args(["train", "--preset", "tiny", "--num-experts", "4", "--lr", "0.01",
                                            "--sliding-window", "16", "--tie-word-embeddings"])
    config, tc, preset, resume, trained = h64lm.train_settings(args)
    tiny, recipe = h64lm.PRESETS["tiny"], h64lm.TRAIN_RECIPES["tiny"]
    assert (config.num_experts, config.sliding_window, config.tie_word_embeddings) == (4, 16, True)
    assert config.hidden_size == tiny["hidden_size"]
    assert (tc.lr, tc.batch_size, tc.max_steps) == (0.01, recipe["batch_size"], recipe["max_steps"])
    assert preset == "tiny" and resume is None and trained is None
    defaults = h64lm.train_settings(h64lm.build_parser().parse_args(["train"]))
    assert defaults[0] == h64lm.H64LMConfig() and defaults[1] == h64lm.TrainConfig()


# --- Several processes --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_gloo_processes_train_like_one_process_with_the_same_global_batch(corpus, tmp_path):
    # One process: 2 micro-batches of 4 per step. Two processes: 1 micro-batch of 4 each. The global batch is the
    # same 8 windows, and each micro-batch is the same 4 windows (so even the per-micro-batch load-balancing loss
    # agrees); DDP averages the gradients over processes as accumulation averages them over micro-batches.
    common = [*TINY_FLAGS, "--data", corpus, "--out-dir", tmp_path, "--cache-dir", tmp_path / "cache",
              "--batch-size", "4", "--max-steps", "5", "--eval-every", "5", "--device", "cpu"]
    single = run_cli("train", *common, "--run-name", "single", "--grad-accum", "2")
    assert single.returncode == 0, single.stderr
    env = PROCESS_ENV
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(REPO / "h64lm.py"), "train", *map(str, common), "--run-name", "ddp", "--grad-accum", "1"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = json.loads((tmp_path / "single" / "training_history.json").read_text())
    two = json.loads((tmp_path / "ddp" / "training_history.json").read_text())
    for key in ("lm_loss", "aux_loss", "z_loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in two["train"]], [r[key] for r in one["train"]], rtol=1e-5,
                                   err_msg=key)
    np.testing.assert_allclose([r["loss"] for r in two["val"]], [r["loss"] for r in one["val"]], rtol=1e-5)
    # Rank 0 alone prints: one parameter table, not two.
    assert ddp.stdout.count("training FLOPs per token") == 1


@pytest.mark.slow
def test_under_torchrun_train_frees_the_ddp_model_before_it_tears_the_process_group_down(corpus, tmp_path):
    """DDP's reducer holds the process group and sits in a reference cycle. Left to a later garbage collection, it
    was freed after destroy_process_group, when the other process had already left, and its gloo threads waited
    for that process forever: a CI run hung at the end of a resumed two-process run. With the collector off, no
    DistributedDataParallel may be alive once train has returned, on either process."""
    script = tmp_path / "train_then_count.py"
    script.write_text(f"""import gc, json, sys
sys.path.insert(0, {str(REPO)!r})
import torch, h64lm
gc.disable()
config = h64lm.H64LMConfig.from_preset("tiny", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                       intermediate_size=64, expert_intermediate_size=32, num_experts=4,
                                       max_position_embeddings=64)
tc = h64lm.TrainConfig(data={str(corpus)!r}, batch_size=2, grad_accum=1, seq_len=32, max_steps=2, eval_every=2,
                       save_every=2, eval_batches=1, warmup_steps=1, out_dir={str(tmp_path)!r}, run_name="gc",
                       cache_dir={str(tmp_path / "cache")!r}, device="cpu")
h64lm.train(config, tc)
print(json.dumps(sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())))
""")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], cwd=REPO, env=PROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line for line in done.stdout.splitlines() if line.isdigit()] == ["0", "0"]


@pytest.mark.slow
def test_no_train_flag_is_taken_by_torchrun():
    # torchrun's parser matches abbreviations across the whole command line, so a flag of ours that begins one of
    # its options (as --run began --run-path) would be swallowed or refused before h64lm.py sees it.
    from torch.distributed.run import get_args_parser

    theirs = [s for a in get_args_parser()._actions for s in a.option_strings if s not in ("-h", "--help")]
    train = h64lm.build_parser()._subparsers._group_actions[0].choices["train"]
    ours = [s for a in train._actions for s in a.option_strings if s not in ("-h", "--help")]
    assert not [o for o in ours if any(t.startswith(o) for t in theirs)]


def test_analyze_prints_the_table_and_writes_the_heatmap(trained_run, tmp_path):
    run_dir, _ = trained_run
    result = run_cli("analyze", "--ckpt", run_dir, "--out", tmp_path / "routing.png")
    assert result.returncode == 0, result.stderr
    for kind in ("prose", "code", "dialogue", "numbers"):
        assert kind in result.stdout
    assert "layer 1" in result.stdout and (tmp_path / "routing.png").stat().st_size > 0
    assert "MaxVio" in result.stdout and (tmp_path / "routing-coactivation.png").stat().st_size > 0
    as_json = json.loads(run_cli("analyze", "--ckpt", run_dir, "--out", tmp_path / "r.png", "--json").stdout)
    assert as_json["layers"] == [1] and as_json["drop_one"] is None
    for kind, share in as_json["share"].items():
        assert sum(share[0]) == pytest.approx(1.0), kind
    coactivation = np.array(as_json["coactivation"][0])  # (E, E), symmetric; top-2: each token makes one pair
    assert np.allclose(coactivation, coactivation.T) and coactivation.diagonal().sum() == pytest.approx(2.0)


def test_analyze_drop_one_scores_every_expert_on_the_training_datas_validation_split(trained_run, tmp_path):
    run_dir, _ = trained_run
    result = run_cli("analyze", "--ckpt", run_dir, "--out", tmp_path / "r.png", "--drop-one", "1", "--json",
                     "--cache-dir", run_dir.parent / "cache")
    assert result.returncode == 0, result.stderr
    as_json = json.loads(result.stdout)
    delta = np.array(as_json["drop_one"])
    assert delta.shape == (1, 4) and np.isfinite(delta).all() and (delta != 0).any()
    assert (tmp_path / "r-drop-one.png").stat().st_size > 0


@pytest.mark.skipif(not (sys.platform == "linux" and __import__("platform").libc_ver()[0] == "glibc"),
                    reason="keep_freed_memory tunes glibc's malloc")
def test_keep_freed_memory_stops_big_tensors_from_faulting_in_fresh_pages():
    """Count page faults (a count, not a timing) while allocating and freeing a 64 MiB tensor 5 times, before and
    after keep_freed_memory(), in a fresh process since the setting is process-wide."""
    script = """
import resource, torch, h64lm
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(16 * 2**20)  # 64 MiB, written, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
default = faults()
took = h64lm.keep_freed_memory()
kept = [faults() for _ in range(4)]  # the first rounds after the change still grow the heap
print(took, default, kept[-1])
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    took, default, kept = out.stdout.split()
    assert took == "True"
    # By default every allocation is a fresh mmap: 16,384 faults of 4 KiB pages each (fewer with huge pages).
    assert int(default) >= 5, default
    assert int(kept) <= max(int(default) // 100, 2), (default, kept)
