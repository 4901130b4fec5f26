"""What training holds in memory, per process, and the road to the seed's production model (README, "Past one GPU's
memory").

    python -m tests.memory                   # the table: h64lm and the production shape, DDP and --shard on 8/64/512
    python -m tests.memory --measure-ddp-vs-shard [--preset small]   # two CPU processes, DDP against --shard

The table's activations are measured, not guessed: one dense and one MoE block of each shape, with bfloat16 weights
(as --shard gathers them on CUDA), run forward on random tokens at 1 and 2 sequences of the context's length while
autograd's saved-tensor hooks count the bytes it keeps for backward (each storage once, the weights left out): what
doubles with the batch is per token, the rest is one forward's fixed part (the LM head's gradient, ALiBi's T x T
bias, RoPE's tables). The rest is arithmetic, written out below: 16 bytes a parameter for float32 weights, gradients
and AdamW's two moments (h64lm.state_bytes), split N ways when sharded."""

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import h64lm  # noqa: E402

# The production model the original H64LM promised to scale to: hidden 4096, 32 layers, 32 heads, 8 KV heads,
# 16 experts. What it did not say is h64lm's: SwiGLU 4 x hidden wide (dense and each expert), top-2 routing, MoE on
# the odd layers, the Mistral tokenizer's 32,000 tokens, untied, 1,024-token context.
PRODUCTION = dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, num_experts=16,
                  intermediate_size=16384, expert_intermediate_size=16384)
MICRO_BATCH = (16, 1024)  # the h64lm recipe's micro-batch: 16 sequences of 1,024 tokens per process
GPUS = (8, 64, 512)
GIB = 2 ** 30


