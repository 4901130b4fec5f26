"""The routing lab's shape: its own BPE tokenizer (bpe:N), the lab preset's FLOPs split, and a lab run that records
its tokenizer so that eval and generate find it."""

import json
import math

import pytest
import torch

import h64lm
from conftest import run_cli


def test_a_bpe_is_trained_once_and_encodes_as_the_mistral_tokenizer_does(corpus, tmp_path):
    said = []
    folder = h64lm.tokenizer_folder("bpe:300", str(corpus), tmp_path, log=said.append)
    assert sum("training a byte-level BPE of 300 tokens" in line for line in said) == 1
    assert h64lm.tokenizer_folder("bpe:300", str(corpus), tmp_path, log=said.append) == folder
    assert sum("training" in line for line in said) == 1  # the second time it is read from the cache
    bpe, mistral = h64lm.load_tokenizer(folder), h64lm.load_tokenizer()
    assert len(bpe) == 300
    for name in ("unk_token_id", "bos_token_id", "eos_token_id"):  # the same special tokens at the same ids
        assert getattr(bpe, name) == getattr(mistral, name)
    text = " = Valkyria Chronicles = \n The café's 日本語 price: $5 <s> and </s> stay text\n"
    ids = bpe(text, add_special_tokens=True, split_special_tokens=True)["input_ids"]
    assert ids[0] == bpe.bos_token_id and bpe.bos_token_id not in ids[1:] and bpe.eos_token_id not in ids
    assert bpe.decode(ids, skip_special_tokens=True) == text  # byte-level: every text comes back exactly


def test_the_same_text_gives_the_same_bpe(corpus, tmp_path):
    one = h64lm.tokenizer_folder("bpe:300", str(corpus), tmp_path / "one", log=lambda *a: None)
    two = h64lm.tokenizer_folder("bpe:300", str(corpus), tmp_path / "two", log=lambda *a: None)
    assert one.name == two.name
    assert h64lm.tokenizer_fingerprint(h64lm.load_tokenizer(one)) == \
        h64lm.tokenizer_fingerprint(h64lm.load_tokenizer(two))


@pytest.mark.parametrize("spec", ["bpe:12", "bpe:lots", "bpe:70000", "bpe:"])
def test_a_bpe_vocabulary_outside_its_range_is_refused_in_one_sentence(spec):
    with pytest.raises(ValueError, match="(?i)bpe"):
        h64lm.bpe_vocab(spec)


def test_the_lab_costs_what_tiny_costs_with_its_compute_in_the_blocks():
    lab, tiny = (h64lm.H64LM(h64lm.H64LMConfig.from_preset(name)) for name in ("lab", "tiny"))
    config = lab.config
    assert abs(lab.flops_per_token(128) / tiny.flops_per_token(128) - 1) < 0.02  # ~32M training FLOPs a token
    # The LM head's matmul by hand (6 FLOPs per weight per token: forward, and backward for inputs and weights).
    head = 6 * config.vocab_size * config.hidden_size
    assert (lab.flops_per_token(128) - head) / lab.flops_per_token(128) >= 0.75
    assert "80% in the blocks, 20% in the LM head" in lab.parameter_table(128)
    assert "23% in the blocks, 77% in the LM head" in tiny.parameter_table(128)
    # Its dense twin spends the same FLOPs in one SwiGLU of 1,024, the width the measurement used.
    assert h64lm.dense_twin(config).intermediate_size == 1024
    assert h64lm.TRAIN_RECIPES["lab"]["tokenizer"] == "bpe:4096"


def test_a_checkpoint_records_its_tokenizer_where_the_project_finds_it_again(tmp_path):
    assert h64lm.portable_path(h64lm.ROOT / "data" / "cache" / "bpe") == "data/cache/bpe"
    assert h64lm.portable_path(tmp_path) == str(tmp_path.resolve())
    assert h64lm.recorded_tokenizer({"tokenizer": "mistral_tokenizer"}, tmp_path) == h64lm.DEFAULT_TOKENIZER
    assert h64lm.recorded_tokenizer({}, tmp_path) == h64lm.DEFAULT_TOKENIZER  # from before checkpoints recorded it
    with pytest.raises(h64lm.H64LMError, match=r"trained with the tokenizer in .*gone, which is not there; point "):
        h64lm.recorded_tokenizer({"tokenizer": str(tmp_path / "gone")}, tmp_path / "best.pt")


