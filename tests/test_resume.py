"""Runs that survive: exact resume, checkpoints that a SIGKILL cannot corrupt, safe loading, and one clear sentence
(exit status 2, nothing overwritten) for every bad input."""

import hashlib
import json
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import h64lm
from conftest import PROCESS_ENV, REPO, TINY_FLAGS, run_cli, run_process, start_training, wait_until

STEPS = ["--batch-size", "4", "--max-steps", "8", "--eval-every", "4", "--save-every", "4"]


def losses(run_dir: Path) -> list[tuple[int, float, float, float]]:
    history = json.loads((run_dir / "training_history.json").read_text())
    return [(r["step"], r["lm_loss"], r["aux_loss"], r["grad_norm"]) for r in history["train"]]


def val_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in json.loads((run_dir / "training_history.json").read_text())["val"]]


# --- Exact resume ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    ["--router-jitter-noise", "0"],
    ["--router-jitter-noise", "0.1"],  # router jitter draws from the torch generator each step
    ["--balance", "aux_free", "--bias-update-rate", "0.01"],  # the bias is state that must be saved and restored
    # global: the counting pass before each step must leave the jitter's generator as it found it
    ["--balance", "global", "--grad-accum", "2", "--router-jitter-noise", "0.1"],
    # The tiny recipe (TINY_FLAGS) steps two optimizers, Muon and AdamW, whose states are saved as one; and AdamW
    # alone, as the other recipes train:
    ["--optimizer", "adamw"],
], ids=["plain", "jitter", "aux_free", "global", "adamw"])
def test_stopped_and_resumed_run_is_bit_identical_to_a_straight_run(corpus, tmp_path, extra):
    common = [*TINY_FLAGS, *STEPS, "--data", corpus, "--out-dir", tmp_path, "--cache-dir", tmp_path / "cache", *extra]
    straight = run_cli("train", *common, "--run-name", "straight")
    assert straight.returncode == 0, straight.stderr
    stopped = run_cli("train", *common, "--run-name", "resumed", "--stop-at", "3")
    assert stopped.returncode == 0, stopped.stderr
    # The exact command to continue is printed, and it is the one that continues the run.
    command = stopped.stdout.strip().splitlines()[-1].partition("continue with: ")[2]
    assert command == f"python h64lm.py train --resume {tmp_path / 'resumed'}"
    assert h64lm.read_checkpoint(tmp_path / "resumed" / "latest.pt")["step"] == 3
    resumed = run_cli(*command.split()[2:], "--cache-dir", tmp_path / "cache")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")  # exact float equality, every step
    assert val_losses(tmp_path / "resumed") == val_losses(tmp_path / "straight")
    a = h64lm.read_checkpoint(tmp_path / "straight" / "latest.pt")
    b = h64lm.read_checkpoint(tmp_path / "resumed" / "latest.pt")
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    if "aux_free" in extra:  # the bias moved, and it moved the same way in both
        assert any(a["model"][n].abs().sum() > 0 for n in a["model"] if n.endswith("balance_bias"))


@pytest.mark.slow
def test_resume_may_extend_the_run_but_not_change_its_data_order(corpus, tmp_path):
    common = [*TINY_FLAGS, *STEPS, "--data", corpus, "--out-dir", tmp_path, "--cache-dir", tmp_path / "cache"]
    assert run_cli("train", *common, "--run-name", "r", "--max-steps", "4").returncode == 0
    refused = run_cli("train", "--resume", tmp_path / "r", "--batch-size", "2")
    assert refused.returncode == 2 and "--resume cannot change --batch-size" in refused.stderr
    longer = run_cli("train", "--resume", tmp_path / "r", "--max-steps", "6", "--cache-dir", tmp_path / "cache")
    assert longer.returncode == 0, longer.stderr
    assert [s for s, *_ in losses(tmp_path / "r")] == list(range(6))


# --- One command starts a run and continues it ---------------------------------------------------------------------