def saved_bytes(config: h64lm.H64LMConfig, batch: int, seq_len: int) -> dict[str, int]:
    """Bytes autograd keeps for backward in one training forward of `config` with bfloat16 weights on random tokens,
    by where they were made: each block ("block 0", ...), "T x T" (tensors whose last two dimensions are the
    sequence, in any block), and "rest" (embedding, final norm, LM head and loss)."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: the production block is 7 GB so, 14 in float32
    try:
        model = h64lm.H64LM(config).train()
    finally:
        torch.set_default_dtype(default)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(3, config.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    where, seen, kept = ["rest"], set(), {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights | seen:
            seen.add(storage.data_ptr())
            label = "T x T" if t.dim() >= 2 and t.shape[-1] == t.shape[-2] == seq_len else where[0]
            kept[label] = kept.get(label, 0) + storage.nbytes()
        return t

    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, f"block {i}"))
        block.register_forward_hook(lambda m, a, o: where.__setitem__(0, "rest"))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids[:, :-1], ids[:, 1:])
    return kept


def block_bytes(config: h64lm.H64LMConfig, seq_len: int) -> dict[str, float]:
    """saved_bytes of a 2-layer model of config's shape (block 0 dense, block 1 MoE, as "odd" places them), at 1
    and 2 sequences: the bytes per token of a dense block, an MoE block, the rest and the T x T tensors (what
    doubles with the batch), and the bytes of one forward that do not grow with the batch (the LM head's gradient,
    which the chunked loss computes in forward and keeps; RoPE's cos and sin, which every block shares)."""
    two = dataclasses.replace(config, num_layers=2, moe_layers="odd")
    one, both = saved_bytes(two, 1, seq_len), saved_bytes(two, 2, seq_len)
    labels = {"block 0": "dense", "block 1": "moe", "rest": "rest", "T x T": "t_by_t"}
    per_token = {name: (both.get(k, 0) - one.get(k, 0)) / seq_len for k, name in labels.items()}
    return {**per_token, "fixed": sum(one.values()) - seq_len * sum(per_token.values())}


def unit_params(config: h64lm.H64LMConfig) -> int:
    """Parameters of the largest unit --shard gathers at once: an MoE block (or a dense one, in a dense model)."""
    with torch.device("meta"):
        model = h64lm.H64LM(config)
    return max(sum(p.numel() for p in block.parameters()) for block in model.blocks)


def rows(name: str, config: h64lm.H64LMConfig, measured: dict) -> list[dict]:
    """The memory of one training process, for DDP and for --shard on each of GPUS, in bytes."""
    with torch.device("meta"):
        model = h64lm.H64LM(config)
    params, active = model.num_params(), model.num_params(active=True)
    batch, seq_len = MICRO_BATCH
    tokens = batch * seq_len
    moe = len(config.moe_layer_ids)
    blocks = (config.num_layers - moe) * measured["dense"] + moe * measured["moe"]
    rest, fixed = measured["rest"] + measured["t_by_t"], measured["fixed"]
    activations = tokens * (blocks + rest) + fixed
    # Checkpointing keeps each block's input (bf16, B x T x D) and recomputes one block at a time in backward.
    checkpointed = (tokens * (config.num_layers * 2 * config.hidden_size + max(measured["dense"], measured["moe"])
                              + rest) + fixed)
    unit = unit_params(config)
    out = []
    for setup, shards in [("DDP", 1)] + [(f"FSDP {n}", n) for n in GPUS]:
        # DDP: autocast's bf16 copy of every weight, kept for backward (2 bytes a parameter). FSDP: the running and
        # the prefetched unit gathered in bf16, and the running unit's bf16 gradient and its float32 copy for the
        # reduce-scatter (2 + 2 + 2 + 4 bytes a parameter of the unit).
        transient = 2 * params if shards == 1 else 10 * unit
        state = h64lm.state_bytes(params, shards)
        out.append(dict(model=name, setup=setup, params=params, active=active, state=state, transient=transient,
                        activations=activations, checkpointed=checkpointed,
                        total=state + transient + activations, total_checkpointed=state + transient + checkpointed))
    return out


def table(all_rows: list[dict]) -> str:
    head = ("| model | setup | parameters (active) | weights + grads + AdamW | gathered / cast weights | activations "
            "| total | activations, checkpointed | total, checkpointed |")
    lines = [head, "|" + " --- |" * 9]
    for r in all_rows:
        g = lambda key: f"{r[key] / GIB:,.1f}"  # noqa: E731
        lines.append(f"| {r['model']} | {r['setup']} | {r['params'] / 1e9:.2f}B ({r['active'] / 1e9:.2f}B) | "
                     f"{g('state')} | {g('transient')} | {g('activations')} | {g('total')} | {g('checkpointed')} | "
                     f"{g('total_checkpointed')} |")
    return "\n".join(lines)


# Data-sheet bandwidths, per GPU and direction: NVLink 4 within an H100 node, and one 400 Gb/s InfiniBand NDR link
# per GPU between nodes (a DGX H100's layout).
NVLINK, INFINIBAND = 450e9, 50e9
H100 = dict(h64lm.GPU_PEAK_FLOPS)["H100"]  # dense bf16 FLOP/s, SXM


def expert_parallel(name: str, config: h64lm.H64LMConfig) -> str:
    """What an MoE layer costs a GPU per micro-batch under --shard, against expert parallelism: FSDP2 gathers the
    layer's whole weights in bf16 for forward and again for backward and reduce-scatters its gradient in float32
    (8 bytes a parameter), whatever the tokens; expert parallelism keeps whole experts on each GPU and sends each
    token's hidden state to its k experts and back, in forward and in backward (bf16). Beside them, the layer's
    compute at an H100's peak, which a transfer must fit under to be hidden."""
    batch, seq_len = MICRO_BATCH
    tokens = batch * seq_len
    experts = 3 * config.hidden_size * config.expert_intermediate_size * config.num_experts
    fsdp = experts * (2 + 2 + 4)
    all_to_all = tokens * config.num_experts_per_tok * config.hidden_size * 2 * 2 * 2
    compute = 6 * tokens * config.num_experts_per_tok * experts / config.num_experts / H100  # s, at peak
    return (f"{name}: an MoE layer's experts are {experts / 1e9:.2f}B parameters; per micro-batch of {tokens:,} "
            f"tokens, sharded, a GPU moves {fsdp / 1e9:.2f} GB of them ({fsdp / NVLINK * 1e3:.1f} ms on NVLink, "
            f"{fsdp / INFINIBAND * 1e3:.0f} ms on InfiniBand); expert parallelism moves the tokens' hidden states, "
            f"{all_to_all / 1e9:.2f} GB ({all_to_all / NVLINK * 1e3:.1f} ms, {all_to_all / INFINIBAND * 1e3:.0f} ms); "
            f"the layer's experts compute for {compute * 1e3:.1f} ms at an H100's peak")


def measure_ddp_vs_shard(preset: str, steps: int = 6) -> None:
    """Run this file under torchrun on 2 CPU processes, DDP then --shard, and print what each process held."""
    for shard in (False, True):
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 __file__, "--inner", preset, str(steps)] + (["--shard"] if shard else []),
                                capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if result.returncode:
            sys.exit(result.stderr[-3000:])
        print(result.stdout.strip())


