"""Guards that keep the README's promises under abuse: every flag of every subcommand refuses values outside its
domain with one sentence and exit status 2; no NaN reaches a checkpoint; one process per run folder; checkpoints
that know the tokenizer and text they were trained on; a token cache that proves itself; a hand-edited config
refused before anything is allocated; OS errors as one sentence; Ctrl-C answered at once."""

import argparse
import functools
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

import h64lm
from conftest import TINY_FLAGS, run_cli, start_training, wait_until


# --- Fixtures ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_run(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("guarded")
    result = run_cli("train", *TINY_FLAGS, "--data", corpus, "--out-dir", out, "--cache-dir", out / "cache",
                     "--batch-size", "4", "--max-steps", "2", "--eval-every", "2", "--run-name", "run")
    assert result.returncode == 0, result.stderr
    return out / "run"


@pytest.fixture(scope="module")
def hostile_files(tmp_path_factory) -> Path:
    """What a hostile value points at: a file where a folder is wanted, an empty folder, a text file."""
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "a_file").write_text("not a folder, not a checkpoint\n")
    (folder / "empty").mkdir()
    return folder


def stat_snapshot(*folders: Path) -> dict:
    """Every file under the folders with its size and modification time: any write changes one of them."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for folder in folders
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        status = h64lm.main(argv)
    except SystemExit as e:  # argparse's own errors
        status = e.code
    return status, capsys.readouterr().err


def assert_one_sentence(status: int, err: str) -> None:
    assert status == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith("."), err


# --- Every flag of every subcommand, with the values it must refuse --------------------------------------------------
# The cases come from the parser itself: a flag with choices= gets a value outside them, a number flag (its dest
# names a Range in h64lm.NUMBER_RANGES) the values outside that Range, and any other flag the hostile values of
# its type (a folder, a file to write, a run name, ...). A new flag is covered without anyone adding it here, and
# a flag whose value nothing checks fails test_every_flag_checks_its_value.

def _number_values(allowed: h64lm.Range) -> list[str]:
    values = ["nan", "inf", "-inf", "abc"]
    if allowed.integer:
        values += ["1.5", str(2**63)]
    if allowed.low is not None:
        values.append(str(allowed.low if allowed.low_open else (allowed.low - 1)))
    if allowed.high is not None:
        values.append(str(allowed.high if allowed.high_open else (allowed.high + 1)))
    return values


TEXT = ["", "\udcff\udcfe"]  # how Python hands over bytes that are not UTF-8
HOSTILE = {  # by the name of the flag's type
    "tokenizer_flag": ["{tmp}/nowhere", "{tmp}/a_file"],
    "run_tokenizer_flag": ["{tmp}/nowhere", "{tmp}/a_file", "bpe:12", "bpe:lots", "bpe:70000"],
    "output_folder_flag": ["{tmp}/a_file", "{tmp}/a_file/inside"],
    "image_file_flag": ["{tmp}/empty", "{tmp}/nowhere/routing.png", "{tmp}/routing.txt"],
    "new_checkpoint_flag": ["{tmp}/empty", "{tmp}/nowhere/one.pt", "{tmp}/one.txt"],
    "run_name_flag": ["../escape", "a/b", "/absolute", ".", "..", ""],
    "data_flag": ["{tmp}/nowhere", "{tmp}/a_file"],
    "text_flag": TEXT, "variants_flag": TEXT, "custom_variant_flag": TEXT,
    "kind_file_flag": ["no-equals-sign", "prose={tmp}/nowhere", "prose={tmp}/empty", "prose=\udcff"],
}
CHECKPOINT_FLAGS = {"ckpt", "resume"}  # plain text, looked for and checked where the checkpoint is read
CHECKPOINT = ["{tmp}/nowhere", "{tmp}/empty", "{tmp}/a_file"]


def _hostile_values(action: argparse.Action) -> list[str] | None:
    """The values a flag must refuse, from what the parser says of it; None when nothing checks its value."""
    if action.choices is not None:
        return ["not-a-choice"]
    if action.dest in h64lm.NUMBER_RANGES:
        return _number_values(h64lm.NUMBER_RANGES[action.dest])
    if action.type is None:
        return CHECKPOINT if action.dest in CHECKPOINT_FLAGS else None
    return HOSTILE.get(action.type.__name__)


# Required flags (and a small model) so that each case reaches the flag under test.
BASE = {
    "train": [*TINY_FLAGS, "--data", "{corpus}", "--out-dir", "{out}", "--cache-dir", "{out}/cache",
              "--run-name", "fresh", "--max-steps", "2"],
    "eval": ["--ckpt", "{run}", "--cache-dir", "{out}/cache", "--max-batches", "1"],
    "generate": ["--ckpt", "{run}", "--prompt", "Hi", "--max-new-tokens", "2"],
    "analyze": ["--ckpt", "{run}", "--out", "{tmp}/routing.png"],
    "bench": ["--repeats", "1", "--batch-size", "1", "--seq-len", "8"],
    "doctor": ["--preset", "tiny", "--device", "cpu"],
    "compare": [*TINY_FLAGS, "--data", "{corpus}", "--out-dir", "{out}", "--cache-dir", "{out}/cache",
                "--run-name", "study", "--max-steps", "2", "--seeds", "1", "--variants", "switch"],
    "export": ["--ckpt", "{run}", "--out", "{tmp}/exported"],
    "unshard": ["--ckpt", "{run}", "--out", "{tmp}/one.pt"],
}


@functools.cache  # building the parser reads every dataclass's source for its help: once is enough
def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = h64lm.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _valued_flags():
    for command, sub in _subcommands().items():
        for action in sub._actions:
            if action.option_strings and action.nargs != 0:  # nargs 0: help, store_true, --flag/--no-flag
                yield command, action


def _built_alike(a: argparse.Action, b: argparse.Action) -> bool:
    """Two flags parsed the same way: the same name, choices and default, and a type of the same name (a number's
    Range is the one of its dest), as add_dataclass_flags builds every field's flag for both train and compare."""
    def type_name(action):
        return action.type.__qualname__ if action.type else None
    return (a.option_strings, a.dest, a.choices, a.default, type_name(a)) == \
        (b.option_strings, b.dest, b.choices, b.default, type_name(b))