def settings(*argv):
    """What `train` would run with these flags: (config, tc, run name, checkpoint path, the checkpoint opened)."""
    return h64lm.train_settings(h64lm.build_parser().parse_args(["train", *map(str, argv)]))


def test_resume_accepts_a_preset_and_model_flags_that_agree_with_the_checkpoint(saved_run):
    # saved_run's own command (TINY_FLAGS: --preset tiny and the model flags), with --resume.
    config, tc, name, resume, trained = settings(*TINY_FLAGS, "--resume", saved_run)
    assert resume == saved_run / "latest.pt" and name == "run"
    assert config.to_dict() == trained.ckpt["config"]
    # The training settings not given are the run's own, not the tiny recipe's (800 steps, validation every 200).
    assert (tc.max_steps, tc.eval_every, tc.batch_size) == (2, 2, 4)
    # Model flags alone are compared one by one; implementations stay free.
    config, *_ = settings("--resume", saved_run, "--hidden-size", "32", "--num-experts", "4", "--moe-impl", "loop")
    assert config.to_dict() == trained.ckpt["config"] and config.moe_impl == "loop"


def test_resume_refuses_by_name_each_model_flag_that_differs_and_changes_nothing(saved_run, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _snapshot(saved_run.parent)
    latest = saved_run / "latest.pt"
    assert h64lm.main(["train", "--resume", str(saved_run), *TINY_FLAGS, "--hidden-size", "64", "--num-experts",
                       "8"]) == 2
    assert capsys.readouterr().err == (f"error: --resume continues the model in {latest}; --hidden-size 64 differs "
                                       "from its 32 and --num-experts 8 differs from its 4; drop them or start a new "
                                       "--run-name.\n")
    # A preset without the model flags the run was started with makes another model: its fields are named.
    assert h64lm.main(["train", "--resume", str(saved_run), "--preset", "tiny", "--num-layers", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --resume continues the model in {latest}; --preset tiny differs in "
                          "max_position_embeddings (256, its 64), hidden_size (128, its 32), num_heads (4, its 2)")
    assert "num_layers" not in err and err.endswith("; drop it or start a new --run-name.\n")
    assert _snapshot(saved_run.parent) == before


def test_resume_auto_starts_an_empty_folder_and_continues_a_saved_one(saved_run, corpus):
    command = [*TINY_FLAGS, "--data", corpus, "--out-dir", saved_run.parent, "--resume", "auto"]
    # No checkpoint in <out-dir>/fresh: a new run from the preset, its recipe and the flags.
    config, tc, name, resume, trained = settings(*command, "--run-name", "fresh")
    assert resume is None and trained is None and config.hidden_size == 32
    assert (tc.run_name, tc.max_steps, tc.optimizer) == ("fresh", 800, "muon")  # the tiny recipe
    # The same command into the folder of a run that saved: it continues that run, which agrees with the flags.
    config, tc, name, resume, trained = settings(*command, "--run-name", "run")
    assert resume == saved_run / "latest.pt" and tc.max_steps == 2 and config.to_dict() == trained.ckpt["config"]
    with pytest.raises(h64lm.H64LMError, match="--hidden-size 64 differs from its 32"):
        settings(*command, "--run-name", "run", "--hidden-size", "64")


@pytest.mark.slow
def test_a_killed_two_process_run_relaunched_by_torchrun_continues_exactly(corpus, tmp_path):
    # One command, run by torchrun up to twice: on the first attempt both processes die right after the first
    # checkpoint (step 2); the relaunch, the same command, continues from it with --resume auto. Beside it, as
    # the reference, the same command into an empty folder, where --resume auto starts the run.
    # The tiny recipe steps two optimizers (Muon, and AdamW for the rest), so both states cross the resume here.
    command = [*TINY_FLAGS, "--batch-size", "4", "--max-steps", "4", "--eval-every", "2", "--save-every", "2",
               "--data", corpus, "--out-dir", tmp_path, "--device", "cpu", "--resume", "auto"]
    # torch 2.13's torchrun keeps one store for all attempts, and a relaunched process can read the address of
    # the dead one's gloo socket from it and hang or fail (pytorch/pytorch#135712); with this, each attempt
    # gets a store of its own.
    env = {**PROCESS_ENV, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}

    def torchrun(script: Path, run: str) -> subprocess.Popen:
        with open(tmp_path / f"{run}.out", "w") as out, open(tmp_path / f"{run}.err", "w") as err:
            return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc_per_node=2", "--max-restarts=1", str(script), "train",
                                     *map(str, command), "--run-name", run, "--cache-dir", tmp_path / f"cache-{run}"],
                                    cwd=REPO, env=env, stdout=out, stderr=err)

    # Both at once: each launch spends most of its time importing and loading, which two cores share well.
    runs = {"straight": torchrun(REPO / "h64lm.py", "straight"),
            "killed": torchrun(REPO / "tests" / "die_after_first_save.py", "killed")}
    for run, process in runs.items():
        assert process.wait(timeout=240) == 0, (tmp_path / f"{run}.err").read_text()[-3000:]
    assert "resuming" not in (tmp_path / "straight.out").read_text()
    relaunched = (tmp_path / "killed.out").read_text()
    assert relaunched.count("resuming") == 1 and f"resuming {tmp_path / 'killed'} from step 2 of 4" in relaunched
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")  # every step, exact
    assert val_losses(tmp_path / "killed") == val_losses(tmp_path / "straight")
    a, b = (h64lm.read_checkpoint(tmp_path / run / "latest.pt") for run in runs)
    assert a["step"] == b["step"] == 4
    assert len(a["rng"]) == 2  # one state per process
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


