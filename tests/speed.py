"""The developers' speed checks: how we tell whether a change made H64LM faster or slower against what it is
measured by. Not part of the program (`python h64lm.py bench` times H64LM alone); from the repository root:

    python -m tests.speed --targets --repeats 5     # SPEED_TARGETS, on the shapes users train
    python -m tests.speed --compare-hf              # bench against transformers' Mixtral of the same shape
    python -m tests.speed --tokenize                # bench, and tokenizing + packing the sample
    python -m tests.speed --optimizers              # a whole training step with Muon against one with AdamW
    python -m tests.speed --moe-steps --preset lab  # a whole MoE training step against its dense twin's

--compare-hf measures both models in Mixtral's form (every layer MoE, RoPE only), transformers' with its fastest
experts implementation for each measurement: a training step of each timed in alternation, and cached greedy
decoding (H64LM eager and compiled, section 13) against transformers' generate(). --targets measures each of
SPEED_TARGETS on its shape in one process: graph breaks in the tiny training step, the MoE layer at the h64lm
shape, the training step and decoding against transformers at the small shape, decoding at the tiny shape, and
what compile_blocks gains. --optimizers times train_step, the very step `train` takes (forward, backward,
clipping, the optimizer), of the preset with its recipe on the bundled sample, with Muon and with AdamW in
alternation; --moe-steps the same step of a preset's dense twin, its MoE (every layer) and its experts split four
ways, at equal active FLOPs. A ratio is the median of the repeats' ratios with the lowest and highest beside it, as
h64lm's own bench (section 20) takes them. README, Speed, has the figures and what the --json keys mean.
"""

import argparse
import copy
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import h64lm  # noqa: E402
from h64lm import (COUNT, H64LM, H64LMConfig, H64LMError, Runtime, _decoding, _median, _ratio,  # noqa: E402
                   _time_alternating)