def _shared_with_train(command: str, action: argparse.Action) -> bool:
    """compare's model and training flags are train's, built by the same code: their hostile values are tried once,
    on train (test_compare_flags_are_built_like_trains proves they are built alike)."""
    if command != "compare":
        return False
    train = {a.option_strings[0]: a for a in _subcommands()["train"]._actions if a.option_strings}
    twin = train.get(action.option_strings[0])
    return twin is not None and _built_alike(action, twin)


def _cases():
    for command, action in _valued_flags():
        flag = action.option_strings[0]
        if _shared_with_train(command, action):
            continue
        for value in _hostile_values(action) or []:
            yield command, flag, value


CASES = list(_cases())


def test_compare_flags_are_built_like_trains():
    compare = [a for c, a in _valued_flags() if c == "compare"]
    shared = [a for a in compare if _shared_with_train("compare", a)]
    assert {a.option_strings[0] for a in shared} >= {"--hidden-size", "--balance", "--lr", "--seed", "--data"}
    assert {a.option_strings[0] for a in compare if a not in shared} == {"--variants", "--variant", "--seeds"}


def test_every_flag_checks_its_value():
    unchecked = [f"{command} {action.option_strings[0]}" for command, action in _valued_flags()
                 if _hostile_values(action) is None]
    assert unchecked == []
    for command, action in _valued_flags():  # a number flag's type is built from the Range its dest names
        if action.choices is None and action.dest in h64lm.NUMBER_RANGES:
            for value in _number_values(h64lm.NUMBER_RANGES[action.dest]):
                with pytest.raises(argparse.ArgumentTypeError):
                    action.type(value)
    assert set(BASE) == set(_subcommands())
    assert len(CASES) > 300  # every subcommand, every flag


