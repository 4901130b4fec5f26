"""tests/gpu_first_run.py, the script the first GPU run will run: whole, at the tiny preset on the CPU (--quick), so
that it is right the first time; and its roofline's bytes counted by hand. Its doctor and bench runs are also where
`doctor` on a CPU and bench's JSON are checked (test_doctor.py and test_analysis.py hold those checks)."""

import json
import math
import subprocess
import sys

import pytest
import torch

import h64lm
from conftest import PROCESS_ENV, REPO
from test_analysis import assert_bench_json_is_complete_and_consistent
from test_doctor import assert_a_cpu_doctor_passed
from tests import gpu_first_run

PARTS = ["doctor", "bench_eager", "bench_compiled", "flex", "train"]


@pytest.mark.slow
def test_the_first_gpu_runs_script_runs_every_part_on_a_cpu(tmp_path):
    out = tmp_path / "quick.json"
    result = subprocess.run([sys.executable, "-m", "tests.gpu_first_run", "--device", "cpu", "--quick", "--out",
                             str(out)], cwd=REPO, env=PROCESS_ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    r = json.loads(out.read_text())
    assert list(r["parts"]) == PARTS and r["quick"] is True
    assert not [name for name, part in r["parts"].items() if "error" in part], r["parts"]
    assert_a_cpu_doctor_passed(r["parts"]["doctor"])
    for name in ("bench_eager", "bench_compiled"):
        bench = r["parts"][name]
        assert_bench_json_is_complete_and_consistent(bench, compiled=name == "bench_compiled")
        assert bench["preset"] == "tiny" and bench["tokens_per_s"] > 0 and 0 < bench["utilization"] < 1
        for suffix in ("", "_batch8"):
            assert bench[f"roofline_tokens_per_s{suffix}"] > 0 and bench[f"decode_of_roofline{suffix}"] > 0
    assert "decode_compiled_of_roofline" in r["parts"]["bench_compiled"]
    flex = r["parts"]["flex"]
    # FlexAttention's forward (compiled, float32) against plain attention: rope+alibi, GQA (12 / 4 heads), a window
    # of 8, training's shared positions and generation's left padding.
    assert flex["tolerance"] == 1e-4 and flex["passed"] and flex["max_diff_gradients"] is None
    assert flex["max_diff_outputs"] <= 1e-5 and flex["padded_max_diff_outputs"] <= 1e-5
    train = r["parts"]["train"]
    assert train["steps"] == 3 and math.isfinite(train["last_lm_loss"]) and len(train["val_losses"]) == 1
    assert train["compile_seconds"] is None  # a CPU does not compile by default
    assert r["summary"] == result.stdout.splitlines()[:len(r["summary"])]
    assert result.stdout.splitlines()[-1].startswith("gpu_first_run: every part ran")


def test_a_decoding_steps_bytes_are_its_weights_counted_by_hand():
    c = h64lm.H64LMConfig.from_preset("tiny")  # 4 layers (odd ones MoE, top-2 of 8), untied, GQA
    D, V, H, Hkv, hd, I, F, E = (c.hidden_size, c.vocab_size, c.num_heads, c.num_kv_heads, c.head_dim,
                                 c.intermediate_size, c.expert_intermediate_size, c.num_experts)
    attention = D * H * hd * 2 + D * Hkv * hd * 2  # q and o; k and v
    dense, expert, router = 3 * D * I, 3 * D * F, D * E
    layers = 4 * (attention + 2 * D) + 2 * dense + 2 * router  # 2 dense, 2 MoE layers, each with two norms
    read = layers + D + V * D  # the final norm and the LM head; of the embedding table only the rows looked up
    assert gpu_first_run.decode_bytes(c, 1) == 4 * (read + 2 * 2 * expert)  # two experts in each MoE layer
    touched = E * (1 - (1 - 2 / E) ** 8)  # expected distinct experts of 8 tokens, top-2 of 8 at random
    assert gpu_first_run.decode_bytes(c, 8) == pytest.approx(4 * (read + 2 * touched * expert))


def test_the_bandwidth_of_a_known_gpu_is_its_data_sheets(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert gpu_first_run.memory_bandwidth(torch.device("cuda")) == (3.35e12, "data sheet (NVIDIA H100 80GB HBM3)")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert gpu_first_run.memory_bandwidth(torch.device("cuda"))[0] == 4.8e12
