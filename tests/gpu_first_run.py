"""The first GPU run, prepared (issue 33): what one H100 or H200 must show, in under 8 minutes, written to one JSON.

    python -m tests.gpu_first_run --out gpu_first_run.json                    # on the GPU, from the repository root
    python -m tests.gpu_first_run --device cpu --quick --out /tmp/quick.json  # the same parts, small and short (CI)

The parts, each timed, each in its own process where it can be (a part that fails is recorded with its error and
the next one runs; the JSON is rewritten after every part, so a run cut short keeps what finished):

  doctor          `h64lm.py doctor --json`: kernels, fast paths against their twins, three training steps;
  bench_eager     `h64lm.py bench --json` of the h64lm preset at 16 x 1024 tokens: tokens/s, MFU, peak memory,
                  the MoE layer over its dense twin, cached greedy decoding at batch 1 and 8, each decoding
                  figure beside its memory-bandwidth roofline (roofline_*);
  bench_compiled  the same with --compile (compile_blocks, and decoding compiled with CUDA graphs);
  flex            FlexAttention (attn_impl="flex") against plain attention, outputs and every gradient (on a
                  CPU the forward alone, all torch runs there), with left padding and a window; on CUDA a whole
                  training step of h64lm with flex against one with SDPA, timed in alternation;
  train           300 steps of `h64lm.py train --preset small --data sample`: losses, tokens/s and MFU from its
                  history, and the compile time of its first step.

The summary at the end is the README's table (Speed, "The first GPU run"); fill it from the printed lines.
"""

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import h64lm  # noqa: E402