def _train_step_fn(model: torch.nn.Module, x: torch.Tensor, rt: Runtime, loss_of) -> Callable[[], None]:
    """One plain training step (forward, backward, AdamW), the same for every model timed side by side: H64LM's
    train_step does more (finite checks, clipping, the recipe's optimizer), which transformers' Mixtral has no twin
    of, so a fair comparison times both models through this."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with rt.autocast():
            loss = loss_of(model, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _model_and_batch(preset: str, rt: Runtime, seq_len: int | None, batch_size: int,
                     **overrides) -> tuple[H64LM, torch.Tensor]:
    """The preset's model (seed 0) and a batch x (B, T + 1) of random tokens; T = seq_len, by default the recipe's."""
    config = H64LMConfig.from_preset(preset, **overrides)
    seq_len = h64lm.seq_len_of(config, seq_len, h64lm.TRAIN_RECIPES.get(preset, {}).get("seq_len"))
    torch.manual_seed(0)
    model = H64LM(config).to(rt.device)
    return model, torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), device=rt.device)


# The targets of --targets: ratios measured in alternation in one process, on the shapes users train.
SPEED_TARGETS = {
    "decode_vs_transformers": 2.0,  # at least: compiled cached greedy decoding over transformers' generate, tiny
    # and small shapes, batch 1 and 8
    "moe_layer_over_dense": 1.15,  # at most: one MoE layer over a dense SwiGLU of equal active FLOPs, forward and
    # backward, h64lm shape, 1,024 tokens
    "train_step_vs_transformers": 1.3,  # at least: a training step over transformers' Mixtral, small shape
    "graph_breaks": 0,  # at most: in the compiled training step of the tiny model
}


# --- Against transformers' Mixtral -----------------------------------------------------------------------------------

def mixtral_like(config: H64LMConfig):
    """transformers' MixtralForCausalLM with H64LM's shape (config must be all-MoE, RoPE only), its own weights."""
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM(h64lm.transformers_config(config, "mixtral", output_router_logits=True,
                                                        attn_implementation="sdpa"))


def _fastest_hf_experts(hf_model, fn: Callable[[], None], rt: Runtime, repeats: int, what: str) -> str:
    """Set the experts implementation of transformers' model under which fn (what it does, for the error) runs
    fastest here; return its name. An implementation this device or version does not support is skipped."""
    times = {}
    for impl in ("eager", "batched_mm", "grouped_mm"):
        try:
            hf_model.set_experts_implementation(impl)
            times[impl] = _median(_time_alternating({impl: fn}, repeats, rt.device)[impl])
        except Exception:  # not supported here: the warm-up call inside _time_alternating raised
            continue
    if not times:
        raise H64LMError(f"None of transformers' experts implementations ran {what} here, so transformers' Mixtral "
                         "cannot be timed on this machine; `python h64lm.py bench` times H64LM alone.")
    best = min(times, key=times.get)
    hf_model.set_experts_implementation(best)
    return best


def compare_hf(preset: str = "tiny", device: str = "auto", precision: str = "auto", seq_len: int | None = None,
               batch_size: int = 8, repeats: int = 10, decode_tokens: int = 32, compile: bool = False,
               **overrides) -> dict:
    """What h64lm.bench measures, in Mixtral's form, with transformers' Mixtral of the same shape timed in
    alternation with H64LM: the training step (hf_tokens_per_s, speedup_vs_hf) and decoding (hf_decode_bench)."""
    rt = h64lm.setup_runtime(device, precision)
    overrides = {**overrides, "moe_layers": "all", "attention_type": "rope"}  # Mixtral's form
    model, x = _model_and_batch(preset, rt, seq_len, batch_size, **overrides)
    step_model = h64lm.compile_blocks(model) if compile else model
    ours = _train_step_fn(step_model, x, rt, lambda m, x: m(x[:, :-1], x[:, 1:]).loss)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    ours()  # its warm-up: H64LM's memory peak alone
    peak_memory = h64lm._peak_memory(rt.device)
    hf = mixtral_like(model.config).to(rt.device).train()
    fns = {"h64lm": ours,
           "transformers": _train_step_fn(hf, x[:, :-1], rt, lambda m, ids: m(input_ids=ids, labels=ids).loss)}
    hf_impl = _fastest_hf_experts(hf, fns["transformers"], rt, max(2, repeats // 2), "a training step")
    all_times = _time_alternating(fns, repeats, rt.device)
    times = {name: _median(t) for name, t in all_times.items()}
    result = h64lm.step_figures(model, preset, rt, x.shape[0], x.shape[1] - 1, times["h64lm"], peak_memory)
    tokens = x[:, 1:].numel()  # the step's B * T
    result.update(h64lm.moe_overhead(model.config, tokens, rt, repeats))
    result["hf_experts_implementation"] = hf_impl
    result["hf_tokens_per_s"] = tokens / times["transformers"]
    result["speedup_vs_hf"], *result["speedup_vs_hf_spread"] = _ratio(all_times, "transformers", "h64lm")
    result.update(hf_decode_bench(model, hf, rt, decode_tokens, repeats))
    return result


@torch.no_grad()
def hf_decode_bench(model: H64LM, hf, rt: Runtime, new_tokens: int, repeats: int) -> dict:
    """h64lm.decode_bench's measurement with transformers' generate timed in the same alternation, with its fastest
    experts implementation for decoding: tokens/s of each and the ratios, at batch 1 and 8."""
    out = {}
    prompt_len = 16
    hf.eval()
    for batch in (1, 8):
        prompt = torch.randint(3, model.config.vocab_size, (batch, prompt_len), device=rt.device)

        def theirs():
            with rt.autocast():
                hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        hf_impl = _fastest_hf_experts(hf, theirs, rt, 1, "generate")
        times = _time_alternating({"h64lm": _decoding(model, prompt, new_tokens, rt, compile=False),
                                   "h64lm_compiled": _decoding(model, prompt, new_tokens, rt, compile=True),
                                   "transformers": theirs}, max(3, repeats // 2), rt.device)
        suffix = "" if batch == 1 else f"_batch{batch}"
        out[f"hf_decode_experts_implementation{suffix}"] = hf_impl
        for name, key in (("h64lm", "decode"), ("h64lm_compiled", "decode_compiled"), ("transformers", "hf_decode")):
            out[f"{key}_tokens_per_s{suffix}"] = batch * new_tokens / _median(times[name])
        out[f"decode_speedup_vs_hf{suffix}"], *out[f"decode_speedup_vs_hf{suffix}_spread"] = _ratio(
            times, "transformers", "h64lm")
        out[f"decode_compiled_speedup_vs_hf{suffix}"], *out[f"decode_compiled_speedup_vs_hf{suffix}_spread"] = _ratio(
            times, "transformers", "h64lm_compiled")
    return out


# --- The speed targets -----------------------------------------------------------------------------------------------

def graph_breaks(config: H64LMConfig, batch_size: int = 2, seq_len: int = 32) -> list[str]:
    """Why torch.compile would split a training step of this model (forward with the loss; the backward is traced
    from the same graph): an empty list when it captures it whole."""
    model = H64LM(config)
    x = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1))
    explanation = torch._dynamo.explain(model)(x[:, :-1], x[:, 1:])
    torch._dynamo.reset()
    return [str(b.reason).split("\n")[0] for b in explanation.break_reasons]


def bench_targets(device: str = "auto", precision: str = "auto", repeats: int = 5, decode_tokens: int = 32,
                  log=print) -> dict:
    """Measure each of SPEED_TARGETS on its shape, in one process, and say which are met."""
    rt = h64lm.setup_runtime(device, precision)
    log("graph breaks in the tiny model's training step")
    breaks = graph_breaks(H64LMConfig.from_preset("tiny"))
    log("one MoE layer over a dense SwiGLU, h64lm shape, 1,024 tokens")
    r = {"graph_breaks": len(breaks), "graph_break_reasons": breaks, "repeats": repeats,
         # three times the repeats: half a second each, and this ratio moves most on a busy machine
         "moe_h64lm": h64lm.moe_overhead(H64LMConfig.from_preset("h64lm"), 1024, rt, 3 * repeats)}
    log("training step and decoding, small shape, against transformers' Mixtral")
    r["small"] = compare_hf("small", device, precision, repeats=repeats, decode_tokens=decode_tokens)
    log("training step with compile_blocks against eager, small shape")
    r["compile_blocks"] = compile_gain(H64LMConfig.from_preset("small"), rt, repeats)
    log("decoding, tiny shape, against transformers' Mixtral")
    torch.manual_seed(0)
    config = H64LMConfig.from_preset("tiny", moe_layers="all", attention_type="rope")
    model, hf = H64LM(config).to(rt.device), mixtral_like(config).to(rt.device)
    r["tiny"] = hf_decode_bench(model, hf, rt, decode_tokens, repeats)
    r["device"], r["dtype"] = r["small"]["device"], r["small"]["dtype"]
    r["targets"] = targets_met(r)
    return r


def targets_met(r: dict) -> dict[str, bool]:
    """Which SPEED_TARGETS the medians in bench_targets' figures r meet."""
    decode = [r[p][f"decode_compiled_speedup_vs_hf{s}"] for p in ("tiny", "small") for s in ("", "_batch8")]
    return {"decode_vs_transformers": min(decode) >= SPEED_TARGETS["decode_vs_transformers"],
            "moe_layer_over_dense": r["moe_h64lm"]["moe_overhead"] <= SPEED_TARGETS["moe_layer_over_dense"],
            "train_step_vs_transformers": r["small"]["speedup_vs_hf"] >= SPEED_TARGETS["train_step_vs_transformers"],
            "graph_breaks": r["graph_breaks"] <= SPEED_TARGETS["graph_breaks"]}


