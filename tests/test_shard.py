"""train --shard (FSDP2) on two (and three) gloo processes: its steps equal DDP's; its checkpoints
(torch.distributed.checkpoint) survive a kill in the middle of a save and resume exactly, on the same or another
number of processes; unshard's one file holds what the shards hold, as PyTorch's own converter reads them; a signal
and a divergence keep their guards; check_fits counts a process's share."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PROCESS_ENV, REPO, TINY_FLAGS, run_cli, wait_until

import h64lm

STEPS = ["--batch-size", "4", "--max-steps", "4", "--eval-every", "2", "--save-every", "2", "--device", "cpu"]


def torchrun(*args, processes: int = 2, script: Path = REPO / "h64lm.py", restarts: int = 0,
             env=None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=processes script ARGS`, which must succeed."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               f"--max-restarts={restarts}", str(script), *map(str, args)]
    result = subprocess.run(command, cwd=REPO, env={**PROCESS_ENV, **(env or {})}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def history(run_dir: Path) -> dict:
    return json.loads((run_dir / "training_history.json").read_text())


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["lm_loss"]) for r in history(run_dir)["train"]]


@pytest.mark.slow
def test_sharded_steps_equal_ddp_and_unshard_holds_what_the_shards_hold(corpus, tmp_path):
    # Two micro-batches a step and the global-batch balance loss: the micro-batch loop and step_fractions run
    # sharded too. --out-dir does not exist yet: the first save makes it, before the shards go in.
    runs = tmp_path / "runs"
    common = ["train", *TINY_FLAGS, *STEPS, "--grad-accum", "2", "--balance", "global", "--optimizer", "adamw",
              "--data", corpus, "--out-dir", runs, "--cache-dir", tmp_path / "cache"]
    torchrun(*common, "--run-name", "ddp")
    # Sharded with gradient checkpointing, which recomputes each block (and so gathers its weights again) in
    # backward: it changes no number.
    torchrun(*common, "--run-name", "sharded", "--shard", "--gradient-checkpointing")
    ddp, sharded = history(runs / "ddp"), history(runs / "sharded")
    for a, b in zip(ddp["train"], sharded["train"], strict=True):
        # The gradients are reduced in another order (FSDP2 reduce-scatters each micro-batch's, divided before
        # the sum): float32 rounding, which the norm over a million weights shows most (2e-5 relative seen).
        for key, rel in (("lm_loss", 1e-5), ("aux_loss", 1e-5), ("grad_norm", 1e-4)):
            assert b[key] == pytest.approx(a[key], rel=rel), (a["step"], key)
    assert [v["loss"] for v in sharded["val"]] == pytest.approx([v["loss"] for v in ddp["val"]], rel=1e-5)
    # The run folder holds the small files and one folder of shards, the one latest.pt and best.pt name.
    run_dir = runs / "sharded"
    latest = h64lm.read_checkpoint(run_dir / "latest.pt")
    assert "model" not in latest and latest["step"] == 4 and latest["world_size"] == 2
    assert [p.name for p in run_dir.glob("shards-*")] == [latest["shards"]]

    # unshard: one file, its weights and AdamW moments equal to what PyTorch's own converter reads from the shards.
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(run_dir / latest["shards"], tmp_path / "torch.pt")
    reference = torch.load(tmp_path / "torch.pt", weights_only=True)
    out = tmp_path / "one" / "latest.pt"
    out.parent.mkdir()
    result = run_cli("unshard", "--ckpt", run_dir / "latest.pt", "--out", out)
    assert result.returncode == 0 and "wrote" in result.stdout, result.stderr
    one = h64lm.read_checkpoint(out)
    assert one["model"].keys() == reference["model"].keys()
    for name, tensor in reference["model"].items():
        assert torch.equal(one["model"][name], tensor), name
    # AdamW numbers the parameters through its groups: the matrices (decayed), then the vectors (decay_groups).
    params = [(n, p.dim()) for n, p in h64lm.open_trained(out).model.named_parameters()]
    names = [n for n, dim in params if dim >= 2] + [n for n, dim in params if dim < 2]
    assert sum(len(g["params"]) for g in one["optimizer"]["param_groups"]) == len(names)
    for index, state in one["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], reference["optimizer"]["state"][names[index]][key]), (names[index], key)
    assert one["train_config"]["shard"] is False and one["step"] == 4
    # ... and DDP's weights, up to the order of the reductions.
    for name, tensor in h64lm.read_checkpoint(runs / "ddp" / "latest.pt")["model"].items():
        torch.testing.assert_close(one["model"][name], tensor, rtol=1e-4, atol=1e-5)

    # eval reads the sharded run as it is, and the one file, alike.
    scores = [json.loads(run_cli("eval", "--ckpt", ckpt, "--data", corpus, "--cache-dir", tmp_path / "cache",
                                 "--max-batches", "2", "--json").stdout)["loss"]
              for ckpt in (run_dir / "latest.pt", out)]
    assert scores[0] == scores[1]
    # The one file resumes without --shard.
    torchrun("train", "--resume", out.parent, "--max-steps", "5", "--cache-dir", tmp_path / "cache")
    assert h64lm.read_checkpoint(out)["step"] == 5


@pytest.mark.slow
def test_a_sharded_run_killed_mid_save_resumes_exactly(corpus, tmp_path):
    # Muon (whole experts on each process, the other matrices gathered) and aux_free's bias cross the resume.
    # The killed run's processes die after they wrote the second save's shards (step 4), before rank 0 wrote the
    # latest.pt that names them; torchrun relaunches the same command, which resumes from step 2.
    common = ["train", *TINY_FLAGS, *STEPS, "--max-steps", "6", "--optimizer", "muon", "--shard", "--data", corpus,
              "--out-dir", tmp_path, "--resume", "auto"]
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # see test_resume.py's relaunched run
    torchrun(*common, "--run-name", "straight", "--cache-dir", tmp_path / "cache-straight")
    killed = torchrun(*common, "--run-name", "killed", "--cache-dir", tmp_path / "cache-killed", restarts=1,
                      script=REPO / "tests" / "die_after_first_save.py", env={**env, "DIE_MID_SAVE": "1"})
    assert killed.stdout.count("resuming") == 1 and f"resuming {tmp_path / 'killed'} from step 2 of 6" in killed.stdout
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")  # every step, exact
    a, b = (h64lm.open_trained(tmp_path / run / "latest.pt").ckpt for run in ("straight", "killed"))
    assert a["step"] == b["step"] == 6
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert any(a["model"][n].abs().sum() > 0 for n in a["model"] if n.endswith("balance_bias"))
    # The half-saved step-4 shards the first attempt left are gone: only what latest.pt and best.pt name stays.
    named = {h64lm.read_checkpoint(tmp_path / "killed" / f)["shards"] for f in ("latest.pt", "best.pt")}
    assert {p.name for p in (tmp_path / "killed").glob("shards-*")} == named


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_on_three_processes_as_its_one_file_does_in_ddp(corpus, tmp_path):
    # Saved by two processes at step 2, continued by three: sharded (its shards split anew) and, from the unshard
    # file, in DDP. The same weights and optimizer state then take the same steps, up to the reductions' order.
    common = ["train", *TINY_FLAGS, *STEPS, "--optimizer", "muon", "--data", corpus, "--out-dir", tmp_path,
              "--cache-dir", tmp_path / "cache"]
    torchrun(*common, "--run-name", "sharded", "--shard", "--stop-at", "2")
    alone = run_cli("train", "--resume", tmp_path / "sharded", "--cache-dir", tmp_path / "cache")
    assert alone.returncode == 2 and alone.stderr == (
        f"error: The run in {tmp_path / 'sharded'} is sharded (--shard) and this is one process; resume it with "
        "torchrun --nproc_per_node=2 h64lm.py train --resume ..., or make it one file with python h64lm.py unshard "
        "and resume that.\n")
    (tmp_path / "ddp").mkdir()
    assert run_cli("unshard", "--ckpt", tmp_path / "sharded" / "latest.pt",
                   "--out", tmp_path / "ddp" / "latest.pt").returncode == 0
    for run in ("sharded", "ddp"):
        result = torchrun("train", "--resume", tmp_path / run, "--cache-dir", tmp_path / "cache", processes=3)
        assert "saved by 2 processes and goes on with 3" in result.stderr
    sharded, ddp = losses(tmp_path / "sharded"), losses(tmp_path / "ddp")
    assert [s for s, _ in sharded] == [s for s, _ in ddp] == [0, 1, 2, 3]
    assert sharded[:2] == ddp[:2]  # the steps before the stop, from the same history
    assert [loss for _, loss in sharded[2:]] == pytest.approx([loss for _, loss in ddp[2:]], rel=1e-5)


@pytest.mark.slow
def test_a_diverging_sharded_run_saves_nothing_non_finite(corpus, tmp_path):
    # test_guards.py's learning rate of 1e30: each process checks its own shards before a save, and all of them
    # stop, naming the same weight, if any process finds a NaN.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "h64lm.py",
               "train", *map(str, [*TINY_FLAGS, *STEPS, "--max-steps", "8", "--save-every", "1", "--eval-every", "1",
                                   "--lr", "1e30", "--warmup-steps", "0", "--shard", "--data", corpus,
                                   "--out-dir", tmp_path, "--cache-dir", tmp_path / "cache", "--run-name", "diverged"])]
    result = subprocess.run(command, cwd=REPO, env=PROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "became NaN or infinite at step" in result.stderr and "nothing from that step on was saved" in result.stderr
    ckpt = h64lm.open_trained(tmp_path / "diverged" / "latest.pt").ckpt  # the shards, read whole
    assert 0 < ckpt["step"] < 8 and all(torch.isfinite(t).all() for t in ckpt["model"].values())


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_the_sharded_run_which_resumes(corpus, tmp_path):
    # torchrun passes the SIGTERM on to its processes; they agree on it, finish the step in flight, write their
    # shards and stop, and the command the run prints continues it.
    common = [*TINY_FLAGS, *STEPS, "--max-steps", "400", "--eval-every", "200", "--save-every", "200", "--shard",
              "--data", corpus, "--out-dir", tmp_path, "--cache-dir", tmp_path / "cache", "--run-name", "signalled"]
    log = tmp_path / "stderr.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node=2", "h64lm.py", "train", *map(str, common)], cwd=REPO,
                                   env=PROCESS_ENV, stdout=subprocess.PIPE, stderr=stderr, text=True)
    # After a step, when every process is in the loop and has its handler (rank 0 alone draws the bar).
    wait_until(lambda: "loss=" in log.read_text(), process)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert "stopped after SIGTERM" in out, log.read_text()[-3000:]
    step = h64lm.open_trained(tmp_path / "signalled" / "latest.pt").ckpt["step"]
    assert 0 < step < 400
    assert f"continue with: torchrun --nproc_per_node=2 h64lm.py train --resume {tmp_path / 'signalled'}" in out
    torchrun("train", "--resume", tmp_path / "signalled", "--max-steps", str(step + 2), "--cache-dir",
             tmp_path / "cache")
    assert [s for s, _ in losses(tmp_path / "signalled")] == list(range(step + 2))


def test_shard_needs_torchrun_and_changes_nothing(corpus, tmp_path):
    result = run_cli("train", *TINY_FLAGS, *STEPS, "--shard", "--data", corpus, "--out-dir", tmp_path,
                     "--cache-dir", tmp_path / "cache")
    assert result.returncode == 2
    assert result.stderr == ("error: --shard splits the model over the processes torchrun starts, and this is one "
                             "process; start it with torchrun --nproc_per_node=N (N of 2 or more), or train without "
                             "--shard.\n")
    assert not (tmp_path / "tiny").exists()


def test_unshard_refuses_a_whole_checkpoint_and_an_existing_file(tmp_path):
    config = h64lm.H64LMConfig.from_preset("tiny", vocab_size=64, hidden_size=32, num_layers=2, num_heads=2,
                                           num_kv_heads=1, intermediate_size=64, expert_intermediate_size=32,
                                           num_experts=4, max_position_embeddings=64)
    whole = tmp_path / "whole.pt"
    h64lm.save_checkpoint(whole, {"model": h64lm.H64LM(config).state_dict(), "config": config.to_dict()})
    before = whole.read_bytes()
    result = run_cli("unshard", "--ckpt", whole, "--out", tmp_path / "out.pt")
    assert result.returncode == 2 and result.stderr == (f"error: {whole} is not a sharded checkpoint (it holds its "
                                                        "weights itself); use it as it is.\n")
    result = run_cli("unshard", "--ckpt", whole, "--out", whole)
    assert result.returncode == 2 and f"{whole} exists; give a new file name" in result.stderr
    assert whole.read_bytes() == before and not (tmp_path / "out.pt").exists()


def test_check_fits_counts_a_process_share_of_the_training_state(monkeypatch):
    with torch.device("meta"):
        params = h64lm.H64LM(h64lm.H64LMConfig.from_preset("h64lm")).num_params()
    # 16 bytes a parameter (float32 weights, gradients, AdamW's two moments), by hand, whole and split.
    assert h64lm.state_bytes(params) == 16 * params
    assert h64lm.state_bytes(params, 8) == 16 * ((params + 7) // 8)
    # A machine with room for a quarter of the state: refused whole, refused on 2 processes, taken on 8.
    pages = 16 * params // 4 // os.sysconf("SC_PAGE_SIZE")
    real = os.sysconf
    monkeypatch.setattr(h64lm.os, "sysconf", lambda name: pages if name == "SC_PHYS_PAGES" else real(name))
    cpu = torch.device("cpu")
    with pytest.raises(h64lm.H64LMError, match=r"alone need 3\.7 GiB"):
        h64lm.check_fits(h64lm.H64LMConfig.from_preset("h64lm"), cpu)
    with pytest.raises(h64lm.H64LMError, match=r"split over 2 processes, need 1\.9 GiB each.*more processes\.$"):
        h64lm.check_fits(h64lm.H64LMConfig.from_preset("h64lm"), cpu, shards=2)
    h64lm.check_fits(h64lm.H64LMConfig.from_preset("h64lm"), cpu, shards=8)
