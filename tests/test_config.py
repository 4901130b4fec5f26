"""The configuration: presets, derived values, sizes, and one clear error for each impossible combination."""

import subprocess
import sys

import pytest
import torch

import h64lm


def test_h64lm_preset_has_249m_parameters():
    config = h64lm.H64LMConfig.from_preset("h64lm")
    with torch.device("meta"):  # shapes only: no memory, no time
        model = h64lm.H64LM(config)
    total = model.num_params()
    assert abs(total - 249e6) / 249e6 < 0.01
    # Active: everything but 6 of the 8 experts in each of the 3 MoE layers, counted from the shapes by hand.
    expert = 3 * 768 * 3072
    assert model.num_params(active=True) == total - 3 * 6 * expert
    table = model.parameter_table()
    print(table)
    assert f"{total:,}" in table and f"{total - 3 * 6 * expert:,}" in table


def test_h64lm_preset_is_the_documented_model():
    c = h64lm.H64LMConfig.from_preset("h64lm")
    assert (c.vocab_size, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == \
        (32000, 768, 6, 12, 4, 64)
    assert (c.num_experts, c.num_experts_per_tok, c.expert_intermediate_size) == (8, 2, 3072)
    assert c.moe_layer_ids == (1, 3, 5) and not c.tie_word_embeddings
    assert c.attention_type == "rope+alibi" and c.use_rope and c.use_alibi


def test_every_preset_builds():
    for name in h64lm.PRESETS:
        with torch.device("meta"):
            model = h64lm.H64LM(h64lm.H64LMConfig.from_preset(name))
        assert model.num_params(active=True) < model.num_params()


def test_flops_per_token_is_six_n_active_plus_attention():
    config = h64lm.H64LMConfig.from_preset("h64lm")
    with torch.device("meta"):
        model = h64lm.H64LM(config)
    n = model.num_params(active=True) - 32000 * 768  # the embedding lookup does no multiply
    assert model.flops_per_token(1024) == 6 * n + 12 * 6 * 12 * 64 * 1024


def test_tied_embeddings_are_counted_once():
    base = dict(vocab_size=100, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=8,
                expert_intermediate_size=8)
    untied = h64lm.H64LM(h64lm.H64LMConfig(**base))
    tied = h64lm.H64LM(h64lm.H64LMConfig(**base, tie_word_embeddings=True))
    assert untied.num_params() - tied.num_params() == 100 * 16
    assert tied.lm_head.weight is tied.embed.weight


def test_config_round_trips_through_a_dict():
    config = h64lm.H64LMConfig.from_preset("tiny", sliding_window=32, moe_layers="1,2")
    assert h64lm.H64LMConfig(**config.to_dict()) == config
    assert config.moe_layer_ids == (1, 2)


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_size=770), "hidden_size .* divisible by num_heads"),
    (dict(num_kv_heads=5), "num_heads .* divisible by num_kv_heads"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok .* cannot exceed num_experts"),
    (dict(hidden_size=12 * 63), "head size .* must be even"),
    (dict(attention_type="nope"), "attention_type must be one of rope, alibi, rope\\+alibi"),
    (dict(sliding_window=0), "sliding_window must be an integer of at least 1"),
    (dict(capacity_factor=0.0), "capacity_factor must be a finite number above 0"),
    (dict(num_layers=0), "num_layers must be an integer of at least 1"),
    (dict(vocab_size=-3), "vocab_size must be an integer of at least 1"),
    (dict(moe_layers="1,9"), "names a layer outside 0..5"),
    (dict(moe_layers="odd-ish"), "moe_layers must be"),
    (dict(router_jitter_noise=1.5), "router_jitter_noise must be a finite number in \\[0, 1\\)"),
    (dict(rope_theta=float("nan")), "rope_theta must be a finite number above 0, got nan"),
    (dict(router_z_loss_coef=-1e-3), "router_z_loss_coef must be a finite number of at least 0"),
    (dict(hidden_size=2**70), "hidden_size must be an integer of at least 1 \\(below 2\\*\\*63\\)"),
    (dict(num_experts=2.5), "num_experts must be an integer"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings must be true or false"),
    (dict(attn_impl="flash"), "attn_impl must be one of"),
    (dict(moe_impl="fast"), "moe_impl must be one of"),
])
def test_invalid_configs_raise_one_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        h64lm.H64LMConfig(**overrides)


def test_odd_head_size_is_fine_without_rope():
    assert h64lm.H64LMConfig(hidden_size=12 * 63, attention_type="alibi").head_dim == 63


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="Unknown preset 'huge'; choose one of tiny, small, h64lm"):
        h64lm.H64LMConfig.from_preset("huge")


def test_importing_h64lm_has_no_side_effects(tmp_path):
    result = subprocess.run([sys.executable, "-c", "import h64lm"], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(__import__("pathlib").Path(h64lm.__file__).parent)})
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
    assert list(tmp_path.iterdir()) == []