def compile_gain(config: H64LMConfig, rt: Runtime, repeats: int, batch_size: int = 4) -> dict:
    """A training step's time eager over its time with compile_blocks, same weights and batch, in alternation."""
    torch.manual_seed(0)
    eager = H64LM(config).to(rt.device)
    compiled = copy.deepcopy(eager)
    h64lm.compile_blocks(compiled)
    seq_len = config.max_position_embeddings
    x = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), device=rt.device)
    ids, targets = x[:, :-1], x[:, 1:]
    fns = {name: _train_step_fn(model, ids, rt, lambda m, _: m(ids, targets).loss)
           for name, model in (("eager", eager), ("compiled", compiled))}
    times = _time_alternating(fns, repeats, rt.device)
    gain, *spread = _ratio(times, "eager", "compiled")
    torch._dynamo.reset()
    return {"batch_size": batch_size, "seq_len": seq_len, "eager_step_seconds": _median(times["eager"]),
            "compiled_step_seconds": _median(times["compiled"]), "speedup": gain, "speedup_spread": spread}


def targets_report(r: dict) -> str:
    def spread(figures: dict, key: str) -> str:
        low, high = figures[f"{key}_spread"]
        return f"{figures[key]:.2f}x ({low:.2f}-{high:.2f})"
    met = {name: "met" if ok else "NOT MET" for name, ok in r["targets"].items()}
    n = r["repeats"]
    lines = [f"device {r['device']}, {r['dtype']}; each ratio the median over repeats timed in alternation ({n}; "
             f"{3 * n} for the MoE layer, {max(3, n // 2)} for decoding), lowest-highest in brackets",
             f"  graph breaks, tiny training step        {r['graph_breaks']}   target 0: {met['graph_breaks']}"]
    lines += [f"    {reason}" for reason in r["graph_break_reasons"]]
    lines.append(f"  MoE layer / dense SwiGLU, h64lm shape   {spread(r['moe_h64lm'], 'moe_overhead')}   target <= "
                 f"{SPEED_TARGETS['moe_layer_over_dense']}x: {met['moe_layer_over_dense']}")
    lines.append(f"  training step / transformers, small     {spread(r['small'], 'speedup_vs_hf')}   target >= "
                 f"{SPEED_TARGETS['train_step_vs_transformers']}x: {met['train_step_vs_transformers']}")
    c = r["compile_blocks"]
    lines.append(f"  training step, compile_blocks, small    {spread(c, 'speedup')} faster than eager "
                 f"({c['compiled_step_seconds']:.2f} vs {c['eager_step_seconds']:.2f} s, batch {c['batch_size']} x "
                 f"{c['seq_len']})")
    for preset in ("tiny", "small"):
        for suffix, batch in (("", 1), ("_batch8", 8)):
            d = r[preset]
            compiled, eager = f"decode_compiled_speedup_vs_hf{suffix}", f"decode_speedup_vs_hf{suffix}"
            lines.append(f"  decoding, {preset:5} batch {batch}   compiled {spread(d, compiled)}, eager "
                         f"{spread(d, eager)}  ({d[f'decode_compiled_tokens_per_s{suffix}']:,.0f} / "
                         f"{d[f'decode_tokens_per_s{suffix}']:,.0f} vs {d[f'hf_decode_tokens_per_s{suffix}']:,.0f} "
                         "tokens/s)")
    lines.append(f"  decoding target >= {SPEED_TARGETS['decode_vs_transformers']}x everywhere, compiled: "
                 f"{met['decode_vs_transformers']}")
    return "\n".join(lines)