@pytest.mark.slow
@pytest.mark.parametrize("command, flag, value", CASES, ids=[f"{c} {f} {ascii(v)}" for c, f, v in CASES])
def test_every_flag_refuses_hostile_values(saved_run, corpus, hostile_files, capsys, monkeypatch,
                                           command, flag, value):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fill = dict(tmp=hostile_files, run=saved_run, out=saved_run.parent, corpus=corpus)
    base = [] if flag == "--resume" else BASE[command]  # --resume alone: the checkpoint holds the settings
    argv = [command, *(a.format(**fill) for a in base), flag, value.format(**fill)]
    before = stat_snapshot(saved_run.parent, corpus, hostile_files)
    status, err = run_main(argv, capsys)
    assert_one_sentence(status, err)
    assert stat_snapshot(saved_run.parent, corpus, hostile_files) == before


# --- A further table: bad input that passes parsing and is caught where it is used ---------------------------------

def _damaged_tokenizer(folder: Path) -> Path:
    shutil.copytree(h64lm.DEFAULT_TOKENIZER, folder)
    data = (folder / "tokenizer.json").read_bytes()
    (folder / "tokenizer.json").write_bytes(data[: len(data) // 3])
    (folder / "tokenizer.model").unlink()
    return folder


LATE_BAD_INPUTS = [
    # (name, arguments, what stderr must say)
    ("model too big for the machine", "train {tiny} --hidden-size 1000000 --data {corpus} --run-name x",
     "alone need"),
    ("damaged tokenizer", "eval --ckpt {run} --tokenizer {tmp}/damaged-tokenizer", "could not be loaded"),
    ("checkpoint that is text", "eval --ckpt {tmp}/a_file", "not a readable H64LM checkpoint"),
    ("resume a text file", "train --resume {tmp}/a_file", "not a readable H64LM checkpoint"),
    ("resume settings made invalid", "train --resume {run} --min-lr 1", "min_lr (1.0) must not exceed lr"),
    ("analyze text that is a folder", "analyze --ckpt {run} --text prose={tmp}/empty --out {tmp}/r.png",
     "no such file, or it is empty"),
    ("compare seeds past the last", "compare --seed 4294967295 --seeds 2 --data {corpus} --out-dir {tmp}/study",
     "goes past the last seed"),
    ("compare a variant that is no model", "compare --variant odd:num_experts_per_tok=9 --data {corpus} "
     "--out-dir {tmp}/study", "The variant odd is not a valid model"),
]


@pytest.mark.parametrize("name, arguments, message", LATE_BAD_INPUTS, ids=[b[0] for b in LATE_BAD_INPUTS])
def test_bad_input_found_after_parsing_is_one_sentence(saved_run, corpus, hostile_files, capsys, monkeypatch,
                                                       name, arguments, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if not (hostile_files / "damaged-tokenizer").exists():
        _damaged_tokenizer(hostile_files / "damaged-tokenizer")
    argv = arguments.format(run=saved_run, corpus=corpus, tmp=hostile_files, tiny=" ".join(TINY_FLAGS)).split(" ")
    if argv[0] == "train":
        argv += ["--out-dir", str(saved_run.parent), "--cache-dir", str(saved_run.parent / "cache")]
    before = stat_snapshot(saved_run.parent, corpus, hostile_files)
    status, err = run_main(argv, capsys)
    assert_one_sentence(status, err)
    assert message in err
    assert stat_snapshot(saved_run.parent, corpus, hostile_files) == before


# --- No NaN on disk ---------------------------------------------------------------------------------------------------

def finite_and_loadable(path: Path) -> int:
    ckpt = h64lm.open_trained(path).ckpt  # read, checked and built
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values()), path
    assert all(torch.isfinite(v).all() for v in h64lm._tensors(ckpt["optimizer"]) if v.is_floating_point()), path
    return ckpt["step"]


@pytest.mark.slow
def test_a_diverging_run_keeps_finite_checkpoints_and_says_which(corpus, tmp_path):
    # A learning rate of 1e30: the first step's update is finite, the next gradient is not. Before this guard the
    # weights it broke were saved over latest.pt (every one NaN) before the loss showed anything.
    common = [*TINY_FLAGS, "--data", corpus, "--out-dir", tmp_path, "--cache-dir", tmp_path / "cache",
              "--batch-size", "4", "--max-steps", "8", "--save-every", "1", "--eval-every", "1"]
    result = run_cli("train", *common, "--run-name", "diverged", "--lr", "1e30", "--warmup-steps", "0")
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip().splitlines()[-1]
    assert "became NaN or infinite at step" in err and "nothing from that step on was saved" in err
    run_dir = tmp_path / "diverged"
    step = finite_and_loadable(run_dir / "latest.pt")
    assert finite_and_loadable(run_dir / "best.pt") <= step
    assert f"the last checkpoint, {run_dir / 'latest.pt'} (step {step}, every number in it finite), is kept" in err
    # The command it prints runs; here the weights that step 0's update of 1e30 made are finite but far too
    # large to recover from, so the guard stops it again, and again nothing non-finite is saved.
    command = err.partition("e.g. ")[2].rstrip(".").split()
    assert command == ["python", "h64lm.py", "train", "--resume", str(run_dir), "--lr", "1e+29"], err
    again = run_cli(*command[2:], "--cache-dir", tmp_path / "cache")
    assert again.returncode == 2 and "became NaN or infinite" in again.stderr, again.stderr
    assert finite_and_loadable(run_dir / "latest.pt") >= step


def test_nonfinite_state_names_the_broken_weight_or_moment():
    model = h64lm.H64LM(h64lm.H64LMConfig.from_preset("tiny", num_layers=2, vocab_size=50))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 50, (1, 8)), torch.randint(0, 50, (1, 8))).loss.backward()
    optimizer.step()
    assert h64lm.nonfinite_state(model, optimizer) is None
    optimizer.state[model.lm_head.weight]["exp_avg_sq"][0, 0] = float("inf")
    assert h64lm.nonfinite_state(model, optimizer) == "the optimizer's exp_avg_sq of lm_head.weight"
    with torch.no_grad():
        model.blocks[1].ffn.w_up[0, 0, 0] = float("nan")
    assert h64lm.nonfinite_state(model, optimizer) == "the weight blocks.1.ffn.w_up"


