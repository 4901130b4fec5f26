"""The GPU run's second pass (issue 33): seven defects a first run on an H100 or on 8 GPUs would hit, each found by
reading torch's sources and each shown here on the CPU twin torch offers (defect 6, the doctor under torchrun, is in
test_doctor.py); then compiling by default on CUDA, CUDA graphs for decoding, and bench's eager decoding. Every test
failed on the code before its fix."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import h64lm


def default_shape(**overrides) -> h64lm.H64LMConfig:
    """The h64lm preset's layout (12 query / 4 KV heads, top-2 of 8 on odd layers, rope+alibi) at a CPU test's width."""
    return h64lm.H64LMConfig.from_preset("h64lm", **{
        "vocab_size": 256, "max_position_embeddings": 64, "hidden_size": 96, "num_layers": 2,
        "intermediate_size": 128, "expert_intermediate_size": 64, **overrides})


def sdpa_spy(monkeypatch) -> list[tuple[torch.dtype, torch.dtype | None]]:
    """Record the dtypes of the query and of the mask that every call of SDPA is handed."""
    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q.dtype, None if attn_mask is None else attn_mask.dtype))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)
    monkeypatch.setattr(h64lm.F, "scaled_dot_product_attention", spy)
    return calls


# --- 1. bf16 weights without autocast: the ALiBi bias in the query's dtype -------------------------------------

@pytest.mark.parametrize("attention_type,window", [("rope+alibi", None), ("alibi", 8)])
@pytest.mark.parametrize("how", ["bf16 weights", "bf16 autocast"])
def test_sdpa_is_handed_an_alibi_bias_in_the_querys_dtype(monkeypatch, attention_type, window, how):
    # CUDA's memory-efficient kernel raises "invalid dtype for bias" on a float32 bias beside bf16 queries, and
    # cuDNN's reads it as bf16 (a wrong result); the CPU's flash kernel takes both, so the call is what is checked.
    calls = sdpa_spy(monkeypatch)
    torch.manual_seed(0)
    model = h64lm.H64LM(default_shape(attention_type=attention_type, sliding_window=window, loss_impl="plain"))
    ids = torch.randint(0, 256, (2, 24))
    if how == "bf16 weights":  # the exported model loaded in bf16, or model.bfloat16()
        reference = model(ids).logits
        logits = model.bfloat16()(ids).logits
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids).logits
        reference = model(ids).logits
    bf16_calls = [c for c in calls if c[0] == torch.bfloat16]
    assert bf16_calls and all(mask == torch.bfloat16 for _, mask in bf16_calls), bf16_calls
    assert (logits.float() - reference).abs().max() < 0.1 * reference.abs().max()


# --- 5. fp16: the grouped GEMM in bf16, not the per-expert loop with its host syncs ------------------------------

def test_fp16_experts_take_the_grouped_kernel_in_bf16_and_not_the_loop(monkeypatch):
    # The gate, with a stand-in for a CUDA tensor (it reads only these attributes), says bf16 for fp16 on an H100.
    import types
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    x = types.SimpleNamespace(is_cuda=True, dtype=torch.float16, shape=(32, 64), device="cuda:0")
    w = types.SimpleNamespace(is_cuda=True, dtype=torch.float16, shape=(8, 64, 64), device="cuda:0")
    assert h64lm.native_grouped_mm(x, w) == torch.bfloat16
    # Then an fp16 MoE layer on this CPU, whose torch._grouped_mm runs in bf16 as a GPU's does: the loop is never
    # called, the output is fp16, and it equals the loop's, forward and backward, to bf16's rounding.
    monkeypatch.setattr(h64lm, "native_grouped_mm",
                        lambda x, w: torch.bfloat16 if x.dtype in (torch.float16, torch.bfloat16) else None)
    torch.manual_seed(0)
    config = default_shape(moe_layers="all", num_layers=1)
    grouped = h64lm.MoE(config)
    looped = h64lm.MoE(dataclasses.replace(config, moe_impl="loop"))
    looped.load_state_dict(grouped.state_dict())
    x, probe = torch.randn(2, 32, config.hidden_size), torch.randn(2, 32, config.hidden_size)
    results = {}
    for name, layer in (("grouped", grouped), ("loop", looped)):
        inputs = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16):
            y, _, _ = layer(inputs)
        (y.float() * probe).sum().backward()
        results[name] = (y, inputs.grad, layer.w_up.grad)
    called = []
    monkeypatch.setattr(h64lm, "grouped_mm_loop", lambda *a: called.append(a))
    with torch.autocast("cpu", dtype=torch.float16):
        grouped(x)[0].float().sum()
    assert not called
    ends = torch.tensor([3, 6], dtype=torch.int32)
    assert h64lm.grouped_mm(torch.randn(6, 16).half(), torch.randn(2, 16, 8).half(), ends).dtype == torch.float16
    for g, l in zip(results["grouped"], results["loop"]):
        assert g.isfinite().all()
        assert (g.float() - l.float()).abs().max() <= 2e-2 * l.float().abs().max()


# --- 7. FSDP2 leaves the RoPE tables in float32 ------------------------------------------------------------------

SHARDED_TABLES_SCRIPT = """
import sys
import torch, torch.distributed as dist
import h64lm
dist.init_process_group("gloo")
rt = h64lm.Runtime(device=torch.device("cpu"), rank=dist.get_rank(), world_size=2, dtype=torch.bfloat16)
torch.manual_seed(0)
model = h64lm.H64LM(h64lm.H64LMConfig.from_preset("tiny", vocab_size=256, num_layers=2))
seen = []
for block in model.blocks:
    block.register_forward_pre_hook(lambda module, args: seen.append(str(args[1][0].dtype)))