# --- Tokenizing ------------------------------------------------------------------------------------------------------

def tokenize_throughput(data: str = "sample", tokenizer_path: str | Path = h64lm.DEFAULT_TOKENIZER) -> dict:
    """Tokens per second of tokenize_documents + packing on the train split of `data`, cache bypassed."""
    tokenizer = h64lm.load_tokenizer(tokenizer_path)
    docs = list(h64lm.documents(h64lm.open_text_source(data).read("train")))
    start = time.perf_counter()
    tokens = h64lm.tokenize_documents(docs, tokenizer, desc="tokenizing")
    h64lm.PackedWindows(tokens, 1024)
    seconds = time.perf_counter() - start
    return {"tokenize_tokens": int(len(tokens)), "tokenize_seconds": seconds,
            "tokenize_tokens_per_s": len(tokens) / seconds}


# --- Muon against AdamW --------------------------------------------------------------------------------------------

def train_step_times(setups: dict[str, tuple[H64LMConfig, dict]], preset: str, batch_size: int, repeats: int,
                     rt: Runtime) -> dict[str, list[float]]:
    """Seconds of train_step, the very step `train` takes (forward, backward, clipping, the optimizer), for each
    name -> (model, changes to the preset's recipe), on the bundled sample, timed in alternation."""
    steps = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (config, changes) in setups.items():
            tc = h64lm.TrainConfig(**{**h64lm.TRAIN_RECIPES[preset], "batch_size": batch_size, "max_steps": repeats + 1,
                                      **changes}, data="sample", device=rt.device.type)
            run = h64lm.start_run(config, tc, rt, Path(folder) / name, log=lambda *a: None)
            steps[name] = lambda run=run: h64lm.train_step(run, run.step)
        return _time_alternating(steps, repeats, rt.device)