# --- Killed runs ------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_at_random_moments_always_leaves_a_loadable_checkpoint(corpus, tmp_path):
    # A checkpoint after every step, so that many of the kills land in the middle of writing one.
    common = [*TINY_FLAGS, "--data", corpus, "--out-dir", tmp_path, "--cache-dir", tmp_path / "cache",
              "--batch-size", "4", "--max-steps", "30", "--eval-every", "10", "--save-every", "1",
              "--run-name", "killed"]
    latest = tmp_path / "killed" / "latest.pt"
    rng = random.Random(0)
    steps_seen = []
    for attempt in range(4):
        before = latest.stat().st_mtime_ns if latest.exists() else None
        args = common if attempt == 0 else ["--resume", tmp_path / "killed", "--cache-dir", tmp_path / "cache"]
        process = start_training(*args, log=tmp_path / f"attempt{attempt}.log")
        # Wait for this process's first save, then kill it at a random moment of the steps and saves that follow.
        wait_until(lambda: latest.exists() and latest.stat().st_mtime_ns != before, process)
        time.sleep(rng.uniform(0.0, 0.6))
        process.send_signal(signal.SIGKILL)
        process.communicate()
        ckpt = h64lm.open_trained(latest).ckpt  # loads, whatever the moment of the kill
        steps_seen.append(ckpt["step"])
    finish = run_cli("train", "--resume", tmp_path / "killed", "--cache-dir", tmp_path / "cache")
    assert finish.returncode == 0, finish.stderr
    assert h64lm.read_checkpoint(latest)["step"] == 30
    assert [s for s, *_ in losses(tmp_path / "killed")] == list(range(30))
    assert steps_seen == sorted(steps_seen)


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_save_before_exiting(corpus, tmp_path, sig, status):
    common = [*TINY_FLAGS, "--data", corpus, "--out-dir", tmp_path, "--cache-dir", tmp_path / "cache",
              "--batch-size", "4", "--max-steps", "200", "--eval-every", "100", "--save-every", "100",
              "--run-name", "signalled"]
    log = tmp_path / "stderr.log"
    process = start_training(*common, log=log)
    wait_until(lambda: "training:" in log.read_text(), process)  # the loop has started: the handlers are in place
    time.sleep(1.0)
    process.send_signal(sig)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == status, log.read_text()[-2000:]
    assert f"stopped after {sig.name}" in out
    run_dir = tmp_path / "signalled"
    ckpt = h64lm.read_checkpoint(run_dir / "latest.pt")
    assert 0 < ckpt["step"] < 200
    assert [s for s, *_ in losses(run_dir)] == list(range(ckpt["step"]))