h64lm.shard_model(model, rt, h64lm.fsdp_policy("cuda", torch.bfloat16))  # CUDA's bf16 policy, forced on gloo
with rt.autocast():
    model(torch.randint(0, 256, (1, 16)), torch.randint(0, 256, (1, 16))).loss.backward()
print("rank", rt.rank, "block rope tables", ",".join(seen))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_a_sharded_block_rotates_with_float32_rope_tables(tmp_path):
    # MixedPrecisionPolicy's cast_forward_inputs=True (its default) cast every floating input of a block to bf16,
    # the RoPE tables with them, so a sharded run rotated with bf16-rounded angles where DDP uses float32.
    import subprocess
    import sys
    from conftest import PROCESS_ENV, REPO
    script = tmp_path / "tables.py"
    script.write_text(SHARDED_TABLES_SCRIPT)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**PROCESS_ENV, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "block rope tables" in line]
    assert len(lines) == 2 and all(line.endswith("torch.float32,torch.float32") for line in lines), result.stdout


# --- 3. doctor names the kernel a call takes, not the one torch's order named before any call -------------------

def test_the_doctor_names_the_kernel_the_call_takes_not_the_order_read_before_it(monkeypatch):
    # On Hopper torch moves cuDNN to the front of its order lazily, at the first call; stand in for that with an
    # order that puts the math kernel first, which no call here takes: the flash kernel serves every type on a CPU.
    from torch.nn.attention import SDPBackend
    order = [int(SDPBackend.MATH), int(SDPBackend.FLASH_ATTENTION), int(SDPBackend.EFFICIENT_ATTENTION),
             int(SDPBackend.CUDNN_ATTENTION), int(SDPBackend.OVERRIDEABLE)]
    monkeypatch.setattr(torch._C, "_get_sdp_priority_order", lambda: order)
    rt = h64lm.Runtime(device=torch.device("cpu"))
    config = h64lm.doctor_config(h64lm.H64LMConfig.from_preset("tiny"))
    rows = h64lm.attention_kernel_rows(config, rt)
    assert [row["kernel"] for row in rows] == ["flash"] * 3, rows
    assert all(row["passed"] for row in rows)


def test_the_kernel_taken_is_read_from_the_call(monkeypatch):
    # The reading can fail: SDPA held to the math kernel is seen as math.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rt = h64lm.Runtime(device=torch.device("cpu"))
    model = h64lm.H64LM(h64lm.doctor_config(h64lm.H64LMConfig.from_preset("tiny")))
    ids = torch.randint(0, 512, (1, 32))
    assert h64lm.sdpa_kernel_taken(model, ids, rt) == "flash"
    with sdpa_kernel([SDPBackend.MATH]):
        assert h64lm.sdpa_kernel_taken(model, ids, rt) == "unfused math"


# --- 2. FlexAttention: ALiBi as a score_mod, causality, window and padding as a BlockMask ------------------------

# FlexAttention's forward against plain attention, with left padding, a window and GQA, is compared on the CPU in
# tests/gpu_first_run.py's quick run (test_gpu_first_run.py), which compiles it anyway; its backward on the GPU.

def test_flex_attention_refuses_to_train_on_a_cpu_in_one_sentence():
    config = h64lm.H64LMConfig.from_preset("tiny", vocab_size=256, num_layers=2, attn_impl="flex")
    ids = torch.randint(0, 256, (2, 24))
    with pytest.raises(h64lm.H64LMError, match="trains on CUDA only"):
        h64lm.H64LM(config)(ids, ids)


def test_training_with_flex_attention_on_a_cpu_is_refused_before_anything_is_written(tmp_path, capsys):
    argv = ["train", "--preset", "tiny", "--attn-impl", "flex", "--device", "cpu", "--out-dir", str(tmp_path / "o")]
    assert h64lm.main(argv) == 2
    assert "attn_impl='flex' trains on CUDA only" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --- 4. The chunked loss's elementwise passes, compiled on a GPU -------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # bf16 is fp16's path with a wider range
