"""`python h64lm.py doctor`: a CPU run passes every check and its JSON holds every row; a fast path made wrong is a
failed check, named, with exit status 1; under torchrun the all-reduce, and the balance bias and weights of every
process, and sharded steps against DDP's, are checked too."""

import json
import math
import subprocess
import sys

import pytest

import h64lm
from conftest import PROCESS_ENV, REPO, run_cli

FACTS = ["device", "versions", "precision", "peak_flops", "grouped_gemm", "flex_vs_plain_attention"]  # on a CPU
CHECKS = ["attention_rope", "attention_alibi", "attention_rope_alibi", "sdpa_vs_plain_attention_outputs",
          "sdpa_vs_plain_attention_gradients", "grouped_vs_loop_moe_outputs", "grouped_vs_loop_moe_gradients",
          "chunked_vs_plain_loss_value", "chunked_vs_plain_loss_gradients", "bf16_vs_float32_loss",
          "bf16_vs_float32_logits", "compiled_decoding", "training_steps"]
DISTRIBUTED = ["all_reduce", "same_balance_bias", "same_weights", "sharded_vs_ddp_losses", "sharded_share",
               "same_balance_bias_sharded"]


def assert_every_check_passed(report: dict, checks: list[str]) -> None:
    rows = report["rows"]
    assert set(FACTS + checks) <= set(rows), set(FACTS + checks) - set(rows)
    assert all(rows[key]["passed"] is None for key in FACTS)
    assert all(rows[key]["passed"] is True for key in checks), {k: rows[k] for k in checks if not rows[k]["passed"]}
    assert report["failed"] == [] and report["checks"] == sum(r["passed"] is not None for r in rows.values())


def assert_a_cpu_doctor_passed(report: dict) -> None:
    """`doctor --preset tiny --device cpu --json`, run by tests/gpu_first_run.py --quick (test_gpu_first_run): every
    check passed, and its rows hold what a CPU has."""
    assert (report["preset"], report["processes"]) == ("tiny", 1)
    assert_every_check_passed(report, CHECKS)
    rows = report["rows"]
    assert rows["versions"]["value"].endswith(" / n/a / n/a")  # no CUDA, no cuDNN on a CPU
    assert rows["grouped_gemm"]["native"] is False  # torch's kernel is for bf16 on CUDA
    assert all(row["max_diff"] <= row["tolerance"] for row in rows.values() if "max_diff" in row)
    steps = rows["training_steps"]
    assert len(steps["losses"]) == h64lm.DOCTOR_STEPS and all(map(math.isfinite, steps["losses"]))
    assert steps["tokens_per_s"] > 0 and steps["peak_memory_bytes"] > 0


def test_a_wrong_fast_path_is_a_failed_check_named_with_exit_status_1(monkeypatch, capsys):
    """The grouped MoE dispatch made 1% wrong; the compile and the training steps, checked above, are left out."""
    grouped = h64lm.MoE._experts_grouped
    monkeypatch.setattr(h64lm.MoE, "_experts_grouped", lambda self, *args: grouped(self, *args) * 1.01)
    monkeypatch.setattr(h64lm, "decoding_row", lambda config, rt: h64lm._row("compiled_decoding", "left out", ""))
    monkeypatch.setattr(h64lm, "training_rows", lambda config, preset, rt: [])
    assert h64lm.main(["doctor", "--preset", "tiny", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    verdict = out.splitlines()[-1]
    assert verdict.startswith("doctor: 2 checks failed: grouped vs loop MoE outputs (max diff ")
    assert "; grouped vs loop MoE gradients (max diff " in verdict and "> 1e-04)" in verdict
    failed = [line.split("  FAIL  ")[0].strip() for line in out.splitlines() if "  FAIL  " in line]
    assert failed == ["grouped vs loop MoE outputs", "grouped vs loop MoE gradients"]


@pytest.mark.slow
def test_under_torchrun_the_doctor_checks_the_all_reduce_and_that_every_process_holds_the_same_state():
    env = PROCESS_ENV
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(REPO / "h64lm.py"), "doctor", "--preset", "tiny", "--device", "cpu", "--json"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)  # one object: rank 0 alone prints
    assert report["processes"] == 2
    assert_every_check_passed(report, CHECKS + DISTRIBUTED)
    assert report["rows"]["all_reduce"]["check"] == "all-reduce (gloo)"


ONE_RANK_FAILS = """
import sys
import torch
import h64lm
rank = int(__import__("os").environ["RANK"])
twins = h64lm.twin_rows
def broken_on_rank1(config, rt):
    if rt.rank == 1:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")  # as a bad GPU would
    return twins(config, rt)
h64lm.twin_rows = broken_on_rank1
h64lm.decoding_row = lambda config, rt: h64lm._row("compiled_decoding", "compiled decoding", "left out")
sys.exit(h64lm.main(["doctor", "--preset", "tiny", "--device", "cpu", "--json"]))
"""


@pytest.mark.slow
def test_under_torchrun_a_part_failed_on_one_rank_stops_the_collective_parts_everywhere_and_is_named(tmp_path):
    # Each process catches its own errors part by part; without agreeing after each part, rank 0 went on into the
    # training steps' all-reduces alone (with NCCL: a hang) and reported every check passed.
    script = tmp_path / "one_rank_fails.py"
    script.write_text(ONE_RANK_FAILS)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], cwd=REPO, env={**PROCESS_ENV, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    report = json.loads(result.stdout)  # rank 0's
    rows = report["rows"]
    assert rows["fast_paths_against_their_twins_rank1"]["passed"] is False
    assert len(report["failed"]) == 1
    assert report["failed"][0].startswith("fast paths against their twins on rank 1 (raised OutOfMemoryError: CUDA "
                                          "out of memory. Tried to allocate 2.00 GiB")
    for key in ("3_training_steps", "sharded_training_shard_"):
        assert rows[key]["value"] == "skipped: fast paths against their twins failed on rank 1", rows[key]
    assert rows["all_reduce"]["passed"] is True  # the parts before it ran