@pytest.mark.slow
def test_a_lab_run_records_its_bpe_and_eval_and_generate_use_it(corpus, tmp_path):
    common = ["--data", corpus, "--cache-dir", tmp_path / "cache", "--out-dir", tmp_path]
    result = run_cli("train", "--preset", "lab", "--tokenizer", "bpe:300", "--vocab-size", "300", "--hidden-size",
                     "64", "--num-heads", "2", "--num-kv-heads", "1", "--expert-intermediate-size", "32",
                     "--max-steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-every", "2",
                     "--eval-batches", "1", *common)
    assert result.returncode == 0, result.stderr
    assert "% in the blocks" in result.stdout
    ckpt = h64lm.read_checkpoint(tmp_path / "lab" / "latest.pt")
    folder = h64lm.ROOT / ckpt["tokenizer"]
    assert folder.parent == (tmp_path / "cache").resolve() and ckpt["tokenizer_vocab"] == 300

    scored = run_cli("eval", "--ckpt", tmp_path / "lab", "--json", "--cache-dir", tmp_path / "cache")
    assert scored.returncode == 0, scored.stderr
    score = json.loads(scored.stdout)
    assert math.isclose(score["word_ppl"], math.exp(score["nll"] / score["words"]))
    sampled = run_cli("generate", "--ckpt", tmp_path / "lab", "--prompt", "The", "--max-new-tokens", "3", "--seed", "0")
    assert sampled.returncode == 0, sampled.stderr
    # Another tokenizer is refused in one sentence, as for any checkpoint.
    refused = run_cli("eval", "--ckpt", tmp_path / "lab", "--tokenizer", h64lm.DEFAULT_TOKENIZER)
    assert refused.returncode == 2 and "32000 tokens but the model only 300" in refused.stderr
    # A study scores every run in words too, so that runs with different tokenizers compare.
    study = run_cli("compare", "--preset", "lab", "--tokenizer", "bpe:300", "--vocab-size", "300", "--hidden-size",
                    "64", "--num-heads", "2", "--num-kv-heads", "1", "--expert-intermediate-size", "32",
                    "--num-layers", "1", "--max-steps", "1", "--batch-size", "2", "--seq-len", "32", "--eval-every",
                    "1", "--eval-batches", "1", "--variants", "dense,aux_free", "--seeds", "1", "--run-name", "study",
                    *common)
    assert study.returncode == 0, study.stderr
    runs = json.loads((tmp_path / "study" / "compare.json").read_text())["runs"]
    assert all(r["valid_word_ppl"] > 1 for r in runs)
    assert "word perplexity" in (tmp_path / "study" / "compare.md").read_text()
    assert torch.isfinite(torch.tensor([r["valid_loss"] for r in runs])).all()


def test_the_expert_curve_puts_each_seed_at_its_expert_count_with_dense_as_a_line():
    def variant(E, moe_layers="all"):
        return {"spec": {}, "config": {"num_experts": E, "moe_layers": moe_layers}}
    runs = [{"variant": name, "seed": seed, "valid_loss": loss} for name, seed, loss in [
        ("dense", 1, 4.0), ("dense", 2, 4.2), ("e4", 1, 4.1), ("e4", 2, 4.3), ("e16", 1, 3.9), ("e16", 2, 3.7)]]
    result = {"seeds": [1, 2], "runs": runs, "variants": {"dense": variant(8, "none"), "e16": variant(16),
                                                          "e4": variant(4)}}
    ax = h64lm.expert_curve_figure(result).axes[0]
    mean = ax.lines[0]
    assert list(mean.get_xdata()) == [4, 16] and list(mean.get_ydata()) == pytest.approx([4.2, 3.8])
    assert ax.lines[1].get_ydata()[0] == pytest.approx(4.1)  # dense's mean, a horizontal line
    assert sorted(y for c in ax.collections[:2] for _, y in c.get_offsets()) == [3.7, 3.9, 4.1, 4.3]  # every seed
    band = ax.collections[2].get_paths()[0].vertices[:, 1]  # the MoE's band, from best to worst seed
    assert band.min() == pytest.approx(3.7) and band.max() == pytest.approx(4.3)
    assert ax.get_xscale() == "log"
    result["variants"].pop("e16")
    assert h64lm.expert_curve_figure(result) is None  # one expert count: no curve to draw