def optimizer_cost(preset: str = "tiny", batch_size: int = 8, repeats: int = 10, moe_layers: str | None = None,
                   device: str = "auto") -> dict:
    """Seconds of train_step with Muon and with AdamW, the preset's recipe otherwise, timed in alternation; the
    ratio Muon / AdamW as _ratio takes it."""
    rt = h64lm.setup_runtime(device)
    config = H64LMConfig.from_preset(preset, **({"moe_layers": moe_layers} if moe_layers else {}))
    times = train_step_times({name: (config, {"optimizer": name}) for name in ("muon", "adamw")}, preset, batch_size,
                             repeats, rt)
    ratio, low, high = _ratio(times, "muon", "adamw")
    return {"preset": preset, "moe_layers": config.moe_layers, "batch_size": batch_size,
            "muon_seconds": _median(times["muon"]), "adamw_seconds": _median(times["adamw"]),
            "muon_over_adamw": ratio, "muon_over_adamw_spread": [low, high], "threads": torch.get_num_threads()}


def optimizer_report(r: dict) -> str:
    low, high = r["muon_over_adamw_spread"]
    return (f"{r['preset']}, MoE layers {r['moe_layers']}, batch {r['batch_size']}, {r['threads']} threads: "
            f"train_step {r['muon_seconds']:.3f} s with Muon, {r['adamw_seconds']:.3f} s with AdamW -> Muon costs "
            f"{r['muon_over_adamw']:.2f}x (repeats {low:.2f}-{high:.2f})")


# --- MoE against its dense twin ------------------------------------------------------------------------------------

def moe_step_cost(preset: str = "lab", batch_size: int = 8, repeats: int = 10, device: str = "auto") -> dict:
    """Seconds of train_step with the preset's recipe for its dense twin, the preset's MoE (every layer MoE) and
    the same experts split four ways (fine_grained, g = 4: four times the experts, a quarter as wide, four times
    the top-k): equal active FLOPs, timed in alternation; each over dense as _ratio takes it."""
    rt = h64lm.setup_runtime(device)
    base = H64LMConfig.from_preset(preset, moe_layers="all")
    fine = h64lm.fine_grained(base, 4)
    setups = {"dense": (h64lm.dense_twin(base), {}), f"{base.num_experts} experts": (base, {}),
              f"{fine.num_experts} experts": (fine, {})}
    times = train_step_times(setups, preset, batch_size, repeats, rt)
    return {"preset": preset, "batch_size": batch_size, "threads": torch.get_num_threads(),
            "optimizer": h64lm.TRAIN_RECIPES[preset].get("optimizer", "adamw"),
            "seconds": {name: _median(t) for name, t in times.items()},
            "over_dense": {name: _ratio(times, name, "dense") for name in times if name != "dense"}}


def moe_step_report(r: dict) -> str:
    lines = [f"{r['preset']}, batch {r['batch_size']}, {r['threads']} threads, {r['optimizer']}: train_step "
             f"{r['seconds']['dense']:.3f} s dense"]
    for name, (ratio, low, high) in r["over_dense"].items():
        lines.append(f"  {name:<11} {r['seconds'][name]:.3f} s -> {ratio:.2f}x dense (repeats {low:.2f}-{high:.2f})")
    return "\n".join(lines)