# --- Safe loading --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_run(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("saved")
    result = run_cli("train", *TINY_FLAGS, "--data", corpus, "--out-dir", out, "--cache-dir", out / "cache",
                     "--batch-size", "4", "--max-steps", "2", "--eval-every", "2", "--run-name", "run")
    assert result.returncode == 0, result.stderr
    return out / "run"


class _Payload:
    """Unpickling this runs code: it creates the file named in its argument."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_never_runs(saved_run, tmp_path):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": h64lm.CHECKPOINT_FORMAT, "version": 1, "model": _Payload(str(marker))}, evil)
    with pytest.raises(h64lm.H64LMError, match="not a readable H64LM checkpoint"):
        h64lm.open_trained(evil)
    assert not marker.exists()
    # And a plain pickle that is not even a torch file.
    with open(tmp_path / "plain.pt", "wb") as f:
        pickle.dump(_Payload(str(marker)), f)
    with pytest.raises(h64lm.H64LMError, match="not a readable H64LM checkpoint"):
        h64lm.open_trained(tmp_path / "plain.pt")
    assert not marker.exists()
    # The unsafe loader would have run it: the test's payload is real.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_truncated_foreign_and_mismatched_checkpoints_are_refused(saved_run, tmp_path):
    data = (saved_run / "latest.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(h64lm.H64LMError, match="not a readable H64LM checkpoint"):
        h64lm.open_trained(tmp_path / "truncated.pt")

    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "foreign.pt")
    with pytest.raises(h64lm.H64LMError, match="is not an H64LM checkpoint"):
        h64lm.open_trained(tmp_path / "foreign.pt")

    ckpt = torch.load(saved_run / "latest.pt", weights_only=True)
    ckpt["config"]["hidden_size"] = 64  # the weights are 32 wide
    torch.save(ckpt, tmp_path / "mismatched.pt")
    with pytest.raises(h64lm.H64LMError, match="do not fit the model its config describes"):
        h64lm.open_trained(tmp_path / "mismatched.pt")

    ckpt["config"]["hidden_size"] = 33  # not divisible by the heads
    torch.save(ckpt, tmp_path / "invalid.pt")
    with pytest.raises(h64lm.H64LMError, match="config stored in .* is not valid"):
        h64lm.open_trained(tmp_path / "invalid.pt")

    ckpt["config"]["hidden_size"], ckpt["version"] = 32, 99
    torch.save(ckpt, tmp_path / "future.pt")
    with pytest.raises(h64lm.H64LMError, match="format version 99"):
        h64lm.open_trained(tmp_path / "future.pt")


def test_ddp_and_compiled_prefixes_are_stripped(saved_run, tmp_path):
    ckpt = torch.load(saved_run / "latest.pt", weights_only=True)
    reference = h64lm.open_trained(saved_run / "latest.pt").model
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        prefixed = {**ckpt, "model": {prefix + k: v for k, v in ckpt["model"].items()}}
        torch.save(prefixed, tmp_path / "prefixed.pt")
        model = h64lm.open_trained(tmp_path / "prefixed.pt").model
        for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
            assert torch.equal(a, b), (prefix, name)


def test_safetensors_export_round_trips_and_refuses_damage(saved_run, tmp_path):
    h64lm.export_checkpoint(saved_run, tmp_path / "export")
    model = h64lm.open_trained(tmp_path / "export").model
    reference = h64lm.open_trained(saved_run).model
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text((tmp_path / "export" / "config.json").read_text())
    (damaged / "model.safetensors").write_bytes((tmp_path / "export" / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(h64lm.H64LMError, match="not a readable safetensors file"):
        h64lm.open_trained(damaged)


def test_a_full_disk_is_a_loud_error_and_the_old_checkpoint_stays(saved_run, tmp_path, monkeypatch):
    target = tmp_path / "latest.pt"
    target.write_bytes(b"the previous checkpoint")
    monkeypatch.setattr(h64lm.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, used=10**12, free=1000))
    with pytest.raises(h64lm.H64LMError, match="free disk space"):
        h64lm.save_checkpoint(target, {"model": {"w": torch.zeros(10_000)}})
    assert target.read_bytes() == b"the previous checkpoint"
    assert not target.with_name("latest.pt.tmp").exists()


# --- Bad input: one sentence, exit status 2, nothing changed -------------------------------------------------------

def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


BAD_INPUTS = [
    # (name, arguments (with {run}, {corpus}, {tmp} filled in), what stderr must say)
    ("missing data", "train --data {tmp}/nowhere --run-name x", "no such folder"),
    ("empty data folder", "train --data {tmp}/empty --run-name x", "holds no wiki"),
    ("non-UTF-8 data", "train --data {tmp}/latin1 --run-name x", "is not UTF-8"),
    ("unknown preset", "train --preset huge", "invalid choice: 'huge'"),
    ("unknown attention type", "train --attention-type cosine", "invalid choice: 'cosine'"),
    ("not a number", "train --max-steps many", "--max-steps: 'many' is not an integer"),
    ("impossible config", "train --hidden-size 100 --num-heads 12", "must be divisible by num_heads"),
    ("sequence longer than the context", "train --preset tiny --seq-len 512 --data {corpus} --run-name x",
     "longer than the model's max_position_embeddings"),
    ("batch larger than the data", "train {tiny} --batch-size 4000 --data {corpus} --run-name x",
     "fewer than one batch"),
    ("zero steps", "train {tiny} --max-steps 0 --data {corpus} --run-name x",
     "--max-steps: must be an integer of at least 1, got 0"),
    ("folder holds another run", "train {tiny} --data {corpus} --run-name run", "already holds a run"),
    ("nothing to resume", "train --resume --run-name nothing", "Nothing to resume"),
    ("resume a missing path", "train --resume {tmp}/nowhere", "Nothing to resume at"),
    ("resume with another model", "train --resume {run} --hidden-size 64", "--hidden-size 64 differs from its 32"),
    ("resume with another preset", "train --resume {run} --preset small", "--preset small differs in"),
    ("resume auto and overwrite", "train --resume auto --overwrite --run-name run", "give one of them"),
    ("resume changing the data order", "train --resume {run} --seed 7", "--resume cannot change --seed"),
    ("resume with another optimizer", "train --resume {run} --optimizer adamw",  # the run: tiny's recipe, Muon
     "--resume cannot change --optimizer"),
    ("vocabulary larger than the model", "train {tiny} --vocab-size 1000 --data {corpus} --run-name x",
     "tokenizer has 32000 tokens but the model only 1000"),
    ("CUDA absent", "train {tiny} --device cuda --data {corpus} --run-name x", "sees no CUDA GPU"),
    ("no checkpoint", "eval --ckpt {tmp}/nowhere", "No checkpoint at"),
    ("empty prompt", "generate --ckpt {run} --prompt ' '", "--prompt is empty"),
    ("no prompt", "generate --ckpt {run}", "give --prompt TEXT, or --interactive"),
    ("prompt and prompt line", "generate --ckpt {run} --prompt Hi --interactive", "drop --prompt"),
    ("too many new tokens", "generate --ckpt {run} --prompt Hi --max-new-tokens 64", "--max-new-tokens must be"),
    ("foreign checkpoint", "generate --ckpt {tmp}/foreign.pt --prompt Hi", "is not an H64LM checkpoint"),
]


@pytest.mark.parametrize("name, arguments, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_sentence_exit_2_and_changes_nothing(saved_run, corpus, tmp_path, monkeypatch, capsys,
                                                              name, arguments, message):
    import shlex

    (tmp_path / "empty").mkdir()
    (tmp_path / "latin1").mkdir()
    for split in ("train", "valid", "test"):
        (tmp_path / "latin1" / f"wiki.{split}.raw").write_bytes(" = Caf\xe9 = \n".encode("latin-1"))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    out_dir = saved_run.parent
    tiny = " ".join(TINY_FLAGS)
    argv = shlex.split(arguments.format(run=saved_run, corpus=corpus, tmp=tmp_path, tiny=tiny,
                                        long="word " * 100))
    if argv[0] == "train" and "--out-dir" not in argv:
        argv += ["--out-dir", str(out_dir), "--cache-dir", str(out_dir / "cache")]
    before = _snapshot(out_dir), _snapshot(corpus)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        status = h64lm.main(argv)
    except SystemExit as e:  # argparse's own errors
        status = e.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert message in err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert err.strip() == last and last.startswith("error: "), err  # one line, the sentence
    assert (_snapshot(out_dir), _snapshot(corpus)) == before


def test_debug_shows_the_traceback(tmp_path):
    result = run_process("eval", "--ckpt", tmp_path / "nowhere", "--debug")  # the interpreter prints it
    assert result.returncode != 0 and "Traceback" in result.stderr and "H64LMError" in result.stderr
    plain = run_cli("eval", "--ckpt", tmp_path / "nowhere")
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip() == f"error: No checkpoint at {tmp_path / 'nowhere'}; point --ckpt at a run folder " \
                                   "or a .pt file."


# --- One read of the checkpoint; implementations are not part of the model --------------------------------------------

@pytest.mark.slow
def test_resume_reads_the_checkpoint_once(corpus, tmp_path, monkeypatch):
    common = [*TINY_FLAGS, *STEPS, "--data", corpus, "--out-dir", tmp_path, "--cache-dir", tmp_path / "cache"]
    assert run_cli("train", *common, "--run-name", "r", "--stop-at", "2").returncode == 0
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(Path(f)) or real_load(f, *a, **k))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert h64lm.main(["train", "--resume", str(tmp_path / "r"), "--stop-at", "3", "--cache-dir",
                       str(tmp_path / "cache")]) == 0
    assert reads == [tmp_path / "r" / "latest.pt"]


@pytest.mark.slow
def test_implementations_are_chosen_at_run_time_not_locked_in_the_checkpoint(corpus, tmp_path):
    common = [*TINY_FLAGS, *STEPS, "--data", corpus, "--out-dir", tmp_path, "--cache-dir", tmp_path / "cache"]
    assert run_cli("train", *common, "--run-name", "straight").returncode == 0
    assert run_cli("train", *common, "--run-name", "r", "--stop-at", "4").returncode == 0
    ckpt = h64lm.read_checkpoint(tmp_path / "r" / "latest.pt")
    assert not set(h64lm.IMPL_FIELDS) & set(ckpt["config"])  # what the model is, not how it was computed
    resumed = run_cli("train", "--resume", tmp_path / "r", "--cache-dir", tmp_path / "cache", "--attn-impl",
                      "plain", "--moe-impl", "loop", "--loss-impl", "plain")
    assert resumed.returncode == 0, resumed.stderr
    # The same function, computed another way: equal up to float rounding, not bit for bit.
    for (s1, a, *_), (s2, b, *_) in zip(losses(tmp_path / "straight"), losses(tmp_path / "r")):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-4)
    # A config written by an older h64lm.py, with the choices in it, still loads; the reader's choice wins.
    old = {**ckpt, "config": {**ckpt["config"], "attn_impl": "plain", "moe_impl": "loop", "loss_impl": "plain"}}
    torch.save(old, tmp_path / "old.pt")
    model = h64lm.open_trained(tmp_path / "old.pt").model
    assert (model.config.attn_impl, model.config.moe_impl, model.config.loss_impl) == ("sdpa", "grouped", "chunked")


def test_a_run_folder_means_best_pt_to_open_and_latest_pt_to_resume(tmp_path):
    # resolve_checkpoint is the one place either rule is written (open_trained, every command and --resume use it).
    run = tmp_path / "run"
    run.mkdir()
    for name in ("latest.pt", "best.pt"):
        (run / name).write_bytes(b"")
    assert h64lm.resolve_checkpoint(run) == run / "best.pt"
    assert h64lm.resolve_checkpoint(run, latest=True) == run / "latest.pt"
    (run / "best.pt").unlink()
    assert h64lm.resolve_checkpoint(run) == run / "latest.pt"
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"")
    assert h64lm.resolve_checkpoint(export) == export / "model.safetensors"
    assert h64lm.resolve_checkpoint(run / "latest.pt", latest=True) == run / "latest.pt"  # a file is itself
    with pytest.raises(h64lm.H64LMError, match="Nothing to resume at"):
        h64lm.resolve_checkpoint(export, latest=True)


# --- Loose ends (issue 34): what a resume names, and what a model flag means --------------------------------------

def test_resume_refusing_a_training_flag_names_both_values(saved_run, capsys):
    before = _snapshot(saved_run.parent)
    assert h64lm.main(["train", "--resume", str(saved_run), "--batch-size", "2", "--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert "--resume cannot change --batch-size 2 (the run's: --batch-size 4), --seed 7 (the run's: --seed " in err
    assert _snapshot(saved_run.parent) == before


def test_resume_compares_moe_layers_by_the_layers_they_name(saved_run, capsys):
    # The run has 2 layers with moe_layers "odd": layer 1. "1" names the same layers; "0" and "all" do not.
    config, *_ = settings("--resume", saved_run, "--moe-layers", "1")
    assert config.moe_layers == "odd"  # the run's own, which means the same
    for other in ("0", "all"):
        assert h64lm.main(["train", "--resume", str(saved_run), "--moe-layers", other]) == 2
        assert f"--moe-layers {other} differs from its odd" in capsys.readouterr().err


@pytest.mark.parametrize("dtype,suffix,refused", [(torch.int64, ".pt", "int64, not float32"),
                                                  (torch.bfloat16, ".pt", "bfloat16, not float32"),
                                                  (torch.int32, ".safetensors", "int32, not floating point"),
                                                  (torch.bfloat16, ".safetensors", None)])
def test_a_checkpoint_whose_weights_are_not_floating_point_is_refused_by_name(dtype, suffix, refused):
    # Names and shapes were checked; an int64 tensor of the right shape loaded and ran. A .pt checkpoint is saved in
    # float32 and records no dtype; an exported safetensors file may hold bf16 (export --dtype), never integers.
    config = h64lm.H64LMConfig.from_preset("tiny", num_layers=2)
    state = h64lm.H64LM(config).state_dict()
    state["blocks.1.ffn.w_up"] = state["blocks.1.ffn.w_up"].to(dtype)
    path = f"run/model{suffix}"
    if refused is None:
        assert h64lm.checked_weights({"model": state}, config, path)["blocks.1.ffn.w_up"].dtype == dtype
        return
    with pytest.raises(h64lm.H64LMError) as e:
        h64lm.checked_weights({"model": state}, config, path)
    assert str(e.value) == (f"The weight blocks.1.ffn.w_up in {path} is {refused}; the file is damaged or was "
                            "edited.")


def test_eval_refuses_a_pt_checkpoint_with_integer_weights_in_one_sentence(saved_run, tmp_path):
    ckpt = torch.load(saved_run / "latest.pt", weights_only=True)
    name = next(iter(ckpt["model"]))
    ckpt["model"][name] = ckpt["model"][name].long()
    torch.save(ckpt, tmp_path / "int.pt")
    before = (tmp_path / "int.pt").read_bytes()
    result = run_cli("eval", "--ckpt", tmp_path / "int.pt", "--data", "sample", "--device", "cpu")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (f"error: The weight {name} in {tmp_path / 'int.pt'} is int64, "
                                                       "not float32; the file is damaged or was edited.")
    assert (tmp_path / "int.pt").read_bytes() == before
