"""H64LM configured like transformers' Mixtral, Mistral and Llama, with their weights copied in, gives their logits.

These are independent implementations: if our RoPE layout, GQA head grouping, RMSNorm, SwiGLU, router (softmax,
top-k, renormalisation), expert dispatch or sliding-window mask differed from theirs in any way, logits would differ.
"""

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig,
                          MixtralForCausalLM)
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

import h64lm
from conftest import small_config


def hf_kwargs(config: h64lm.H64LMConfig) -> dict:
    return dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
                num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
                max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
                rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
                tie_word_embeddings=False, attn_implementation="eager")


@torch.no_grad()
def copy_weights(hf_model, model: h64lm.H64LM) -> None:
    """Copy a transformers Llama/Mistral/Mixtral model's weights into an H64LM of the same shape."""
    hf = hf_model.model
    model.embed.weight.copy_(hf.embed_tokens.weight)
    model.norm.weight.copy_(hf.norm.weight)
    model.lm_head.weight.copy_(hf_model.lm_head.weight)
    for ours, theirs in zip(model.blocks, hf.layers):
        ours.attn_norm.weight.copy_(theirs.input_layernorm.weight)
        ours.ffn_norm.weight.copy_(theirs.post_attention_layernorm.weight)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(ours.attn, proj).weight.copy_(getattr(theirs.self_attn, proj).weight)
        if ours.is_moe:
            experts, F = theirs.mlp.experts, model.config.expert_intermediate_size
            ours.ffn.router.weight.copy_(theirs.mlp.gate.weight)  # (E, D)
            # transformers stores (E, out, in) for F.linear; we store (E, in, out) for x @ W.
            ours.ffn.w_gate.copy_(experts.gate_up_proj[:, :F, :].transpose(1, 2))
            ours.ffn.w_up.copy_(experts.gate_up_proj[:, F:, :].transpose(1, 2))
            ours.ffn.w_down.copy_(experts.down_proj.transpose(1, 2))
        else:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                getattr(ours.ffn, proj).weight.copy_(getattr(theirs.mlp, proj).weight)


def assert_same_logits(hf_model, model, ids):
    hf_model.eval(), model.eval()
    with torch.no_grad():
        expected = hf_model(ids).logits
        got = model(ids).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("moe_impl", ["loop", "grouped"])
@pytest.mark.parametrize("attn_impl", ["sdpa", "plain"])
def test_all_moe_rope_equals_mixtral(attn_impl, moe_impl):
    config = small_config(attention_type="rope", moe_layers="all", num_layers=3, attn_impl=attn_impl,
                          moe_impl=moe_impl, balance="switch")  # Mixtral balances with Switch's loss
    hf_model = MixtralForCausalLM(MixtralConfig(**hf_kwargs(config), intermediate_size=config.expert_intermediate_size,
                                                num_local_experts=config.num_experts,
                                                num_experts_per_tok=config.num_experts_per_tok))
    model = h64lm.H64LM(config)
    copy_weights(hf_model, model)
    ids = torch.randint(0, config.vocab_size, (3, 17))
    assert_same_logits(hf_model, model, ids)

    # The load-balancing loss of each layer equals transformers' load_balancing_loss_func on that layer's logits;
    # ours is their mean over layers.
    with torch.no_grad():
        hf_out = hf_model(ids, output_router_logits=True)
        ours = model(ids, ids)
    per_layer = [load_balancing_loss_func((logits,), config.num_experts, config.num_experts_per_tok)
                 for logits in hf_out.router_logits]
    torch.testing.assert_close(ours.aux_loss, torch.stack(per_layer).mean(), rtol=1e-5, atol=1e-6)


def test_greedy_generation_equals_mixtral_generate():
    config = small_config(attention_type="rope", moe_layers="all")
    hf_model = MixtralForCausalLM(MixtralConfig(**hf_kwargs(config), intermediate_size=config.expert_intermediate_size,
                                                num_local_experts=config.num_experts,
                                                num_experts_per_tok=config.num_experts_per_tok))
    model = h64lm.H64LM(config)
    copy_weights(hf_model, model)
    hf_model.eval()
    prompt = torch.randint(3, config.vocab_size, (1, 9))
    expected = hf_model.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, 9:].tolist()
    assert h64lm.generate(model, [prompt[0].tolist()], 20, temperature=0)[0] == expected


@pytest.mark.parametrize("attn_impl", ["sdpa", "plain"])
def test_dense_rope_sliding_window_equals_mistral(attn_impl):
    config = small_config(attention_type="rope", moe_layers="none", sliding_window=5, attn_impl=attn_impl)
    hf_model = MistralForCausalLM(MistralConfig(**hf_kwargs(config), intermediate_size=config.intermediate_size,
                                                sliding_window=config.sliding_window))
    model = h64lm.H64LM(config)
    copy_weights(hf_model, model)
    assert_same_logits(hf_model, model, torch.randint(0, config.vocab_size, (2, 23)))


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_dense_rope_equals_llama(num_kv_heads):
    config = small_config(attention_type="rope", moe_layers="none", num_kv_heads=num_kv_heads)
    hf_model = LlamaForCausalLM(LlamaConfig(**hf_kwargs(config), intermediate_size=config.intermediate_size))
    model = h64lm.H64LM(config)
    copy_weights(hf_model, model)
    assert_same_logits(hf_model, model, torch.randint(0, config.vocab_size, (2, 19)))