def hf_cache_speed(ckpt: str | Path = h64lm.ROOT / "checkpoints" / "demo", new_tokens: int = 200,
                   repeats: int = 3, prompt: str = "The history of the city begins") -> dict:
    """The model of ckpt exported for transformers (export --format hf, a temporary folder) and loaded as
    transformers loads it, then greedy generate() of new_tokens with its KV cache and without, in alternation:
    seconds of each and uncached over cached, and whether both wrote the same tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        h64lm.export_transformers(ckpt, folder)
        hf = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        ids = AutoTokenizer.from_pretrained(folder)(prompt, return_tensors="pt").input_ids
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    times, outputs = {"cached": [], "uncached": []}, {}
    for _ in range(repeats + 1):  # the first round warms up
        for name in times:
            started = time.perf_counter()
            outputs[name] = hf.generate(ids, use_cache=name == "cached", **options)
            times[name].append(time.perf_counter() - started)
    times = {name: t[1:] for name, t in times.items()}
    return {"checkpoint": str(ckpt), "prompt_tokens": ids.shape[1], "new_tokens": new_tokens,
            "threads": torch.get_num_threads(), "seconds": {name: _median(t) for name, t in times.items()},
            "uncached_over_cached": _ratio(times, "uncached", "cached"),
            "same_tokens": torch.equal(outputs["cached"], outputs["uncached"])}


def hf_cache_report(r: dict) -> str:
    ratio, low, high = r["uncached_over_cached"]
    return (f"{r['checkpoint']}, greedy generate() of {r['new_tokens']} tokens after {r['prompt_tokens']}, "
            f"{r['threads']} threads: {r['seconds']['cached']:.2f} s with the cache, {r['seconds']['uncached']:.2f} s "
            f"without: {ratio:.1f}x (repeats {low:.1f}-{high:.1f}); the same tokens: {r['same_tokens']}")


# --- The report and the command line --------------------------------------------------------------------------------

def bench_report(r: dict) -> str:
    """h64lm's bench report, or with --compare-hf the comparison's, then the tokenizer's line with --tokenize."""
    lines = [compare_report(r) if "speedup_vs_hf" in r else h64lm.bench_report(r)]
    if "tokenize_tokens_per_s" in r:
        lines.append(f"  tokenizing + packing {r['tokenize_tokens_per_s']:,.0f} tokens/s ({r['tokenize_tokens']:,} "
                     f"tokens in {r['tokenize_seconds']:.2f} s)")
    return "\n".join(lines)