# --- One writer per run folder -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_process_into_the_same_run_folder_is_refused(corpus, tmp_path):
    common = [*TINY_FLAGS, "--data", corpus, "--out-dir", tmp_path, "--cache-dir", tmp_path / "cache",
              "--batch-size", "4", "--max-steps", "400", "--save-every", "1", "--eval-every", "200",
              "--run-name", "shared"]
    latest = tmp_path / "shared" / "latest.pt"
    first = start_training(*common, log=tmp_path / "first.log")
    try:
        wait_until(latest.exists, first)
        for extra in ([], ["--overwrite"]):
            second = run_cli("train", *common, *extra)
            assert second.returncode == 2, second.stderr
            assert second.stderr.strip() == (
                f"error: {tmp_path / 'shared'} is being trained into by process {first.pid}; wait for that run to "
                "end (or stop it), or choose another --run-name.")
        resumer = run_cli("train", "--resume", tmp_path / "shared", "--cache-dir", tmp_path / "cache")
        assert resumer.returncode == 2 and "is being trained into by process" in resumer.stderr
        for _ in range(20):  # the first run goes on saving, and its checkpoint always loads
            h64lm.read_checkpoint(latest)
    finally:
        first.kill()
        first.communicate()
    # The lock goes with the process: the killed run's folder can be resumed at once, and its stale temporary
    # file (if the kill landed mid-save) is cleared.
    finish = run_cli("train", "--resume", tmp_path / "shared", "--cache-dir", tmp_path / "cache", "--max-steps",
                     str(h64lm.read_checkpoint(latest)["step"] + 1))
    assert finish.returncode == 0, finish.stderr
    assert not list((tmp_path / "shared").glob(".*.tmp"))
    assert not (tmp_path / ".shared.lock").exists()


