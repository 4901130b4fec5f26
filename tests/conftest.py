"""Shared helpers: small configurations that keep every test in the suite fast on a 2-core CPU."""

import pytest
import torch

import h64lm


def small_config(**overrides) -> h64lm.H64LMConfig:
    """A few-thousand-parameter H64LM: 2 layers (dense then MoE), 4 query and 2 KV heads, 4 experts, top-2."""
    base = dict(vocab_size=101, max_position_embeddings=64, hidden_size=32, num_layers=2, num_heads=4,
                num_kv_heads=2, intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                expert_intermediate_size=24)
    return h64lm.H64LMConfig(**{**base, **overrides})


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