def inner(preset: str, steps: int, shard: bool) -> None:
    """One process of measure_ddp_vs_shard: a few train_steps of the preset at 2 x 512 tokens, then the bytes of
    its weights, gradients and optimizer state (its shards, when sharded), its peak resident memory, and the median
    seconds of a step after the first."""
    rt = h64lm.setup_runtime("cpu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    config = h64lm.H64LMConfig.from_preset(preset)
    tc = h64lm.TrainConfig(batch_size=2, grad_accum=1, seq_len=512, optimizer="adamw", shard=shard)
    run = h64lm.synthetic_run(config, tc, rt)
    seconds = []
    for step in range(steps):
        started = time.perf_counter()
        h64lm.train_step(run, step)
        seconds.append(time.perf_counter() - started)
        if step == steps - 2:  # gradients are freed by the step: the last one keeps them, for counting
            run.optimizer.zero_grad = lambda set_to_none=True: None
    size = lambda t: h64lm.local(t).numel() * t.element_size()  # noqa: E731
    parameters = list(run.model.parameters())
    held = {"weights": sum(map(size, parameters)),
            "gradients": sum(size(p.grad) for p in parameters if p.grad is not None),
            "optimizer": sum(size(v) for s in run.optimizer.state.values() for v in s.values()
                             if torch.is_tensor(v) and v.dim() > 0),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_before_model": before,
            "seconds_per_step": h64lm._median(seconds[1:])}
    every = [None] * rt.world_size
    torch.distributed.all_gather_object(every, held)
    if rt.master:
        print(json.dumps({"preset": preset, "setup": "--shard" if shard else "DDP",
                          "params": run.model.num_params(), "per_process": every}))
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure-ddp-vs-shard", action="store_true")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--inner", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--shard", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        return inner(args.inner[0], int(args.inner[1]), args.shard)
    if args.measure_ddp_vs_shard:
        return measure_ddp_vs_shard(args.preset)
    torch.set_num_threads(os.cpu_count())
    all_rows = []
    for name, config in (("h64lm", h64lm.H64LMConfig.from_preset("h64lm")),
                         ("production", h64lm.H64LMConfig.from_preset("h64lm", **PRODUCTION))):
        measured = block_bytes(config, MICRO_BATCH[1])
        print(f"{name}: saved for backward, per token: dense block {measured['dense']:,.0f} B, MoE block "
              f"{measured['moe']:,.0f} B, the rest {measured['rest']:,.0f} B, T x T {measured['t_by_t']:,.0f} B; "
              f"a forward's fixed part {measured['fixed'] / GIB:,.2f} GiB")
        all_rows += rows(name, config, measured)
        print(expert_parallel(name, config))
    print(table(all_rows))


if __name__ == "__main__":
    main()