def compare_report(r: dict) -> str:
    lines = h64lm.bench_report(r, " (all-MoE, RoPE: Mixtral form)", decoding=False).splitlines()
    low, high = r["speedup_vs_hf_spread"]
    lines.append(f"  transformers Mixtral {r['hf_tokens_per_s']:,.0f} tokens/s ({r['hf_experts_implementation']} "
                 f"experts) -> H64LM is {r['speedup_vs_hf']:.2f}x (repeats {low:.2f}-{high:.2f})")
    for suffix, batch in (("", 1), ("_batch8", 8)):
        lines.append(f"  decode, batch {batch}      eager {r[f'decode_tokens_per_s{suffix}']:,.0f}, compiled "
                     f"{r[f'decode_compiled_tokens_per_s{suffix}']:,.0f} vs "
                     f"{r[f'hf_decode_tokens_per_s{suffix}']:,.0f} tokens/s -> "
                     f"{r[f'decode_speedup_vs_hf{suffix}']:.2f}x, "
                     f"{r[f'decode_compiled_speedup_vs_hf{suffix}']:.2f}x")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = h64lm.Parser(prog="python -m tests.speed", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                     description="The developers' speed checks: H64LM against transformers' Mixtral, the speed "
                                 "targets, tokenizer throughput. The flags bench shares are bench's.")
    p.add_argument("--targets", action="store_true",
                   help="measure the speed targets on their shapes (graph breaks in the tiny training step; MoE "
                        "layer over dense at the h64lm shape; training step and decoding against transformers' "
                        "Mixtral at the small shape, decoding at the tiny shape) and say which are met; --json "
                        "gives the figures with a 'targets' object of booleans. --preset and the size flags are "
                        "ignored")
    p.add_argument("--compare-hf", action="store_true",
                   help="bench in Mixtral's form (every layer MoE, RoPE only) with transformers' MixtralForCausalLM "
                        "of the same shape timed in alternation: --json adds hf_tokens_per_s, speedup_vs_hf, "
                        "hf_decode_tokens_per_s, decode_speedup_vs_hf, decode_compiled_speedup_vs_hf (and _batch8), "
                        "hf_experts_implementation")
    p.add_argument("--tokenize", action="store_true", help="also time tokenizing and packing the sample's train "
                   "split, cache bypassed (key tokenize_tokens_per_s)")
    p.add_argument("--optimizers", action="store_true", help="time train_step with Muon and with AdamW in "
                   "alternation (the preset's recipe otherwise, on the bundled sample; --batch-size, --repeats and "
                   "--moe-layers apply)")
    p.add_argument("--moe-steps", action="store_true", help="time train_step of the preset's dense twin, its MoE "
                   "(every layer) and the same experts split four ways, at equal active FLOPs, in alternation (the "
                   "preset's recipe, on the bundled sample; use --preset lab; --batch-size and --repeats apply)")
    p.add_argument("--hf-cache", action="store_true", help="greedy generate() of the demo exported for "
                   "transformers, --decode-tokens new tokens, with its KV cache and without (--repeats of each)")
    p.add_argument("--moe-layers", default=None,
                   help="with --optimizers: override the preset's (odd, even, all, none or indices like 1,3)")
    p.add_argument("--preset", choices=h64lm.PRESETS, default="tiny")
    p.add_argument("--device", default="auto", choices=h64lm.DEVICES)
    p.add_argument("--precision", default="auto", choices=h64lm.PRECISIONS, help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--seq-len", type=h64lm.number_flag(COUNT), default=None,
                   help="tokens per sequence; default: the preset's recipe")
    p.add_argument("--batch-size", type=h64lm.number_flag(COUNT), default=8)
    p.add_argument("--repeats", type=h64lm.number_flag(COUNT), default=10, help="timed repeats of each ratio")
    p.add_argument("--decode-tokens", type=h64lm.number_flag(COUNT), default=32,
                   help="new tokens per decode measurement")
    p.add_argument("--compile", action="store_true", help="compile each block of H64LM's training step")
    p.add_argument("--attn-impl", choices=h64lm.ATTENTION_IMPLS, default=None, help="override the preset's")
    p.add_argument("--moe-impl", choices=h64lm.MOE_IMPLS, default=None, help="override the preset's")
    p.add_argument("--loss-impl", choices=h64lm.LOSS_IMPLS, default=None, help="override the preset's")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.targets or args.compare_hf or args.tokenize or args.optimizers or args.moe_steps or args.hf_cache):
        parser.error("say what to measure: --targets, --compare-hf, --tokenize, --optimizers, --moe-steps or "
                     "--hf-cache (`python h64lm.py bench` times H64LM alone)")
    h64lm.keep_freed_memory()  # as h64lm.py's command line does, for both models alike
    try:
        if args.targets:
            result = bench_targets(args.device, args.precision, args.repeats, args.decode_tokens,
                                   log=lambda text: print(text, file=sys.stderr))
            print(json.dumps(result) if args.json else targets_report(result))
            return 0
        if args.hf_cache:
            result = hf_cache_speed(new_tokens=args.decode_tokens, repeats=args.repeats)
            print(json.dumps(result) if args.json else hf_cache_report(result))
            return 0
        if args.moe_steps:
            result = moe_step_cost(args.preset, args.batch_size, args.repeats, args.device)
            print(json.dumps(result) if args.json else moe_step_report(result))
            return 0
        if args.optimizers:
            result = optimizer_cost(args.preset, args.batch_size, args.repeats, args.moe_layers, args.device)
            print(json.dumps(result) if args.json else optimizer_report(result))
            return 0
        overrides = {name: getattr(args, name) for name in ("attn_impl", "moe_impl", "loss_impl")
                     if getattr(args, name)}
        measure = compare_hf if args.compare_hf else h64lm.bench
        result = measure(args.preset, args.device, args.precision, args.seq_len, args.batch_size, args.repeats,
                         args.decode_tokens, args.compile, **overrides)
        if args.tokenize:
            result.update(tokenize_throughput())
        print(json.dumps(result) if args.json else bench_report(result))
        return 0
    except Exception as e:
        if args.debug:
            raise
        print(f"error: {h64lm.one_sentence(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