@pytest.mark.slow
def test_a_run_killed_before_its_first_save_leaves_no_run_folder(corpus, tmp_path):
    log = tmp_path / "stderr.log"
    process = start_training(*TINY_FLAGS, "--data", corpus, "--out-dir", tmp_path / "out", "--cache-dir",
                             tmp_path / "cache", "--batch-size", "4", "--max-steps", "400", "--save-every", "300",
                             "--eval-every", "300", "--run-name", "early", log=log)
    wait_until(lambda: "training:" in log.read_text(), process)
    process.kill()
    process.communicate()
    assert not (tmp_path / "out" / "early").exists()


# --- Checkpoints know what they were trained on ------------------------------------------------------------------------

def permuted_tokenizer(folder: Path) -> Path:
    """The Mistral tokenizer with the ids of two ordinary tokens swapped: same size, other ids."""
    shutil.copytree(h64lm.DEFAULT_TOKENIZER, folder)
    (folder / "tokenizer.model").unlink()  # the slow tokenizer would not see the swap
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    vocab["▁the"], vocab["▁of"] = vocab["▁of"], vocab["▁the"]
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return folder


def small_tokenizer(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "the", "history", "of"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_resume_refuses_another_tokenizer_or_changed_text(corpus, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    common = [*TINY_FLAGS, "--data", data, "--out-dir", tmp_path, "--cache-dir", tmp_path / "cache",
              "--batch-size", "4", "--max-steps", "6", "--eval-every", "3", "--save-every", "3"]
    assert run_cli("train", *common, "--run-name", "r", "--stop-at", "3").returncode == 0
    ckpt = h64lm.read_checkpoint(tmp_path / "r" / "latest.pt")
    assert ckpt["tokenizer_vocab"] == 32000
    assert ckpt["tokenizer_fingerprint"] == h64lm.tokenizer_fingerprint(h64lm.load_tokenizer())
    assert ckpt["data_fingerprint"] == h64lm.open_text_source(str(data)).fingerprint

    resume = ["train", "--resume", tmp_path / "r", "--cache-dir", tmp_path / "cache"]
    other = run_cli(*resume, "--tokenizer", permuted_tokenizer(tmp_path / "permuted"))
    assert other.returncode == 2 and "was trained with another tokenizer" in other.stderr, other.stderr
    assert "(32000 tokens then, 32000 now" in other.stderr

    with open(data / "wiki.train.raw", "a", encoding="utf-8") as f:
        f.write(" = An article added later = \n Text that was not there before . \n")
    edited = run_cli(*resume)
    assert edited.returncode == 2 and "is not the text" in edited.stderr, edited.stderr
    assert h64lm.read_checkpoint(tmp_path / "r" / "latest.pt")["step"] == 3  # nothing was changed

    anyway = run_cli(*resume, "--allow-mismatch")
    assert anyway.returncode == 0, anyway.stderr
    assert h64lm.read_checkpoint(tmp_path / "r" / "latest.pt")["step"] == 6


def test_eval_generate_and_analyze_refuse_another_tokenizer_and_export_keeps_the_record(saved_run, tmp_path,
                                                                                         capsys):
    permuted, small = permuted_tokenizer(tmp_path / "permuted"), small_tokenizer(tmp_path / "small")
    exported = tmp_path / "exported"
    h64lm.export_checkpoint(saved_run, exported)
    for ckpt in (saved_run, exported):
        for tokenizer in (permuted, small):
            for command in (["eval", "--ckpt", ckpt, "--max-batches", "1", "--cache-dir", tmp_path / "cache"],
                            ["generate", "--ckpt", ckpt, "--prompt", "the history of", "--max-new-tokens", "2"],
                            ["analyze", "--ckpt", ckpt, "--out", tmp_path / "r.png"],
                            ["export", "--ckpt", ckpt, "--out", tmp_path / "hf", "--format", "hf"]):
                status, err = run_main([*map(str, command), "--tokenizer", str(tokenizer)], capsys)
                assert_one_sentence(status, err)
                assert "was trained with another tokenizer" in err, err
    assert not (tmp_path / "r.png").exists() and not (tmp_path / "hf").exists()
    assert h64lm.main(["generate", "--ckpt", str(exported), "--prompt", "the history of", "--max-new-tokens", "2",
                       "--tokenizer", str(permuted), "--allow-mismatch"]) == 0


@pytest.mark.slow
def test_eval_refuses_changed_training_text_unless_data_is_named(corpus, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    assert run_cli("train", *TINY_FLAGS, "--data", data, "--out-dir", tmp_path, "--cache-dir", tmp_path / "cache",
                   "--batch-size", "4", "--max-steps", "2", "--eval-every", "2", "--run-name", "r").returncode == 0
    (data / "wiki.test.raw").write_text(" = Replaced = \n All new text . \n" * 50, encoding="utf-8")
    changed = run_cli("eval", "--ckpt", tmp_path / "r", "--cache-dir", tmp_path / "cache")
    assert changed.returncode == 2 and "is not the text" in changed.stderr, changed.stderr
    named = run_cli("eval", "--ckpt", tmp_path / "r", "--cache-dir", tmp_path / "cache", "--data", data)
    assert named.returncode == 0, named.stderr
    assert "evaluating" in named.stderr  # the progress bar


# --- The token cache proves itself -----------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "edited", "metadata"])
def test_a_damaged_token_cache_is_rebuilt_not_used(corpus, tokenizer, tmp_path, damage):
    _, first = h64lm.load_token_splits(str(corpus), tokenizer, tmp_path, log=lambda *a: None)
    expected = first["train"].tokens.tolist()
    (folder,) = list(tmp_path.iterdir())
    bin_path, meta_path = folder / "train.bin", folder / "train.json"
    data = bytearray(bin_path.read_bytes())
    if damage == "truncated":
        bin_path.write_bytes(data[: len(data) // 2])
    elif damage == "edited":
        data[100:102] = bytes([0xFF, 0x7F])  # token id 32767 where another was: same size
        bin_path.write_bytes(bytes(data))
    else:
        meta_path.write_text("{not json")
    said = []
    _, second = h64lm.load_token_splits(str(corpus), tokenizer, tmp_path, log=said.append)
    assert second["train"].tokens.tolist() == expected
    assert said[0].startswith(f"the token cache {folder / 'train'} does not match its metadata"), said
    assert said[1].startswith("tokenizing the train split")
    assert len(said) == 2  # the other splits were fine
    assert not list(folder.glob(".*.tmp"))


# --- A config from a file is bounded by the weights before anything is allocated ------------------------------------

def test_a_hand_edited_config_is_refused_before_allocating(saved_run, tmp_path):
    exported = tmp_path / "exported"
    h64lm.export_checkpoint(saved_run, exported)
    config = json.loads((exported / "config.json").read_text())
    # 20,000 experts of width 10^6: 7.7 TB of float32 weights, were it built.
    (exported / "config.json").write_text(json.dumps({**config, "num_experts": 20000,
                                                      "expert_intermediate_size": 10**6}))
    result = run_cli("generate", "--ckpt", exported, "--prompt", "Hi", "--max-new-tokens", "2")
    assert result.returncode == 2, result.stderr
    assert "do not fit the model its config describes" in result.stderr
    assert "(20000, 32, 1000000) expected, (4, 32, 32) found" in result.stderr


def test_a_checkpoint_missing_a_weight_or_its_optimizer_state_is_refused(saved_run, tmp_path):
    ckpt = torch.load(saved_run / "latest.pt", weights_only=True)
    ckpt["model"].pop("blocks.0.attn.q_proj.weight")
    torch.save(ckpt, tmp_path / "no_weight.pt")
    result = run_cli("eval", "--ckpt", tmp_path / "no_weight.pt")
    assert result.returncode == 2 and "blocks.0.attn.q_proj.weight: (32, 32) expected, absent found" in result.stderr

    ckpt = torch.load(saved_run / "latest.pt", weights_only=True)
    optimizer = ckpt["optimizer"]  # AdamW's state_dict, or with Muon one per optimizer
    del (optimizer["muon"] if "muon" in optimizer else optimizer)["state"]
    run_dir = tmp_path / "no_optimizer"
    run_dir.mkdir()
    torch.save(ckpt, run_dir / "latest.pt")
    result = run_cli("train", "--resume", run_dir, "--cache-dir", tmp_path / "cache", "--max-steps", "4")
    assert result.returncode == 2, result.stderr
    assert "not a whole training state" in result.stderr


# --- Whatever escapes: one sentence, no half-written file ------------------------------------------------------------

def test_an_os_error_mid_write_is_one_sentence_and_leaves_no_partial_file(saved_run, tmp_path, capsys,
                                                                         monkeypatch):
    import safetensors.torch

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    out = tmp_path / "exported"
    status, err = run_main(["export", "--ckpt", str(saved_run), "--out", str(out)], capsys)
    assert_one_sentence(status, err)
    assert err.startswith("error: No space left on device (") and "free disk space" in err
    assert list(out.iterdir()) == []


def test_an_unexpected_error_is_one_sentence_and_debug_shows_it(saved_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(h64lm, "routing_profile", lambda *a, **k: 1 / 0)
    argv = ["analyze", "--ckpt", str(saved_run), "--out", str(tmp_path / "r.png")]
    status, err = run_main(argv, capsys)
    assert_one_sentence(status, err)
    assert err.startswith("error: ZeroDivisionError: division by zero; this is unexpected: rerun with --debug")
    with pytest.raises(ZeroDivisionError):
        h64lm.main([*argv, "--debug"])


def test_export_writes_files_with_the_users_umask(saved_run, tmp_path):
    result = run_cli("export", "--ckpt", saved_run, "--out", tmp_path / "exported")
    assert result.returncode == 0, result.stderr
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "exported" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


# --- Sampling options at the edge of their domain --------------------------------------------------------------------

@pytest.mark.parametrize("options", [dict(temperature=1e-30), dict(repetition_penalty=1e-30),
                                     dict(repetition_penalty=1e30), dict(top_p=1e-30), dict(top_k=10**9)])
def test_extreme_but_valid_sampling_options_still_sample(options):
    logits = torch.randn(3, 50) * 30
    seen = torch.zeros(3, 50, dtype=torch.bool)
    seen[:, :10] = True
    token = h64lm.sample(logits, seen=seen, generator=torch.Generator().manual_seed(0), **options)
    assert token.shape == (3,) and ((0 <= token) & (token < 50)).all()
    if "temperature" in options or "top_p" in options:
        assert torch.equal(token, logits.argmax(-1))  # the limit of both is greedy


# --- Ctrl-C ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ctrl_c_is_answered_at_once_and_a_second_one_stops_without_saving(corpus, tmp_path):
    log = tmp_path / "stderr.log"
    # 100 micro-batches a step, so that the second Ctrl-C lands while a step is in flight.
    process = start_training(*TINY_FLAGS, "--data", corpus, "--out-dir", tmp_path, "--cache-dir", tmp_path / "cache",
                             "--batch-size", "1", "--grad-accum", "100", "--max-steps", "400", "--save-every", "1",
                             "--eval-every", "200", "--run-name", "interrupted", log=log)
    latest = tmp_path / "interrupted" / "latest.pt"
    wait_until(latest.exists, process)
    process.send_signal(signal.SIGINT)
    wait_until(lambda: "Ctrl-C: saving and stopping when the step in flight ends" in log.read_text(), process)
    process.send_signal(signal.SIGINT)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 130
    if "Ctrl-C again: stopped at once" not in log.read_text():  # the step had ended, saved and stopped first
        assert "stopped after SIGINT" in out
    h64lm.open_trained(latest)


# --- What a newcomer is told -------------------------------------------------------------------------------------------

def test_a_run_far_too_slow_for_the_device_says_so_with_the_command_to_use(corpus, tmp_path, monkeypatch, capsys):
    # As if this CPU multiplied matrices at 1 MFLOP/s: the run would take at least hours, and it says so first.
    monkeypatch.setattr(h64lm, "peak_flops", lambda device: 1e6)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["train", *map(str, TINY_FLAGS), "--data", str(corpus), "--out-dir", str(tmp_path), "--cache-dir",
            str(tmp_path / "cache"), "--batch-size", "4", "--max-steps", "10", "--eval-every", "10", "--run-name", "slow",
            "--device", "cpu"]
    assert h64lm.main(argv) == 0
    out = capsys.readouterr().out
    flops = h64lm.H64LM(h64lm.H64LMConfig.from_preset("tiny", **{
        "hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64,
        "expert_intermediate_size": 32, "num_experts": 4, "max_position_embeddings": 64})).flops_per_token(32)
    seconds = flops * 4 * 32 / 1e6  # tokens per step: batch 4 x 32
    assert (f"warning: even at this CPU's full measured speed a step takes at least {seconds:,.1f} s, so 10 steps "
            f"take at least {10 * seconds / 3600:,.1f} hours; for a run of minutes on a CPU: python h64lm.py train "
            "--preset tiny --data sample") in out


@pytest.mark.slow
def test_extending_a_finished_run_says_what_happens_to_the_learning_rate(corpus, tmp_path):
    common = [*TINY_FLAGS, "--data", corpus, "--out-dir", tmp_path, "--cache-dir", tmp_path / "cache",
              "--batch-size", "4", "--max-steps", "4", "--eval-every", "4", "--run-name", "r"]
    assert run_cli("train", *common).returncode == 0
    longer = run_cli("train", "--resume", tmp_path / "r", "--max-steps", "8", "--cache-dir", tmp_path / "cache")
    assert longer.returncode == 0, longer.stderr
    tc = h64lm.TrainConfig(**{**h64lm.TRAIN_RECIPES["tiny"], "warmup_steps": 2, "max_steps": 4})
    before, after = h64lm.learning_rate(3, tc), h64lm.learning_rate(4, h64lm.TrainConfig(**{**vars(tc),
                                                                                           "max_steps": 8}))
    assert after > before
    assert (f"--max-steps 8 (was 4): the cosine schedule now ends at step 8, so the learning rate goes from "
            f"{before:.2e} to {after:.2e} at step 4") in longer.stdout


def test_a_long_prompt_keeps_its_last_tokens_on_the_command_line_as_in_the_library(saved_run):
    result = run_cli("generate", "--ckpt", saved_run, "--prompt", "word " * 100, "--max-new-tokens", "8", "--greedy")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ("warning: A prompt is longer than the 56 tokens that leave room for 8 new ones "
                                     "in a 64-token context; only its last 56 tokens are used.")


def test_a_save_onto_a_disk_too_full_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """check_room reaches every save through Part I's SAVE_CHECKS seam: with less free space than the checkpoint's
    tensors (and a margin), the save is refused in one sentence and the old file stays."""
    import collections

    assert h64lm.check_room in h64lm.SAVE_CHECKS
    path = tmp_path / "latest.pt"
    path.write_bytes(b"the old checkpoint")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(2**30, 2**30 - 2**20, 2**20))  # 1 MiB free
    with pytest.raises(h64lm.H64LMError, match=r"^Only 0\.00 GiB are free next to .*latest\.pt, and the checkpoint "
                                               r"needs about 0\.04 GiB; free disk space or choose another --out-dir\.$"):
        h64lm.save_checkpoint(path, {"model": {"w": torch.zeros(10_000_000)}})  # 40 MB of float32
    assert path.read_bytes() == b"the old checkpoint" and sorted(tmp_path.iterdir()) == [path]