# Memory bandwidth of each GPU, from NVIDIA's data sheets, bytes/s; the first name the device's contains is taken,
# so the longer names come first (as h64lm's GPU_PEAK_FLOPS).
GPU_BANDWIDTH = (("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H200", 4.8e12), ("H100", 3.35e12),
                 ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L40S", 0.864e12))

# The settings of each part: on the GPU what the issue asks for; --quick the same commands at the tiny preset.
FULL = dict(preset="h64lm", bench=["--batch-size", "16"], train_preset="small", train=["--max-steps", "300",
            "--eval-every", "100", "--save-every", "300"], flex_window=256, flex_repeats=10, part_timeout=420)
QUICK = dict(preset="tiny", bench=["--batch-size", "2", "--seq-len", "32", "--repeats", "1", "--decode-tokens", "2"],
             train_preset="tiny", train=["--max-steps", "3", "--eval-every", "3", "--save-every", "3", "--batch-size",
                                         "2", "--seq-len", "32", "--eval-batches", "2", "--optimizer", "adamw"],
             flex_window=8, flex_repeats=1, part_timeout=300)


def h64lm_command(*args, timeout: float) -> subprocess.CompletedProcess:
    """`python h64lm.py ARGS` in a process of its own."""
    return subprocess.run([sys.executable, str(REPO / "h64lm.py"), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def json_of(result: subprocess.CompletedProcess) -> dict:
    """The JSON object a command printed, or an error naming its exit status and last words."""
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"exit status {result.returncode}: {result.stderr.strip()[-1500:]}") from None


def doctor_part(s: dict, device: str) -> dict:
    result = h64lm_command("doctor", "--preset", s["preset"], "--device", device, "--json", timeout=s["part_timeout"])
    return json_of(result) | {"exit_status": result.returncode}  # 1: a check failed, named in "failed"


def bench_part(s: dict, device: str, compile: bool) -> dict:
    result = json_of(h64lm_command("bench", "--preset", s["preset"], *s["bench"], "--device", device, "--json",
                                   *(["--compile"] if compile else []), timeout=s["part_timeout"]))
    bandwidth, source = memory_bandwidth(torch.device(device))
    config = h64lm.H64LMConfig(**result["config"])
    result |= {"bandwidth_bytes_per_s": bandwidth, "bandwidth_source": source,
               "peak_memory_gib": result["peak_memory_bytes"] / 2**30}
    for suffix, batch in (("", 1), ("_batch8", 8)):
        roofline = batch * bandwidth / decode_bytes(config, batch)
        result[f"roofline_tokens_per_s{suffix}"] = roofline
        for key in ("decode", "decode_compiled"):
            if f"{key}_tokens_per_s{suffix}" in result:
                result[f"{key}_of_roofline{suffix}"] = result[f"{key}_tokens_per_s{suffix}"] / roofline
    return result


def decode_bytes(config: h64lm.H64LMConfig, batch: int) -> float:
    """Bytes of weights one decoding step of `batch` rows reads, the floor of its time at the memory's speed: every
    weight but the embedding table (of which it reads `batch` rows), of each MoE layer the experts its tokens chose
    (E (1 - (1 - k/E)^batch) of them expected, for routing uniform at random), in float32, the dtype the model keeps
    its weights in (bf16 autocast casts them as it reads them). The KV cache's reads are left out: at these lengths
    they are a few percent."""
    with torch.device("meta"):
        model = h64lm.H64LM(config)
    E, k = config.num_experts, config.num_experts_per_tok
    per_expert = 3 * config.hidden_size * config.expert_intermediate_size
    unread = (E - E * (1 - (1 - k / E) ** batch)) * per_expert * len(config.moe_layer_ids)
    table = 0 if config.tie_word_embeddings else model.embed.weight.numel()
    return 4 * (model.num_params() - table - unread)


def memory_bandwidth(device: torch.device) -> tuple[float, str]:
    """The device's memory bandwidth and where the number comes from: the data sheet for a known GPU, else
    measured here (a 256 MiB float32 tensor summed ten times, the best of three: reads only)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, bandwidth in GPU_BANDWIDTH:
            if key in name:
                return bandwidth, f"data sheet ({name})"
    x = torch.ones(2**26, device=device)
    best = math.inf
    for _ in range(3):
        h64lm._sync(device)
        started = time.perf_counter()
        for _ in range(10):
            x.sum()
        h64lm._sync(device)
        best = min(best, time.perf_counter() - started)
    return 10 * x.numel() * 4 / best, "measured: a 256 MiB tensor summed"


def flex_part(s: dict, device: str) -> dict:
    """FlexAttention against plain attention (outputs; gradients on CUDA) in the training dtype, at a small width with
    the h64lm preset's heads, rope+alibi and a window: training's positions, then generation's left padding; on CUDA
    a training step of the preset with flex against SDPA."""
    rt = h64lm.setup_runtime(device)
    cuda = rt.device.type == "cuda"
    config = dataclasses.replace(h64lm.doctor_config(h64lm.H64LMConfig.from_preset("h64lm")),
                                       max_position_embeddings=4 * s["flex_window"], sliding_window=s["flex_window"],
                                       num_heads=12, num_kv_heads=4, hidden_size=768, loss_impl="plain")
    x = h64lm._doctor_batch(config, rt)
    outputs, gradients = h64lm.twin_gaps(config, "attn_impl", "flex", "plain", rt, x, backward=cuda)
    result = {"tolerance": h64lm.TWIN_TOLERANCE[rt.dtype], "max_diff_outputs": outputs,
              "max_diff_gradients": gradients if cuda else None, "padded_max_diff_outputs": padded_gap(config, rt)}
    result["passed"] = max(outputs, gradients, result["padded_max_diff_outputs"]) <= result["tolerance"]
    if cuda:
        steps = {}
        for impl in ("sdpa", "flex"):
            run = h64lm.bench_run(s["preset"], rt, None, 16, attn_impl=impl)
            steps[impl] = h64lm.bench_step(run)[0]
        times = h64lm._time_alternating(steps, s["flex_repeats"], rt.device)
        ratio, low, high = h64lm._ratio(times, "sdpa", "flex")
        result |= {"sdpa_step_seconds": h64lm._median(times["sdpa"]), "flex_step_seconds": h64lm._median(times["flex"]),
                   "flex_speedup": ratio, "flex_speedup_spread": [low, high]}
    return result


@torch.no_grad()
def padded_gap(config: h64lm.H64LMConfig, rt: h64lm.Runtime) -> float:
    """flex against plain on two rows, the second left-padded by a third of its length (generation's batches)."""
    torch.manual_seed(0)
    models = [h64lm.H64LM(dataclasses.replace(config, attn_impl=impl)).to(rt.device) for impl in ("flex", "plain")]
    models[0].load_state_dict(models[1].state_dict())
    T = config.max_position_embeddings
    ids = torch.randint(0, config.vocab_size, (2, T), device=rt.device)
    positions = torch.arange(T, device=rt.device)[None].repeat(2, 1)
    positions[1] -= T // 3
    positions = positions.masked_fill(positions < 0, -1)
    with rt.autocast():
        flex, plain = (model(ids, positions=positions).logits for model in models)
    real = positions >= 0  # the padding rows' outputs are never used
    return h64lm._gap(flex[real], plain[real])


def train_part(s: dict, device: str, folder: Path) -> dict:
    result = h64lm_command("train", "--preset", s["train_preset"], "--data", "sample", *s["train"], "--device", device,
                           "--out-dir", folder, "--run-name", "first-run", "--cache-dir", folder / "cache",
                           timeout=s["part_timeout"])
    if result.returncode != 0:
        raise RuntimeError(f"exit status {result.returncode}: {result.stderr.strip()[-1500:]}")
    history = json.loads((folder / "first-run" / "training_history.json").read_text())
    timed = [r for r in history["train"] if "tokens_per_s" in r]
    return {"steps": history["train"][-1]["step"] + 1, "first_lm_loss": history["train"][0]["lm_loss"],
            "last_lm_loss": history["train"][-1]["lm_loss"], "val_losses": [v["loss"] for v in history["val"]],
            "median_tokens_per_s": h64lm._median([r["tokens_per_s"] for r in timed]),
            "median_mfu": h64lm._median([r["mfu"] for r in timed]) if timed and "mfu" in timed[0] else None,
            "compile_seconds": next((r["compile_seconds"] for r in history["train"] if "compile_seconds" in r), None),
            "seconds_in_run": history["val"][-1]["seconds"]}


def summary(result: dict) -> list[str]:
    """The README's table, one line a figure: what a reader of the README looks for."""
    p = result["parts"]

    def get(part, key, form="{:,.0f}"):
        value = p.get(part, {}).get(key)
        return "error" if "error" in p.get(part, {}) else "-" if value is None else form.format(value)
    lines = [f"device: {result['device_name']}"]
    lines.append(f"doctor: {get('doctor', 'checks', '{}')} checks, failed: {p.get('doctor', {}).get('failed')}")
    for part in ("bench_eager", "bench_compiled"):
        lines.append(f"{part}: {get(part, 'tokens_per_s')} tokens/s, MFU {get(part, 'utilization', '{:.1%}')}, "
                     f"peak memory {get(part, 'peak_memory_gib', '{:.2f}')} GiB, MoE layer / dense "
                     f"{get(part, 'moe_overhead', '{:.2f}')}x")
        for suffix, batch in (("", 1), ("_batch8", 8)):
            key = "decode_compiled" if part == "bench_compiled" else "decode"
            lines.append(f"  decode batch {batch}: {get(part, f'{key}_tokens_per_s{suffix}')} tokens/s, "
                         f"{get(part, f'{key}_of_roofline{suffix}', '{:.0%}')} of the roofline "
                         f"({get(part, f'roofline_tokens_per_s{suffix}')})")
    lines.append(f"flex vs plain: outputs {get('flex', 'max_diff_outputs', '{:.1e}')}, gradients "
                 f"{get('flex', 'max_diff_gradients', '{:.1e}')}, padded {get('flex', 'padded_max_diff_outputs', '{:.1e}')}"
                 f"; training step SDPA / flex {get('flex', 'flex_speedup', '{:.2f}')}x")
    lines.append(f"train: loss {get('train', 'first_lm_loss', '{:.3f}')} -> {get('train', 'last_lm_loss', '{:.3f}')}, "
                 f"{get('train', 'median_tokens_per_s')} tokens/s, MFU {get('train', 'median_mfu', '{:.1%}')}, "
                 f"compile {get('train', 'compile_seconds', '{:.0f}')} s")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="the tiny preset, a few steps: checks the script, in CI")
    p.add_argument("--out", default="gpu_first_run.json", help="the JSON to write")
    p.add_argument("--parts", default="doctor,bench_eager,bench_compiled,flex,train", help="which parts, comma-separated")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here; run on the GPU, or --device cpu --quick to check the script")
    s = QUICK if args.quick else FULL
    device = torch.device(args.device)
    result = {"command": " ".join(sys.argv), "quick": args.quick, "device_name": h64lm.device_name(device),
              "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "parts": {}}
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as folder:
        parts = {"doctor": lambda: doctor_part(s, args.device),
                 "bench_eager": lambda: bench_part(s, args.device, compile=False),
                 "bench_compiled": lambda: bench_part(s, args.device, compile=True),
                 "flex": lambda: flex_part(s, args.device),
                 "train": lambda: train_part(s, args.device, Path(folder))}
        for name in args.parts.split(","):
            print(f"gpu_first_run: {name}", file=sys.stderr, flush=True)
            started = time.perf_counter()
            try:
                figures = parts[name]()
            except Exception as e:  # recorded, and the next part runs
                figures = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}  # a compiler's error fills pages
            result["parts"][name] = figures | {"seconds": time.perf_counter() - started}
            out.write_text(json.dumps(result, indent=1))
    result["summary"] = summary(result)
    out.write_text(json.dumps(result, indent=1))
    print("\n".join(result["summary"]))
    failed = [name for name, part in result["parts"].items() if "error" in part or part.get("failed")
              or part.get("passed") is False]
    print(f"gpu_first_run: {'failed: ' + ', '.join(failed) if failed else 'every part ran'}; {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
