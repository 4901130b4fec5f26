"""What repeating the KV heads before F.scaled_dot_product_attention (fused_attention, section 7) would cost a
training step on this CPU, where it is not done: a whole step (forward, backward, fused AdamW) of the default
attention (rope+alibi, GQA) timed with and without the repeat, in alternation in one process, with the bench's
own timing helpers. On CUDA the repeat is what lets a masked GQA call reach a fused kernel; on a CPU, whose
flash kernel takes a mask and enable_gqa together, it could only cost. A developer's measurement for the README:

    python tests/kv_repeat_cost.py [--repeats 5]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import h64lm  # noqa: E402
from tests.speed import _train_step_fn  # noqa: E402

SHAPES = {"tiny": (8, 128), "small": (4, 256)}  # preset: (batch, sequence length)


def step_with(repeat: bool, step) -> callable:
    def run():
        h64lm.KV_REPEATING_DEVICES = ("cpu",) if repeat else ()
        step()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rt = h64lm.setup_runtime("cpu", "fp32")
    for preset, (batch, seq_len) in SHAPES.items():
        torch.manual_seed(0)
        model = h64lm.H64LM(h64lm.H64LMConfig.from_preset(preset))
        x = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1))
        step = _train_step_fn(model, x, rt, lambda m, x: m(x[:, :-1], x[:, 1:]).loss)
        times = h64lm._time_alternating({"gqa": step_with(False, step), "repeat": step_with(True, step)},
                                        args.repeats, rt.device)
        median, low, high = h64lm._ratio(times, "repeat", "gqa")
        print(f"{preset} {batch} x {seq_len}: step with the repeat / without {median:.3f}x ({low:.3f}-{high:.3f}); "
              f"without {h64lm._median(times['gqa']) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