def test_the_compiled_chunk_loss_equals_cross_entropy_in_values_and_gradients(monkeypatch, dtype):
    # CUDA's path, compiled on this CPU: chunks that do not divide the rows, ignored targets, and each autocast
    # dtype (fp16 through a gradient scaler, whose factor must reach p / n before fp16 does).
    monkeypatch.setattr(h64lm, "COMPILED_LOSS_DEVICES", ("cpu",))
    monkeypatch.setattr(h64lm, "_chunk_rows", lambda device, vocab_size: 48)
    compiled = []
    chunk_loss = h64lm.compiled_chunk_loss()
    monkeypatch.setattr(h64lm, "compiled_chunk_loss", lambda: lambda *a: compiled.append(1) or chunk_loss(*a))
    torch.manual_seed(0)
    N, D, V = 200, 16, 3000
    x = torch.randn(N, D, requires_grad=True)
    weight = (torch.randn(V, D) * 0.5).requires_grad_()
    targets = torch.randint(0, V, (N,))
    targets[::5] = -100
    reference = F.cross_entropy(F.linear(x.double(), weight.double()), targets, ignore_index=-100)
    ref_dx, ref_dw = torch.autograd.grad(reference, (x, weight))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, enabled=dtype == torch.float16)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = h64lm.linear_cross_entropy(x, weight, targets)
    scaler.scale(loss).backward()
    assert len(compiled) == 5  # 200 rows in chunks of 48
    dx, dw = x.grad / scaler.get_scale(), weight.grad / scaler.get_scale()
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2
    assert abs(loss.item() - reference.item()) <= tolerance * reference.item()
    assert (dw - ref_dw).norm() / ref_dw.norm() < tolerance
    assert (dx - ref_dx).norm() / ref_dx.norm() < tolerance


# --- Compiled decoding with CUDA graphs; bench's eager decoding left eager ----------------------------------------

@pytest.mark.slow
def test_compiled_decoding_in_cudas_mode_is_one_graph_without_breaks_or_recompiles_over_64_tokens(monkeypatch):
    # mode="reduce-overhead" (CUDA graphs) on this CPU, which compiles it and records no graph: one graph for 63
    # decoding steps, the eager tokens, for a batch with left padding.
    from torch._dynamo.utils import counters
    monkeypatch.setattr(h64lm, "CUDA_GRAPH_DEVICES", ("cpu",))
    modes = []
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: modes.append(kw.get("mode")) or compile_(fn, **kw))
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = h64lm.H64LM(h64lm.H64LMConfig.from_preset("tiny", vocab_size=256, num_layers=2))
    prompts = [torch.randint(3, 256, (n,)).tolist() for n in (5, 9)]
    eager = h64lm.generate(model, prompts, 64, temperature=0)
    counters.clear()
    assert h64lm.generate(model, prompts, 64, temperature=0, compile=True) == eager
    assert modes == ["reduce-overhead"]
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters)
    torch._dynamo.reset()


def test_bench_compile_times_eager_decoding_on_blocks_not_compiled_for_training(monkeypatch):
    # bench --compile compiles the blocks in place for the training step; decoding through them recompiled them at
    # every new shape (a 16-token prompt, then one token with a growing cache), and timed the compiler as eager.
    seen = []
    monkeypatch.setattr(h64lm, "bench_step", lambda run: (lambda: None, 0))  # nothing compiles in this test
    monkeypatch.setattr(h64lm, "moe_overhead", lambda *a: {})
    monkeypatch.setattr(h64lm, "decode_bench", lambda model, rt, new, repeats, compile: seen.append(
        (compile, [block._compiled_call_impl is not None for block in model.blocks], model.state_dict())) or {})
    trained = []
    monkeypatch.setattr(h64lm, "step_figures", lambda model, *a: trained.append(model) or {})
    h64lm.bench("tiny", device="cpu", batch_size=1, seq_len=16, repeats=1, compile=True)
    (compile, compiled_blocks, weights), = seen
    assert compile and not any(compiled_blocks)
    assert all(block._compiled_call_impl is not None for block in trained[0].blocks)  # the step's, compiled
    for name, tensor in trained[0].state_dict().items():
        assert torch.equal(weights[name], tensor), name


# --- train compiles by default on CUDA, and says how long compiling took --------------------------------------------

@pytest.mark.parametrize("device,flag,compiled", [("cuda", None, True), ("cpu", None, False), ("cuda", "--no-compile",
                                                   False), ("cpu", "--compile", True)])
def test_train_compiles_by_default_on_cuda_and_not_on_a_cpu(device, flag, compiled):
    args = h64lm.build_parser().parse_args(["train", *([flag] if flag else [])])
    _, tc, *_ = h64lm.train_settings(args)
    assert h64lm.compiles(tc, h64lm.Runtime(device=torch.device(device))) is compiled


@pytest.mark.slow
def test_a_compiled_runs_first_step_reports_its_compile_time_on_its_own_line(corpus, tmp_path):
    from conftest import TINY_FLAGS, run_cli
    import json
    result = run_cli("train", *TINY_FLAGS, "--compile", "--data", corpus, "--out-dir", tmp_path, "--cache-dir",
                     tmp_path / "cache", "--batch-size", "2", "--max-steps", "3", "--eval-every", "3", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 1 compiled the blocks: " in result.stdout + result.stderr
    first, *rest = json.loads((tmp_path / "tiny" / "training_history.json").read_text())["train"]
    assert first["compile_seconds"] > 0 and "tokens_per_s" not in first and "mfu" not in first
    assert all(r["tokens_per_s"] > 0 and "compile_seconds" not in r for r in rest)
