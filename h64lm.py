"""H64LM: a Mixture-of-Experts language model, from scratch, in one file.

The file is a book and a workshop. Part I, the book (sections 1-18, lines 1 to
3049: everything above the line that begins "# Part II"), is a complete program
that builds every part of a modern sparse transformer before the whole that uses
it, then trains, resumes, evaluates and generates. Part II, the workshop, is
what a reader may skip: it adds guards, sharding, the routing lab, export,
speed tools and the command line through a few seams that Part I defines, and
changes none of its numbers. The notebook H64LM.ipynb mirrors every section.

   Part I, the book                                                Part II, the workshop
     1. Configuration               10. The Mixture-of-Experts layer   19. Guards
     2. RMSNorm                     11. The transformer block          20. Sharding: FSDP2 and distributed checkpoints
     3. Rotary position embedding   12. The H64LM model                21. The routing lab
     4. ALiBi                       13. Generation                     22. Sharing the model: transformers
     5. Attention masks             14. Data                           23. Speed: compiled decoding, the benchmark
     6. The KV cache                15. Training                           and the doctor
     7. Grouped-query attention     16. Runs and checkpoints           24. Command line
     8. SwiGLU feed-forward         17. Evaluation
     9. The router and its losses   18. Routing analysis

The default model (the `h64lm` preset) is a 6-layer, 768-wide decoder whose odd
layers are top-2-of-8 Mixture-of-Experts layers: 250M parameters, of which
122M are active for any one token.

Importing this file only defines things; nothing runs until you call it. As a
program: python h64lm.py {train,compare,eval,generate,analyze,bench,doctor,export,unshard} --help.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import gzip
import hashlib
import json
import math
import os
import random
import re
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

if not hasattr(torch.optim, "Muon"):  # ExpertMuon (section 15) builds on it, as this file is imported
    raise ImportError(f"h64lm.py needs PyTorch 2.9 or later (for torch.optim.Muon), and this is {torch.__version__}; "
                      "upgrade it: pip install 'torch>=2.9'.")

# -----------------------------------------------------------------------------
# 1. Configuration
# -----------------------------------------------------------------------------
# One dataclass holds every architectural choice. Each field says what it means,
# its unit, and where its default comes from; values that follow from others are
# derived in __post_init__, so each default is set in exactly one place.

ATTENTION_TYPES = ("rope", "alibi", "rope+alibi")
ATTENTION_IMPLS: dict[str, Callable] = {}  # attn_impl -> the attention function: "sdpa", "plain" (section 7)
MOE_IMPLS = ("grouped", "loop")
LOSS_IMPLS = ("chunked", "plain")
IMPL_FIELDS = ("attn_impl", "moe_impl", "loss_impl")  # H64LMConfig's run-time choices (see the config)
ROUTER_SCORINGS = ("softmax", "sigmoid")
BALANCE_METHODS = ("switch", "global", "sequence", "aux_free", "aux_free+sequence", "none")  # section 9
PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # these three are TrainConfig's (section 15)
DEVICES = ("auto", "cpu", "cuda")
OPTIMIZERS = ("adamw", "muon")

# The values each text setting may take, by field name: the checks of H64LMConfig and TrainConfig
# (check_choices) and the command line's choices= all read this one table, so a value is refused alike everywhere.
CHOICES: dict[str, tuple[str, ...]] = dict(
    attention_type=ATTENTION_TYPES, router_scoring=ROUTER_SCORINGS, balance=BALANCE_METHODS,
    attn_impl=ATTENTION_IMPLS, moe_impl=MOE_IMPLS, loss_impl=LOSS_IMPLS,
    precision=PRECISIONS, device=DEVICES, optimizer=OPTIMIZERS)


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take. A config checks its fields against their ranges when it is made
    (from a preset, from flags or from a checkpoint's file), and the command line checks each flag as it parses
    it, so a NaN, a negative size or a probability above 1 never gets as far as the model."""
    low: float | None = None  # None = no bound
    high: float | None = None
    low_open: bool = False  # True: low itself is not allowed
    high_open: bool = False
    integer: bool = False

    def __contains__(self, x) -> bool:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or (self.integer and not isinstance(x, int)):
            return False
        if not math.isfinite(x) or (isinstance(x, int) and abs(x) >= 2**63):  # 2**63: too big for an int64
            return False
        if self.low is not None and (x < self.low or (self.low_open and x == self.low)):
            return False
        return self.high is None or not (x > self.high or (self.high_open and x == self.high))

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        low, high = (str(int(b)) if b is not None and float(b).is_integer() else f"{b}" for b in (self.low, self.high))
        if self.low is not None and self.high is not None:
            return f"{kind} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{kind} {'above' if self.low_open else 'of at least'} {low}"
        return kind

    def refuse(self, x) -> str | None:
        """Why x is not allowed ("must be ..., got ..."), or None when it is."""
        if x in self:
            return None
        huge = isinstance(x, int) and not isinstance(x, bool) and abs(x) >= 2**63
        return f"must be {self}{' (below 2**63)' if huge and self.high is None else ''}, got {x!r}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
COUNT = Range(1, integer=True)  # sizes, lengths, steps
SEED = Range(0, 2**32 - 1, integer=True)  # what NumPy's legacy seed accepts; torch takes any of these too


def check_ranges(obj, ranges: dict[str, Range]) -> None:
    """Raise ValueError naming the first field of obj outside its range (None passes: it means "not set")."""
    for name, allowed in ranges.items():
        value = getattr(obj, name)
        if value is not None and (why := allowed.refuse(value)):
            raise ValueError(f"{name} {why}.")


def check_choices(values: dict) -> None:
    """Raise ValueError naming the first setting in values (name -> value) that is not one of its CHOICES."""
    for name, value in values.items():
        if name in CHOICES and value not in CHOICES[name]:
            raise ValueError(f"{name} must be one of {', '.join(CHOICES[name])}, got {value!r}.")


@dataclass
class H64LMConfig:
    # Vocabulary and context.
    vocab_size: int = 32000  # tokens; the Mistral 7B v0.1 tokenizer in mistral_tokenizer/
    max_position_embeddings: int = 1024  # tokens; the longest sequence trained on or generated

    # Width and depth of the H64LM model.
    hidden_size: int = 768  # d_model, the residual stream width; GPT-2 small's width
    num_layers: int = 6  # transformer blocks
    num_heads: int = 12  # query heads; 768 / 12 = 64 per head, as in GPT-2
    num_kv_heads: int = 4  # key/value heads, each shared by num_heads / num_kv_heads query heads
    # (GQA, Ainslie et al. 2023)
    intermediate_size: int = 3072  # hidden width of the dense SwiGLU layers; 4 x hidden_size (GPT-2's ratio)

    # Where attention gets its sense of position, and how far back it looks.
    attention_type: str = "rope+alibi"  # "rope" (Su et al. 2021), "alibi" (Press et al. 2022) or both
    rope_theta: float = 10000.0  # RoPE base wavelength; RoFormer's value, also Llama's and Mistral's
    sliding_window: int | None = None  # tokens a query may see, itself included; None = all earlier tokens
    # (Mistral 7B uses 4096)

    # Mixture of Experts (Shazeer et al. 2017; Switch Transformer, Fedus et al. 2021; Mixtral, Jiang et al. 2024).
    moe_layers: str = "odd"  # which blocks are MoE: "odd", "even", "all", "none" or indices like "1,3";
    # the rest are dense
    num_experts: int = 8  # experts per MoE layer; Mixtral's 8
    num_experts_per_tok: int = 2  # k of top-k routing: experts each token is sent to; Mixtral's 2
    expert_intermediate_size: int = 3072  # hidden width of each expert's SwiGLU; same as the dense layers
    capacity_factor: float | None = None  # None = dropless (Mixtral, MegaBlocks); else each expert takes at most
    # ceil(capacity_factor * tokens * k / num_experts) tokens per batch while training (Switch uses 1.0 to 1.25)
    num_shared_experts: int = 0  # always-on experts of width expert_intermediate_size, added to the routed output
    # of every MoE layer (DeepSeekMoE, Dai et al. 2024, section 3.2); 0 = none, as in Mixtral
    router_scoring: str = "softmax"  # "softmax" over the experts (Switch, Mixtral) or "sigmoid" per expert, the
    # chosen ones' weights normalised to sum to 1 (DeepSeek-V3, Liu et al. 2024, eqs. 13-16)
    balance: str = "aux_free"  # how the load is kept even (section 9): "switch", "global", "sequence", "aux_free",
    # "aux_free+sequence" or "none"; aux_free had the lowest loss and MaxVio of the balancing methods in the
    # README's compute-matched study (3 seeds; Switch's loss, the textbook choice, was 0.022 nats behind)
    bias_update_rate: float = 0.001  # gamma, aux_free's per-expert bias step after each optimizer step (DeepSeek-V3)
    router_jitter_noise: float = 0.0  # training-time multiplicative noise on the router input, U(1-eps, 1+eps)
    # (Switch; 0 = off)
    router_aux_loss_coef: float = 0.01  # alpha, weight of the balance loss (switch, global, sequence); Switch
    # Transformer section 2.2 uses 1e-2 (DeepSeek-V3 weighs its sequence-wise loss, beside aux_free, 1e-4)
    router_z_loss_coef: float = 0.001  # c_z, weight of the router z-loss; ST-MoE (Zoph et al. 2022) uses 1e-3

    # Everything else.
    rms_norm_eps: float = 1e-5  # added to the mean square inside RMSNorm; Mistral's and Mixtral's value
    tie_word_embeddings: bool = False  # share the input embedding with the LM head; H64LM keeps them separate
    initializer_range: float = 0.02  # std of the normal init of every weight matrix; GPT-2's value

    # How the model is computed, not what it is: each pair computes the same function (tests prove it), so these
    # are run-time choices, left out of to_dict, of checkpoints and of the resume check (IMPL_FIELDS).
    attn_impl: str = "sdpa"  # "sdpa": PyTorch's fused attention kernels; "plain": the same math written out
    # (Part II adds "flex": FlexAttention, section 23)
    moe_impl: str = "grouped"  # "grouped": tokens sorted by expert, one pass each; "loop": the readable per-expert loop
    loss_impl: str = "chunked"  # "chunked": LM head and cross-entropy fused, a few rows at a time, logits never stored
    # (forward then returns logits=None); "plain": the (B, T, V) logits, then F.cross_entropy

    # Derived in __post_init__; not arguments.
    head_dim: int = field(init=False)  # channels per attention head
    moe_layer_ids: tuple[int, ...] = field(init=False)  # indices of the MoE blocks
    use_rope: bool = field(init=False)
    use_alibi: bool = field(init=False)

    # The values each number may take (None, where a field allows it, always passes).
    RANGES: ClassVar[dict[str, Range]] = dict(
        vocab_size=COUNT, max_position_embeddings=COUNT, hidden_size=COUNT, num_layers=COUNT, num_heads=COUNT,
        num_kv_heads=COUNT, intermediate_size=COUNT, num_experts=COUNT, num_experts_per_tok=COUNT,
        expert_intermediate_size=COUNT, sliding_window=COUNT, rope_theta=POSITIVE, capacity_factor=POSITIVE,
        router_jitter_noise=Range(0, 1, high_open=True), router_aux_loss_coef=NON_NEGATIVE,
        router_z_loss_coef=NON_NEGATIVE, rms_norm_eps=POSITIVE, initializer_range=POSITIVE,
        num_shared_experts=Range(0, integer=True), bias_update_rate=NON_NEGATIVE)

    def __post_init__(self):
        check_ranges(self, self.RANGES)
        check_choices(vars(self))
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}); "
                             "pick a head count that divides it.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads}), "
                             "so that each key/value head serves a whole group of query heads.")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed num_experts "
                             f"({self.num_experts}).")

        self.head_dim = self.hidden_size // self.num_heads
        self.use_rope = "rope" in self.attention_type
        self.use_alibi = "alibi" in self.attention_type
        if self.use_rope and self.head_dim % 2:
            raise ValueError(f"RoPE rotates channel pairs, so the head size (hidden_size / num_heads = "
                             f"{self.head_dim}) must be even; change hidden_size or num_heads, or use "
                             "attention_type='alibi'.")
        self.moe_layer_ids = self._parse_moe_layers(self.moe_layers, self.num_layers)

    @staticmethod
    def _parse_moe_layers(spec: str, num_layers: int) -> tuple[int, ...]:
        named = {"odd": range(1, num_layers, 2), "even": range(0, num_layers, 2),
                 "all": range(num_layers), "none": range(0)}
        if spec in named:
            return tuple(named[spec])
        try:
            ids = sorted({int(part) for part in spec.split(",")})
        except (AttributeError, ValueError):
            raise ValueError(f"moe_layers must be 'odd', 'even', 'all', 'none' or comma-separated layer indices "
                             f"like '1,3', got {spec!r}.") from None
        if ids and not 0 <= ids[0] <= ids[-1] < num_layers:
            raise ValueError(f"moe_layers {spec!r} names a layer outside 0..{num_layers - 1}.")
        return tuple(ids)

    def to_dict(self, with_impl: bool = False) -> dict:
        """What the model is: the constructor arguments (not the derived fields), without the implementation
        choices unless with_impl; what a checkpoint saves and a resume compares."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.init and (with_impl or f.name not in IMPL_FIELDS)}

    @classmethod
    def from_preset(cls, name: str, **overrides) -> H64LMConfig:
        """A named preset, with any field overridden: H64LMConfig.from_preset("tiny", sliding_window=64)."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})


# Presets only list what differs from the defaults above, which are the h64lm model.
PRESETS: dict[str, dict] = {
    # For tests, the notebook and the CPU demo: a training step takes well under a second on 2 cores.
    "tiny": dict(max_position_embeddings=256, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                 intermediate_size=384, expert_intermediate_size=384),
    # A single-GPU model for quick experiments.
    "small": dict(max_position_embeddings=512, hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=2,
                  intermediate_size=1536, expert_intermediate_size=1536),
    # The H64LM model: 6 layers, 768 wide, 12 query / 4 KV heads of 64, 8 experts of 3072, untied: 250M parameters.
    "h64lm": dict(),
}


# -----------------------------------------------------------------------------
# 2. RMSNorm
# -----------------------------------------------------------------------------
# Root-mean-square normalisation (Zhang & Sennrich 2019): y = x / sqrt(mean(x^2) + eps) * g.
# Unlike LayerNorm it neither subtracts the mean nor adds a bias; Llama, Mistral
# and Mixtral all use it. The statistics are taken in float32 so that bf16
# activations do not lose precision in the sum of squares.

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # g, the learned per-channel gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


# -----------------------------------------------------------------------------
# 3. Rotary position embedding (RoPE)
# -----------------------------------------------------------------------------
# RoFormer (Su et al. 2021), eq. (34): rotate each pair of query/key channels by
# an angle proportional to the token's position, pos * theta^(-2i/d). Because a
# rotation by a followed by the inverse rotation by b is a rotation by a - b,
# the score q_m . k_n depends only on the distance m - n.
#
# Channel pairing: channel i is paired with channel i + d/2 ("rotate half"), the
# layout of Llama, Mistral and Mixtral in transformers, so their weights load
# unchanged. The angle comes from the same position tensor as the mask, which is
# what keeps cached generation correct: token 57 is rotated as token 57 whether
# it arrives in a prompt or one at a time.

def rope_inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """theta^(-2i/d) for i = 0 .. d/2 - 1: the rotation speed of each channel pair, in radians per position."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every (position, channel) angle, in float32."""
    angles = positions[..., None].float() * inv_freq  # (B, T, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, hd): channel i and i + hd/2 share an angle
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension: a 90 degree turn of every pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys x (B, H, T, hd) by their positions' angles: x cos + rotate_half(x) sin."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd), shared by every head
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


# -----------------------------------------------------------------------------
# 4. ALiBi
# -----------------------------------------------------------------------------
# Attention with Linear Biases (Press et al. 2022): no position embedding at all;
# instead head h adds -m_h * (i - j) to the score of query i for key j, so a key
# is penalised in proportion to how far back it lies. The slopes m_h form a
# geometric sequence: for n heads (n a power of two) m_h = 2^(-8h/n), h = 1..n.
# For other head counts the paper takes the slopes of the nearest lower power of
# two, 2^floor(log2 n), and fills the rest with every other slope of twice that.

def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi slope m_h of each head, as in Press et al. 2022, section 3 and their reference code."""
    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    base = 2 ** math.floor(math.log2(num_heads))
    slopes = geometric(base) + geometric(2 * base)[0::2][: num_heads - base]
    return torch.tensor(slopes, dtype=torch.float32)  # (H,)


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """-m_h * (i - j) for every head h, query position i and key position j."""
    distance = (q_pos[:, :, None] - k_pos[:, None, :]).float()  # (B, T, S): i - j
    return -slopes[None, :, None, None] * distance[:, None]  # (B, H, T, S)


# -----------------------------------------------------------------------------
# 5. Attention masks
# -----------------------------------------------------------------------------
# Query i may see key j when j <= i (causal) and, with a sliding window of W
# tokens (Mistral 7B; Beltagy et al. 2020), when i - j < W. Masks are built from
# positions, not from row and column numbers: in cached decoding the one query
# row sits at position len(cache), and a mask built from indices would let it
# see only the first key (the bug of the original H64LM script).
#
# A position of -1 marks a padding slot (left-padding in batched generation):
# no query may see it. A padding query that can see nothing is allowed to see
# everything instead, so softmax stays finite; its output is never used.

def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean mask, True where query i may attend to key j. q_pos (B, T), k_pos (B, S) -> (B, 1, T, S)."""
    distance = q_pos[:, :, None] - k_pos[:, None, :]  # (B, T, S): i - j
    allowed = (distance >= 0) & (k_pos[:, None, :] >= 0)  # causal, and not a padding key
    if window is not None:
        allowed &= distance < window
    allowed |= ~allowed.any(dim=-1, keepdim=True)  # padding queries: see everything rather than nothing
    return allowed[:, None]  # (B, 1, T, S), one mask for every head


# -----------------------------------------------------------------------------
# 6. The KV cache
# -----------------------------------------------------------------------------
# Generating token t+1 needs the keys and values of tokens 0..t, which do not
# change once computed, so each layer keeps them. The cache stores the KV heads
# only (num_kv_heads, not num_heads): with GQA that is 3x less memory for H64LM,
# and the repetition to query heads happens inside attention, after the cache.
# With a sliding window of W a new query can only see the W - 1 keys before it,
# so the cache keeps no more than that, whatever the length of the generation.
# The cache also records every key's position, from which the mask is built.

class KVCache:
    def __init__(self, num_layers: int, sliding_window: int | None = None):
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # each (B, Hkv, S, hd)
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.positions: torch.Tensor | None = None  # (B, S): the position of each cached key, -1 for padding
        self.sliding_window = sliding_window
        self.next_position: torch.Tensor | None = None  # (B or 1, 1): each row's next position, after advance

    def key_positions(self, new_positions: torch.Tensor) -> torch.Tensor:
        """Positions of all keys the new tokens attend to: the cached ones, then the new ones. -> (B, S)"""
        if self.positions is None:
            return new_positions
        batch = max(self.positions.shape[0], new_positions.shape[0])
        return torch.cat((self.positions.expand(batch, -1), new_positions.expand(batch, -1)), dim=1)

    def _keep(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """The tail a future query can still see: the last W - 1 entries with a window, all without one."""
        if self.sliding_window is None:
            return t
        start = max(t.shape[dim] - (self.sliding_window - 1), 0)
        return t.narrow(dim, start, t.shape[dim] - start)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys and values (B, Hkv, T, hd); return all of them (B, Hkv, S, hd)."""
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = self._keep(k, 2), self._keep(v, 2)
        return k, v

    def advance(self, new_positions: torch.Tensor) -> None:
        """Record the positions of the tokens every layer has just appended."""
        self.positions = self._keep(self.key_positions(new_positions), 1)
        # Per row: after a left-padded batched prefill the rows have different lengths, so each goes on from its
        # own last position (padding is -1, below every real one).
        self.next_position = new_positions.amax(dim=1, keepdim=True) + 1

    def __len__(self) -> int:
        """Number of cached keys per sequence (at most W - 1 with a window)."""
        return 0 if self.positions is None else self.positions.shape[1]


# -----------------------------------------------------------------------------
# 7. Grouped-query attention
# -----------------------------------------------------------------------------
# softmax(Q K^T / sqrt(hd) + bias) V (Vaswani et al. 2017), with num_heads query
# heads but only num_kv_heads key/value heads: query head h reads KV head
# h // (num_heads / num_kv_heads) (GQA, Ainslie et al. 2023). Fewer KV heads
# means a smaller KV cache and fewer projection weights at almost no loss.
#
# Two implementations of the same function: `plain_attention` writes the math
# out, so a reader can follow it; `fused_attention` hands the same inputs to
# F.scaled_dot_product_attention, which runs fused kernels (flash attention,
# memory-efficient attention) when they take them. tests/test_attention.py
# proves they agree.

def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """q (B, H, T, hd), k and v (B, Hkv, S, hd); bias: None (causal), a bool mask or float additive bias."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, H, S, hd): KV head j serves query heads j*groups .. (j+1)*groups-1
    v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, S)
    if bias is None:
        T, S = scores.shape[-2:]
        bias = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if bias.dtype == torch.bool:
        scores = scores.masked_fill(~bias, float("-inf"))
    else:
        scores = scores + bias
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return weights @ v  # (B, H, T, hd)


# Which fused kernel SDPA reaches depends on what it is given. On CUDA, flash attention takes no mask at all, and
# the memory-efficient kernel, which takes any mask, does not take enable_gqa in released builds, so a mask (an
# ALiBi bias, a window, padding) with fewer KV heads than query heads falls back to the unfused math kernel,
# which stores the whole (B, H, T, S) score matrix. There the KV heads are repeated to the query heads first, after
# the cache, which keeps them few. A CPU's flash kernel takes a mask and enable_gqa together, and repeating costs
# it time (README, Speed), so it is not done there. `python h64lm.py doctor` prints the kernel each attention
# type reaches on a device.
KV_REPEATING_DEVICES = ("cuda",)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """plain_attention's function with F.scaled_dot_product_attention. q (B, H, T, hd), k and v (B, Hkv, S, hd)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and bias is not None and q.device.type in KV_REPEATING_DEVICES:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, H, S, hd)
        groups = 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=bias is None, enable_gqa=groups > 1)


# The seam for other implementations of attention: each takes q, k, v and the bias that its ATTENTION_MASKS entry
# builds, H64LM.attention_bias by default (Part II adds FlexAttention, section 23, which builds its own).
ATTENTION_IMPLS |= {"sdpa": fused_attention, "plain": plain_attention}
ATTENTION_MASKS: dict[str, Callable] = {}  # attn_impl -> (model, q_pos, k_pos, plain_causal) -> what it takes


class Attention(nn.Module):
    def __init__(self, config: H64LMConfig, layer: int):
        super().__init__()
        self.layer = layer  # which entry of the KV cache is ours
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.use_rope, self.impl = config.use_rope, config.attn_impl
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                bias: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        if self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, S, hd), S = cached + T
        y = ATTENTION_IMPLS[self.impl](q, k, v, bias)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, H*hd)
        return self.o_proj(y)


# -----------------------------------------------------------------------------
# 8. SwiGLU feed-forward
# -----------------------------------------------------------------------------
# FFN(x) = W_down (SiLU(W_gate x) * W_up x) (Shazeer 2020, "GLU Variants Improve
# Transformer"): a gated MLP, used by Llama, Mistral and every expert of Mixtral.
# H64LM's dense layers are one SwiGLU; its MoE layers hold num_experts of them.

class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, D) -> (B, T, F) -> (B, T, D)


# -----------------------------------------------------------------------------
# 9. The router and its losses
# -----------------------------------------------------------------------------
# A linear router scores every expert for every token; each token goes to its
# k best-scoring experts, weighted by their scores renormalised to sum to one.
# Two scorings: softmax over the experts (Switch, Mixtral), or a sigmoid per
# expert (DeepSeek-V3, eqs. 13-16), where experts do not compete for one unit
# of probability. The scores are computed in float32 even under bf16 autocast:
# small logit errors flip top-k choices (Switch Transformer's "selective
# precision", section 2.4).
#
# Left alone, a router learns to favour a few experts, which then get better
# and are favoured more. `balance` chooses how H64LM keeps the load even:
#   switch (Switch Transformer, eqs. 4-6):  L_aux = E * sum_i f_i * P_i
#       f_i = fraction of tokens whose top-k choices include expert i
#       P_i = mean router probability of expert i (sigmoid: of the scores
#             normalised to sum to one per token)
#     minimal when routing is uniform; f is not differentiable, P carries the
#     gradient. With top-k routing sum_i f_i = k, so the uniform value is k.
#     f and P are counted over each micro-batch.
#   global (Qiu et al. 2025, "Demons in the Detail", arXiv 2501.11873; used in
#     Qwen3-MoE): the same loss with f counted over the whole optimizer step,
#     all micro-batches of all processes. A micro-batch of a few sequences is
#     almost one document; balancing it forbids an expert to specialise in a
#     kind of text, balancing the step only asks that all experts be used.
#   sequence (DeepSeek-V3, eqs. 17-20): L = sum_i f_i * P_i for each sequence,
#     with f_i = E / (k T) * (tokens of the sequence choosing i), so that the
#     uniform value is 1; averaged over sequences.
#   aux_free (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing", arXiv
#     2408.15664; DeepSeek-V3): no loss at all. Each expert has a bias b_i
#     that is added to its score for the top-k *choice* only (the weights come
#     from the unbiased scores), and after every optimizer step
#       b_i += gamma * sign(mean_j load_j - load_i)
#     with the loads counted over the step on all processes, so the bias is
#     the same everywhere. An overloaded expert is chosen less next step
#     without any gradient pulling the router away from the language model.
#     "aux_free+sequence" adds the sequence loss as a backstop (DeepSeek-V3,
#     with alpha = 1e-4).
#   none: nothing; watch an expert die.
# A balance loss is weighted by router_aux_loss_coef (alpha). Separately, the
# router z-loss (ST-MoE, Zoph et al. 2022, eq. 5):
#     L_z = mean_t (log sum_i exp z_ti)^2
# keeps logits small, which keeps the float32 scores well conditioned.

def route(logits: torch.Tensor, top_k: int, scoring: str = "softmax", bias: torch.Tensor | None = None,
          allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (N, E) in float32 -> probs (N, E), each token's scores normalised to sum to one (what the balance
    losses average), expert_ids (N, k), the chosen experts, and weights (N, k), their renormalised scores.
    bias (E,): added to the scores for choosing only (aux_free). allowed (E,) bool: experts that may be chosen
    (the drop-one-expert analysis masks one out)."""
    scores = logits.softmax(dim=-1) if scoring == "softmax" else logits.sigmoid()  # (N, E)
    choice = scores if bias is None else scores + bias  # the bias decides who is chosen...
    if allowed is not None:
        choice = choice.masked_fill(~allowed, float("-inf"))
    expert_ids = choice.topk(top_k, dim=-1).indices  # (N, k)
    chosen = scores.gather(-1, expert_ids)  # ...the unbiased scores decide how much each counts
    weights = chosen / chosen.sum(dim=-1, keepdim=True)  # (N, k)
    probs = scores if scoring == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
    return probs, expert_ids, weights


def expert_load(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(..., k) chosen experts -> (num_experts,) how many tokens chose each expert. (A scatter-add, not
    torch.bincount, whose output length depends on the data: torch.compile could not give it a shape.)"""
    ids = expert_ids.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


def load_balancing_loss(probs: torch.Tensor, expert_ids: torch.Tensor, f: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer's E * sum_i f_i * P_i. probs (N, E) in float32, expert_ids (N, k) -> scalar.
    f (E,): the fraction of tokens choosing each expert, when it was counted over more than these N tokens
    (balance='global'); by default it is counted here."""
    N, E = probs.shape
    if f is None:
        f = expert_load(expert_ids, E).to(probs.dtype) / N  # (E,) tokens routed to i / tokens
    P = probs.mean(dim=0)  # (E,) mean probability of expert i
    return E * (f * P).sum()


def sequence_balance_loss(probs: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss, eqs. 17-20: per sequence, sum_i f_i * P_i with
    f_i = E / (k T) * (tokens choosing i) and P_i the mean normalised score; mean over the B sequences.
    probs (B, T, E), expert_ids (B, T, k) -> scalar."""
    B, T, E = probs.shape
    k = expert_ids.shape[-1]
    f = F.one_hot(expert_ids, E).sum(dim=2).sum(dim=1).to(probs.dtype) * E / (k * T)  # (B, E)
    P = probs.mean(dim=1)  # (B, E)
    return (f * P).sum(dim=-1).mean()


def updated_bias(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """aux_free's update after an optimizer step (Wang et al. 2024, algorithm 1): b_i + gamma * sign(mean load -
    load_i), load (E,) counted over the whole step. An expert at exactly the mean keeps its bias."""
    load = load.float()
    return bias + rate * torch.sign(load.mean() - load)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss: mean over tokens of logsumexp(logits)^2. logits (N, E) -> scalar."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def relative_load(load: torch.Tensor) -> torch.Tensor:
    """Each expert's load over the mean load, (..., E): 1 is an even share, 0 a dead expert. The one measure of
    balance that MaxVio, the flags under the progress bar and `analyze`'s dead experts read. Counted in float32
    at least (float64 stays float64)."""
    load = load.to(torch.promote_types(load.dtype, torch.float32))
    return load / load.mean(dim=-1, keepdim=True).clamp_min(1e-9)


def max_violation(load: torch.Tensor) -> torch.Tensor:
    """MaxVio (Wang et al. 2024, eq. 4): max_i load_i / mean load - 1; 0 when perfectly even. load (..., E)."""
    return relative_load(load).amax(dim=-1) - 1


DEAD_SHARE, OVERLOADED_SHARE = 0.1, 2.0  # an expert's load as a multiple of the uniform share that is flagged


def unbalanced_experts(load: torch.Tensor | None, layers: Sequence[int]) -> list[str]:
    """A sentence for each MoE layer with experts under DEAD_SHARE or over OVERLOADED_SHARE times the uniform
    share. load (L, E): tokens choosing each expert in each layer (None: nothing counted)."""
    if load is None:
        return []
    flags = []
    for layer, row in zip(layers, relative_load(load).tolist()):  # (L, E), 1 = uniform
        dead = [f"{e} ({v:.0%})" for e, v in enumerate(row) if v < DEAD_SHARE]
        busy = [f"{e} ({v:.0%})" for e, v in enumerate(row) if v > OVERLOADED_SHARE]
        if dead or busy:
            flags.append(f"layer {layer}: " + "; ".join(
                ([f"nearly dead: expert {', '.join(dead)}"] if dead else []) +
                ([f"overloaded: expert {', '.join(busy)}"] if busy else [])) + " of a uniform share")
    return flags


@dataclass
class RoutingStats:
    """What one MoE layer did in its latest forward pass (detached, kept on the device)."""
    load: torch.Tensor  # (E,) tokens that chose each expert: what balancing counts
    expert_ids: torch.Tensor  # (N, k) the experts each token chose (for co-activation)
    tokens_per_expert: torch.Tensor  # (E,) token-expert assignments each expert processed (load less the dropped)
    dropped_fraction: torch.Tensor  # () fraction of assignments dropped for lack of capacity
    router_entropy: torch.Tensor  # () mean over tokens of -sum_i p_i log p_i, in nats; log(E) = uniform


# -----------------------------------------------------------------------------
# 10. The Mixture-of-Experts layer
# -----------------------------------------------------------------------------
# Letters: N tokens (B*T), D hidden size, E experts, k experts per token,
# F expert hidden size, A = N*k token-expert assignments.
#
# Every token is processed by k of the E expert SwiGLUs and gets their weighted
# sum: y_t = sum over chosen i of w_ti * expert_i(x_t). Parameters grow with E,
# compute per token only with k. Shared experts (DeepSeekMoE, Dai et al. 2024)
# process every token besides: y_t += shared(x_t). DeepSeekMoE pairs them with
# fine-grained experts, many narrow ones of which a token takes many
# (fine_grained, section 21): the same FLOPs, far more combinations.
#
# Capacity (Switch Transformer, section 2.2): with a capacity factor c, each
# expert takes at most C = ceil(c * N * k / E) assignments per batch, so that
# the work per expert is bounded. Assignments are served in token order (token
# 0's choices, then token 1's, ...); an expert that is full drops the rest, and a
# dropped assignment adds nothing (the token keeps its residual). Token order
# keeps the model causal: whether token t is dropped depends only on earlier
# tokens. (GShard's order, all first choices before any second choice, would let
# a later token push out an earlier one.) Dropping applies only while training.
#
# Two dispatch implementations compute the same function, and a test proves it:
# `_experts_loop` visits each expert and finds its tokens with torch.where, the
# way mistral-inference writes it; `_experts_grouped` sorts the assignments by
# expert once, so that each expert's rows are one contiguous block, and runs
# every projection as one grouped GEMM over all the blocks (torchtitan's MoE).
#
# Grouped GEMM. Given rows sorted into E blocks, the stacked weights (E, K, M)
# and the row where each block ends, `grouped_mm` computes block i times
# W[i] for every i in one call. On a GPU in bfloat16 that is one kernel,
# torch._grouped_mm; elsewhere a loop of matrix multiplies inside one custom
# operator (torch.library), whose output shape (rows, M) the compiler knows
# without running it. Either way the block sizes stay in a tensor and never
# reach Python, so the layer has no host sync and torch.compile captures the
# whole of it, forward and backward, without a graph break. Its gradient, per
# block: dX_i = dY_i W_i^T (a grouped GEMM with W transposed), dW_i = X_i^T dY_i.

# The operators' namespace: this module's own, so that a second copy of this file in one process (a model
# exported with remote code, section 22, imports its own) registers its operators beside ours, not over them.
_OPS = "h64lm" if __name__ in ("h64lm", "__main__") else "h64lm_" + re.sub(r"\W", "_", __name__)


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would multiply x in here (x's own when autocast is off). For code that casts by hand:
    a custom operator (below) and the chunked loss (section 12), which autocast does not see into."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def native_grouped_mm(x: torch.Tensor, w: torch.Tensor) -> torch.dtype | None:
    """The dtype torch's grouped GEMM kernel can multiply these in, None where it cannot (the loop below then runs),
    as its documentation says: torch.nn.functional.grouped_mm (public in torch 2.10 and later) in bfloat16 on a CUDA
    GPU of compute capability 8.0 or more (A100, H100), or, in an older torch, the private torch._grouped_mm on 9.0
    (Hopper); rows aligned to 16 bytes either way. fp16 runs there in bfloat16, cast back (the loop would sync the
    host once per expert); float32 has no grouped kernel, and takes the loop."""
    public = hasattr(F, "grouped_mm")
    if not (public or hasattr(torch, "_grouped_mm")) or not x.is_cuda or x.dtype != w.dtype:
        return None
    aligned = x.shape[-1] % 8 == 0 and w.shape[-1] % 8 == 0
    able = aligned and torch.cuda.get_device_capability(x.device) >= ((8, 0) if public else (9, 0))
    return torch.bfloat16 if able and x.dtype in (torch.bfloat16, torch.float16) else None


@torch.library.custom_op(f"{_OPS}::grouped_mm_loop", mutates_args=())
def grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """x (A, K) in blocks, block i ending at row ends[i] (E,); w (E, K, M) -> (A, M), block i times w[i]; rows
    after the last block are 0."""
    out = x.new_empty(x.shape[0], w.shape[-1])  # every row is written below: zero-filling would cost a pass
    start = 0
    for i, end in enumerate(ends.tolist()):  # inside the operator: the compiler never sees these numbers
        if end > start:  # an expert with no rows is skipped: when decoding one token, 6 of 8 are idle
            torch.mm(x[start:end], w[i], out=out[start:end])
        start = end
    out[start:].zero_()
    return out


@torch.library.custom_op(f"{_OPS}::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(x: torch.Tensor, grad: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """dW for grouped_mm_loop: x (A, K), grad (A, M) in the same blocks -> (E, K, M), block i's x^T grad."""
    out = x.new_empty(ends.shape[0], x.shape[1], grad.shape[1])
    start = 0
    for i, end in enumerate(ends.tolist()):
        if end > start:
            torch.mm(x[start:end].T, grad[start:end], out=out[i])
        else:
            out[i].zero_()  # an expert that had no rows gets no gradient
        start = end
    return out


@grouped_mm_loop.register_fake
def _(x, w, ends):
    return x.new_empty(x.shape[0], w.shape[-1])


@grouped_mm_weight_grad.register_fake
def _(x, grad, ends):
    return x.new_empty(ends.shape[0], x.shape[1], grad.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad):
    x, w, ends = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = grouped_mm_loop(grad, w.transpose(1, 2), ends) if ctx.needs_input_grad[0] else None
    grad_w = grouped_mm_weight_grad(x, grad, ends) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


grouped_mm_loop.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Block i of the rows x (A, K) times w[i] (E, K, M), block i ending at row ends[i] (E,) -> (A, M)."""
    dtype = native_grouped_mm(x, w)
    if dtype is None:
        return grouped_mm_loop(x, w, ends)
    kernel = getattr(F, "grouped_mm", None) or torch._grouped_mm
    # Rows after the last block are left undefined by the kernel, in backward too (see MoE._experts_grouped).
    return kernel(x.to(dtype), w.to(dtype), offs=ends).to(x.dtype)


def init_weight(name: str, p: torch.Tensor, config: H64LMConfig) -> None:
    """GPT-2's initialisation, by parameter name (see section 12): RMSNorm gains 1; every matrix N(0, 0.02), the
    projections that write into the residual stream (o_proj, down_proj, w_down) N(0, 0.02 / sqrt(2 * layers))."""
    if p.dim() == 1:
        nn.init.ones_(p)
    elif name.endswith(("o_proj.weight", "down_proj.weight", "w_down")):
        nn.init.normal_(p, mean=0.0, std=config.initializer_range / math.sqrt(2 * config.num_layers))
    else:
        nn.init.normal_(p, mean=0.0, std=config.initializer_range)


class MoE(nn.Module):
    def __init__(self, config: H64LMConfig):
        super().__init__()
        E, D, Fh = config.num_experts, config.hidden_size, config.expert_intermediate_size
        self.num_experts, self.top_k = E, config.num_experts_per_tok
        self.capacity_factor, self.jitter = config.capacity_factor, config.router_jitter_noise
        self.scoring, self.balance = config.router_scoring, config.balance
        self.impl = config.moe_impl
        self.router = nn.Linear(D, E, bias=False)
        # The E experts' SwiGLU weights, stacked so that expert i is w_gate[i], w_up[i], w_down[i].
        self.w_gate = nn.Parameter(torch.empty(E, D, Fh))
        self.w_up = nn.Parameter(torch.empty(E, D, Fh))
        self.w_down = nn.Parameter(torch.empty(E, Fh, D))
        # Shared experts see every token: num_shared_experts SwiGLUs of width Fh, summed, are one SwiGLU of
        # width num_shared_experts * Fh (their weights side by side).
        self.shared = SwiGLU(D, config.num_shared_experts * Fh) if config.num_shared_experts else None
        # aux_free's per-expert bias: state, not a parameter (saved and resumed, never trained); None otherwise.
        self.register_buffer("balance_bias", torch.zeros(E) if config.balance.startswith("aux_free") else None)
        self.step_f: torch.Tensor | None = None  # balance="global": f counted over the step, set by train_step
        self.allowed: torch.Tensor | None = None  # (E,) bool: the experts that may be chosen; None = all
        self.stats: RoutingStats | None = None
        self.config = config
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A layer made alone is ready to use: the model's initialisation rule (init_weight, section 12), and no
        bias yet."""
        for name, p in self.named_parameters():
            init_weight(name, p, self.config)
        if self.balance_bias is not None:
            self.balance_bias.zero_()

    def expert_weights(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(w_gate, w_up, w_down) of each expert. Split once per forward with unbind: indexing w_gate[i] for each
        expert instead makes backward write a zero-filled full-size (E, D, F) gradient per expert."""
        return list(zip(self.w_gate.unbind(0), self.w_up.unbind(0), self.w_down.unbind(0)))

    @staticmethod
    def expert(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        """One expert's SwiGLU on the rows x (n, D) -> (n, F) -> (n, D)."""
        return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down

    def capacity_keep(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """True for the assignments that fit in their expert's capacity, in token order. (N, k) -> (N, k)"""
        N, k = expert_ids.shape
        capacity = math.ceil(self.capacity_factor * N * k / self.num_experts)
        onehot = F.one_hot(expert_ids.reshape(-1), self.num_experts)  # (A, E), assignments in token order
        rank = (onehot.cumsum(dim=0) * onehot).sum(dim=-1) - 1  # (A,) how many earlier assignments chose its expert
        return (rank < capacity).view(N, k)

    def forward(self, x: torch.Tensor, with_losses: bool = True) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                          torch.Tensor | None]:
        """x (B, T, D) -> output (B, T, D), balance loss (config.balance), router z-loss (None, None with
        with_losses=False: generation has no use for them)."""
        B, T, D = x.shape
        x = x.reshape(B * T, D)  # (N, D)
        router_in = x
        if self.training and self.jitter > 0:
            router_in = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(router_in.float(), self.router.weight.float())  # (N, E), float32
        probs, expert_ids, weights = route(logits, self.top_k, self.scoring, self.balance_bias, self.allowed)

        routed_ids = expert_ids  # what the experts actually process; a dropped assignment goes to "expert E"
        if self.training and self.capacity_factor is not None:
            routed_ids = expert_ids.masked_fill(~self.capacity_keep(expert_ids), self.num_experts)

        dispatch = self._experts_grouped if self.impl == "grouped" else self._experts_loop
        y = dispatch(x, routed_ids, weights.to(x.dtype))  # (N, D)
        if self.shared is not None:
            y = y + self.shared(x)

        with torch.no_grad():
            counts = expert_load(routed_ids, self.num_experts + 1)  # the last count is the dropped assignments
            self.stats = RoutingStats(
                load=expert_load(expert_ids, self.num_experts), expert_ids=expert_ids,
                tokens_per_expert=counts[: self.num_experts],
                dropped_fraction=counts[self.num_experts] / routed_ids.numel(),
                router_entropy=-(probs * torch.log(probs.clamp_min(1e-20))).sum(dim=-1).mean(),
            )
        if not with_losses:
            return y.view(B, T, D), None, None
        return y.view(B, T, D), self.balance_loss(probs, expert_ids, B), router_z_loss(logits)

    def balance_loss(self, probs: torch.Tensor, expert_ids: torch.Tensor, B: int) -> torch.Tensor:
        """The balance loss that config.balance asks for (section 9); 0 for aux_free and none."""
        if self.balance in ("switch", "global"):
            return load_balancing_loss(probs, expert_ids, self.step_f if self.balance == "global" else None)
        if self.balance.endswith("sequence"):
            return sequence_balance_loss(probs.view(B, -1, self.num_experts), expert_ids.view(B, -1, self.top_k))
        return probs.new_zeros(())

    def _experts_loop(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The readable dispatch: for each expert, gather its tokens, run it, add the weighted result back."""
        y = torch.zeros_like(x)  # (N, D)
        for i, w in enumerate(self.expert_weights()):
            token, slot = torch.where(expert_ids == i)  # which tokens chose expert i, and as their slot-th choice
            if token.numel() == 0:
                continue
            out = self.expert(x[token], *w) * weights[token, slot, None]  # (n_i, D)
            y.index_add_(0, token, out)
        return y

    def _experts_grouped(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The same function as one grouped GEMM per projection: sort the assignments by expert, so that expert
        i's rows are one block, and multiply every block by its expert's weights in one call. Dropped
        assignments (id E) sort last, past every block, and add nothing. No host sync: the block sizes stay in
        a tensor."""
        E, k = self.num_experts, self.top_k
        flat_ids = expert_ids.reshape(-1)  # (A,)
        order = torch.argsort(flat_ids, stable=True)  # (A,) assignments grouped by expert, in token order within
        ends = expert_load(flat_ids, E + 1)[:E].cumsum(0).to(torch.int32)  # (E,) the row where each block ends
        token = order // k  # (A,) the token of each sorted assignment
        dtype = autocast_dtype(x)
        rows = x.index_select(0, token).to(dtype)  # (A, D), expert 0's rows first, then expert 1's, ...
        # Dropped assignments sort past the last block, where torch's grouped GEMM leaves its output rows and, in
        # backward, its input-gradient rows undefined (recycled GPU memory: NaN as likely as anything). So both
        # ends are masked with torch.where, whose backward selects, not multiplies (0 * NaN is NaN): at the
        # gather, so that no undefined gradient reaches x, and at the output.
        kept = (flat_ids[order] < E)[:, None] if self.training and self.capacity_factor is not None else None
        if kept is not None:
            rows = torch.where(kept, rows, 0)
        w_gate, w_up, w_down = (w.to(dtype) for w in (self.w_gate, self.w_up, self.w_down))  # autocast's casts
        h = F.silu(grouped_mm(rows, w_gate, ends)) * grouped_mm(rows, w_up, ends)  # (A, F)
        out = grouped_mm(h, w_down, ends)  # (A, D)
        weight = weights.reshape(-1)[order]  # (A,)
        if kept is not None:
            out = torch.where(kept, out, 0)
        return torch.zeros_like(x).index_add_(0, token, out * weight[:, None])  # (N, D)


# -----------------------------------------------------------------------------
# 11. The transformer block
# -----------------------------------------------------------------------------
# Pre-norm residual block (GPT-2, Llama): x = x + Attn(Norm(x)); x = x + FFN(Norm(x)).
# Normalising the input of each sub-layer, not its output, keeps the residual
# stream an identity path, which is what lets deep stacks train without warm-up
# tricks. The FFN is a dense SwiGLU or an MoE layer, as config.moe_layers says.

class Block(nn.Module):
    def __init__(self, config: H64LMConfig, layer: int):
        super().__init__()
        self.is_moe = layer in config.moe_layer_ids
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config, layer)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn = MoE(config) if self.is_moe else SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, rope, bias, cache, with_losses: bool = True):
        """x (B, T, D) -> x (B, T, D), and (balance loss, z-loss), or None for a dense block or when
        with_losses is False."""
        x = x + self.attn(self.attn_norm(x), rope, bias, cache)
        if self.is_moe:
            h, balance, z = self.ffn(self.ffn_norm(x), with_losses)
            return x + h, (balance, z) if with_losses else None
        return x + self.ffn(self.ffn_norm(x)), None


# -----------------------------------------------------------------------------
# 12. The H64LM model
# -----------------------------------------------------------------------------
# token ids -> embedding -> N blocks -> RMSNorm -> LM head -> logits over the
# vocabulary. `forward` returns the logits or, given targets, the loss to
# minimise: cross-entropy plus the weighted router losses, averaged over the MoE
# layers so that their weight does not grow with depth. (With targets the
# logits come back only with loss_impl="plain"; see "The loss without the
# logits" below.)
#
# Initialisation follows GPT-2: every weight ~ N(0, 0.02), and the projections
# that write into the residual stream (attention output, FFN and expert down
# projections) scaled by 1/sqrt(2 * num_layers), so the stream's variance does
# not grow with depth (Radford et al. 2019, section 2.3).
#
# The loss without the logits. With a 32000-token vocabulary the LM head is the
# biggest matrix multiply in the model, and its output, the (N, V) logits, is
# the biggest activation: 131 MB in float32 for the tiny preset's 1024 tokens,
# 2 GB for 16k tokens. F.cross_entropy then reads and writes it several times
# (log-softmax, its backward, a zero-filled gradient). Cross-entropy's gradient
# has a closed form,
#     dL/dz_t = (softmax(z_t) - onehot(y_t)) / n      for each of the n counted tokens,
# so `ChunkedLinearCrossEntropy` takes a few hundred rows at a time, computes
# their logits, loss and both gradients (dL/dx = dL/dz W, dL/dW += dL/dz^T x),
# so that only one chunk's logits exist at a time, and keeps only the gradients
# for the backward pass: the idea of Liger Kernel's fused linear cross-entropy
# and of "Cut Your Losses" (Wijmans et al. 2024). Same three matrix multiplies,
# one pass of exp, no (N, V) tensor. What it buys is memory, not speed (README,
# Speed); tests/test_training.py proves it equals the plain path in loss and
# gradients.

def _chunk_rows(device: torch.device, vocab_size: int) -> int:
    """Rows per chunk: 64 MiB of float32 logits on CPU (524 rows of a 32000-token vocabulary: each chunk adds one
    read and write of the (V, D) gradient, so chunks should not be small); 1 GiB on a GPU, where a chunk must keep
    the device busy."""
    budget = 2**30 if device.type == "cuda" else 2**26
    return max(1, budget // (4 * vocab_size))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(x @ weight.T, targets, ignore_index=-100), mean over counted tokens, with its gradients
    computed in forward, chunk by chunk. x (N, D), weight (V, D), targets (N,) -> scalar."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows: int, compute_dtype: torch.dtype, with_grad: bool):
        counted = targets != -100  # (N,)
        n = counted.sum().clamp_min(1)  # a batch with nothing to count has loss 0, not 0/0
        xc, wc = x.to(compute_dtype), weight.to(compute_dtype)  # the matmul dtype, as autocast would choose it
        exact = torch.promote_types(compute_dtype, torch.float32)  # logits and sums: float32 at least
        total = torch.zeros((), dtype=exact, device=x.device)
        grad_x = torch.empty_like(x) if with_grad else None
        grad_w = torch.zeros_like(weight, dtype=exact) if with_grad else None  # summed over chunks
        chunk_loss = compiled_chunk_loss() if x.device.type in COMPILED_LOSS_DEVICES else softmax_cross_entropy
        for start in range(0, x.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            loss, g = chunk_loss(xc[rows] @ wc.T, targets[rows], counted[rows], with_grad)  # from (c, V) logits
            total += loss
            if with_grad:
                grad_x[rows] = g @ wc  # (c, D)
                if compute_dtype == exact:
                    grad_w.addmm_(g.T, xc[rows])  # (V, D), accumulated in place
                else:
                    grad_w += (g.T @ xc[rows]).to(exact)
        if with_grad:
            ctx.save_for_backward(grad_x, grad_w.to(weight.dtype), n)
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w, n = ctx.saved_tensors
        scale = grad_loss / n  # in float32 at least: a gradient scaler's factor times 1/n
        return (grad_x * scale).to(grad_x.dtype), (grad_w * scale).to(grad_w.dtype), None, None, None, None


def softmax_cross_entropy(z: torch.Tensor, targets: torch.Tensor, counted: torch.Tensor,
                          with_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's elementwise work: from its logits z (c, V) in the matmul dtype, the summed loss of its counted
    rows, and n * dL/dz = softmax(z) - onehot(y) (0 for a row not counted) in z's dtype, or None."""
    safe_targets = targets.clamp_min(0)[:, None]  # (c, 1), ignored rows point at token 0 and are masked
    dtype, exact = z.dtype, torch.promote_types(z.dtype, torch.float32)
    z = z.to(exact)  # float32 at least, like the plain path's .float()
    target_logit = z.gather(1, safe_targets)  # (c, 1)
    z_max = z.amax(dim=1, keepdim=True)
    z.sub_(z_max).exp_()  # in place from here on: z becomes exp(z - max)
    sum_exp = z.sum(dim=1, keepdim=True)
    loss = ((z_max + sum_exp.log() - target_logit).squeeze(1) * counted).sum()  # logsumexp(z) - z_y
    if not with_grad:
        return loss, None
    # The 1/n waits for backward, where it meets the loss's own gradient: p/n would be cast to fp16 here, before a
    # gradient scaler's factor has reached it, and at 16k tokens it is below fp16's smallest number.
    counted = counted[:, None].to(exact)  # (c, 1)
    z.mul_(counted / sum_exp)  # softmax(z)
    z.scatter_add_(1, safe_targets, -counted)  # - onehot(y)
    return loss, z.to(dtype)


# On a GPU the chunk's elementwise passes (a cast, max, exp, sum, the softmax, the one-hot, a cast back), each a
# read and a write of (c, V) floats, take longer than its matrix multiplies; compiled, they fuse into a few
# kernels. On a CPU compiling would add seconds to every process for a part of the step not measured to be slow.
COMPILED_LOSS_DEVICES = ("cuda",)


@functools.cache
def compiled_chunk_loss() -> Callable:
    """softmax_cross_entropy compiled, once per process."""
    return torch.compile(softmax_cross_entropy)


def token_nll(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy of logits (..., V), taken in float32, against targets (...), -100 not counted: the
    plain loss, and evaluation's sums (linear_cross_entropy is its fused twin)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction=reduction)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The LM loss from the final hidden states x (N, D), the LM head weight (V, D) and targets (N,), as
    F.cross_entropy(F.linear(x, weight), targets, ignore_index=-100) computes it, without the (N, V) logits."""
    compute_dtype = autocast_dtype(x)
    with_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    with torch.autocast(device_type=x.device.type, enabled=False):  # the dtypes are chosen above, explicitly
        return ChunkedLinearCrossEntropy.apply(x, weight, targets, _chunk_rows(x.device, weight.shape[0]),
                                               compute_dtype, with_grad)


@dataclass
class H64LMOutput:
    logits: torch.Tensor | None  # (B, T, V); None when the chunked loss computed the loss without them
    loss: torch.Tensor | None = None  # lm_loss + router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss
    lm_loss: torch.Tensor | None = None  # mean next-token cross-entropy, in nats
    aux_loss: torch.Tensor | None = None  # balance loss (config.balance; 0 for aux_free), mean over MoE layers
    # (unweighted)
    z_loss: torch.Tensor | None = None  # router z-loss, mean over MoE layers (unweighted)


class H64LM(nn.Module):
    def __init__(self, config: H64LMConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        for name, value in self.derived_buffers().items():
            self.register_buffer(name, value, persistent=False)
        # Recompute each block's activations in backward instead of storing them: less memory, about 1/3 more compute.
        self.gradient_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            init_weight(name, p, self.config)

    def derived_buffers(self) -> dict[str, torch.Tensor]:
        """The non-persistent buffers: derived from the config, so they are rebuilt, never loaded."""
        return {"rope_inv_freq": rope_inverse_frequencies(self.config.head_dim, self.config.rope_theta),
                "alibi_slopes": alibi_slopes(self.config.num_heads)}

    def attention_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor, plain_causal: bool) -> torch.Tensor | None:
        """What every layer adds to its attention scores: None for the plain causal mask (fast kernels know it),
        a boolean mask (B, 1, T, S) without ALiBi, or a float bias (B, H, T, S) with ALiBi and -inf where masked, in
        the dtype the scores are computed in (a float32 bias beside bf16 queries is refused by CUDA's kernels)."""
        config = self.config
        if plain_causal and not config.use_alibi:
            return None
        mask = attention_mask(q_pos, k_pos, config.sliding_window)
        if not config.use_alibi:
            return mask
        bias = alibi_bias(self.alibi_slopes, q_pos, k_pos).masked_fill(~mask, float("-inf"))
        return bias.to(autocast_dtype(self.embed.weight))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, cache: KVCache | None = None) -> H64LMOutput:
        """idx (B, T) token ids; targets (B, T) next tokens (-100 = ignore); positions (B or 1, T) of each token,
        -1 for padding (default: continue from the cache, or 0..T-1); cache: a KVCache to read and extend."""
        B, T = idx.shape
        default_positions = positions is None
        steps = torch.arange(T, device=idx.device)[None]  # (1, T)
        if not default_positions:
            last = positions.max()
        elif cache is None or cache.next_position is None:
            positions, last = steps, T - 1  # no device sync in training
        else:
            positions = cache.next_position + steps  # (B or 1, T): each row continues from its own position
            last = positions.max()
        # A compiled decoding step skips the check, a host sync: stream_generate has made room (fit_prompts).
        if not torch.compiler.is_compiling() and last >= self.config.max_position_embeddings:
            raise ValueError(f"Position {int(last)} is beyond max_position_embeddings "
                             f"({self.config.max_position_embeddings}); use a shorter sequence.")
        k_pos = cache.key_positions(positions) if cache is not None else positions  # (B or 1, S)
        plain_causal = cache is None and default_positions and (self.config.sliding_window or T) >= T
        bias = ATTENTION_MASKS.get(self.config.attn_impl, H64LM.attention_bias)(self, positions, k_pos, plain_causal)
        rope = rope_cos_sin(positions, self.rope_inv_freq) if self.config.use_rope else None

        x = self.embed(idx)  # (B, T, D)
        router_losses = []
        with_losses = targets is not None  # the router losses only count towards a loss
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x, aux = torch.utils.checkpoint.checkpoint(block, x, rope, bias, cache, with_losses,
                                                           use_reentrant=False)
            else:
                x, aux = block(x, rope, bias, cache, with_losses)
            if aux is not None:
                router_losses.append(aux)
        if cache is not None:
            cache.advance(positions)
        x = self.norm(x)

        if targets is None:
            return H64LMOutput(logits=self.lm_head(x))  # (B, T, V)
        return self.loss_output(x, targets, router_losses)

    def loss_output(self, x: torch.Tensor, targets: torch.Tensor,
                    router_losses: list[tuple[torch.Tensor, torch.Tensor]]) -> H64LMOutput:
        """The output of the final hidden states x (B, T, D) given targets (B, T): the LM loss (chunked, without
        the logits, or plain) plus the router losses, each layer's (balance, z) pair, averaged over the MoE layers
        and weighted by their coefficients."""
        B, T, _ = x.shape
        if self.config.loss_impl == "chunked":
            logits = None
            lm_loss = linear_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1))
        else:
            logits = self.lm_head(x)  # (B, T, V)
            lm_loss = token_nll(logits, targets)
        if router_losses:
            aux_loss = torch.stack([b for b, _ in router_losses]).mean()
            z_loss = torch.stack([z for _, z in router_losses]).mean()
        else:
            aux_loss = z_loss = torch.zeros((), device=x.device)
        loss = lm_loss + self.config.router_aux_loss_coef * aux_loss + self.config.router_z_loss_coef * z_loss
        return H64LMOutput(logits=logits, loss=loss, lm_loss=lm_loss, aux_loss=aux_loss, z_loss=z_loss)

    def new_cache(self) -> KVCache:
        """An empty KVCache for this model (section 6), which grows as tokens are decoded."""
        return KVCache(self.config.num_layers, self.config.sliding_window)

    def moe_layers(self) -> dict[int, MoE]:
        """The MoE layers, by block index."""
        return {i: b.ffn for i, b in enumerate(self.blocks) if b.is_moe}

    def routing_stats(self) -> dict[int, RoutingStats]:
        """Each MoE layer's statistics from the latest forward pass, by layer index."""
        return {i: m.stats for i, m in self.moe_layers().items() if m.stats is not None}

    # --- Size and cost -------------------------------------------------------

    def num_params(self, active: bool = False) -> int:
        """Parameters, a shared (tied) tensor counted once. active=True counts what one token uses: all but
        the num_experts - k experts it is not routed to in each MoE layer."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        config = self.config
        per_expert = 3 * config.hidden_size * config.expert_intermediate_size
        unused = (config.num_experts - config.num_experts_per_tok) * per_expert * len(config.moe_layer_ids)
        return total - unused

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), the torchtitan / PaLM convention:
        6 * (active parameters - embedding table) for the matrix multiplies, plus 12 * layers * heads * head size
        * context for attention scores and values, the context being the window when it is shorter."""
        config = self.config
        seq_len = seq_len or config.max_position_embeddings
        context = min(seq_len, config.sliding_window or seq_len)
        matmul_params = self.num_params(active=True) - self.embed.weight.numel()
        if config.tie_word_embeddings:
            matmul_params += self.embed.weight.numel()  # the shared table is still the LM head's matrix
        return 6 * matmul_params + 12 * config.num_layers * config.num_heads * config.head_dim * context

    def parameter_table(self, seq_len: int | None = None) -> str:
        """A table of where the parameters are, total and active, and the FLOPs per token."""
        config = self.config
        groups: dict[str, int] = {}
        for name, p in self.named_parameters():
            if name.startswith("embed"):
                group = "embedding"
            elif name.startswith("lm_head"):
                group = "LM head"
            elif ".attn." in name:
                group = "attention"
            elif "router" in name:
                group = "routers"
            elif ".w_" in name:
                group = "experts"
            elif ".shared." in name:
                group = "shared experts"
            elif ".ffn." in name:
                group = "dense FFN"
            else:
                group = "norms"
            groups[group] = groups.get(group, 0) + p.numel()
        active_experts = groups.get("experts", 0) * config.num_experts_per_tok // config.num_experts
        lines = [f"{'part':<12}{'parameters':>15}{'active':>15}"]
        for group in ("embedding", "attention", "dense FFN", "routers", "experts", "shared experts", "norms",
                      "LM head"):
            if group in groups:
                active = active_experts if group == "experts" else groups[group]
                lines.append(f"{group:<12}{groups[group]:>15,}{active:>15,}")
        lines.append(f"{'total':<12}{self.num_params():>15,}{self.num_params(active=True):>15,}")
        if config.moe_layer_ids:
            shared = f" + {config.num_shared_experts} shared" if config.num_shared_experts else ""
            lines.append(f"each MoE layer: top-{config.num_experts_per_tok} of {config.num_experts} experts{shared}, "
                         f"{config.expert_intermediate_size} wide, {config.router_scoring} router, "
                         f"balance {config.balance}")
        seq_len = seq_len or config.max_position_embeddings
        flops, head = self.flops_per_token(seq_len), 6 * config.vocab_size * config.hidden_size
        lines.append(f"training FLOPs per token at context {seq_len}: {flops:,}, {100 * (flops - head) / flops:.0f}% "
                     f"in the blocks, {100 * head / flops:.0f}% in the LM head")
        return "\n".join(lines)


# -----------------------------------------------------------------------------
# 13. Generation
# -----------------------------------------------------------------------------
# Autoregressive decoding in two phases (gpt-fast's split): `prefill` runs the
# whole prompt in one forward pass and fills the KV cache; `decode_one_token`
# then feeds one token at a time, attending to the cache. `sample` turns the
# last logits into the next token.
#
# With compile=True decoding is gpt-fast's, through the seam COMPILED_DECODING
# (section 23): a preallocated cache and decode_one_token compiled whole, one
# generated program a step; tests/test_speed.py proves both give the same tokens.
#
# Batched prompts of different lengths are left-padded so that every row's last
# prompt token is in the same column; padding slots get position -1, which the
# mask hides, and each row's real tokens are numbered from 0, so a padded row
# computes exactly what it would alone.
#
# Context: positions never exceed max_position_embeddings - 1. A prompt longer
# than max_position_embeddings - max_new_tokens keeps only its last tokens (with
# a warning), so the continuation always fits.

def fit_prompts(prompts: list[list[int]], max_new_tokens: int, config: H64LMConfig) -> list[list[int]]:
    """The prompts, each cut to its last tokens where it would not leave room for max_new_tokens in the context
    (with a warning); the one rule for a long prompt, in the library and on the command line."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("Every prompt needs at least one token; a text prompt gets <s> from the tokenizer.")
    if why := new_tokens_refused(max_new_tokens, config):
        raise ValueError(f"max_new_tokens {why}.")
    room = config.max_position_embeddings - max_new_tokens
    if any(len(p) > room for p in prompts):
        warnings.warn(f"A prompt is longer than the {room} tokens that leave room for {max_new_tokens} new ones in "
                      f"a {config.max_position_embeddings}-token context; only its last {room} tokens are used.")
    return [p[-room:] for p in prompts]


def new_tokens_refused(max_new_tokens: int, config: H64LMConfig) -> str | None:
    """Why max_new_tokens do not fit in config's context beside a prompt of at least one token, or None when they
    do: the one rule, for fit_prompts and for generate's --max-new-tokens."""
    if not 1 <= max_new_tokens < config.max_position_embeddings:
        return f"must be between 1 and {config.max_position_embeddings - 1} (max_position_embeddings - 1)"
    return None


def sample(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           repetition_penalty: float = 1.0, seen: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose the next token of each row from logits (B, V) -> (B,).

    temperature 0 is greedy (argmax). repetition_penalty > 1 discourages tokens marked in seen (B, V): a positive
    logit is divided by it, a negative one multiplied (Keskar et al. 2019, CTRL). top_k keeps the k most likely
    tokens; top_p keeps the smallest set whose probability reaches p (Holtzman et al. 2020, nucleus sampling)."""
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits).clamp(max=torch.finfo(logits.dtype).max)  # a tiny penalty
    if temperature == 0:
        return logits.argmax(dim=-1)
    # Shifted so that the largest logit is 0: a tiny temperature then sends the others towards -inf, and no
    # logit towards +inf (where inf - inf would make the softmax NaN).
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:
        kth_best = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None:
        sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the tokens ranked above each one
        remove_sorted = before >= top_p  # the most likely token always stays (its "before" is 0)
        remove = remove_sorted.scatter(-1, sorted_ids, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.no_grad()
def prefill(model: H64LM, idx: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the prompts (B, T) through the model, filling the cache; return the last position's logits (B, V)."""
    return model(idx, positions=positions, cache=cache).logits[:, -1]


@torch.no_grad()  # not inference_mode: a compiled step writes the cache in place
def decode_one_token(model: H64LM, token: torch.Tensor, position: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed one token per row, token and position (B, 1), through the cached model; return its logits (B, V)."""
    return model(token, positions=position, cache=cache).logits[:, -1]


# The seam for compiled decoding (section 23 fills it): (model, batch size) -> the cache to decode into and the
# function that decodes one token in its place. Part I alone decodes eagerly.
COMPILED_DECODING: Callable[[H64LM, int], tuple[KVCache, Callable]] | None = None


def stream_generate(model: H64LM, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                    eos_id: int | None = None, pad_id: int = 0, seed: int | None = None,
                    compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield the next token of every prompt (B,), step by step, until max_new_tokens or every row has produced
    eos_id. A row that has finished keeps yielding eos_id. pad_id fills the left of shorter prompts.
    compile: decode through COMPILED_DECODING (gpt-fast's way); the same tokens, faster."""
    config = model.config
    prompts = fit_prompts(prompts, max_new_tokens, config)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max())
    pad = width - lengths  # (B,) padding slots at the left of each row
    idx = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)  # (B, T)
    positions = torch.arange(width, device=device)[None] - pad[:, None]  # (B, T), row b starts at -pad_b
    positions = positions.masked_fill(positions < 0, -1)
    seen = None  # (B, V) the tokens of each prompt and its output so far, kept only for the repetition penalty
    if repetition_penalty != 1.0:
        seen = torch.zeros(len(prompts), config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, idx, positions >= 0)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)

    was_training = model.training
    model.eval()  # no router jitter or capacity dropping while generating
    try:
        if compile and COMPILED_DECODING is None:
            raise H64LMError("compile=True needs the whole h64lm.py (compiled decoding is in Part II, section 23); "
                             "decode without it here.")
        cache, decode = COMPILED_DECODING(model, len(prompts)) if compile else (model.new_cache(), decode_one_token)
        logits = prefill(model, idx, positions, cache)
        next_pos = lengths[:, None]  # (B, 1)
        for step in range(max_new_tokens):
            token = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                           repetition_penalty=repetition_penalty, seen=seen, generator=generator)
            if eos_id is not None:  # without an eos_id no row ever finishes early
                token = token.masked_fill(done, eos_id)  # (B,): a finished row repeats eos_id
                done |= token == eos_id
            yield token
            if step == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
                break
            if seen is not None:
                seen.scatter_(1, token[:, None], True)
            logits = decode(model, token[:, None], next_pos, cache)
            next_pos = next_pos + 1
    finally:
        model.train(was_training)


def generate(model: H64LM, prompts: list[list[int]], max_new_tokens: int, **sampling) -> list[list[int]]:
    """The new tokens of each prompt, up to and including its eos_id. Options as in stream_generate."""
    eos_id = sampling.get("eos_id")
    out: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for token in stream_generate(model, prompts, max_new_tokens, **sampling):
        for row, t in enumerate(token.tolist()):
            if not finished[row]:
                out[row].append(t)
                finished[row] = t == eos_id
    return out


# -----------------------------------------------------------------------------
# 14. Data
# -----------------------------------------------------------------------------
# Text comes in splits (train, valid, test) of lines, from one of four sources:
#   wikitext-103  the Hugging Face dataset Salesforce/wikitext, wikitext-103-raw-v1
#   sample        the Wikipedia sample bundled in data/ (WikiText's raw layout)
#   PATH          a folder of WikiText raw files, the hub's parquet shards, or .txt files
#   auto          wikitext-103 when it can be loaded, else the sample
#
# Each document (a WikiText article, from one ' = Title = ' heading to the next)
# is encoded the way a prompt is encoded at generation time: <s>, then its text.
# The documents of a split are concatenated into one array of token ids, saved
# as uint16 on disk and memory-mapped, so a second run skips tokenizing. The
# cache is keyed by a fingerprint of the text and of the tokenizer.
#
# Training reads packed windows of seq_len + 1 consecutive tokens (inputs and
# next-token targets) that cross document boundaries freely: no padding, no
# truncated documents.

ROOT = Path(__file__).resolve().parent
SAMPLE_DIR = ROOT / "data" / "wikipedia_sample"
DEFAULT_TOKENIZER = ROOT / "mistral_tokenizer"
DEFAULT_CACHE = ROOT / "data" / "cache"
SPLITS = ("train", "valid", "test")
SPLIT_ALIASES = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid", "test": "test"}
WIKITEXT_HUB = ("Salesforce/wikitext", "wikitext-103-raw-v1")
TOKEN_CACHE_VERSION = 2  # bump when the way text becomes tokens, or the cache's metadata, changes


class H64LMError(Exception):
    """A problem the user can fix; the command line prints its one-sentence message and exits with status 2."""


def one_sentence(e: Exception) -> str:
    """What the command line says of an error: an H64LMError's own sentence; for an OS error (a permission, a
    full disk, a path that went away) what failed and where; for anything else its type and first line, with
    the way to see more. Nothing reaches the user as a traceback unless --debug asks for it."""
    if isinstance(e, H64LMError):
        return str(e)
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        return f"{e.strerror or e}{where}; check the path, its permissions and the free disk space."
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {first}; this is unexpected: rerun with --debug for the traceback, and report it."


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp) on a temporary name of this process's own beside path, flush it to disk, then rename it
    over path (os.replace is atomic). A reader, a second process or a crash at any moment sees the old file or
    the new one, never half of one, and a failure leaves no temporary file behind. The file gets the permissions
    the user's umask gives new files (some writers, such as safetensors, create theirs readable by the owner
    only)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class TextSource:
    """Where a corpus comes from, and how to read it."""
    name: str  # for messages, e.g. "the bundled Wikipedia sample"
    fingerprint: str  # changes whenever the text does
    read: Callable[[str], list[str]]  # split name -> list of lines (without their newline)


def is_article_heading(line: str) -> bool:
    """' = Title = ' starts a WikiText article; ' = = Section = = ' does not."""
    s = line.strip()
    return s.startswith("= ") and s.endswith(" =") and not s.startswith("= =")


def count_words(lines: list[str]) -> int:
    """WikiText's word count, used for word-level perplexity: whitespace-separated words plus one end-of-line per
    line (Merity et al. 2016; Transformer-XL's evaluation), so numbers compare with the literature."""
    return sum(len(line.split()) + 1 for line in lines)


def _hash_files(paths: list[Path], names: bool = True) -> str:
    """SHA-256 of the files' contents (and names), in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        if names:
            digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read().splitlines()
    except UnicodeDecodeError:
        raise H64LMError(f"{path} is not UTF-8 text; convert it to UTF-8 or remove it from the folder.") from None
    except OSError as e:
        raise H64LMError(f"Could not read {path} ({e.strerror or e}); check the file and its permissions.") from None


def _split_of(path: Path) -> str | None:
    """The split a file belongs to, from its name: wiki.valid.raw, validation-00000-of-00001.parquet, test.txt."""
    for word in re.split(r"[^a-z]+", path.name.lower()):
        if word in SPLIT_ALIASES:
            return SPLIT_ALIASES[word]
    return None


def check_data_folder(folder: Path) -> None:
    """--data names a folder that exists (its files are checked as they are read); --data's flag asks this too."""
    if not folder.exists():
        raise H64LMError(f"{folder}: no such folder; give a folder of wiki.*.raw, parquet or .txt files, or use "
                         "--data sample.")
    if not folder.is_dir():
        raise H64LMError(f"{folder} is a file; give the folder that holds it.")


def _folder_source(folder: Path) -> TextSource:
    check_data_folder(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    raw = [p for p in files if p.name.endswith((".raw", ".raw.gz", ".txt", ".txt.gz"))]
    parquet = [p for p in files if p.suffix == ".parquet"]
    by_split: dict[str, list[Path]] = {}
    for p in raw or parquet:
        if (split := _split_of(p)) is not None:
            by_split.setdefault(split, []).append(p)
    missing = [s for s in SPLITS if s not in by_split]
    if not (raw or parquet):
        raise H64LMError(f"--data {folder} holds no wiki.*.raw, .txt or .parquet files; put WikiText-103 there "
                         "or use --data sample.")
    if missing:
        raise H64LMError(f"--data {folder} has no file for the {', '.join(missing)} split; name files by split "
                         "(wiki.train.raw, wiki.valid.raw, wiki.test.raw, or train/validation/test parquet shards).")

    if raw:
        def read(split: str) -> list[str]:
            return [line for p in by_split[split] for line in _read_lines(p)]
    else:
        def read(split: str) -> list[str]:
            import datasets  # imported here: it is slow to import and only needed for parquet and the hub
            ds = datasets.load_dataset("parquet", data_files={split: [str(p) for p in by_split[split]]}, split=split)
            if "text" not in ds.column_names:
                raise H64LMError(f"The parquet files in {folder} have no 'text' column; WikiText's shards do.")
            return [line.rstrip("\n") for line in ds["text"]]
    return TextSource(name=str(folder), fingerprint=_hash_files([p for ps in by_split.values() for p in ps]),
                      read=read)


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _wikitext103_source() -> TextSource:
    import datasets
    import datasets.config
    import huggingface_hub.constants

    offline = not _hub_reachable()
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    try:
        # Without a network, ask only the local cache: otherwise datasets retries for half a minute.
        if offline:
            datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
        ds = datasets.load_dataset(*WIKITEXT_HUB)
    except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, DatasetNotFoundError, ...
        raise H64LMError(
            "WikiText-103 could not be loaded from the Hugging Face hub or its cache "
            f"({type(e).__name__}); use --data sample for the bundled Wikipedia sample, or download "
            "wiki.train.raw, wiki.valid.raw and wiki.test.raw (or the hub's parquet shards) into a folder "
            "and pass --data FOLDER.") from None
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved
    names = {"train": "train", "valid": "validation", "test": "test"}
    fingerprint = hashlib.sha256("".join(ds[names[s]]._fingerprint for s in SPLITS).encode()).hexdigest()
    return TextSource(name="WikiText-103 (Salesforce/wikitext, wikitext-103-raw-v1)", fingerprint=fingerprint,
                      read=lambda split: [line.rstrip("\n") for line in ds[names[split]]["text"]])


def open_text_source(data: str | TextSource, log: Callable[[str], None] = print) -> TextSource:
    """The corpus named by --data: "auto", "wikitext-103", "sample" or a folder; a source opened already is itself
    (a run that trains a bpe:N tokenizer on the text, then tokenizes it, opens and fingerprints it once)."""
    if isinstance(data, TextSource):
        return data
    if data == "wikitext-103":
        return _wikitext103_source()
    if data == "sample":
        source = _folder_source(SAMPLE_DIR)
        source.name = "the bundled Wikipedia sample (data/wikipedia_sample)"
        return source
    if data == "auto":
        try:
            return _wikitext103_source()
        except H64LMError as e:
            log(f"--data auto: WikiText-103 could not be loaded from the Hugging Face hub or its local cache "
                f"({type(e.__context__).__name__}), so this run uses the bundled Wikipedia sample instead; "
                "--data wikitext-103 insists on WikiText-103, --data FOLDER reads a copy of it.")
            return open_text_source("sample")
    return _folder_source(Path(data).expanduser())


def load_tokenizer(path: str | Path = DEFAULT_TOKENIZER):
    """The fast Hugging Face tokenizer in `path` (the Mistral tokenizer by default), loaded offline."""
    from transformers import AutoTokenizer

    path = Path(path)
    check_tokenizer_folder(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # a damaged JSON or model file; transformers raises many kinds
        raise H64LMError(f"The tokenizer in {path} could not be loaded ({type(e).__name__}); its files are damaged "
                         "or incomplete: copy them again, or point --tokenizer at another folder.") from None
    if not getattr(tokenizer, "is_fast", False):
        raise H64LMError(f"The tokenizer in {path} has no tokenizer.json (a fast tokenizer), which H64LM needs; "
                         "save it with a recent transformers (tokenizer.save_pretrained).")
    return tokenizer


def check_tokenizer_folder(path: Path) -> None:
    """A folder with a tokenizer's files in it (whether they load is seen when they are); --tokenizer's flag asks
    this too."""
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer.model").exists():
        raise H64LMError(f"No tokenizer in {path}; point --tokenizer at a folder with tokenizer.json.")


# The seam for tokenizers that a run makes from its own text (section 21 adds "bpe", for --tokenizer bpe:N): the
# part of --tokenizer before its colon names the maker, which returns the folder it made (or cached) the tokenizer in.
TOKENIZER_MAKERS: dict[str, Callable[[str, TextSource, Path, Callable], Path]] = {}


def tokenizer_folder(spec: str, data: str | TextSource, cache_dir: str | Path = DEFAULT_CACHE, log=print) -> Path:
    """The folder of the tokenizer a run's --tokenizer names: a folder is itself; a spec with a maker's name before
    its colon (bpe:N) is made by that maker from data's text, or read from cache_dir where the maker keeps it."""
    maker = TOKENIZER_MAKERS.get(spec.split(":", 1)[0]) if ":" in spec else None
    if maker is None:
        return Path(spec)
    return maker(spec, open_text_source(data, log), Path(cache_dir), log)


def check_vocab(tokenizer, config: H64LMConfig) -> None:
    """A token id the embedding has no row for would fail deep inside the model; say so up front."""
    if len(tokenizer) > config.vocab_size:
        raise H64LMError(f"The tokenizer has {len(tokenizer)} tokens but the model only {config.vocab_size}; use "
                         "the tokenizer the model was made for (--tokenizer), or for a new model raise --vocab-size.")


def check_seq_len(seq_len: int, config: H64LMConfig, remedy: str = "lower it") -> None:
    """Windows longer than the model's context would fail on their first position past it; say so up front."""
    if seq_len > config.max_position_embeddings:
        raise H64LMError(f"--seq-len {seq_len} is longer than the model's max_position_embeddings "
                         f"({config.max_position_embeddings}); {remedy}.")


def seq_len_of(config: H64LMConfig, *given: int | None) -> int:
    """The sequence length to use: the first of given that is set (a flag, then the run's own setting, say), else
    the model's whole context, max_position_embeddings (TrainConfig.seq_len's default)."""
    return next((seq_len for seq_len in given if seq_len), config.max_position_embeddings)


def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def documents(lines: list[str]) -> Iterator[str]:
    """Group lines into documents: a new one starts at each WikiText article heading (or at the first line)."""
    current: list[str] = []
    for line in lines:
        if is_article_heading(line) and any(s.strip() for s in current):
            yield "\n".join(current) + "\n"
            current = []
        current.append(line)
    if any(s.strip() for s in current):
        yield "\n".join(current) + "\n"


def tokenize_documents(docs: list[str], tokenizer, desc: str, batch_size: int = 64) -> np.ndarray:
    """Encode documents in batches (the fast tokenizer runs a batch on every core), each as <s> + text,
    and concatenate them into one uint16 array."""
    from tqdm.auto import tqdm

    chunks = []
    for start in tqdm(range(0, len(docs), batch_size), desc=desc, unit="batch", leave=False):
        # split_special_tokens: a literal "<s>" in the text is text, not the BOS token.
        encoded = tokenizer(docs[start:start + batch_size], add_special_tokens=True,
                            split_special_tokens=True)["input_ids"]
        chunks.append(np.fromiter((t for ids in encoded for t in ids), dtype=np.uint16))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint16)


@dataclass
class TokenSplit:
    tokens: np.ndarray  # (n,) uint16 token ids, memory-mapped from the cache
    words: int  # WikiText word count of the split's text (see count_words)
    lines: int


def load_token_splits(data: str | TextSource, tokenizer, cache_dir: str | Path = DEFAULT_CACHE,
                      log=print) -> tuple[TextSource, dict[str, TokenSplit]]:
    """Every split of --data as tokens, tokenizing only what the cache does not hold yet."""
    if len(tokenizer) > np.iinfo(np.uint16).max + 1:
        raise H64LMError(f"The tokenizer has {len(tokenizer)} tokens; the token cache stores uint16 ids, "
                         "so at most 65536.")
    source = open_text_source(data, log)
    key = hashlib.sha256(f"{TOKEN_CACHE_VERSION}|{source.fingerprint}|{tokenizer_fingerprint(tokenizer)}"
                         .encode()).hexdigest()[:20]
    folder = Path(cache_dir) / key
    splits = {}
    for split in SPLITS:
        bin_path, meta_path = folder / f"{split}.bin", folder / f"{split}.json"
        if (cached := read_cached_split(bin_path, meta_path, log)) is None:
            log(f"tokenizing the {split} split of {source.name} into {folder} (once)")
            lines = source.read(split)
            tokens = tokenize_documents(list(documents(lines)), tokenizer, desc=f"tokenizing {split}")
            if len(tokens) < 2:
                raise H64LMError(f"The {split} split of {source.name} holds no text; give every split some text.")
            folder.mkdir(parents=True, exist_ok=True)
            # The .json goes last: it vouches for the .bin beside it (count, dtype and SHA-256 of its bytes).
            meta = {"tokens": int(len(tokens)), "dtype": "uint16", "sha256": hashlib.sha256(tokens).hexdigest(),
                    "words": count_words(lines), "lines": len(lines)}
            write_atomically(bin_path, tokens.tofile)
            write_atomically(meta_path, lambda tmp: tmp.write_text(json.dumps(meta)))
            cached = np.memmap(bin_path, dtype=np.uint16, mode="r"), meta  # just hashed: no need to read it back
        tokens, meta = cached
        splits[split] = TokenSplit(tokens=tokens, words=meta["words"], lines=meta["lines"])
    return source, splits


def read_cached_split(bin_path: Path, meta_path: Path, log=print) -> tuple[np.memmap, dict] | None:
    """The cached tokens of a split and their metadata, when the .bin is what the .json says it is (token count,
    dtype and SHA-256 of the bytes); None when there is no cache or it does not match, which is said in one line.
    A truncated or edited cache is never used: it would give wrong losses without a word."""
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        count, digest, _, _ = int(meta["tokens"]), meta["sha256"], meta["words"], meta["lines"]
    except (OSError, ValueError, KeyError, TypeError):
        problem = f"{meta_path.name} is unreadable"
    else:
        size = bin_path.stat().st_size if bin_path.exists() else None
        if meta.get("dtype") != "uint16":
            problem = f"its dtype is {meta.get('dtype')!r}, not uint16"
        elif size != 2 * count:
            problem = f"{bin_path.name} holds {size or 0:,} bytes, not the {2 * count:,} of {count:,} tokens"
        elif _hash_files([bin_path], names=False) != digest:
            problem = f"the bytes of {bin_path.name} are not the ones it was written with"
        else:
            return np.memmap(bin_path, dtype=np.uint16, mode="r"), meta
    log(f"the token cache {bin_path.with_suffix('')} does not match its metadata ({problem}); tokenizing again")
    return None


class PackedWindows:
    """Non-overlapping windows of seq_len + 1 tokens over a token array: window i holds tokens
    [i*seq_len, (i+1)*seq_len], its first seq_len as inputs and its last seq_len as targets."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.count = (len(tokens) - 1) // seq_len

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self.tokens[i * self.seq_len:(i + 1) * self.seq_len + 1] for i in indices])
        rows = torch.from_numpy(rows.astype(np.int64))  # (B, T + 1)
        return rows[:, :-1], rows[:, 1:]  # inputs (B, T), targets (B, T)


@functools.lru_cache(maxsize=2)
def _epoch_permutation(seed: int, epoch: int, num_windows: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_windows)


def train_window_indices(step: int, global_batch: int, num_windows: int, seed: int) -> np.ndarray:
    """The windows of optimizer step `step`: steps walk through a fresh random permutation of all windows each
    epoch, so every window is seen once per epoch and the order depends only on (seed, step)."""
    slots = np.arange(step * global_batch, (step + 1) * global_batch)
    epochs, offsets = np.divmod(slots, num_windows)
    out = np.empty_like(slots)
    for epoch in np.unique(epochs):
        chosen = epochs == epoch
        out[chosen] = _epoch_permutation(seed, int(epoch), num_windows)[offsets[chosen]]
    return out


# -----------------------------------------------------------------------------
# 15. Training
# -----------------------------------------------------------------------------
# One optimizer step is train_step, which its docstring tells; after it come
# its parts: the micro-batches, the learning-rate schedule, the optimizers
# (AdamW, or Muon for the hidden matrices), and validate, which measures the
# loss on held-out text. Every setting is a field of TrainConfig, at the end
# of the section; section 16 runs the steps as a whole run.


def train_step(run: Run, step: int) -> dict:
    """Optimizer step `step`: set its learning rate (a linear warm-up, then cosine decay), take this process's
    share of the batch, forward and backward over grad_accum micro-batches (the loss divided by grad_accum, so
    that the gradient is the mean over the whole batch; DDP averages it over the processes on the last
    micro-batch, a sharded model on each), check that the loss and the gradient are finite before they touch the
    weights, clip the gradient norm, step the optimizer. Returns what it measured, averaged over all processes."""
    tc, rt, model = run.tc, run.rt, run.step_model
    lr = learning_rate(step, tc)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    indices = train_window_indices(step, run.global_batch, run.windows.count, tc.seed)
    moe = list(run.model.moe_layers().values())
    if run.config.balance == "global" and tc.grad_accum * rt.world_size > 1:
        for layer, f in zip(moe, step_fractions(run, indices)):
            layer.step_f = f  # (E,) used by every micro-batch's loss below
    sums = torch.zeros(3, device=rt.device)  # lm loss, balance loss, z-loss
    load = torch.zeros(len(moe), run.config.num_experts, device=rt.device)  # (L, E) tokens choosing each expert
    for micro in range(tc.grad_accum):
        x, y = micro_batch(run, indices, micro)  # (B, T) each
        last = micro == tc.grad_accum - 1
        with (model.no_sync() if not (last or tc.shard or rt.world_size == 1) else contextlib.nullcontext()), \
                rt.autocast():
            out = model(x, y)
        run.scaler.scale(out.loss / tc.grad_accum).backward()
        sums += torch.stack([out.lm_loss, out.aux_loss, out.z_loss]).detach() / tc.grad_accum
        load += torch.stack([layer.stats.load for layer in moe]) if moe else 0
    if rt.world_size > 1:
        torch.distributed.all_reduce(sums)
        sums /= rt.world_size
        torch.distributed.all_reduce(load)  # the whole step's load, the same on every process
    run.scaler.unscale_(run.optimizer)
    grad_norm = whole(nn.utils.clip_grad_norm_(run.model.parameters(), tc.grad_clip or float("inf"))).item()
    lm_loss, aux_loss, z_loss = sums.tolist()
    if not all(map(math.isfinite, (lm_loss, aux_loss, z_loss))):
        raise diverged("The loss", step, run)
    if not math.isfinite(grad_norm) and not run.scaler.is_enabled():  # with fp16 the scaler skips such a step
        raise diverged("The gradient norm", step, run)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    for layer, layer_load in zip(moe, load):
        layer.step_f = None
        if layer.balance_bias is not None:  # aux_free: the bias moves after the step, from the step's load
            layer.balance_bias.copy_(updated_bias(layer.balance_bias, layer_load, run.config.bias_update_rate))
    run.step = step + 1
    return {"step": step, "lm_loss": lm_loss, "aux_loss": aux_loss, "z_loss": z_loss, "lr": lr,
            "grad_norm": grad_norm, "load": load}


def micro_batch(run: Run, indices: list[int], micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's share of micro-batch `micro` of a step whose windows are `indices`: inputs and targets
    (B, T), on the device."""
    tc, rt = run.tc, run.rt
    first = (micro * rt.world_size + rt.rank) * tc.batch_size
    x, y = run.windows.batch(indices[first:first + tc.batch_size])
    return x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)


@torch.no_grad()
def step_fractions(run: Run, indices: list[int]) -> torch.Tensor:
    """balance='global': f for each MoE layer, counted over the whole step (every micro-batch of every process)
    before any loss is formed, (L, E). It costs one forward pass per micro-batch without backward, about a third
    of a step, and is needed only when the step has more than one micro-batch or process. The random state is
    put back, so that router jitter draws the same noise in the step itself."""
    model = run.step_model.module if isinstance(run.step_model, nn.parallel.DistributedDataParallel) \
        else run.step_model
    moe = list(run.model.moe_layers().values())
    load = torch.zeros(len(moe), run.config.num_experts, device=run.rt.device)
    with torch.random.fork_rng(devices=[run.rt.device] if run.rt.device.type == "cuda" else []):
        for micro in range(run.tc.grad_accum):
            x, y = micro_batch(run, indices, micro)
            with run.rt.autocast():
                model(x, y)
            load += torch.stack([layer.stats.load for layer in moe])
    if run.rt.world_size > 1:
        torch.distributed.all_reduce(load)
    return load / run.tokens_per_step


def learning_rate(step: int, tc: TrainConfig) -> float:
    """Linear warm-up to lr over warmup_steps, then cosine decay to min_lr at max_steps (Loshchilov & Hutter 2017)."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (tc.lr - tc.min_lr)


def make_optimizer(model: nn.Module, tc: TrainConfig, device: torch.device, log=None) -> torch.optim.Optimizer:
    """The optimizer tc.optimizer names, with weight decay on matrices (and the stacked expert matrices) only:
    decaying norm gains pulls them towards 0, which is not the prior we want for a scale.

    adamw: AdamW (Loshchilov & Hutter 2019) for everything. fused=True runs the whole update as one kernel per
    dtype and device, on CPU too (PyTorch 2.4+), instead of a loop over the parameters.

    muon: Muon (Jordan et al. 2024) for the matrices inside the blocks (attention, dense and shared MLPs, and each
    expert's three), AdamW for the embeddings, the LM head, the norms and the routers, as Muon's authors advise:
    the first and last layers and the scalars are not hidden linear maps. Muon uses Moonshot's scaling (Liu et al.
    2025, "Muon is Scalable for LLM Training", section 2.2: the update's RMS matched to AdamW's, 0.2 * sqrt(max(A,
    B))), so that both take the same learning rate, schedule and weight decay; `log` gets the split."""
    adamw = dict(lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=True)
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(decay_groups(list(model.parameters()), tc.weight_decay), **adamw)
    hidden, rest = [], []
    for name, p in model.named_parameters():
        is_hidden = p.dim() >= 2 and not any(part in name for part in ("embed", "lm_head", "router"))
        (hidden if is_hidden else rest).append(p)
    if log is not None:
        log(f"optimizer: Muon for {len(hidden)} hidden matrices ({sum(p.numel() for p in hidden):,} parameters; the "
            f"experts of a stacked tensor orthogonalised each alone, all at once), AdamW for the embeddings, LM head, "
            f"norms and routers ({sum(p.numel() for p in rest):,} parameters)")
    return Optimizers(adamw=torch.optim.AdamW(decay_groups(rest, tc.weight_decay), **adamw),
                      muon=ExpertMuon(hidden, lr=tc.lr, weight_decay=tc.weight_decay, adjust_lr_fn="match_rms_adamw"))


def decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Two parameter groups: matrices with weight decay, vectors (norm gains) without."""
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class ExpertMuon(torch.optim.Muon):
    """torch.optim.Muon, which orthogonalises 2-D matrices one at a time, taught the stacked expert tensors and to
    orthogonalise matrices in batches.

    An (E, in, out) tensor holds E matrices, and a mixed update would be wrong: Newton-Schulz on the stack as one
    matrix would tie the experts together. So each expert's slice is orthogonalised as the (out, in) matrix an
    nn.Linear would hold, with its own norm, but all E as one batch (newton_schulz), and so are the 2-D weights of
    one shape: one batched matrix multiply per iteration instead of E, or one per layer, small ones. Each matrix's
    step is torch's Muon step on that matrix alone, to bfloat16's last rounding (a batched multiply may round
    differently from a single one; tests compare them), and the state is torch's (one momentum buffer per
    parameter). Sharded (--shard), a process holds whole experts and orthogonalises its own; a 2-D matrix, split
    by rows, is gathered whole for its Newton-Schulz, and each process keeps its rows of the result."""

    def __init__(self, params, **options):
        # torch's constructor refuses anything but 2-D parameters; its checked defaults come from a stand-in.
        defaults = torch.optim.Muon([torch.zeros(1, 1, requires_grad=True)], **options).defaults
        torch.optim.Optimizer.__init__(self, params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # as every torch optimizer takes one: re-evaluate the loss, with gradients
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # One batch per stacked expert tensor (its E matrices), and one for all the 2-D weights of a shape (the
            # q_proj of every block, say). Stacks are not batched together: at E x 4 layers the batch outgrows the
            # cache and runs slower than its parts.
            batches, matrices = [], {}
            for p in (p for p in group["params"] if p.grad is not None):
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                if p.dim() == 3:  # sharded (--shard), a process holds whole experts: its own are enough
                    batches.append(([p], local(update).mT))  # (E, out, in): each expert as nn.Linear holds it
                else:  # sharded, a process holds some rows of the matrix: it needs them all
                    matrices.setdefault(p.shape, []).append((p, whole(update)))
            batches += [([p for p, _ in pairs], torch.stack([u for _, u in pairs])) for pairs in matrices.values()]
            for params, updates in batches:  # updates (n, out, in)
                ortho = newton_schulz(updates, group["ns_coefficients"], group["ns_steps"], group["eps"])
                lr = muon_lr(group, *updates.shape[-2:])
                for p, o in zip(params, [ortho.mT] if params[0].dim() == 3 else ortho):
                    mine = local(p)
                    mine.mul_(1 - group["lr"] * group["weight_decay"])
                    mine.add_(o if p.dim() == 3 else local_rows(p, o), alpha=-lr)
        return loss


def local_rows(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The part of `full` (a whole update of p's shape) that this process's shard of p holds: all of it when p is
    not sharded. Every process computed the same `full`, so it is cut, not sent."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(p, DTensor):
        return full
    return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()


def whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor as one process sees all of it: a sharded one (a DTensor) gathered from every process."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: its shard of a sharded one (a DTensor), else all of it."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def newton_schulz(G: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> torch.Tensor:
    """torch.optim.Muon's orthogonalisation of a matrix (Jordan et al. 2024: the quintic Newton-Schulz iteration
    X <- aX + (bXX^T + c(XX^T)^2)X in bfloat16, from G scaled to norm 1, wide side last), over a batch of matrices
    (..., A, B), each scaled by its own norm."""
    a, b, c = coefficients
    tall = G.size(-2) > G.size(-1)
    X = G.bfloat16().reshape(-1, *G.shape[-2:])  # (batch, A, B)
    X = X.mT if tall else X  # (batch, short, long)
    X = X / torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = X @ X.mT  # (batch, short, short)
        X = torch.baddbmm(X, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), X, beta=a)
    return (X.mT if tall else X).reshape(G.shape)


def muon_lr(group: dict, A: int, B: int) -> float:
    """The learning rate of an (A, B) matrix's Muon step, as torch's adjust_lr_fn says: "match_rms_adamw", Moonshot's
    0.2 * sqrt(max(A, B)) (the update's RMS matched to AdamW's); "original", Keller Jordan's sqrt(max(1, A / B))."""
    if group["adjust_lr_fn"] == "match_rms_adamw":
        return group["lr"] * 0.2 * math.sqrt(max(A, B))
    return group["lr"] * math.sqrt(max(1, A / B)) if group["adjust_lr_fn"] in (None, "original") else group["lr"]


class Optimizers:
    """Several optimizers used as one (Muon's and AdamW's; PyTorch has no such wrapper): what train_step, the
    gradient scaler and the checkpoints use of an optimizer. param_groups (which the learning-rate schedule sets)
    and state are gathered anew at each use, as load_state_dict replaces an optimizer's lists."""

    def __init__(self, **named: torch.optim.Optimizer):
        self.named = named

    param_groups = property(lambda self: [group for opt in self.named.values() for group in opt.param_groups])
    state = property(lambda self: {p: s for opt in self.named.values() for p, s in opt.state.items()})
    parts = property(lambda self: list(self.named.values()))  # the torch optimizers, for torch's checkpoint API

    def step(self) -> None:
        for opt in self.named.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.named.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.named.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, opt in self.named.items():
            opt.load_state_dict(state[name])


@torch.no_grad()
def evaluate(model: H64LM, tokens: np.ndarray, seq_len: int, batch_size: int, rt: Runtime,
             max_batches: int | None = None, progress: bool = False) -> tuple[float, int]:
    """Summed next-token NLL (nats) and the number of predicted tokens over non-overlapping windows of the
    token array, in order; each process takes every world_size-th batch and the sums are all-reduced.
    With max_batches=None every token after the first is predicted exactly once. progress: a bar on stderr."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    windows = PackedWindows(tokens, seq_len)
    starts = list(range(0, windows.count, batch_size))[: max_batches]
    total = torch.zeros(2, dtype=torch.float64, device=rt.device)  # (NLL, tokens)
    mine = starts[rt.rank::rt.world_size]
    # A sharded model's forward gathers its weights from every process: a process with no batch of its own left
    # runs its first one again, uncounted, so that all run the same forwards.
    sharded = any(local(p) is not p for p in model.parameters())
    rounds = -(-len(starts) // rt.world_size) if sharded else len(mine)
    for i in tqdm(range(rounds), desc="evaluating", unit="batch", leave=False, disable=not (progress and rt.master)):
        start = mine[min(i, len(mine) - 1)] if mine else 0
        x, y = windows.batch(range(start, min(start + batch_size, windows.count)))
        x, y = x.to(rt.device), y.to(rt.device)
        with rt.autocast():
            logits = model(x).logits
        if i < len(mine):
            total[0] += token_nll(logits, y, reduction="sum").double()
            total[1] += y.numel()
    # The tokens after the last full window: one more window that ends at the last token, scoring only them.
    tail = len(tokens) - 1 - windows.count * seq_len
    if tail > 0 and max_batches is None and (rt.master or sharded):
        span = min(seq_len, len(tokens) - 1)
        x = torch.from_numpy(tokens[-span - 1:-1].astype(np.int64))[None].to(rt.device)  # (1, span)
        y = torch.from_numpy(tokens[-span:].astype(np.int64))[None].to(rt.device)
        with rt.autocast():
            logits = model(x).logits[:, -tail:]
        if rt.master:
            total[0] += token_nll(logits, y[:, -tail:], reduction="sum").double()
            total[1] += tail
    if rt.world_size > 1:
        torch.distributed.all_reduce(total)
    model.train(was_training)
    return total[0].item(), int(total[1].item())


def validate(run: Run) -> float:
    """The validation loss on eval_batches batches, recorded in the history (and the best so far kept)."""
    nll, count = evaluate(run.model, run.valid_tokens, run.seq_len, run.tc.batch_size, run.rt, run.tc.eval_batches)
    val_loss = nll / count
    if not math.isfinite(val_loss):
        raise diverged("The validation loss", run.step - 1, run)
    run.best_val = min(run.best_val, val_loss)
    run.history["val"].append({"step": run.step, "loss": val_loss, "ppl": math.exp(min(val_loss, 50)),
                               "tokens": run.step * run.tokens_per_step, "seconds": run.seconds})
    return val_loss


def diverged(what: str, step: int, run: Run) -> H64LMError:
    """The error that stops a run whose loss, gradient or weights stopped being finite."""
    then = (f"continue from it with a lower --lr (or start again with a longer --warmup-steps), e.g. "
            f"{resume_command(run.run_dir, run.rt)} --lr {run.tc.lr / 10:.2g}" if run.saved
            else "start again with a lower --lr or a longer --warmup-steps")
    return H64LMError(f"{what} became NaN or infinite at step {step}, so nothing from that step on was saved; "
                      f"{last_good(run.saved)}; {then}.")


def last_good(checkpoint: tuple[Path, int] | None) -> str:
    """What stays on disk if the run stops now: (path, step) of its last checkpoint, or None."""
    if checkpoint is None:
        return "no checkpoint of this run was saved before"
    return f"the last checkpoint, {checkpoint[0]} (step {checkpoint[1]}, every number in it finite), is kept"


def resume_command(run_dir: Path, rt: Runtime) -> str:
    launcher = f"torchrun --nproc_per_node={rt.world_size} h64lm.py" if rt.world_size > 1 else "python h64lm.py"
    return f"{launcher} train --resume {run_dir}"


# --- Settings -----------------------------------------------------------------
# Every setting of a run, with its meaning, unit and source; each one is also
# a flag of `h64lm.py train` (section 24).


@dataclass
class TrainConfig:
    data: str = "auto"  # "auto", "wikitext-103", "sample" or a folder of wiki.*.raw / parquet / .txt files
    run_name: str | None = None  # name of the run folder under --out-dir; default: the preset's name
    out_dir: str = str(ROOT / "checkpoints")  # where run folders are written
    overwrite: bool = False  # replace a run folder that already holds a run
    tokenizer: str = str(DEFAULT_TOKENIZER)  # folder of a Hugging Face tokenizer, or "bpe:N": a byte-level BPE of N
    # tokens trained on --data's training split, once, and cached in --cache-dir (tokenizer_folder)
    cache_dir: str = str(DEFAULT_CACHE)  # where tokenized splits are cached
    seq_len: int | None = None  # tokens per training sequence; default: the model's max_position_embeddings
    batch_size: int = 16  # sequences per micro-batch per process
    grad_accum: int = 4  # micro-batches per optimizer step; global batch = batch_size x grad_accum x processes
    max_steps: int = 5000  # optimizer steps
    optimizer: str = "adamw"  # "adamw", or "muon": Muon for the hidden matrices, AdamW for the rest (make_optimizer)
    lr: float = 6e-4  # peak learning rate; GPT-3 (Brown et al. 2020, table 2.1) for a model of 125M active
    min_lr: float = 6e-5  # learning rate at the end of the cosine decay; lr / 10 as in Chinchilla
    warmup_steps: int = 200  # steps of linear warm-up from 0 to lr
    weight_decay: float = 0.1  # AdamW decoupled weight decay on matrices only (GPT-3)
    beta1: float = 0.9  # AdamW first-moment decay (GPT-3)
    beta2: float = 0.95  # AdamW second-moment decay (GPT-3)
    grad_clip: float = 1.0  # maximum global gradient norm; 0 = no clipping (GPT-3)
    eval_every: int = 250  # steps between validations; each one also saves latest.pt, and best.pt when it improves
    save_every: int = 250  # steps between saves of latest.pt (also saved at every validation and at the end)
    stop_at: int | None = None  # stop after this step, saved, without changing the schedule; continue with --resume
    eval_batches: int = 20  # validation micro-batches per evaluation
    log_every: int = 10  # steps between entries of training_history.json
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "bf16", "fp16" or "fp32"
    compile: bool | None = None  # torch.compile each block (compile_blocks); None: on CUDA, where it pays, not
    # on a CPU, where it does not (README, Speed)
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    shard: bool = False  # under torchrun, FSDP2: each process holds 1/N of the weights, gradients and optimizer state,
    # and saves its share (section 20); without it each holds them all (DistributedDataParallel)
    device: str = "auto"  # "auto", "cpu" or "cuda"
    seed: int = 1337  # seeds the weights, the data order and the router noise

    # The values each number may take (None, where a field allows it, always passes).
    RANGES: ClassVar[dict[str, Range]] = dict(
        seq_len=COUNT, batch_size=COUNT, grad_accum=COUNT, max_steps=COUNT, lr=POSITIVE, min_lr=NON_NEGATIVE,
        warmup_steps=Range(0, integer=True), weight_decay=NON_NEGATIVE, beta1=Range(0, 1, high_open=True),
        beta2=Range(0, 1, high_open=True), grad_clip=NON_NEGATIVE, eval_every=COUNT, save_every=COUNT,
        stop_at=COUNT, eval_batches=COUNT, log_every=COUNT, seed=SEED)

    def __post_init__(self):
        check_ranges(self, self.RANGES)
        check_choices(vars(self))
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr}).")
        if self.run_name is not None:
            check_run_name(self.run_name)


def check_run_name(name: str) -> None:
    """A run name names one folder inside --out-dir: no separator, not '.' or '..', nothing that leaves it."""
    if name in ("", ".", "..") or any(c in name for c in ("/", os.sep, os.altsep or "/", "\0")):
        raise ValueError(f"the run name {name!r} is not a folder name; give a name without '/' (the folder it goes "
                         "in is --out-dir).")


# Training recipes, like the model presets, list only what differs from the defaults above (the h64lm GPU recipe).
TRAIN_RECIPES: dict[str, dict] = {
    # The CPU demo: 800 steps of 8 x 128 tokens, minutes on 2 cores (README, Training). Muon at 4e-3, the best of a
    # learning-rate sweep of both optimizers on this recipe (README, AdamW vs Muon).
    "tiny": dict(batch_size=8, grad_accum=1, seq_len=128, max_steps=800, optimizer="muon", lr=4e-3, min_lr=1e-4,
                 warmup_steps=40, eval_every=200, save_every=200, eval_batches=10),
    "small": dict(batch_size=16, grad_accum=2, max_steps=3000, lr=1e-3, min_lr=1e-4, warmup_steps=100),
    "h64lm": dict(),
}


# -----------------------------------------------------------------------------
# 16. Runs and checkpoints
# -----------------------------------------------------------------------------
# A run is a folder under --out-dir: its checkpoints, its history and its
# plots. Device and precision are decided once: bf16 autocast on CUDA
# (weights and optimizer state stay float32), fp16 with a gradient scaler if
# asked, float32 on CPU. Several processes are started by torchrun, which
# sets RANK, WORLD_SIZE and LOCAL_RANK; each process takes its share of every
# batch, DistributedDataParallel averages the gradients, and rank 0 alone
# prints and saves. A run survives being stopped: its checkpoint holds all it
# needs to go on exactly, written so that a crash at any moment leaves a whole
# one, and nothing non-finite is ever saved. The workshop (Part II) acts in a
# run only through seams, each harmless by default; this section's are train's
# should_stop, on_start and on_save, SHARDING, SAVE_CHECKS, PROVENANCE and
# CHECKPOINT_READERS.


# --- Where a run runs ---------------------------------------------------------


@dataclass
class Runtime:
    """Where this process runs: decided once, from torchrun's environment and --device / --precision."""
    device: torch.device
    rank: int = 0  # this process among all of them
    world_size: int = 1
    dtype: torch.dtype = torch.float32  # autocast dtype; float32 = no autocast

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def setup_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    if device == "cuda" and not torch.cuda.is_available():
        raise H64LMError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu.")
    check_choices(dict(device=device, precision=precision))  # a library caller's: the parser has checked its own
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
              "auto": torch.bfloat16 if use_cuda else torch.float32}
    if precision == "fp16" and not use_cuda:
        raise H64LMError("--precision fp16 needs a CUDA GPU; on CPU use fp32 (or bf16).")
    return Runtime(device=dev, rank=rank, world_size=world_size, dtype=dtypes[precision])


# --- The whole run ------------------------------------------------------------
# train starts or resumes the run (start_run, below); train_loop steps it to
# max_steps, logging, validating and saving as the settings say, and stops
# early, saved, at --stop-at or when should_stop asks.


@dataclass
class Run:
    """What a training run holds from one step to the next (start_run makes it; train_step and save_run use it)."""
    config: H64LMConfig
    tc: TrainConfig
    rt: Runtime
    run_dir: Path
    model: H64LM  # the plain model, whose weights are saved
    step_model: nn.Module  # what a step calls: the model, compiled and/or wrapped in DDP as asked
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    windows: PackedWindows  # the training split's windows
    valid_tokens: np.ndarray
    seq_len: int
    provenance: dict  # what its checkpoints record of its tokenizer and text (PROVENANCE.record)
    history: dict
    step: int = 0  # optimizer steps done
    best_val: float = float("inf")
    saved: tuple[Path, int] | None = None  # (path, step) of the last checkpoint written or resumed from
    seconds: float = 0.0  # wall-clock of the training loop (steps, validations, saves), resumed runs included
    peak_flops: float | None = None  # FLOP/s of all the devices together, for MFU (section 19 measures it)

    @property
    def global_batch(self) -> int:  # sequences per optimizer step, over every process
        return self.tc.batch_size * self.tc.grad_accum * self.rt.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


def train(config: H64LMConfig, tc: TrainConfig, preset: str = "custom", resume: str | Path | None = None,
          allow_mismatch: bool = False, trained: Trained | None = None,
          on_step: Callable[[dict], None] | None = None, should_stop: Callable[[], str | None] = lambda: None,
          on_start: Callable[[Run], None] | None = None,
          on_save: Callable[[Run, bool], None] | None = None) -> dict:
    """Pretrain a model, or continue the run saved at `resume` (trained: that checkpoint, if the caller has opened
    it already; train empties it once the run holds its state); return the run's history. Writes <out_dir>/<run>/
    (rank 0 only), the folder at the first save. allow_mismatch: resume although the tokenizer or the text differ
    from the checkpoint's. on_step(history) is called after every step, e.g. to draw the loss as it falls.

    The seams: should_stop() is asked after every step and returns why the run should stop there, saved, or None;
    on_start(run) is called once the run is built or resumed, before its first step; on_save(run, last) after every
    save (last: the run's final one). `h64lm.py train` fills them with its guards (section 19)."""
    rt = setup_runtime(tc.device, tc.precision)
    log = print if rt.master else (lambda *a, **k: None)
    if resume is not None and trained is None:
        trained = open_trained(resume, rt.device, latest=True, build=False)
    run = start_run(config, tc, rt, Path(tc.out_dir) / (tc.run_name or preset), trained, allow_mismatch, log)
    if trained is not None:  # consumed: its tensors are copied into the run; at h64lm size they are 3 GB
        trained.ckpt.clear()
    if on_start is not None:
        on_start(run)
    train_loop(run, log, on_step, should_stop, on_save)
    history = run.history
    if rt.world_size > 1:
        # DDP's reducer holds the process group and sits in a reference cycle: freed by a later garbage collection,
        # after the group was torn down and the other processes left, it would wait for them forever.
        del run
        gc.collect()
        torch.distributed.barrier()  # no process tears down gloo while another still uses it
        torch.distributed.destroy_process_group()
    return history


def train_loop(run: Run, log, on_step: Callable[[dict], None] | None = None,
               should_stop: Callable[[], str | None] = lambda: None,
               on_save: Callable[[Run, bool], None] | None = None) -> None:
    """Steps until max_steps or a stop (--stop-at, or should_stop on any process), each one logged, and validated
    and saved as often as the TrainConfig says; a stop saves at the end of the step in flight."""
    from tqdm.auto import tqdm

    tc, rt = run.tc, run.rt
    flops_per_token = run.model.flops_per_token(run.seq_len)
    if run.peak_flops:
        run.history["peak_flops"] = run.peak_flops
    quiet = {} if rt.master else {"disable": True}  # on rank 0 the bar obeys tqdm's own TQDM_DISABLE
    bar = tqdm(range(run.step, tc.max_steps), desc="training", unit="step", dynamic_ncols=True, initial=run.step,
               total=tc.max_steps, **quiet)
    run.step_model.train()
    t_last, window_load = time.perf_counter(), None  # window_load: (L, E) summed since the last validation
    compiling = compiles(tc, rt)  # the first step compiles: its time is its own line, not a speed
    for step in bar:
        started = time.perf_counter()
        stats = train_step(run, step)
        now = time.perf_counter()
        run.seconds, t_last = run.seconds + now - t_last, now  # validations and saves included
        speed = {"tokens_per_s": run.tokens_per_step / (now - started)}  # the step alone: every process's tokens
        if compiling:
            speed, compiling = {"compile_seconds": now - started}, False
            log(f"step {step + 1} compiled the blocks: {now - started:.1f} s, left out of tokens/s")
        elif run.peak_flops:  # model FLOP utilisation: the share of the devices' peak that the model's FLOPs use
            speed["mfu"] = speed["tokens_per_s"] * flops_per_token / run.peak_flops
        load = stats.pop("load")  # (L, E)
        balance = ({} if not len(load) else {"aux": f"{stats['aux_loss']:.3f}"} if stats["aux_loss"]
                   else {"maxvio": f"{max_violation(load).mean():.2f}"})  # without a loss: how even the load is
        tok_s = {"tok_s": f"{speed['tokens_per_s']:,.0f}"} if "tokens_per_s" in speed else {}
        mfu = {"mfu": f"{speed['mfu']:.1%}"} if "mfu" in speed else {}
        bar.set_postfix(loss=f"{stats['lm_loss']:.3f}", **balance, lr=f"{stats['lr']:.2e}", **tok_s, **mfu)
        window_load = load if window_load is None else window_load + load
        if step % tc.log_every == 0 or step == tc.max_steps - 1:
            run.history["train"].append(history_record(run, stats, load, **speed))
        stopping = stop_reason(run, should_stop())
        val_loss = None
        if run.step % tc.eval_every == 0 or run.step == tc.max_steps:
            val_loss, window_load = validate_and_flag(run, window_load), None
        if val_loss is not None or stopping or run.step % tc.save_every == 0:
            last = bool(stopping) or run.step == tc.max_steps
            save_run(run, val_loss, last)
            if on_save is not None:
                on_save(run, last)
        if on_step is not None:
            on_step(run.history)
        if stopping:
            bar.close()
            report_stop(run, stopping, log)
            break
    bar.close()


def stop_reason(run: Run, asked: str | None) -> str | None:
    """Why the run stops after this step, or None: what should_stop said on any process (all of them then stop
    after the same step), or --stop-at."""
    if run.rt.world_size > 1:
        anyone = torch.tensor(float(asked is not None), device=run.rt.device)
        torch.distributed.all_reduce(anyone)
        asked = asked or ("at another process's request" if anyone else None)
    return asked or (f"at --stop-at {run.tc.stop_at}" if run.step == run.tc.stop_at else None)


def validate_and_flag(run: Run, window_load: torch.Tensor | None) -> float:
    """validate, and flag the experts nearly dead or overloaded since the last validation (window_load (L, E): the
    load summed over those steps) in the validation's history entry; rank 0 writes both under the progress bar."""
    from tqdm.auto import tqdm

    val_loss = validate(run)
    flags = unbalanced_experts(window_load, run.config.moe_layer_ids)
    run.history["val"][-1]["routing_flags"] = flags
    if run.rt.master:
        tqdm.write(f"step {run.step}: validation loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 50)):.2f}")
        for flag in flags:
            tqdm.write(f"  warning: {flag}")
    return val_loss


def report_stop(run: Run, why: str, log) -> None:
    """Say why the run stopped before max_steps and how to continue it; the history keeps the why."""
    log(f"stopped {why}, step {run.step} of {run.tc.max_steps}, saved in {run.run_dir / 'latest.pt'}; "
        f"continue with: {resume_command(run.run_dir, run.rt)}")
    run.history["stopped"] = why


def history_record(run: Run, stats: dict, load: torch.Tensor, **speed) -> dict:
    """One entry of training_history.json: what train_step measured, the tokens and time so far, and per MoE layer
    the step's load (each expert's share of the tokens), its MaxVio and the router's entropy (nats, on the step's
    last micro-batch). load (L, E)."""
    layers = [str(i) for i in run.config.moe_layer_ids]
    return {**stats, "tokens": run.step * run.tokens_per_step, "seconds": run.seconds, **speed,
            "expert_load": dict(zip(layers, (load / load.sum(-1, keepdim=True).clamp_min(1)).tolist())),
            "max_vio": dict(zip(layers, max_violation(load).tolist())),
            "router_entropy": {str(i): s.router_entropy.item() for i, s in run.model.routing_stats().items()}}


# --- Starting and resuming ----------------------------------------------------
# start_run turns settings into a Run (data, model, optimizer), and when
# resuming puts a checkpoint's state back into it (restore_run); save_run
# writes it out.


def start_run(config: H64LMConfig, tc: TrainConfig, rt: Runtime, run_dir: Path, trained: Trained | None = None,
              allow_mismatch: bool = False, log=print) -> Run:
    """Everything a run needs before its first step: data, model, optimizer, and, when resuming, the state of the
    checkpoint trained (opened once, by the caller, without building its model). Seeds so that a run is a function
    of its settings."""
    seq_len = seq_len_of(config, tc.seq_len)
    check_seq_len(seq_len, config, remedy="lower it or raise --max-position-embeddings")
    if trained is not None and trained.config.to_dict() != config.to_dict():
        changed = [k for k, v in config.to_dict().items() if trained.ckpt["config"].get(k) != v]
        raise H64LMError(f"The run in {trained.path} is a different model ({', '.join(changed)} differ); resume it "
                         "with its own settings, or start a new --run-name.")
    if tc.shard and SHARDING is None:
        raise H64LMError("--shard needs the whole h64lm.py (its sharding is in Part II, section 20); train without "
                         "--shard here.")
    elif tc.shard:
        SHARDING.refuse(tc, rt, trained)
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    torch.manual_seed(tc.seed + rt.rank)  # each rank its own stream: router jitter differs per rank
    tokenizer, source, splits = load_run_data(config, tc, rt, seq_len, log)
    if trained is not None and not allow_mismatch:
        PROVENANCE.check(trained.ckpt, trained.path, tokenizer, source)
    run = new_run(config, tc, rt, run_dir, splits["train"].tokens, splits["valid"].tokens, seq_len,
                  PROVENANCE.record(tokenizer, source), log)
    if trained is not None:
        restore_run(run, trained.ckpt, trained.path, log)  # last: nothing above draws from the restored generators
    else:
        log(run.model.parameter_table(seq_len))
    if run.step >= tc.max_steps:
        raise H64LMError(f"The run in {run_dir} already finished its {tc.max_steps} steps; raise --max-steps to "
                         "train it further.")
    return run


def load_run_data(config: H64LMConfig, tc: TrainConfig, rt: Runtime, seq_len: int, log):
    """The tokenizer, the text source and its splits as tokens, checked to be big enough for one batch."""
    def tokenize():  # rank 0 first: it trains a bpe:N tokenizer and fills the token cache, the others read them
        source = open_text_source(tc.data, log)
        tokenizer = load_tokenizer(tokenizer_folder(tc.tokenizer, source, tc.cache_dir, log))
        check_vocab(tokenizer, config)
        return tokenizer, *load_token_splits(source, tokenizer, tc.cache_dir, log=log)

    tokenizer, source, splits = rank0_first(rt, tokenize)
    windows = PackedWindows(splits["train"].tokens, seq_len).count
    global_batch = tc.batch_size * tc.grad_accum * rt.world_size
    if windows < global_batch:
        raise H64LMError(f"The training split has {windows} windows of {seq_len} tokens, fewer than one batch "
                         f"({global_batch}); lower --batch-size or --seq-len.")
    if PackedWindows(splits["valid"].tokens, seq_len).count < 1:
        raise H64LMError(f"The validation split has fewer than {seq_len + 1} tokens; give it more text or lower "
                         "--seq-len.")
    log(f"data: {source.name}: {len(splits['train'].tokens):,} training tokens, "
        f"{len(splits['valid'].tokens):,} validation tokens"
        + ("" if tc.data == "wikitext-103" else "; --data wikitext-103 insists on WikiText-103"))
    return tokenizer, source, splits


# How long the other processes wait for rank 0 to tokenize a text (rank0_first). The first run on WikiText-103
# tokenizes 540 MB of text for minutes; NCCL's watchdog aborts a collective after 10 minutes, and gloo's default
# is 30. If rank 0 fails instead, torchrun stops the others at once, so a long wait costs nothing then.
TOKENIZE_WAIT = datetime.timedelta(hours=4)


def rank0_first(rt: Runtime, fn: Callable[[], object]):
    """fn() on rank 0, then on the others: rank 0 tokenizes and fills the cache, and the others read it, so the
    work is done once. They wait in a barrier of their own, on gloo with a TOKENIZE_WAIT timeout, not on NCCL."""
    if rt.world_size == 1:
        return fn()
    group = torch.distributed.new_group(backend="gloo", timeout=TOKENIZE_WAIT)
    if not rt.master:
        torch.distributed.barrier(group=group)
    result = fn()
    if rt.master:
        torch.distributed.barrier(group=group)
    torch.distributed.destroy_process_group(group)
    return result


def new_run(config: H64LMConfig, tc: TrainConfig, rt: Runtime, run_dir: Path, train_tokens: np.ndarray,
            valid_tokens: np.ndarray, seq_len: int, provenance: dict, log=None) -> Run:
    """A run at step 0 on these tokens: the model with its initial weights, the same on every rank, then what a
    step calls (step_model_of), the optimizer (log gets its parameter split) and the gradient scaler."""
    with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []):
        torch.manual_seed(tc.seed)  # the same initial weights on every rank, drawn aside from the rank's stream
        model = H64LM(config).to(rt.device)
    model.gradient_checkpointing = tc.gradient_checkpointing
    return Run(config=config, tc=tc, rt=rt, run_dir=run_dir, model=model, step_model=step_model_of(model, tc, rt),
               optimizer=make_optimizer(model, tc, rt.device, log), scaler=grad_scaler(rt),
               windows=PackedWindows(train_tokens, seq_len), valid_tokens=valid_tokens, seq_len=seq_len,
               provenance=provenance,
               history={"config": config.to_dict(), "train_config": asdict(tc), "train": [], "val": []})


def step_model_of(model: H64LM, tc: TrainConfig, rt: Runtime) -> nn.Module:
    """What a training step calls: the model, its blocks compiled if asked, under torchrun sharded (--shard) or in
    DDP. Sharding replaces the weights by their shards in place: build the optimizer after it."""
    step_model = compile_blocks(model) if compiles(tc, rt) else model
    if tc.shard:
        return SHARDING.wrap(step_model, rt)
    if rt.world_size > 1:
        step_model = nn.parallel.DistributedDataParallel(step_model, device_ids=None if rt.device.type == "cpu"
                                                         else [rt.device.index])
    return step_model


def compiles(tc: TrainConfig, rt: Runtime) -> bool:
    """Whether the blocks are compiled: as --compile / --no-compile says, by default on CUDA where torch can."""
    if tc.compile is not None:
        return tc.compile
    return rt.device.type == "cuda" and torch._dynamo.is_dynamo_supported()


def compile_blocks(model: H64LM) -> H64LM:
    """Regional compilation: torch.compile each block in place, not the whole model. The blocks of one kind share
    one compiled program, so compiling takes seconds, and what it can buy is the fusion of the elementwise work
    around the matrix multiplies (RMSNorm, RoPE, SiLU and the gating product, the router's softmax and top-k),
    which runs as a few hundred separate operators otherwise (README, Speed, has what it buys on a CPU). The
    weights keep their names: checkpoints are the same."""
    for block in model.blocks:
        block.compile()
    return model


def grad_scaler(rt: Runtime) -> torch.amp.GradScaler:
    """fp16's gradient scaler (Micikevicius et al. 2018): off in bf16 and float32, whose range needs none."""
    return torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)


def restore_run(run: Run, ckpt: dict, resume: Path, log) -> None:
    """Put a checkpoint's state into a fresh run: the weights (checked against the config by open_trained; a
    sharded run's shards: SHARDING.load), the optimizer, the gradient scaler, step, best validation loss, history, and
    every process's random generators, so that the run goes on exactly as if it had not stopped."""
    try:
        was = TrainConfig(**ckpt["train_config"])
        if was.optimizer != run.tc.optimizer:
            raise H64LMError(f"The run in {resume} was trained with --optimizer {was.optimizer}, whose state does "
                             f"not fit {run.tc.optimizer}; resume it with --optimizer {was.optimizer}, or start a "
                             "new --run-name.")
        if was.shard != run.tc.shard:
            raise H64LMError(f"The run in {resume} was {'' if was.shard else 'not '}trained with --shard; resume "
                             f"it {'with' if was.shard else 'without'} it (python h64lm.py unshard makes a sharded "
                             "checkpoint one file).")
        if run.tc.shard:
            SHARDING.load(run, resume, ckpt)
        else:
            run.model.load_state_dict(ckpt["model"])
            run.optimizer.load_state_dict(ckpt["optimizer"])
        run.scaler.load_state_dict(ckpt["scaler"])
        run.step, run.best_val, run.seconds = ckpt["step"], ckpt["best_val_loss"], ckpt.get("seconds", 0.0)
        run.history["train"] = [r for r in ckpt["history"]["train"] if r["step"] < run.step]
        run.history["val"] = [r for r in ckpt["history"]["val"] if r["step"] <= run.step]
        states = ckpt["rng"]
    except (KeyError, TypeError, ValueError):
        raise H64LMError(f"{resume} holds the weights but not a whole training state (its optimizer state or "
                         "history is missing or damaged); start a new run from scratch.") from None
    run.saved = (Path(resume), run.step)
    log(f"resuming {run.run_dir} from step {run.step} of {run.tc.max_steps}")
    if was.max_steps != run.tc.max_steps:
        log(f"--max-steps {run.tc.max_steps} (was {was.max_steps}): the cosine schedule now ends at step "
            f"{run.tc.max_steps}, so the learning rate goes from {learning_rate(run.step - 1, was):.2e} to "
            f"{learning_rate(run.step, run.tc):.2e} at step {run.step}")
    if len(states) != run.rt.world_size:
        warnings.warn(f"The run was saved by {len(states)} processes and goes on with {run.rt.world_size}; the "
                      "random state (router jitter only) is not continued exactly.")
    set_rng_state(states[run.rt.rank % len(states)])


def save_run(run: Run, val_loss: float | None = None, last: bool = True) -> None:
    """latest.pt (and best.pt when val_loss is the best so far) and the history, for the steps done. Nothing
    non-finite reaches the disk: a finite loss can be followed by a step that broke the weights. last: the run's
    final save (train_loop tells on_save)."""
    broken = [nonfinite_state(run.model, run.optimizer)]  # sharded, each process checks its own part
    if run.tc.shard:
        broken *= run.rt.world_size
        torch.distributed.all_gather_object(broken, broken[0])
    if (broken := next(filter(None, broken), None)) is not None:
        raise diverged(broken, run.step - 1, run)
    # Every process's random state travels with the checkpoint, gathered on rank 0.
    states = [None] * run.rt.world_size
    if run.rt.world_size > 1:
        torch.distributed.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    payload = {"config": run.config.to_dict(), "train_config": asdict(run.tc), "scaler": run.scaler.state_dict(),
               "step": run.step, "tokens_seen": run.step * run.tokens_per_step, "best_val_loss": run.best_val,
               "val_loss": val_loss, "history": run.history, "rng": states, "world_size": run.rt.world_size,
               "seconds": run.seconds, **run.provenance,
               **({"shards": SHARDING.save(run)} if run.tc.shard else
                  {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict()})}
    best = val_loss is not None and val_loss <= run.best_val
    on_rank0(run.rt, lambda: write_run_files(run.run_dir, payload, run.history, best))
    run.saved = (run.run_dir / "latest.pt", run.step)


def write_run_files(run_dir: Path, payload: dict, history: dict, best: bool) -> None:
    """latest.pt, best.pt when the validation loss is the best so far, and the history (rank 0). A sharded run's
    shards are written before the files that name them, and those that no file names any more go after."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(run_dir / "latest.pt", payload)
    if best:
        save_checkpoint(run_dir / "best.pt", payload)
    if "shards" in payload:
        SHARDING.prune(run_dir, payload, best)
    write_atomically(run_dir / "training_history.json", lambda tmp: tmp.write_text(json.dumps(history, indent=1)))


@dataclass
class Sharding:
    """The seam for --shard, which Part I alone refuses: section 20 fills SHARDING with FSDP2, which splits the model
    over the processes, and a checkpoint file that names a folder of shards instead of holding the state."""
    refuse: Callable[[TrainConfig, Runtime, Trained | None], None]  # raises H64LMError where a run cannot shard
    wrap: Callable[[H64LM, Runtime], nn.Module]  # shards the model in place; the optimizer is built after it
    save: Callable[[Run], str]  # every process writes its shards; returns their folder's name, for the checkpoint
    load: Callable[[Run, Path, dict], None]  # (run, path, ckpt): the checkpoint's shards into a fresh sharded run
    read: Callable[[Path, dict, H64LMConfig, torch.device, bool], dict]  # whole weights in one process (open_trained)
    prune: Callable[[Path, dict, bool], None]  # (run_dir, payload, best): removes the shards no file names any more


SHARDING: Sharding | None = None


def on_rank0(rt: Runtime, fn: Callable[[], object]):
    """fn() on rank 0 alone (the process that owns the run folder). An H64LMError or OSError it raises is raised,
    as an H64LMError, on every process, which would otherwise wait for rank 0 at their next collective call."""
    result, message = None, None
    if rt.master:
        try:
            result = fn()
        except (H64LMError, OSError) as e:
            message = one_sentence(e)
    if rt.world_size > 1:
        box = [message]
        torch.distributed.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise H64LMError(message)
    return result


# --- Checkpoints --------------------------------------------------------------
# A checkpoint is one file that holds everything a run needs to go on exactly
# where it stopped: weights, optimizer and gradient-scaler state, step, the
# random-number generators of every process, the best validation loss and the
# history so far. (The data order needs nothing saved: it is a function of the
# seed and the step, see train_window_indices.)
#
# It is written to a temporary name in the same folder, flushed to disk and
# then renamed over the old file (os.replace is atomic): a crash or a SIGKILL
# at any moment leaves either the old checkpoint or the new one, never half of
# one. It holds only tensors and plain Python values, so it is read with
# torch.load(weights_only=True), which refuses any pickle that would run code.
#
# A sharded run (--shard) keeps its weights and optimizer state apart, in a
# folder of shards beside that file, which names it (SHARDING.save); the file is
# still written last and atomically.
#
# For sharing, `h64lm.py export` writes just the weights as safetensors plus the
# config as JSON; open_trained reads that form too.
CHECKPOINT_FORMAT = "h64lm-checkpoint"
CHECKPOINT_VERSION = 1
# The seam for checks before a checkpoint is written: each is called with its path and the bytes of its tensors,
# and raises H64LMError to refuse (section 19 adds the free-disk check).
SAVE_CHECKS: list[Callable[[Path, int], None]] = []


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write payload atomically to path (write_atomically), after SAVE_CHECKS."""
    tensor_bytes = sum(t.numel() * t.element_size() for t in _tensors(payload))
    for check in SAVE_CHECKS:
        check(path, tensor_bytes)
    try:
        write_atomically(path, lambda tmp: torch.save(
            {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}, tmp))
    except OSError as e:
        raise H64LMError(f"Saving the checkpoint {path} failed ({e.strerror or e}); free disk space or choose "
                         "another --out-dir.") from None


def nonfinite_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> str | None:
    """The name of the first weight (or optimizer state) holding a NaN or an infinity, or None if all are finite.
    Checked before every save: a loss can be finite while the step that followed it broke the weights."""
    for name, p in model.named_parameters():
        if not torch.isfinite(local(p)).all():  # sharded: this process's part (save_run asks them all)
            return f"the weight {name}"
    names = {id(p): name for name, p in model.named_parameters()}
    for p, state in (optimizer.state.items() if optimizer is not None else ()):
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(local(value)).all():
                return f"the optimizer's {key} of {names.get(id(p), 'a weight')}"
    return None


def _tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def resolve_checkpoint(path: str | Path, latest: bool = False) -> Path:
    """The checkpoint file a path means: a file is itself. A run folder means its best.pt, the best model it saved
    (else latest.pt, else an exported folder's model.safetensors): what evaluating, sampling, analysing and
    exporting use. With latest=True it means latest.pt, where the run stopped: what resuming continues. This is the
    one place where either rule is written."""
    path = Path(path).expanduser()
    if latest:
        path = path / "latest.pt" if path.is_dir() else path
        if not path.exists():
            raise H64LMError(f"Nothing to resume at {path}; give a run folder holding latest.pt or a .pt file.")
        return path
    if path.is_dir():
        for name in ("best.pt", "latest.pt", "model.safetensors"):
            if (path / name).exists():
                return path / name
        raise H64LMError(f"{path} holds no best.pt, latest.pt or model.safetensors; point --ckpt at a run folder "
                         "of `h64lm.py train`.")
    if not path.exists():
        raise H64LMError(f"No checkpoint at {path}; point --ckpt at a run folder or a .pt file.")
    return path


@dataclass
class Provenance:
    """The seam for a checkpoint's provenance, which section 19 fills: what a checkpoint records of the tokenizer and
    the text it was trained on, and the check that refuses others when it is resumed, scored or sampled. Part I alone
    records and checks nothing, and reads a checkpoint with the tokenizer it is given ("recorded": the default)."""
    record: Callable[[object, TextSource], dict] = lambda tokenizer, source: {}  # entries every checkpoint keeps
    check: Callable[..., None] = lambda ckpt, path, tokenizer=None, source=None: None  # raises H64LMError if not theirs
    tokenizer: Callable[[dict, Path], Path] = lambda ckpt, path: DEFAULT_TOKENIZER  # the folder of the one it records


PROVENANCE = Provenance()


@dataclass
class Trained:
    """A trained model as open_trained gives it."""
    path: Path  # the file it was read from
    config: H64LMConfig
    ckpt: dict  # all the file holds: the weights (checked, prefixes stripped), and step, train_config, provenance
    model: H64LM | None = None  # None when open_trained was asked not to build it (resuming builds its own)
    tokenizer: object = None  # the tokenizer asked for, once checked against the model


def open_trained(path: str | Path, device: torch.device | str = "cpu", *, latest: bool = False, build: bool = True,
                 tokenizer: str | Path | None = None, allow_mismatch: bool = False) -> Trained:
    """The one way a trained model is opened: find the file path means (resolve_checkpoint; latest=True for
    latest.pt, to resume, else best.pt), read it, check its config and weights once, build the model on device
    (unless build=False), and with a tokenizer (its folder, or "recorded": the one the checkpoint records) load it
    and refuse one the model cannot read or was not trained with (allow_mismatch: let the second pass)."""
    path = resolve_checkpoint(path, latest)
    ckpt = read_checkpoint(path, device)
    config = _config_of(ckpt, path)
    if "shards" in ckpt and SHARDING is None:
        raise H64LMError(f"{path} is a sharded checkpoint, which the whole h64lm.py reads (Part II, section 20); "
                         "open it with that, or make it one file with its unshard command.")
    ckpt["model"] = (SHARDING.read(path, ckpt, config, device, build) if "shards" in ckpt else
                     checked_weights(ckpt, config, path))  # resuming a sharded run loads its shards (SHARDING.load)
    trained = Trained(path, config, ckpt)
    if build:
        trained.model = H64LM(config).to(device)
        trained.model.load_state_dict(ckpt["model"])
    if tokenizer is not None:
        trained.tokenizer = load_tokenizer(PROVENANCE.tokenizer(ckpt, path) if tokenizer == "recorded" else tokenizer)
        check_vocab(trained.tokenizer, config)
        if not allow_mismatch:
            PROVENANCE.check(ckpt, path, trained.tokenizer)
    return trained


# The seam for other checkpoint formats, by file suffix: each reader returns the dict a .pt checkpoint holds
# (section 22 adds ".safetensors", the weights and config that `h64lm.py export` writes).
CHECKPOINT_READERS: dict[str, Callable[[Path, torch.device | str], dict]] = {}


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """The checkpoint dict in the file at path, of the right format and version (open_trained checks its config and
    weights). Nothing in it can run code."""
    if path.suffix in CHECKPOINT_READERS:
        return CHECKPOINT_READERS[path.suffix](path, device)
    try:
        with warnings.catch_warnings():  # about pickles it is going to refuse anyway: noise before our sentence
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated files, pickles that would run code, anything torch.load refuses
        raise H64LMError(f"{path} is not a readable H64LM checkpoint ({type(e).__name__}: it is damaged or "
                         "holds objects other than tensors); use another checkpoint or retrain.") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise H64LMError(f"{path} is not an H64LM checkpoint; use one written by `h64lm.py train`.")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise H64LMError(f"{path} is an H64LM checkpoint of format version {ckpt.get('version')}, and this "
                         f"h64lm.py reads version {CHECKPOINT_VERSION}; use the h64lm.py that wrote it.")
    return ckpt


def _config_of(ckpt: dict, path) -> H64LMConfig:
    """The model config a checkpoint describes. Implementation choices that older checkpoints stored are left
    out: they are the reader's to make (see IMPL_FIELDS). A config without `balance` was written before there
    was a choice, when every model was trained with Switch's loss."""
    try:
        return H64LMConfig(**{"balance": "switch", **{k: v for k, v in ckpt["config"].items()
                                                      if k not in IMPL_FIELDS}})
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise H64LMError(f"The config stored in {path} is not valid for this h64lm.py ({e}); use the h64lm.py "
                         "that wrote it.") from None


def strip_prefixes(state: dict) -> dict:
    """Names as a plain H64LM has them: DistributedDataParallel adds 'module.', torch.compile '_orig_mod.'."""
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}


def checked_weights(ckpt: dict, config: H64LMConfig, path) -> dict:
    """The checkpoint's weights (prefixes stripped), once their names and shapes are those of the model the config
    describes, and their dtypes floating point (float32 in a .pt checkpoint, which is saved so and records no
    dtype). Compared before the model is allocated: a config edited by hand (20,000 experts, say) is refused, not
    built, and so is a checkpoint that lost a weight or whose weights became integers."""
    with torch.device("meta"):  # the model's shapes, without its memory
        expected = {name: tuple(t.shape) for name, t in H64LM(config).state_dict().items()}
    state = strip_prefixes(ckpt.get("model") if isinstance(ckpt.get("model"), dict) else {})
    found = {name: tuple(t.shape) for name, t in state.items() if torch.is_tensor(t)}
    if found != expected:
        wrong = sorted(set(expected) ^ set(found)) or [k for k in expected if expected[k] != found[k]]
        raise H64LMError(f"The weights in {path} do not fit the model its config describes ({wrong[0]}: "
                         f"{expected.get(wrong[0], 'absent')} expected, {found.get(wrong[0], 'absent')} found); the "
                         "file is damaged or was edited.")
    pt = Path(path).suffix == ".pt"
    for name, t in state.items():
        if torch.is_tensor(t) and not (t.dtype == torch.float32 if pt else t.is_floating_point()):
            raise H64LMError(f"The weight {name} in {path} is {str(t.dtype).removeprefix('torch.')}, not "
                             f"{'float32' if pt else 'floating point'}; the file is damaged or was edited.")
    return state


def rng_state() -> dict:
    """Every random-number generator a run draws from, as tensors and plain values (weights_only-loadable)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(t if not isinstance(t, list) else tuple(t) for t in state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# -----------------------------------------------------------------------------
# 17. Evaluation
# -----------------------------------------------------------------------------
# Perplexity is exp(mean NLL). Per token it depends on the tokenizer, so papers
# on WikiText-103 report it per word instead: the split's total NLL divided by
# its number of words, counted as whitespace-separated words plus one
# end-of-line per line (count_words). Every token after the first is scored
# once, in non-overlapping windows of seq_len tokens, so a token sees on
# average seq_len / 2 tokens of context; the NLL includes the <s> that starts
# each article, the model's guess that an article ends there.


def evaluate_checkpoint(ckpt: str | Path, data: str | None = None, split: str = "test", *,
                        tokenizer: str | Path = "recorded", cache_dir: str | Path = DEFAULT_CACHE,
                        batch_size: int = 8, seq_len: int | None = None, max_batches: int | None = None,
                        device: str = "auto", precision: str = "auto", allow_mismatch: bool = False,
                        log=print) -> dict:
    """Loss, token- and word-level perplexity of a checkpoint on one split of a corpus (by default the corpus
    it was trained on, which must then be the text it was trained on). allow_mismatch: score with a tokenizer
    other than the one the checkpoint records."""
    if split not in SPLIT_ALIASES:
        raise H64LMError(f"--split must be train, valid or test, got {split!r}.")
    if batch_size < 1 or (max_batches is not None and max_batches < 1):
        raise H64LMError("--batch-size and --max-batches must be at least 1.")
    rt = setup_runtime(device, precision)
    trained = open_trained(ckpt, rt.device, tokenizer=tokenizer, allow_mismatch=allow_mismatch)
    seq_len = seq_len_of(trained.config, seq_len, trained.ckpt.get("train_config", {}).get("seq_len"))
    check_seq_len(seq_len, trained.config)
    source, splits = scored_text(trained, data, cache_dir, allow_mismatch, log)
    part = splits[SPLIT_ALIASES[split]]
    nll, count = evaluate(trained.model, part.tokens, seq_len, batch_size, rt, max_batches, progress=True)
    words = part.words if max_batches is None else None  # a partial pass has no word count to divide by
    return {"checkpoint": str(trained.path), "data": source.name, "split": SPLIT_ALIASES[split],
            "loss": nll / count, "token_ppl": math.exp(nll / count),
            "word_ppl": math.exp(nll / words) if words else None, "nll": nll, "tokens": count, "words": words,
            "seq_len": seq_len}


def scored_text(trained: Trained, data: str | None, cache_dir: str | Path, allow_mismatch: bool, log):
    """The text a trained model is scored on, and its splits: data, else the text it was trained on, which must then
    be that very text (allow_mismatch: let it have changed); another --data is a choice, not a mismatch."""
    trained_on = trained.ckpt.get("train_config", {}).get("data", "auto")
    source, splits = load_token_splits(data or trained_on, trained.tokenizer, cache_dir, log=log)
    if data is None and not allow_mismatch:
        PROVENANCE.check(trained.ckpt, trained.path, source=source)
    return source, splits


# -----------------------------------------------------------------------------
# 18. Routing analysis
# -----------------------------------------------------------------------------
# What did the experts specialise in? Run texts of different kinds through the
# model and count, per MoE layer, which experts their tokens were sent to. A
# well-balanced router spreads every kind over all experts; a specialised one
# sends each kind to a few; an expert that gets almost nothing is dead weight.
# (Mixtral's authors found little specialisation by topic and more by syntax:
# Jiang et al. 2024, section 5.)


@torch.no_grad()
def routing_profile(model: H64LM, tokenizer, texts: dict[str, list[str]]) -> dict:
    """For each kind of text and each MoE layer, the share of token-expert assignments each expert received,
    and the mean router entropy. Returns {"layers": [...], "kinds": [...], "share": {kind: (L, E) array},
    "entropy": {kind: (L,) array}, "tokens": {kind: int}}."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    layers = list(model.config.moe_layer_ids)
    E = model.config.num_experts
    profile = {"layers": layers, "kinds": list(texts), "share": {}, "entropy": {}, "tokens": {}}
    # Tokens that chose both expert i and expert j, over all texts; the diagonal is each expert's load.
    pairs = torch.zeros(len(layers), E, E, dtype=torch.float64)  # (L, E, E)
    for kind, items in texts.items():
        counts, entropy, tokens = np.zeros((len(layers), E)), np.zeros(len(layers)), 0
        for text in items:
            ids = tokenizer(text)["input_ids"][: model.config.max_position_embeddings]
            model(torch.tensor([ids], device=device))
            stats = model.routing_stats()
            for row, layer in enumerate(layers):
                counts[row] += stats[layer].tokens_per_expert.cpu().numpy()
                entropy[row] += stats[layer].router_entropy.item() * len(ids)  # weighted by tokens
                chose = F.one_hot(stats[layer].expert_ids, E).sum(dim=1).double()  # (N, E) 0/1
                pairs[row] += (chose.T @ chose).cpu()
            tokens += len(ids)
        profile["share"][kind] = counts / counts.sum(axis=1, keepdims=True).clip(min=1)
        profile["entropy"][kind] = entropy / max(tokens, 1)
        profile["tokens"][kind] = tokens
    total = sum(profile["tokens"].values())
    profile["max_vio"] = max_violation(pairs.diagonal(dim1=1, dim2=2)).numpy()  # (L,)
    profile["coactivation"] = (pairs / max(total, 1)).numpy()  # (L, E, E) share of tokens choosing i and j; diagonal: i
    model.train(was_training)
    return profile


def routing_table(profile: dict) -> str:
    """One block per MoE layer: rows are kinds of text, columns experts (% of the kind's assignments), then the
    layer's MaxVio and, with top-k > 1, the pair of experts most often chosen together."""
    E = next(iter(profile["share"].values())).shape[1]
    lines = []
    for row, layer in enumerate(profile["layers"]):
        lines.append(f"layer {layer:<4}" + "".join(f"{'e' + str(e):>7}" for e in range(E)) + "   entropy (nats)")
        for kind in profile["kinds"]:
            cells = "".join(f"{100 * v:6.1f}%" for v in profile["share"][kind][row])
            lines.append(f"  {kind:<8}{cells}   {profile['entropy'][kind][row]:.3f}")
        both = profile["coactivation"][row] - np.diag(profile["coactivation"][row].diagonal())  # off-diagonal
        i, j = np.unravel_index(both.argmax(), both.shape)
        lines.append(f"  MaxVio {profile['max_vio'][row]:.2f}" + (
            f"; most frequent pair: e{i} + e{j} in {100 * both[i, j]:.1f}% of tokens" if both.any() else ""))
        lines.append("")
    lines.append(f"uniform: {100 / E:.1f}% per expert, entropy up to log({E}) = {math.log(E):.3f} nats, MaxVio 0")
    return "\n".join(lines)


# Part II. The workshop =======================================================
# Everything above is the book: a complete program that trains, resumes,
# evaluates and generates, with the same numbers as the whole file. What follows
# is the workshop, which a learner may skip: the guards a long run needs, FSDP2
# sharding, the routing lab and its studies, the transformers export, compiled
# decoding, the benchmark and the doctor, and the command line. It changes no
# number of Part I: it calls Part I, and acts inside it only through the seams
# Part I defines where it uses them (train's should_stop, on_start and on_save;
# SAVE_CHECKS; PROVENANCE; SHARDING; TOKENIZER_MAKERS; CHECKPOINT_READERS;
# COMPILED_DECODING). Part I names nothing of it (tests/test_book.py checks both).

import argparse  # noqa: E402  (the workshop's own imports: Part I needs none of them)
import ctypes  # noqa: E402
import dataclasses  # noqa: E402
import importlib  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from dataclasses import MISSING  # noqa: E402


# -----------------------------------------------------------------------------
# 19. Guards
# -----------------------------------------------------------------------------
# What keeps a long run's promises when things go wrong, around the story of
# section 16: one process per run folder (run_lock), a signal answered at once
# and saved on (stop_request), a model refused before it is allocated when it
# cannot fit (check_fits), a save refused when the disk is too full
# (check_room), a checkpoint that records the tokenizer and text it was trained
# on and refuses others (provenance), a warning when a run will take hours; and
# what a real run shows besides its numbers: its model FLOP utilisation against
# the device's peak, and the plots of its history. train_guarded is `h64lm.py
# train`: section 16's train with all of them, through its seams.

def train_guarded(config: H64LMConfig, tc: TrainConfig, preset: str = "custom", resume: Path | None = None,
                  allow_mismatch: bool = False, trained: Trained | None = None) -> dict:
    """train, as `h64lm.py train` and compare run it: the run folder locked, and refused while it holds another
    run (--overwrite removes that run's files once this one has started); the model refused if it cannot fit;
    from the first step on, SIGINT and SIGTERM saved on and stopped at; MFU against the device's peak; a warning
    for a run of hours; the plots drawn at the last save, and between saves at most every PLOT_SECONDS."""
    rt = setup_runtime(tc.device, tc.precision)
    if config.attn_impl == "flex" and rt.device.type != "cuda":
        raise H64LMError(FLEX_ON_CPU)
    run_dir = Path(tc.out_dir) / (tc.run_name or preset)
    with contextlib.ExitStack() as cleanup:  # the folder's lock and the signal handlers, released however it ends
        held = on_rank0(rt, lambda: claim_run_dir(run_dir, resume, tc.overwrite, cleanup))
        check_fits(config, rt.device, rt.world_size if tc.shard else 1)
        stop, plotted = StopRequest(), -math.inf  # plotted: time.monotonic() when the plots were last drawn

        def on_start(run: Run) -> None:
            nonlocal stop
            if rt.master and resume is None:
                for name in held:  # --overwrite: the old run's files go, so none is mistaken for this run's
                    (run_dir / name).unlink()
            run.peak_flops = peak_flops(rt.device) * rt.world_size  # every process's device, alike under torchrun
            warn_if_slow(run.model.flops_per_token(run.seq_len) * run.tokens_per_step / run.peak_flops,
                         tc.max_steps - run.step, rt.device, print if rt.master else lambda *a: None)
            stop = cleanup.enter_context(stop_request(speak=rt.master))
            stop.kept = last_good(run.saved)

        def on_save(run: Run, last: bool) -> None:
            stop.kept = last_good(run.saved)
            on_rank0(rt, lambda: draw_plots(run, last))  # at every save, on every process: rank 0 decides

        def draw_plots(run: Run, last: bool) -> None:
            nonlocal plotted
            if last or time.monotonic() - plotted >= PLOT_SECONDS:  # one clock, rank 0's
                save_plots(run.history, run.run_dir)
                plotted = time.monotonic()

        return train(config, tc, preset, resume, allow_mismatch, trained, should_stop=lambda: stop.reason(),
                     on_start=on_start, on_save=on_save)


RUN_FILES = ("latest.pt", "best.pt", "training_history.json", "loss.png", "lr.png", "expert_load.png")


@dataclass
class StopRequest:
    signum: int | None = None  # the first SIGINT or SIGTERM, once one arrived
    kept: str = "no checkpoint of this run was saved"  # what a second signal leaves behind (see last_good)

    def reason(self) -> str | None:
        """Why the run stops (train's should_stop): after the first signal, or None before one."""
        return None if self.signum is None else f"after {signal.Signals(self.signum).name}"


@contextlib.contextmanager
def stop_request(speak: bool = True):
    """Remember a SIGINT (Ctrl-C) or SIGTERM so that the loop saves and stops when the step in flight ends, and say
    so at once (speak: rank 0 speaks for every process); a second signal stops the process at once (the last
    checkpoint stays: saves are atomic).

    A Python signal handler runs only when the main thread is between two bytecodes, which can be minutes away
    while a big model's step runs on a CPU. So the signal is also written, by the interpreter's C-level handler,
    to a pipe (signal.set_wakeup_fd) that a small thread watches: it answers the moment the signal arrives."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield stop
        return

    def watch(read_fd: int) -> None:
        while data := os.read(read_fd, 1):  # b"" once the write end is closed
            if (signum := data[0]) not in (signal.SIGINT, signal.SIGTERM):
                continue
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            if stop.signum is not None:
                say(f"{name} again: stopped at once; {stop.kept}.")
                os._exit(128 + signum)
            stop.signum = signum
            say(f"{name}: saving and stopping when the step in flight ends; {name} again stops at once, without "
                "saving.")
        os.close(read_fd)

    def say(text: str) -> None:
        if speak:
            print(f"\n{text}", file=sys.stderr, flush=True)

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = {sig: signal.signal(sig, lambda signum, frame: None)  # the watcher does the work
                for sig in (signal.SIGINT, signal.SIGTERM)}
    previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=watch, args=(read_fd,), daemon=True).start()
    try:
        yield stop
    finally:
        signal.set_wakeup_fd(previous_wakeup)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(write_fd)


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """One writer per run folder: an exclusive lock (flock) on the file .<run>.lock beside the folder, held while
    a process trains into it, so that a second process is refused, told the holder's pid, instead of writing the
    same checkpoints. The kernel releases the lock however its holder ends (SIGKILL too), so a lock is never stale;
    the holder removes the file when it ends normally."""
    try:
        import fcntl  # Unix only; imported here so that importing h64lm works everywhere
    except ImportError:
        yield
        return
    path = run_dir.with_name(f".{run_dir.name}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        lock = open(path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise H64LMError(f"{run_dir} is being trained into by {holder}; wait for that run to end (or stop it), "
                             "or choose another --run-name.") from None
        if os.fstat(lock.fileno()).st_nlink:  # the file is still there, not removed by the previous holder
            break
        lock.close()  # it was removed between our open and our lock: lock the file now at that path
    with lock:
        lock.truncate(0)
        lock.write(f"process {os.getpid()}")
        lock.flush()  # now, for a second process to read
        for stale in run_dir.glob(".*.tmp"):  # left by a process killed mid-save; nobody else writes here
            stale.unlink()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while the lock is held, so that it is never another process's file


def claim_run_dir(run_dir: Path, resume, overwrite: bool, cleanup: contextlib.ExitStack) -> list[str]:
    """Lock the run folder for this process (released by cleanup) and return the run files it holds; refuse a
    folder that holds another run."""
    cleanup.enter_context(run_lock(run_dir))
    held = [name for name in RUN_FILES if (run_dir / name).exists()]
    if resume is None and held and not overwrite:
        raise H64LMError(f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                         "or --run-name NAME for a new one.")
    return held


def check_fits(config: H64LMConfig, device: torch.device, shards: int = 1) -> None:
    """Refuse, before allocating anything, a model whose weights, gradients and AdamW moments (16 bytes a
    parameter in float32) alone exceed the device's memory: all of them on each process, or with shards > 1
    (--shard) a process's 1/shards of them (state_bytes)."""
    with torch.device("meta"):
        params = H64LM(config).num_params()
    if device.type == "cuda":
        have, where = torch.cuda.get_device_properties(device).total_memory, "GPU"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "machine"
    need = state_bytes(params, shards)
    if need > have:
        split = f", split over {shards} processes, need {need / 2**30:,.1f} GiB each" if shards > 1 else \
            f" alone need {need / 2**30:,.1f} GiB"
        raise H64LMError(f"The model has {params / 1e6:,.0f}M parameters, whose weights, gradients and AdamW state"
                         f"{split}, and this {where} has {have / 2**30:,.1f} GiB; choose a smaller --preset or shrink "
                         "the model (--hidden-size, --num-layers, --num-experts)"
                         + (", or shard it over more processes." if shards > 1 else "."))


def state_bytes(params: int, shards: int = 1) -> int:
    """Bytes one process holds of a model's training state: float32 weights and gradients and AdamW's two float32
    moments, 16 bytes a parameter, all of them under DDP, 1/shards of each (rounded up) when sharded."""
    return 16 * -(-params // shards)


def check_room(path: Path, tensor_bytes: int) -> None:
    """Refuse to write a checkpoint of tensor_bytes beside path (a file, or a folder's shards) on a disk too full."""
    free = shutil.disk_usage(path.parent).free
    if free < tensor_bytes * 1.1 + (64 << 20):
        raise H64LMError(f"Only {free / 2**30:.2f} GiB are free next to {path}, and the checkpoint needs about "
                         f"{tensor_bytes / 2**30:.2f} GiB; free disk space or choose another --out-dir.")


SAVE_CHECKS.append(check_room)


def warn_if_slow(seconds_per_step: float, steps: int, device: torch.device, log) -> None:
    """Say up front when a run will take hours even at the device's full speed: the first step of a big model on
    a CPU can take minutes, and until it ends the progress bar has no estimate to show."""
    total = seconds_per_step * steps
    if total < 3600:
        return
    log(f"warning: even at this {device.type.upper()}'s full measured speed a step takes at least "
        f"{seconds_per_step:,.1f} s, so {steps:,} steps take at least {total / 3600:,.1f} hours"
        + ("; for a run of minutes on a CPU: python h64lm.py train --preset tiny --data sample"
           if device.type == "cpu" else ""))


# Dense bf16 peak of common GPUs, in FLOP/s, for model FLOP utilisation (vendor data sheets, without sparsity).
# The first name found in the device's name wins, so the PCIe and NVL cards, which run at lower clocks and power
# than the SXM ones of the same name, come first.
GPU_PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H100", 989e12),
                  ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 125e12), ("L4", 121e12),
                  ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12))


def peak_flops(device: torch.device) -> float:
    """The FLOP/s of one device that utilisation is measured against: a GPU's dense bf16 peak from its data sheet
    (NaN for a GPU not in GPU_PEAK_FLOPS), or on CPU the float32 matmul rate this process actually reaches (one
    2048 x 2048 torch.mm, best of 5). peak_flops_source says which."""
    if device.type == "cuda":
        return next((flops for key, flops in GPU_PEAK_FLOPS if key in torch.cuda.get_device_name(device)), math.nan)
    return cpu_matmul_rate(torch.get_num_threads())


@functools.cache  # measured once per process and thread count: it takes about a second
def cpu_matmul_rate(threads: int) -> float:
    generator = torch.Generator().manual_seed(0)  # its own, so measuring draws nothing from the run's generators
    a, b = torch.randn(2048, 2048, generator=generator), torch.randn(2048, 2048, generator=generator)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(5))
    return 2 * 2048 ** 3 / best


def peak_flops_source(device: torch.device) -> str:
    """Where peak_flops(device) comes from, in words."""
    if device.type != "cuda":
        return "measured: float32 2048 x 2048 matmul on this CPU, best of 5"
    name = torch.cuda.get_device_name(device)
    key = next((key for key, _ in GPU_PEAK_FLOPS if key in name), None)
    return f"data sheet, {key} dense bf16" if key else f"unknown: {name} is not in GPU_PEAK_FLOPS (MFU is NaN)"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# Drawing the three plots takes seconds on a CPU (README, Training): a run that saves every step would spend most of
# its time drawing, so between its first and last saves they are redrawn at most this often (seconds).
PLOT_SECONDS = 30.0


def save_figure(fig, path: Path) -> None:
    """A matplotlib Figure to path, atomically; the format follows the file's extension."""
    write_atomically(Path(path), lambda tmp: fig.savefig(tmp, format=Path(path).suffix[1:] or "png", dpi=110,
                                                         bbox_inches="tight"))


def save_plots(history: dict, folder: Path) -> None:
    """loss.png (train and validation), lr.png and expert_load.png (share of tokens per expert over time, and its
    maximal violation, per MoE layer)."""
    # Figure objects, not pyplot: they draw straight to files and leave pyplot's backend and state alone
    # (a notebook that calls train() keeps its inline plots). layout="tight" spaces the parts when the file is drawn.
    from matplotlib.figure import Figure

    train, val = history["train"], history["val"]
    if not train:
        return
    steps = [r["step"] for r in train]
    ax = Figure(figsize=(7, 4), layout="tight").subplots()
    ax.plot(steps, [r["lm_loss"] for r in train], label="train")
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="Loss")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(ax.figure, folder / "loss.png")

    ax = Figure(figsize=(7, 3), layout="tight").subplots()
    ax.plot(steps, [r["lr"] for r in train])
    ax.set(xlabel="step", ylabel="learning rate", title="Learning rate")
    ax.grid(alpha=0.3)
    save_figure(ax.figure, folder / "lr.png")

    layers = sorted(train[-1].get("expert_load", {}), key=int)
    if not layers:  # a dense model
        return
    fig = Figure(figsize=(4 * len(layers), 5.6), layout="tight")
    axes = fig.subplots(2, len(layers), squeeze=False, sharex=True, height_ratios=[2, 1])
    for ax, vio, layer in zip(axes[0], axes[1], layers):
        load = np.array([r["expert_load"][layer] for r in train])  # (records, E) shares of assignments
        ax.stackplot(steps, load.T, labels=[f"expert {i}" for i in range(load.shape[1])])
        ax.set(title=f"layer {layer}", ylim=(0, 1))
        vio.plot(steps, [r.get("max_vio", {}).get(layer, float("nan")) for r in train])
        vio.set(xlabel="step", ylim=(0, None))
        vio.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of token assignments")
    axes[1][0].set_ylabel("MaxVio")
    if len(train[-1]["expert_load"][layers[0]]) <= 16:  # a legend of 64 experts hides the plot
        axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.suptitle("Expert load per MoE layer, and its maximal violation (max load / mean load - 1)")
    save_figure(fig, folder / "expert_load.png")


# What a checkpoint records of the tokenizer and the text it was trained on (section 16's PROVENANCE seam), so
# that a run is resumed, and a model scored or sampled, with the same ones: token ids from another vocabulary,
# or from the same one permuted, give nonsense and wrong perplexities without an error.
def provenance(tokenizer, source: TextSource) -> dict:
    """PROVENANCE.record: the tokenizer's folder, fingerprint and size, and the text's name and fingerprint."""
    return {"tokenizer": portable_path(tokenizer.name_or_path),
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "tokenizer_vocab": len(tokenizer),
            "data": source.name, "data_fingerprint": source.fingerprint}


def portable_path(path: str | Path) -> str:
    """A path as a checkpoint records it: relative to this file's folder when inside it (a checkpoint that travels
    with the project finds it again), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def recorded_tokenizer(ckpt: dict, path: Path) -> Path:
    """The folder of the tokenizer the checkpoint at path was trained with (mistral_tokenizer/ for a checkpoint
    from before they recorded it, which check_trained_with then compares); refused in one sentence when that folder
    no longer holds it."""
    folder = ROOT / ckpt.get("tokenizer", DEFAULT_TOKENIZER)  # an absolute path stays itself
    if not (folder / "tokenizer.json").exists():
        raise H64LMError(f"{path} was trained with the tokenizer in {folder}, which is not there; point --tokenizer "
                         "at a copy of it (a bpe:N tokenizer is made again by training with the same --tokenizer "
                         "and --data).")
    return folder


def check_trained_with(ckpt: dict, path, tokenizer=None, source: TextSource | None = None) -> None:
    """Refuse a tokenizer, or a text, other than the ones the checkpoint records (older checkpoints record none):
    token ids from another vocabulary, or from the same one permuted, give nonsense and wrong perplexities without
    an error, and a resumed run would quietly train on other data."""
    if tokenizer is not None and ckpt.get("tokenizer_fingerprint") not in (None, tokenizer_fingerprint(tokenizer)):
        raise H64LMError(f"{path} was trained with another tokenizer than the one in {tokenizer.name_or_path} "
                         f"({ckpt.get('tokenizer_vocab', '?')} tokens then, {len(tokenizer)} now, and not the same "
                         "vocabulary); give the one it was trained with (--tokenizer), or pass --allow-mismatch if "
                         "you know they agree.")
    if source is not None and ckpt.get("data_fingerprint") not in (None, source.fingerprint):
        raise H64LMError(f"The text of {source.name} is not the text {path} was trained on (it was "
                         f"{ckpt.get('data', '?')}, and its files have changed since); give the same text, or pass "
                         "--allow-mismatch to go on with this one.")


PROVENANCE = Provenance(record=provenance, check=check_trained_with, tokenizer=recorded_tokenizer)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep the memory of freed tensors for reuse instead of handing it back to the OS.

    By default glibc serves a big block (over a threshold that starts at 128 KiB and adapts up to 32 MiB) with a
    fresh mmap and unmaps it when freed, and gives the top of its heap back to the OS once more than twice that is
    free. So each training step's big activations arrive as untouched pages and fault in one 4 KiB page at a time,
    which costs kernel time in every step (README, Speed). With no mmap threshold and no trimming the heap keeps its
    peak size, as PyTorch's CUDA caching allocator does on a GPU. (jemalloc or tcmalloc through LD_PRELOAD, which
    PyTorch's CPU tuning guide recommends, do the same; this needs nothing installed.) It is process-wide, so the
    program's entry point calls it, not the library. Returns whether the setting took, False off glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))


# -----------------------------------------------------------------------------
# 20. Sharding: FSDP2 and distributed checkpoints
# -----------------------------------------------------------------------------
# Past one device's memory. Under torchrun with --shard each process holds
# only its share of the model and its state (FSDP2, shard_model) and writes its
# share of every checkpoint (save_shards), into a folder that the checkpoint
# file names; `h64lm.py unshard` makes the two one file again. Part I refuses
# --shard on its own; this section fills its seam, SHARDING, at the end.


def check_shardable(tc: TrainConfig, rt: Runtime, trained: Trained | None) -> None:
    """--shard splits the model over the processes torchrun starts: refuse it, in one sentence, on one."""
    if rt.world_size == 1 and trained is not None:
        raise H64LMError(f"The run in {trained.path.parent} is sharded (--shard) and this is one process; resume "
                         f"it with torchrun --nproc_per_node={trained.ckpt.get('world_size', 'N')} h64lm.py train "
                         "--resume ..., or make it one file with python h64lm.py unshard and resume that.")
    if rt.world_size == 1:
        raise H64LMError("--shard splits the model over the processes torchrun starts, and this is one process; "
                         "start it with torchrun --nproc_per_node=N (N of 2 or more), or train without --shard.")


def shard_model(model: H64LM, rt: Runtime, policy=None) -> H64LM:
    """FSDP2 (torch.distributed.fsdp.fully_shard, Zhao et al. 2023, as torchtitan uses it): every weight is split
    on its first dimension over the processes, each holding 1/N of it, and of its gradient and optimizer state.
    Before a block runs its weights are all-gathered, and freed after it; in backward each gradient is
    reduce-scattered to the shards, averaged as DDP averages. So a process holds one block's whole weights at a
    time, not the model's. Each block is a unit of its own, and the root takes the rest (embeddings, final norm,
    LM head). The stacked expert tensors (E, in, out) split on their first dimension, the experts: a process holds
    whole experts (which ExpertMuon needs). policy: the MixedPrecisionPolicy, by default fsdp_policy's for this
    device. The model is changed in place (its parameters become DTensors) and returned. Buffers (RoPE tables,
    aux_free's balance bias) are not sharded: every process keeps them whole, and moves the bias alike
    (train_step)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(rt.device.type, (rt.world_size,))
    policy = policy or fsdp_policy(rt.device.type, rt.dtype)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


def fsdp_policy(device_type: str, dtype: torch.dtype):
    """On CUDA in bf16 the gathered weights are bf16 for compute and gradients are reduced in float32; the shards,
    and the optimizer, stay float32. Forward inputs are not cast (cast_forward_inputs=False): a block's inputs
    include the RoPE tables, which must stay float32 as they are in DDP (autocast casts what multiplies in bf16).
    Elsewhere nothing is cast."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if device_type == "cuda" and dtype == torch.bfloat16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    return MixedPrecisionPolicy()


def save_shards(run: Run) -> str:
    """A sharded run's weights and optimizer state, each process writing its own shards with PyTorch's distributed
    checkpoint (torch.distributed.checkpoint, as torchtitan saves) into a new folder of the run, whose name it
    returns: shards-<step>-<random tag>, never an older save's folder. The small checkpoint file that names the
    folder is written after it, atomically (write_run_files): a save killed half-way leaves a folder that nothing
    names, and the last checkpoint whole. The state is saved under the parameters' names, not their order, whole
    tensors split into shards, so that it can be loaded on another number of processes (load_shards) or into one
    (read_shards, unshard_checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    name = [f"shards-{run.step:06d}-{os.urandom(4).hex()}"]
    torch.distributed.broadcast_object_list(name, src=0)
    folder = run.run_dir / name[0]
    model_state, optimizer_state = get_state_dict(run.model, optimizer_parts(run.optimizer))
    mine = sum(local(t).numel() * t.element_size() for t in _tensors([model_state, optimizer_state]))
    on_rank0(run.rt, lambda: (run.run_dir.mkdir(parents=True, exist_ok=True),
                              check_room(folder, mine * run.rt.world_size)))
    try:
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
    except (OSError, CheckpointException) as e:  # DCP gathers a process's error and raises it on all of them
        raise H64LMError(f"Saving the shards in {folder} failed ({one_sentence(e)}); free disk space or choose "
                         "another --out-dir.") from None
    return name[0]


def load_shards(run: Run, path: Path, ckpt: dict) -> None:
    """Put the weights and optimizer state that save_shards wrote for the checkpoint ckpt, read from path, into a
    sharded run, on as many processes as saved them or another number (PyTorch's distributed checkpoint splits
    the tensors anew)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = shards_folder(path, ckpt)
    parts = optimizer_parts(run.optimizer)
    model_state, optimizer_state = get_state_dict(run.model, parts)
    dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
    set_state_dict(run.model, parts, model_state_dict=model_state, optim_state_dict=optimizer_state)


def optimizer_parts(optimizer) -> list[torch.optim.Optimizer]:
    return optimizer.parts if isinstance(optimizer, Optimizers) else [optimizer]


def shards_folder(path: Path, ckpt: dict) -> Path:
    """The folder of shards that the sharded checkpoint ckpt, read from path, names, once it holds a whole
    distributed checkpoint (its .metadata is written last)."""
    folder = Path(path).parent / ckpt["shards"]
    if not (folder / ".metadata").exists():
        raise H64LMError(f"The shards in {folder}, which the checkpoint beside it names, are gone or incomplete; "
                         "resume or open another checkpoint of the run.")
    return folder


def read_shards(path: Path, ckpt: dict, config: H64LMConfig, device, read: bool = True) -> dict:
    """The whole weights of the sharded checkpoint at path, in one process, as a single-file checkpoint holds them
    (checked_weights first checks their names and shapes, from the shards' metadata, before anything is
    allocated); read=False: tensors on the meta device, the shapes alone."""
    import torch.distributed.checkpoint as dcp

    folder = shards_folder(path, ckpt)
    metadata = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    shapes = {key.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype, device="meta")
              for key, m in metadata.items() if key.startswith("model.")}
    state = checked_weights({"model": shapes}, config, path)
    if not read:
        return state
    state = {name: torch.empty_like(t, device=device) for name, t in state.items()}
    load_whole({"model": state}, folder)
    return state


def load_whole(state: dict, folder: Path) -> None:
    """Fill state's tensors, whole, from the shards in folder, in this process alone (torch.distributed.checkpoint
    without a process group, which it warns of: that is the intent here)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=folder, no_dist=True)


def unshard_checkpoint(path: str | Path, out: str | Path) -> Path:
    """The sharded checkpoint at path as one file at out, the single-file checkpoint a run without --shard writes:
    whole weights and optimizer state, read in one process. It resumes without --shard (its settings say so), and
    eval, generate, analyze and export read it as any other."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    trained = open_trained(path)
    if "shards" not in trained.ckpt:
        raise H64LMError(f"{trained.path} is not a sharded checkpoint (it holds its weights itself); use it as it "
                         "is.")
    tc = TrainConfig(**{**with_defaults(trained.ckpt["train_config"]), "shard": False})
    optimizer = make_optimizer(trained.model, tc, torch.device("cpu"))
    parts = optimizer_parts(optimizer)
    state = get_optimizer_state_dict(trained.model, parts)  # an empty state of the right shapes, to be filled
    load_whole({"optimizer": state}, shards_folder(trained.path, trained.ckpt))
    set_optimizer_state_dict(trained.model, parts, state)
    payload = {**{k: v for k, v in trained.ckpt.items() if k != "shards"}, "train_config": asdict(tc),
               "model": trained.model.state_dict(), "optimizer": optimizer.state_dict()}
    out = Path(out)
    save_checkpoint(out, payload)
    return out


def prune_shards(run_dir: Path, payload: dict, best: bool) -> None:
    """After a save (rank 0): remove the shard folders that no checkpoint file names any more. latest.pt names this
    save's folder; best.pt this one or an earlier one."""
    named = {payload["shards"]} | ({read_checkpoint(run_dir / "best.pt").get("shards")}
                                   if not best and (run_dir / "best.pt").exists() else set())
    for folder in run_dir.glob("shards-*"):
        if folder.name not in named:
            shutil.rmtree(folder)


SHARDING = Sharding(refuse=check_shardable, wrap=shard_model, save=save_shards, load=load_shards, read=read_shards,
                    prune=prune_shards)


# -----------------------------------------------------------------------------
# 21. The routing lab
# -----------------------------------------------------------------------------
# The lab where MoE is studied at equal compute on a laptop: the `lab` model
# and its recipe, with a byte-level BPE of its own (so that the embedding and
# LM head do not hold most of its parameters); the expert shapes a study
# compares (fine_grained, dense_twin); the routing figures of `analyze`
# (heatmaps, drop-one-expert); and `compare`, which trains the variants of a
# study and draws its table and curve.

# A tokenizer of the run's own. At the lab preset's width (section 1) a 32,000-token vocabulary would put most
# of the parameters and FLOPs in the embedding and the LM head, which MoE does not touch. "bpe:N" names a
# byte-level BPE of N tokens (GPT-2's kind: every byte is a token, so no text is unknown; Sennrich et al. 2016)
# trained with Hugging Face's tokenizers on the training split of --data. It is trained the first time it is
# asked for (about a second on the sample), then read from --cache-dir, where its folder's name holds the text's
# fingerprint; a checkpoint records its folder and fingerprint like any tokenizer's.
BPE_VOCAB = Range(259, 65536, integer=True)  # 256 bytes and <unk>, <s>, </s>; the token cache stores uint16 ids


def bpe_vocab(spec: str) -> int | None:
    """N of a "bpe:N" tokenizer, None for a folder; ValueError when N is not a vocabulary size."""
    if not spec.startswith("bpe:"):
        return None
    try:
        vocab = int(spec[4:])
    except ValueError:
        raise ValueError(f"{spec!r} should be bpe:N with N the number of tokens, e.g. bpe:4096") from None
    if why := BPE_VOCAB.refuse(vocab):
        raise ValueError(f"the BPE's vocabulary {why}")
    return vocab


def train_bpe(lines: list[str], vocab_size: int, folder: Path) -> None:
    """Train a byte-level BPE on the documents of lines and save it in folder as a transformers tokenizer that
    encodes as Mistral's does: <s> before the text, <unk>, <s> and </s> at ids 0, 1 and 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(documents(lines), trainer)  # the same text gives the same merges
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        clean_up_tokenization_spaces=False)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, folder)  # whole or not at all; a folder another process finished first is as good
    except OSError:
        shutil.rmtree(tmp)


def bpe_folder(spec: str, source: TextSource, cache_dir: Path, log=print) -> Path:
    """TOKENIZER_MAKERS["bpe"] (section 14): the folder of the BPE that spec ("bpe:N") names, trained on source's
    training split here if the cache does not hold it yet."""
    vocab = bpe_vocab(spec)
    folder = cache_dir / f"bpe{vocab}-{source.fingerprint[:16]}"
    if not (folder / "tokenizer.json").exists():
        log(f"training a byte-level BPE of {vocab:,} tokens on the training split of {source.name} into {folder} "
            "(once)")
        train_bpe(source.read("train"), vocab, folder)
    return folder


TOKENIZER_MAKERS["bpe"] = bpe_folder


# The routing lab's model: tiny's cost per token with the compute in the blocks, where MoE acts. Its own 4,096-token
# BPE (its recipe's tokenizer, above) shrinks the embedding and LM head (the LM head is 77% of tiny's training
# FLOPs); every layer is MoE, 8 experts of 512 top-2, so its dense twin is a 1,024-wide SwiGLU. Its recipe is tiny's.
PRESETS["lab"] = dict(vocab_size=4096, max_position_embeddings=256, hidden_size=256, num_layers=4, num_heads=8,
                      num_kv_heads=4, intermediate_size=1024, moe_layers="all", expert_intermediate_size=512)
TRAIN_RECIPES["lab"] = dict(TRAIN_RECIPES["tiny"], tokenizer="bpe:4096")


def fine_grained(config: H64LMConfig, g: int, shared: int = 0) -> H64LMConfig:
    """DeepSeekMoE's expert shape (Dai et al. 2024, section 3): split every expert into g of 1/g the width and
    route to g times as many, then make `shared` of the narrow experts always-on and route to that many fewer.
    Parameters and active FLOPs per token stay those of `config` (the router, g times wider, aside); what grows is
    the number of ways to combine experts: C(8, 2) = 28 for Mixtral's shape, C(31, 7) = 2.6 million for g = 4 with
    one shared expert."""
    E, k, width = config.num_experts, config.num_experts_per_tok, config.expert_intermediate_size
    if g < 1 or width % g:
        raise ValueError(f"granularity {g} must be a whole divisor of expert_intermediate_size ({width}).")
    if config.num_shared_experts or not 0 <= shared < k * g:
        raise ValueError(f"shared ({shared}) must be below the {k * g} routed experts per token, and the config "
                         "must not have shared experts already.")
    return dataclasses.replace(config, num_experts=E * g - shared, num_experts_per_tok=k * g - shared,
                               expert_intermediate_size=width // g, num_shared_experts=shared)


def dense_twin(config: H64LMConfig) -> H64LMConfig:
    """The dense model that spends the same FLOPs per token as the all-MoE `config`: every layer one SwiGLU as wide
    as the expert width a token passes through (k routed experts plus the shared ones)."""
    if len(config.moe_layer_ids) != config.num_layers:
        raise ValueError("a dense twin of equal FLOPs needs every layer MoE (moe_layers='all'): a dense layer's "
                         "width cannot match an MoE layer's active width and the other dense layers' at once.")
    active = (config.num_experts_per_tok + config.num_shared_experts) * config.expert_intermediate_size
    return dataclasses.replace(config, moe_layers="none", intermediate_size=active, num_shared_experts=0)


# The texts `analyze` profiles by default (routing_profile, section 18): a few of each kind, short and plain.
ANALYSIS_TEXTS: dict[str, list[str]] = {
    "prose": [
        "The river rises in the hills north of the town and flows slowly south through farmland, where it was used "
        "for centuries to drive the mills that ground the region's grain.",
        "After the war she returned to the university, finished her degree in chemistry and spent the next thirty "
        "years teaching and writing about the history of science.",
    ],
    "code": [
        "def mean(values):\n    total = 0\n    for v in values:\n        total += v\n    return total / len(values)\n",
        "for (int i = 0; i < n; i++) {\n    if (a[i] > max) max = a[i];\n}\nreturn max;\n",
    ],
    "dialogue": [
        '"Where are you going?" she asked.\n"To the station," he said. "The train leaves at six."\n'
        '"Then you had better hurry."',
        "A: Did you finish the report?\nB: Almost. I still need the numbers from March.\nA: I'll send them now.",
    ],
    "numbers": [
        "1. Apples: 42\n2. Pears: 17\n3. Plums: 8\n4. Cherries: 120\nTotal: 187",
        "In 1969 the population was 12,400; by 1990 it had reached 31,250 and in 2011 it stood at 58,902.",
    ],
}


def dead_experts(profile: dict, threshold: float = DEAD_SHARE) -> list[tuple[int, int]]:
    """(layer, expert) pairs that received less than threshold x the uniform share 1/E over all kinds of text."""
    total = sum(profile["share"][k] * profile["tokens"][k] for k in profile["kinds"])  # (L, E) assignments / k
    dead = relative_load(torch.from_numpy(total)) < threshold
    return [(profile["layers"][r], int(e)) for r, e in zip(*np.nonzero(dead.numpy()))]


@torch.no_grad()
def drop_one_expert(model: H64LM, tokens: np.ndarray, seq_len: int, batch_size: int, rt: Runtime,
                    max_batches: int | None = 4) -> np.ndarray:
    """How much each expert matters: the validation loss with expert i of MoE layer l masked out of routing (its
    tokens go to their next choice), minus the loss with every expert, (L, E) in nats. Costs L * E + 1
    evaluations of max_batches batches."""
    base = evaluate(model, tokens, seq_len, batch_size, rt, max_batches)
    base_loss = base[0] / base[1]
    layers = list(model.moe_layers().values())
    E = model.config.num_experts
    if E <= model.config.num_experts_per_tok:
        raise H64LMError(f"Every token uses all {E} experts (top-{E}); masking one out leaves too few to route to.")
    delta = np.zeros((len(layers), E))
    for row, layer in enumerate(layers):
        for expert in range(E):
            layer.allowed = torch.arange(E, device=rt.device) != expert  # (E,) bool
            try:
                nll, count = evaluate(model, tokens, seq_len, batch_size, rt, max_batches)
            finally:
                layer.allowed = None
            delta[row, expert] = nll / count - base_loss
    return delta


def save_heatmaps(panels: dict[str, np.ndarray], path: str | Path, label: str, ylabels: list[str] | None = None,
                  cmap: str = "viridis", centred: bool = False) -> None:
    """Side-by-side heatmaps on one colour scale, columns = experts; centred: a diverging scale around 0."""
    from matplotlib.figure import Figure

    rows = max(a.shape[0] for a in panels.values())
    fig = Figure(figsize=(3.2 * len(panels), 0.4 * rows + 1.8))
    axes = fig.subplots(1, len(panels), squeeze=False)
    high = max(float(np.abs(a).max()) for a in panels.values()) or 1.0
    low = -high if centred else 0
    for n, (ax, (title, values)) in enumerate(zip(axes[0], panels.items())):
        image = ax.imshow(values, vmin=low, vmax=high, cmap=cmap, aspect="auto")
        ax.set(title=title, xlabel="expert", yticks=range(values.shape[0]) if ylabels else [],
               yticklabels=ylabels if ylabels and n == 0 else [])
    fig.colorbar(image, ax=axes[0].tolist(), label=label)
    save_figure(fig, path)


def save_routing_heatmap(profile: dict, path: str | Path) -> None:
    """A (layer x expert) heatmap of the share of assignments, one panel per kind of text."""
    save_heatmaps(profile["share"], path, "share of assignments", [f"layer {i}" for i in profile["layers"]])


def save_coactivation_heatmap(profile: dict, path: str | Path) -> None:
    """Per MoE layer, the (expert x expert) share of tokens that chose both; the diagonal is each expert's load."""
    panels = {f"layer {layer}": profile["coactivation"][row] for row, layer in enumerate(profile["layers"])}
    save_heatmaps(panels, path, "share of tokens choosing both", ylabels=[str(e) for e in
                                                                          range(profile["coactivation"].shape[1])])


# --- A compute-matched study ----------------------------------------------------
#
# Does MoE win here? `compare` trains variants of one base model on the same
# data, the same token budget and the same seeds, each with the same active
# FLOPs per token, and writes one table and one plot. The dense twin spends
# the FLOPs of the k routed plus the shared experts in one SwiGLU as wide as
# them (dense_twin); fine-grained variants keep parameters and FLOPs too
# (fine_grained). Every run is an ordinary `train` run in <out>/<variant>-seed<s>,
# so a study that was stopped goes on from its runs' checkpoints, and a run
# that finished is not trained again.


STUDY_VARIANTS: dict[str, dict] = {  # name -> H64LMConfig fields to change, or dense / granularity / shared
    "dense": dict(dense=True),
    "switch": dict(balance="switch"),
    "global": dict(balance="global"),
    "sequence": dict(balance="sequence"),
    "aux_free": dict(balance="aux_free"),
    "sigmoid+aux_free": dict(router_scoring="sigmoid", balance="aux_free"),
    "fine+shared": dict(granularity=4, shared=1),
    "fine+shared+aux_free": dict(granularity=4, shared=1, balance="aux_free"),
    "none": dict(balance="none"),
}


def variant_config(base: H64LMConfig, spec: dict) -> H64LMConfig:
    """The model of one variant: base with the spec's fields changed; dense=True gives the dense twin,
    granularity=g and shared=s the fine-grained shape (fine_grained)."""
    spec = dict(spec)
    if spec.pop("dense", False):
        return dense_twin(base)
    g, shared = spec.pop("granularity", 1), spec.pop("shared", 0)
    config = dataclasses.replace(base, **spec)
    return fine_grained(config, g, shared) if g > 1 or shared else config


def study_run(config: H64LMConfig, tc: TrainConfig, log=print) -> Trained | str:
    """Train one run of a study, or go on with it, or take it as it is when it is finished: the trained model (with
    its checkpoint), or why it stopped before the end (a signal: the next call goes on from its checkpoint)."""
    path = Path(tc.out_dir) / tc.run_name / "latest.pt"  # where the run stopped: when finished, its final model
    trained = open_trained(path, build=False) if path.exists() else None
    ckpt = trained.ckpt if trained else None

    def settings(train_config: dict) -> dict:  # what decides the result: all but overwrite and stop_at
        return {k: v for k, v in with_defaults(train_config).items() if k not in ("overwrite", "stop_at")}

    same = ckpt is not None and ckpt.get("config") == config.to_dict() and \
        settings(ckpt.get("train_config", {})) == settings(asdict(tc))
    history = {}
    if not same:
        history = train_guarded(config, dataclasses.replace(tc, overwrite=True))
    elif ckpt["step"] < tc.max_steps:
        log(f"{tc.run_name}: going on from step {ckpt['step']}")
        history = train_guarded(config, dataclasses.replace(tc, overwrite=False), resume=path, trained=trained)
    return history["stopped"] if "stopped" in history else open_trained(path)


def compare(base: H64LMConfig, tc: TrainConfig, variants: dict[str, dict], seeds: Sequence[int], log=print) -> dict:
    """Train every variant with every seed (seeds outer, so that a stopped study has whole seeds), then score
    each final model on the whole validation split; writes <out_dir>/<run_name>/compare.{json,md,png} and returns
    what they hold, or {"stopped": why} when a signal stopped a run."""
    out = Path(tc.out_dir) / (tc.run_name or "compare")
    configs = {}
    for name, spec in variants.items():
        try:
            configs[name] = variant_config(base, spec)
        except (ValueError, TypeError) as e:
            raise H64LMError(f"The variant {name} is not a valid model: {e}") from None
    rt = setup_runtime(tc.device, tc.precision)
    if rt.world_size > 1:
        raise H64LMError("compare trains its runs one after another in one process; start it without torchrun.")
    # Every run is scored on the same validation tokens, read once (each run's own train says where the text is from).
    source = open_text_source(tc.data, log=lambda *a, **k: None)
    tokenizer = load_tokenizer(tokenizer_folder(tc.tokenizer, source, tc.cache_dir, log))
    valid = load_token_splits(source, tokenizer, tc.cache_dir, log=lambda *a, **k: None)[1]["valid"]
    runs = []
    for seed in seeds:
        for name, config in configs.items():
            run_tc = dataclasses.replace(tc, seed=seed, run_name=f"{name}-seed{seed}", out_dir=str(out))
            trained = study_run(config, run_tc, log)
            if isinstance(trained, str):
                log(f"the study stopped {trained}; the same command goes on where it stopped")
                return {"stopped": trained}
            runs.append(score_study_run(name, seed, trained, run_tc, rt, valid))
    result = {"base": base.to_dict(), "train_config": asdict(tc), "seeds": list(seeds), "runs": runs,
              "variants": {name: {"spec": variants[name], "config": config.to_dict()}
                           for name, config in configs.items()}}
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "compare.json", lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    write_atomically(out / "compare.md", lambda tmp: tmp.write_text(study_table(result)))
    save_study_plot(result, out / "compare.png")
    if (curve := expert_curve_figure(result)) is not None:
        save_figure(curve, out / "compare-experts.png")
    return result


def score_study_run(name: str, seed: int, trained: Trained, tc: TrainConfig, rt: Runtime, valid: TokenSplit) -> dict:
    """One finished run's numbers: loss and word-level perplexity on the whole validation split (valid; the word
    count makes studies with different tokenizers comparable), its curve, time, and balance."""
    model, saved = trained.model, trained.ckpt
    seq_len = seq_len_of(model.config, tc.seq_len)
    model.to(rt.device)
    moe = list(model.moe_layers().values())
    load = torch.zeros(len(moe), model.config.num_experts, device=rt.device)

    def count(module, args, output):  # each forward of the evaluation adds its routing to load
        load[moe.index(module)] += module.stats.load

    hooks = [layer.register_forward_hook(count) for layer in moe]
    try:
        nll, tokens = evaluate(model, valid.tokens, seq_len, tc.batch_size, rt, progress=True)
    finally:
        for hook in hooks:
            hook.remove()
    share = load / load.mean(dim=-1, keepdim=True).clamp_min(1e-9)  # (L, E), 1 = uniform
    return {"variant": name, "seed": seed, "valid_loss": nll / tokens, "valid_tokens": tokens,
            "valid_word_ppl": math.exp(nll / valid.words),
            "params": model.num_params(), "active_params": model.num_params(active=True),
            "flops_per_token": model.flops_per_token(seq_len), "tokens": saved["tokens_seen"],
            "seconds": saved.get("seconds", 0.0), "curve": saved["history"]["val"],
            "max_vio": max_violation(load).tolist(), "min_share": share.min().item() if moe else None}


def study_table(result: dict) -> str:
    """compare.md: mean and spread over seeds per variant, then the gap to the dense twin at every validation."""
    by = {}
    for r in result["runs"]:
        by.setdefault(r["variant"], []).append(r)
    lines = ["| variant | parameters | active | FLOPs/token | tokens | validation loss (mean ± sd) | min-max | "
             "word perplexity | wall-clock | MaxVio | smallest expert share |", "|" + " --- |" * 11]
    for name, runs in by.items():
        losses = np.array([r["valid_loss"] for r in runs])
        vio = [np.mean(r["max_vio"]) for r in runs if r["max_vio"]]
        shares = [r["min_share"] for r in runs if r["min_share"] is not None]
        lines.append(f"| {name} | {runs[0]['params'] / 1e6:.2f}M | {runs[0]['active_params'] / 1e6:.2f}M | "
                     f"{runs[0]['flops_per_token'] / 1e6:.1f}M | {runs[0]['tokens']:,} | "
                     f"{losses.mean():.4f} ± {losses.std(ddof=1) if len(losses) > 1 else 0:.4f} (n={len(losses)}) | "
                     f"{losses.min():.4f}-{losses.max():.4f} | {word_ppl(runs)} | "
                     f"{np.mean([r['seconds'] for r in runs]):.0f} s | "
                     + (f"{np.mean(vio):.2f} | {100 * min(shares):.0f}% of uniform |" if vio else "- | - |"))
    if "dense" in by:
        lines += ["", "Gap to dense (dense minus variant, mean over seeds; positive: the variant is ahead), "
                  "by tokens seen, on the validation batches of each evaluation:", ""]
        steps = [v["tokens"] for v in by["dense"][0]["curve"]]
        lines += ["| variant | " + " | ".join(f"{t:,}" for t in steps) + " |", "|" + " --- |" * (len(steps) + 1)]
        dense = np.mean([[v["loss"] for v in r["curve"]] for r in by["dense"]], axis=0)
        for name, runs in by.items():
            if name != "dense":
                mine = np.mean([[v["loss"] for v in r["curve"]] for r in runs], axis=0)
                lines.append(f"| {name} | " + " | ".join(f"{d:+.4f}" for d in dense - mine) + " |")
    return "\n".join(lines) + "\n"


def word_ppl(runs: list[dict]) -> str:
    """The mean word-level perplexity of runs, for the table (a study from before it was recorded has none)."""
    ppl = [r["valid_word_ppl"] for r in runs if "valid_word_ppl" in r]
    return f"{np.mean(ppl):.1f}" if ppl else "-"


def expert_curve_figure(result: dict):
    """A study's validation loss on the whole split against the number of experts (log axis): a point per seed,
    the mean joined, with the band from best to worst seed, and dense as a dashed line with its band. None when the
    study has fewer than two expert counts to compare."""
    from matplotlib.figure import Figure

    experts = {name: v["config"]["num_experts"] for name, v in result["variants"].items()
               if v["config"]["moe_layers"] != "none"}
    if len(set(experts.values())) < 2:
        return None
    losses = {name: [r["valid_loss"] for r in result["runs"] if r["variant"] == name] for name in result["variants"]}
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    names = sorted(experts, key=experts.get)
    counts = [experts[name] for name in names]
    for name in names:
        ax.scatter([experts[name]] * len(losses[name]), losses[name], color="C0", alpha=0.4, s=14)
    ax.plot(counts, [np.mean(losses[name]) for name in names], "o-", color="C0", label="MoE, mean over seeds")
    ax.fill_between(counts, [min(losses[name]) for name in names], [max(losses[name]) for name in names],
                    color="C0", alpha=0.15)
    if dense := losses.get("dense"):
        ax.axhline(np.mean(dense), color="k", linestyle="--", label="dense twin")
        ax.axhspan(min(dense), max(dense), color="k", alpha=0.1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.set(xlabel="experts per layer (the active FLOPs per token the same for all)",
           ylabel="validation loss (nats/token)", title=f"{len(result['seeds'])} seeds per point")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def save_study_plot(result: dict, path: Path) -> None:
    """Validation loss against tokens and against wall-clock: a line per variant (mean over seeds), the band
    from the best to the worst seed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for name in dict.fromkeys(r["variant"] for r in result["runs"]):
        curves = [r["curve"] for r in result["runs"] if r["variant"] == name]
        loss = np.array([[v["loss"] for v in c] for c in curves])  # (seeds, evaluations)
        for ax, key in zip(axes, ("tokens", "seconds")):
            x = np.mean([[v[key] for v in c] for c in curves], axis=0)
            (line,) = ax.plot(x, loss.mean(axis=0), label=name)
            ax.fill_between(x, loss.min(axis=0), loss.max(axis=0), color=line.get_color(), alpha=0.2)
    for ax, label in zip(axes, ("tokens", "wall-clock (s)")):
        ax.set(xlabel=label, ylabel="validation loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    seeds = len(result["seeds"])
    fig.suptitle(f"{seeds} seed{'s' if seeds > 1 else ''} per variant" + ("; bands: best to worst seed" if seeds > 1
                                                                         else ""))
    fig.tight_layout()
    save_figure(fig, path)


# -----------------------------------------------------------------------------
# 22. Sharing the model: transformers
# -----------------------------------------------------------------------------
# The tools that evaluate and serve language models (lm-evaluation-harness, a
# plain transformers script, vLLM) load a folder with
# AutoModelForCausalLM.from_pretrained. `export --format hf` writes one, in one
# of two ways:
#
#   - Native, when the model computes exactly what a transformers architecture
#     computes: Mixtral (every layer MoE, RoPE alone, softmax top-k, no shared
#     experts, no routing bias) or Mistral (every layer dense, RoPE alone). The
#     weights are renamed into that architecture and transformers' own code
#     runs them; no remote code. (tests/test_reference_models.py shows that
#     these architectures compute what H64LM computes.)
#   - Remote code, for everything else (ALiBi, alternating layers, sigmoid
#     routing, shared experts, aux_free's bias), which no transformers
#     architecture expresses: the folder carries this file and a two-line
#     modeling_h64lm.py that takes H64LM wrapped in a PreTrainedModel with
#     GenerationMixin (transformers_classes). One implementation, not two;
#     loading it needs trust_remote_code=True, as any custom model does.
#
# Either way the tokenizer is saved beside the weights, so that
# AutoTokenizer.from_pretrained reads the same folder.


# What a checkpoint records of the tokenizer and the data it was trained on, so that a run is resumed, and a
# model evaluated or sampled, with the same ones (see check_trained_with). An exported model keeps them in its
# safetensors metadata, as strings.
PROVENANCE_KEYS = ("tokenizer", "tokenizer_fingerprint", "tokenizer_vocab", "data", "data_fingerprint")


def read_safetensors(path: Path, device) -> dict:
    """CHECKPOINT_READERS[".safetensors"] (section 16): an exported model as read_checkpoint gives a checkpoint."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    config_path = path.with_name("config.json")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        raise H64LMError(f"{path} needs its config.json beside it; export the checkpoint again with "
                         "`h64lm.py export`.") from None
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
        state = load_file(path, device=str(device))
    except (SafetensorError, OSError) as e:
        raise H64LMError(f"{path} is not a readable safetensors file ({e}); export the checkpoint again.") from None
    ckpt = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": state, "config": config}
    ckpt.update({k: metadata[k] for k in PROVENANCE_KEYS if k in metadata})
    if "tokenizer_vocab" in ckpt:
        ckpt["tokenizer_vocab"] = int(ckpt["tokenizer_vocab"])
    return ckpt


CHECKPOINT_READERS[".safetensors"] = read_safetensors


def export_checkpoint(path: str | Path, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the weights of a checkpoint as out/model.safetensors (in dtype; bfloat16 halves the size) and its
    config as out/config.json. Loading converts the weights back to the model's float32."""
    from safetensors.torch import save_file

    trained = open_trained(path)
    model, ckpt = trained.model, trained.ckpt
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": CHECKPOINT_FORMAT, "step": str(ckpt.get("step", "")),
                "val_loss": str(ckpt.get("val_loss", "")), **{k: str(ckpt[k]) for k in PROVENANCE_KEYS if k in ckpt}}
    weights = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    write_atomically(out / "model.safetensors", lambda tmp: save_file(weights, str(tmp), metadata=metadata))
    write_atomically(out / "config.json", lambda tmp: tmp.write_text(json.dumps(model.config.to_dict(), indent=1)
                                                                     + "\n"))
    return out / "model.safetensors"


def native_architecture(model: H64LM) -> str | None:
    """"mixtral" or "mistral" when a transformers architecture computes exactly this model, else None."""
    config = model.config
    if config.attention_type != "rope":
        return None
    if not config.moe_layer_ids:
        return "mistral"
    no_bias = all(m.balance_bias is None or not m.balance_bias.any() for m in model.moe_layers().values())
    if (len(config.moe_layer_ids) == config.num_layers and config.router_scoring == "softmax"
            and config.num_shared_experts == 0 and no_bias):
        return "mixtral"
    return None


def transformers_config(config: H64LMConfig, architecture: str, **extra):
    """The MixtralConfig or MistralConfig of the same shape as config."""
    from transformers import MistralConfig, MixtralConfig

    shape = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
                 num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
                 head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
                 rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
                 rms_norm_eps=config.rms_norm_eps, sliding_window=config.sliding_window,
                 tie_word_embeddings=config.tie_word_embeddings, **extra)
    if architecture == "mistral":
        return MistralConfig(intermediate_size=config.intermediate_size, **shape)
    return MixtralConfig(intermediate_size=config.expert_intermediate_size, num_local_experts=config.num_experts,
                         num_experts_per_tok=config.num_experts_per_tok,
                         router_aux_loss_coef=config.router_aux_loss_coef, **shape)


def transformers_state_dict(model: H64LM) -> dict[str, torch.Tensor]:
    """H64LM's weights under transformers' Mistral/Mixtral names and layouts."""
    state = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
             "lm_head.weight": model.lm_head.weight}
    for i, block in enumerate(model.blocks):
        prefix = f"model.layers.{i}."
        state[prefix + "input_layernorm.weight"] = block.attn_norm.weight
        state[prefix + "post_attention_layernorm.weight"] = block.ffn_norm.weight
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[prefix + f"self_attn.{proj}.weight"] = getattr(block.attn, proj).weight
        ffn = block.ffn
        if block.is_moe:
            # transformers keeps (E, out, in) for F.linear, gate and up side by side; we keep (E, in, out).
            state[prefix + "mlp.gate.weight"] = ffn.router.weight  # (E, D)
            state[prefix + "mlp.experts.gate_up_proj"] = torch.cat([ffn.w_gate, ffn.w_up], 2).mT  # (E, 2F, D)
            state[prefix + "mlp.experts.down_proj"] = ffn.w_down.mT  # (E, D, F)
        else:
            for proj in ("gate_proj", "up_proj", "down_proj"):
                state[prefix + f"mlp.{proj}.weight"] = getattr(ffn, proj).weight
    return {name: t.detach().contiguous() for name, t in state.items()}


def to_transformers(model: H64LM, **extra):
    """A transformers MixtralForCausalLM or MistralForCausalLM that computes what model computes (float32)."""
    from transformers import MistralForCausalLM, MixtralForCausalLM

    architecture = native_architecture(model)
    if architecture is None:
        raise ValueError("this model has no transformers architecture; export it with remote code.")
    cls = MixtralForCausalLM if architecture == "mixtral" else MistralForCausalLM
    hf = cls(transformers_config(model.config, architecture, **extra))
    hf.load_state_dict(transformers_state_dict(model), strict=True)
    return hf.eval()


@functools.cache
def transformers_classes():
    """(H64LMHFConfig, H64LMForCausalLM): H64LM as transformers sees a model, for the remote-code export. Defined on
    first call, so that importing h64lm does not import transformers."""
    config_cls = transformers_config_class()
    return config_cls, transformers_model_class(config_cls)


def transformers_config_class():
    """H64LMHFConfig: an H64LMConfig (as a dict) inside transformers' PretrainedConfig."""
    from transformers import PretrainedConfig

    class H64LMHFConfig(PretrainedConfig):
        model_type = "h64lm"

        def __init__(self, h64lm: dict | None = None, **kwargs):
            self.h64lm = dict(h64lm or {})  # H64LMConfig.to_dict()
            kwargs.setdefault("tie_word_embeddings", self.h64lm.get("tie_word_embeddings", False))
            super().__init__(**kwargs)
            # The usual names of the shape, which tools read (lm-evaluation-harness its context length).
            for name, ours in (("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"),
                               ("num_hidden_layers", "num_layers"), ("num_attention_heads", "num_heads"),
                               ("num_key_value_heads", "num_kv_heads"),
                               ("max_position_embeddings", "max_position_embeddings")):
                setattr(self, name, self.h64lm.get(ours))

    return H64LMHFConfig


def transformers_model_class(config_cls):
    """H64LMForCausalLM: H64LM inside transformers' PreTrainedModel, configured by config_cls (H64LMHFConfig)."""
    from transformers import DynamicCache, GenerationMixin, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class H64LMForCausalLM(PreTrainedModel, GenerationMixin):
        """H64LM in transformers' clothes, with transformers' own KV cache (a Cache: generate() makes a DynamicCache,
        or a StaticCache with cache_implementation="static"), which H64LM's layers fill as they fill a KVCache
        (TransformersCache)."""
        config_class = config_cls
        base_model_prefix = "model"
        _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}

        def __init__(self, config):
            super().__init__(config)
            self.model = H64LM(H64LMConfig(**config.h64lm))
            self.post_init()

        @torch.no_grad()
        def _init_weights(self, module):
            # from_pretrained builds the model on the meta device and loads every weight from the file; what no
            # file holds, the buffers derived from the config, is computed again here.
            if isinstance(module, H64LM):
                for name, value in module.derived_buffers().items():
                    getattr(module, name).copy_(value)

        def get_input_embeddings(self):
            return self.model.embed

        def get_output_embeddings(self):
            return self.model.lm_head

        def forward(self, input_ids, attention_mask=None, labels=None, cache=None, use_cache=None, **kwargs):
            """transformers' calling convention: input_ids (B, T) are the tokens after the `cache`'s, and
            attention_mask (B, cached + T) covers them all; padding (0 in it), left or right, gets position -1,
            which H64LM's masks skip; labels are the inputs (shifted here), -100 ignored. use_cache without a
            cache starts one, as transformers' models do."""
            if use_cache and cache is None:
                cache = DynamicCache(config=self.config)
            B, T = input_ids.shape
            cached = int(cache.get_seq_length()) if cache is not None else 0
            positions = None  # 0..T-1: H64LM's plain causal path
            if cached or (attention_mask is not None and not bool(attention_mask.all())):
                if attention_mask is None:
                    attention_mask = torch.ones(B, cached + T, dtype=torch.long, device=input_ids.device)
                positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, -1)
            view = None if cache is None else TransformersCache(cache, positions)
            logits = self.model(input_ids, positions=None if positions is None else positions[:, -T:],
                                cache=view).logits  # (B, T, V)
            loss = None
            if labels is not None:
                loss = token_nll(logits[:, :-1], labels[:, 1:])
            return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

        def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
            # transformers' own, but the attention mask stays the 2-D one (B, S) that positions are read from: for
            # a static cache transformers would turn it into a 4-D mask of its attention's making.
            inputs = super().prepare_inputs_for_generation(input_ids, attention_mask=attention_mask, **kwargs)
            inputs["attention_mask"] = attention_mask
            return inputs

    return H64LMForCausalLM


class TransformersCache(KVCache):
    """A transformers Cache as H64LM's layers use a KVCache: each layer's keys and values go into it (Cache.update,
    which returns all of them, cached then new), and the positions of all the keys are those of the attention mask
    that transformers extends by a column for every generated token, so the cache need not keep them. A static
    cache returns all its slots, the empty ones last: their position is -1, which the mask hides as it hides
    padding. No key is dropped outside a sliding window (the mask hides it too)."""

    def __init__(self, cache, positions: torch.Tensor | None):
        super().__init__(num_layers=0)
        self.cache, self.all_positions = cache, positions  # (B, cached + T); None: 0..T-1 and nothing cached

    def key_positions(self, new_positions: torch.Tensor) -> torch.Tensor:
        positions = new_positions if self.all_positions is None else self.all_positions  # (B or 1, cached + T)
        slots = self.cache.get_mask_sizes(new_positions.shape[1], 0)[0]  # what update will return: S
        return F.pad(positions, (0, slots - positions.shape[1]), value=-1)  # (B or 1, S)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(k, v, layer)  # (B, Hkv, S, hd)

    def advance(self, new_positions: torch.Tensor) -> None:
        pass  # the mask of the next call has them


# What an exported remote-code folder imports: this file, copied beside it.
REMOTE_CODE = '''"""H64LM for transformers: the model is h64lm.py, beside this file (h64lm.py export --format hf)."""

from .h64lm import transformers_classes

H64LMHFConfig, H64LMForCausalLM = transformers_classes()
'''


def export_transformers(path: str | Path, out: str | Path, tokenizer_path: str | Path = "recorded",
                        dtype: torch.dtype = torch.float32, allow_mismatch: bool = False) -> str:
    """Write a checkpoint as a folder that AutoModelForCausalLM and AutoTokenizer load (see above), refusing a
    tokenizer other than the one it was trained with. Returns the architecture written: "mixtral", "mistral" or
    "h64lm" (remote code)."""
    trained = open_trained(path, tokenizer=tokenizer_path, allow_mismatch=allow_mismatch)
    model, tokenizer = trained.model, trained.tokenizer
    out = Path(out)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    architecture = native_architecture(model)
    if architecture is not None:
        hf = to_transformers(model, **ids)
    else:
        config_cls, model_cls = transformers_classes()
        config = config_cls(h64lm=model.config.to_dict(), **ids)
        config.auto_map = {"AutoConfig": "modeling_h64lm.H64LMHFConfig",
                           "AutoModelForCausalLM": "modeling_h64lm.H64LMForCausalLM"}
        hf = model_cls(config)
        hf.model.load_state_dict(model.state_dict())
        architecture = "h64lm"
    out.mkdir(parents=True, exist_ok=True)
    hf.to(dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)
    if architecture == "h64lm":
        shutil.copyfile(Path(__file__), out / "h64lm.py")
        (out / "modeling_h64lm.py").write_text(REMOTE_CODE)
    return architecture


# -----------------------------------------------------------------------------
# 23. Speed: compiled decoding, the benchmark and the doctor
# -----------------------------------------------------------------------------
# Decoding compiled the way gpt-fast does, which fills section 13's seam
# COMPILED_DECODING: a static cache, below, and decode_one_token compiled whole.
#
# `h64lm.py bench` times what matters for pretraining and serving:
#   - train_step, the step `train` takes, with the preset's recipe (finite
#     checks, clipping, its optimizer): tokens/s, model FLOPs per
#     token (6 N_active + attention, as torchtitan counts them), achieved FLOP/s
#     and utilisation of the device's peak (on CPU the float32 matmul rate this
#     process measures; on CUDA the data-sheet bf16 peak), and peak memory;
#   - the MoE overhead: one MoE layer's forward+backward over a dense SwiGLU
#     with the same active FLOPs (hidden width expert_intermediate_size x k),
#     both timed in alternation in one process, so that the ratio holds even
#     on a busy machine;
#   - cached greedy decoding at batch 1 and 8, eager and, with --compile,
#     compiled (a static cache, section 13), in alternation too.
# A ratio is the median of the repeats' ratios, each repeat timing both sides
# moments apart, with the lowest and highest beside it: the spread says how
# far one number on a busy machine can be trusted. How the developers check
# their speed against transformers' Mixtral and the speed targets lives with
# the tests (`python -m tests.speed --help`), built on the timing below.


# The same cache in preallocated tensors (gpt-fast's static cache): a fixed
# number of slots per layer, written in place, so that every decoding step has
# the same shapes and torch.compile captures it once (section 13). Position p
# goes to slot p % slots. With a window of W there are W slots, a ring: the
# new key overwrites the one W positions back, which no query can see any
# more; without a window, one slot per position of the context. Empty slots
# have position -1, which the mask hides like padding, and attention reads
# the slots in any order: the mask and ALiBi come from the positions, and RoPE
# was applied before caching. A prompt of several tokens attends to the slots
# and its own keys side by side (it may be longer than the ring), then its
# last keys are written.

class StaticKVCache(KVCache):
    def __init__(self, num_layers: int, batch: int, context: int, sliding_window: int | None = None,
                 device: torch.device | str = "cpu"):
        super().__init__(num_layers, sliding_window)
        self.slots = min(sliding_window or context, context)
        # keys and values are allocated at the first update, with the shape and dtype attention gives them
        self.positions = torch.full((batch, self.slots), -1, device=device)  # (B, slots) each slot's position
        torch._dynamo.mark_static_address(self.positions)
        self.slot_of_new: torch.Tensor | None = None  # (B, T') the slots the new tokens' keys go to

    def key_positions(self, new_positions: torch.Tensor) -> torch.Tensor:
        B, T = self.positions.shape[0], new_positions.shape[1]
        new_positions = new_positions.expand(B, -1)
        if T == 1:  # decoding: the new key is written first, then attention reads the slots
            self.slot_of_new = new_positions % self.slots  # (B, 1)
            return self.positions.scatter(1, self.slot_of_new, new_positions)  # (B, slots)
        self.slot_of_new = new_positions[:, -self.slots:] % self.slots  # (B, min(T, slots)): padding (-1) goes to
        return torch.cat((self.positions, new_positions), dim=1)  # the last slot, and stays masked; (B, slots + T)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is None:
            shape = (k.shape[0], k.shape[1], self.slots, k.shape[3])  # (B, Hkv, slots, hd)
            self.keys[layer], self.values[layer] = k.new_zeros(shape), v.new_zeros(shape)
            for t in (self.keys[layer], self.values[layer]):  # a CUDA graph writes them in place
                torch._dynamo.mark_static_address(t)
        keys, values = self.keys[layer], self.values[layer]
        slot = self.slot_of_new[:, None, :, None]  # (B, 1, T', 1)
        T = slot.shape[2]
        if k.shape[2] == 1:
            keys.scatter_(2, slot.expand_as(k), k)
            values.scatter_(2, slot.expand_as(v), v)
            return keys, values  # (B, Hkv, slots, hd)
        all_k, all_v = torch.cat((keys, k), dim=2), torch.cat((values, v), dim=2)  # (B, Hkv, slots + T, hd)
        keys.scatter_(2, slot.expand(-1, k.shape[1], -1, k.shape[3]), k[:, :, -T:])
        values.scatter_(2, slot.expand(-1, v.shape[1], -1, v.shape[3]), v[:, :, -T:])
        return all_k, all_v

    def advance(self, new_positions: torch.Tensor) -> None:
        T = self.slot_of_new.shape[1]
        self.positions.scatter_(1, self.slot_of_new, new_positions.expand(self.positions.shape[0], -1)[:, -T:])
        self.next_position = new_positions.amax(dim=1, keepdim=True) + 1

    def __len__(self) -> int:
        return int((self.positions >= 0).sum(dim=1).max())


def static_cache(model: H64LM, batch: int) -> StaticKVCache:
    """A StaticKVCache for model, preallocated for batch rows, on its device."""
    config = model.config
    return StaticKVCache(config.num_layers, batch, config.max_position_embeddings, config.sliding_window,
                         model.embed.weight.device)


def compiled_decoder(device: torch.device) -> Callable:
    """decode_one_token compiled whole (fullgraph: no graph break), for a StaticKVCache, whose shapes do not change
    from one token to the next, so it is compiled once per batch size. The first call compiles (seconds). On CUDA
    with CUDA graphs (mode="reduce-overhead", as gpt-fast): each token replays one recorded graph, without
    launching its hundreds of kernels from Python one by one; the cache's tensors keep their addresses
    (StaticKVCache marks them), so the graph reads and writes them where they are."""
    mode = "reduce-overhead" if device.type in CUDA_GRAPH_DEVICES else None
    return torch.compile(decode_one_token, fullgraph=True, dynamic=False, mode=mode)


CUDA_GRAPH_DEVICES = ("cuda",)  # where compiled decoding records CUDA graphs (a CPU has none)


def compiled_decoding(model: H64LM, batch: int) -> tuple[StaticKVCache, Callable]:
    """COMPILED_DECODING (section 13): a static cache and the compiled decoder."""
    cache = static_cache(model, batch)
    return cache, compiled_decoder(cache.positions.device)


COMPILED_DECODING = compiled_decoding


# FlexAttention, attn_impl="flex", which fills section 7's seam. SDPA takes
# ALiBi, a window or padding only as a materialised (B, H, T, S) bias: no flash
# kernel, no skipping of the tiles wholly above the diagonal, and on CUDA the
# KV heads repeated first (section 7). FlexAttention (torch.nn.attention.
# flex_attention; Dong et al. 2024) compiles attention with any score_mod and
# mask_mod into one fused kernel: ALiBi is a score_mod, -m_h (i - j) added to
# each score; causality, the window and padding are a mask_mod, from which
# create_block_mask finds the tiles that are wholly masked, and skips them;
# GQA is its enable_gqa. It is opt-in: torch runs its backward on GPUs only (a
# CPU computes its forward, without gradients, so training there keeps SDPA),
# and whether it pays on a GPU is for tests/gpu_first_run.py to measure.

@functools.cache
def compiled_flex_attention(device_type: str) -> Callable:
    """flex_attention compiled, once per process and device type: uncompiled, it is a reference that stores every
    score. On a CPU each new shape compiles anew (dynamic=False): torch 2.13's C++ kernel for FlexAttention fails
    to build with dynamic shapes ("cur_qSplitSize2 was not declared")."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False if device_type == "cpu" else None)


def flex_masks(model: H64LM, q_pos: torch.Tensor, k_pos: torch.Tensor, plain_causal: bool) -> tuple:
    """ATTENTION_MASKS["flex"]: the score_mod (ALiBi's, or None) and the BlockMask of one forward, from the query
    positions (B or 1, T) and key positions (B or 1, S), with section 5's rules (a padding query sees everything)."""
    from torch.nn.attention.flex_attention import create_block_mask
    B = max(q_pos.shape[0], k_pos.shape[0])
    q_pos, k_pos = q_pos.expand(B, -1), k_pos.expand(B, -1)
    window, slopes = model.config.sliding_window, model.alibi_slopes

    def row(b):  # positions shared by every row (training's) make one mask, broadcast over the batch
        return b if B > 1 else 0

    def mask_mod(b, h, q, k):
        distance = q_pos[row(b), q] - k_pos[row(b), k]
        allowed = (distance >= 0) & (k_pos[row(b), k] >= 0)
        if window is not None:
            allowed = allowed & (distance < window)
        return allowed | (q_pos[row(b), q] < 0)

    def alibi(score, b, h, q, k):
        return score - slopes[h] * (q_pos[row(b), q] - k_pos[row(b), k])
    block_mask = create_block_mask(mask_mod, B if B > 1 else None, None, q_pos.shape[1], k_pos.shape[1],
                                   device=q_pos.device)
    return (alibi if model.config.use_alibi else None), block_mask


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masks: tuple) -> torch.Tensor:
    """ATTENTION_IMPLS["flex"]: plain_attention's function with FlexAttention. q (B, H, T, hd), k and v
    (B, Hkv, S, hd), masks from flex_masks."""
    if q.device.type != "cuda" and torch.is_grad_enabled() and q.requires_grad:
        raise H64LMError(FLEX_ON_CPU)
    score_mod, block_mask = masks
    return compiled_flex_attention(q.device.type)(q, k, v, score_mod=score_mod, block_mask=block_mask,
                                                  enable_gqa=q.shape[1] != k.shape[1])


FLEX_ON_CPU = ("attn_impl='flex' trains on CUDA only (torch's FlexAttention has no backward on a CPU); "
               "use --attn-impl sdpa here.")
ATTENTION_IMPLS["flex"], ATTENTION_MASKS["flex"] = flex_attention, flex_masks


def _median(values: list[float]) -> float:
    return float(np.median(values))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_alternating(fns: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each function, called in turn repeats times (after one warm-up call each, which also compiles):
    one list per function, so that ratios can be taken repeat by repeat between calls made moments apart."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def _ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> tuple[float, float, float]:
    """The median, lowest and highest over the repeats of numerator's time over denominator's."""
    ratios = [a / b for a, b in zip(times[numerator], times[denominator])]
    return _median(ratios), min(ratios), max(ratios)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource  # on CPU: the peak resident memory of the whole process (Linux reports KiB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bench(preset: str = "tiny", device: str = "auto", precision: str = "auto", seq_len: int | None = None,
          batch_size: int = 8, repeats: int = 10, decode_tokens: int = 32, compile: bool = False,
          **overrides) -> dict:
    """Measure a training step, the MoE overhead and decoding, as this section's header says."""
    rt = setup_runtime(device, precision)
    run = bench_run(preset, rt, seq_len, batch_size, compile, **overrides)
    step, peak_memory = bench_step(run)
    seconds = _median(_time_alternating({"h64lm": step}, repeats, rt.device)["h64lm"])
    result = step_figures(run.model, preset, rt, batch_size, run.seq_len, seconds, peak_memory)
    result["optimizer"] = run.tc.optimizer
    result.update(moe_overhead(run.config, run.tokens_per_step, rt, repeats))
    result.update(decode_bench(uncompiled(run.model) if compile else run.model, rt, decode_tokens, repeats, compile))
    return result


def uncompiled(model: H64LM) -> H64LM:
    """A copy of model whose blocks are not compiled: --compile compiles the training step's blocks in place, and
    decoding through them would recompile them at every new shape, timing the compiler as eager decoding."""
    copy = H64LM(model.config).to(model.embed.weight.device)
    copy.load_state_dict(model.state_dict())
    return copy


def bench_run(preset: str, rt: Runtime, seq_len: int | None, batch_size: int, compile: bool = False,
              **overrides) -> Run:
    """What train_step needs for the preset's model (seed 0) with its recipe (its optimizer, schedule and clipping),
    a step of one micro-batch of batch_size x seq_len random tokens; seq_len by default the recipe's."""
    try:
        config = H64LMConfig.from_preset(preset, **overrides)
    except ValueError as e:
        raise H64LMError(str(e)) from None
    recipe = TRAIN_RECIPES.get(preset, {})
    seq_len = seq_len_of(config, seq_len, recipe.get("seq_len"))
    check_seq_len(seq_len, config)
    tc = TrainConfig(**{**recipe, "batch_size": batch_size, "grad_accum": 1, "seq_len": seq_len, "seed": 0,
                        "compile": compile})
    return synthetic_run(config, tc, rt)


def synthetic_run(config: H64LMConfig, tc: TrainConfig, rt: Runtime) -> Run:
    """What train_step needs, made by new_run as start_run makes it, for a fresh model on one step's worth of random
    tokens, with no data to read and no folder to write."""
    check_fits(config, rt.device, rt.world_size if tc.shard else 1)
    seq_len = seq_len_of(config, tc.seq_len)
    tokens = np.random.default_rng(tc.seed).integers(0, config.vocab_size,
                                                     tc.batch_size * tc.grad_accum * rt.world_size * seq_len + 1)
    return new_run(config, tc, rt, Path(tc.out_dir) / "synthetic", tokens, tokens, seq_len, provenance={})


def bench_step(run: Run) -> tuple[Callable[[], None], int]:
    """train_step of run, the very step `train` takes (forward, backward, the finite checks, clipping, the recipe's
    optimizer), and its peak memory: the step is run once here, the warm-up, with nothing else in the measurement."""
    def step() -> None:
        train_step(run, run.step)

    if run.rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.rt.device)
    step()  # warm-up, and the memory peak of the training step alone
    return step, _peak_memory(run.rt.device)


def step_figures(model: H64LM, preset: str, rt: Runtime, batch_size: int, seq_len: int, seconds: float,
                 peak_memory: int) -> dict:
    """The training step's figures in bench's keys, from its median seconds on batch_size x seq_len tokens."""
    tokens = batch_size * seq_len
    flops_per_token = model.flops_per_token(seq_len)
    peak = peak_flops(rt.device)
    result = {
        "device": device_name(rt.device),
        "preset": preset, "config": model.config.to_dict(with_impl=True), "batch_size": batch_size,
        "seq_len": seq_len, "dtype": str(rt.dtype).replace("torch.", ""), "step_seconds": seconds,
        "tokens_per_s": tokens / seconds, "flops_per_token": flops_per_token,
        "achieved_flops": tokens * flops_per_token / seconds, "peak_flops": peak,
    }
    result["utilization"] = result["achieved_flops"] / peak
    result["peak_memory_bytes"] = peak_memory
    return result


def moe_overhead(config: H64LMConfig, tokens: int, rt: Runtime, repeats: int) -> dict:
    """One MoE layer's forward+backward time over that of a dense SwiGLU with the same active FLOPs."""
    moe = MoE(config).to(rt.device)
    dense = SwiGLU(config.hidden_size, config.expert_intermediate_size * config.num_experts_per_tok).to(rt.device)
    x = torch.randn(1, tokens, config.hidden_size, device=rt.device, requires_grad=True)

    def run(layer, first):
        def fn():
            with rt.autocast():
                out = layer(x)
                out = out[0] if first else out
            out.float().sum().backward()
            layer.zero_grad(set_to_none=True)  # as a training step leaves them: otherwise each call adds the
            x.grad = None  # gradients to the last, a pass over 4x more weights in the MoE layer than in the dense
        return fn
    times = _time_alternating({"moe": run(moe, True), "dense": run(dense, False)}, repeats, rt.device)
    overhead, *spread = _ratio(times, "moe", "dense")
    return {"moe_layer_seconds": _median(times["moe"]), "dense_layer_seconds": _median(times["dense"]),
            "moe_overhead": overhead, "moe_overhead_spread": spread}


@torch.no_grad()
def decode_bench(model: H64LM, rt: Runtime, new_tokens: int, repeats: int, compile: bool = False) -> dict:
    """Greedy cached decoding of random 16-token prompts, tokens/s at batch 1 and 8 (keys with _batch8): H64LM's
    stream_generate eager, and with compile also compiled with a static cache (section 13; compiling takes about a
    minute on a CPU), timed in alternation."""
    out = {}
    for batch in (1, 8):
        prompt = torch.randint(3, model.config.vocab_size, (batch, 16), device=rt.device)
        fns = {"decode": _decoding(model, prompt, new_tokens, rt, compile=False)}
        if compile:
            fns["decode_compiled"] = _decoding(model, prompt, new_tokens, rt, compile=True)
        times = _time_alternating(fns, max(3, repeats // 2), rt.device)
        suffix = "" if batch == 1 else f"_batch{batch}"
        for key, seconds in times.items():
            out[f"{key}_tokens_per_s{suffix}"] = batch * new_tokens / _median(seconds)
    return out


def _decoding(model: H64LM, prompt: torch.Tensor, new_tokens: int, rt: Runtime, compile: bool) -> Callable[[], None]:
    """A call that decodes new_tokens greedily after each row of prompt (B, T)."""
    def fn():
        with rt.autocast():
            for _ in stream_generate(model, prompt.tolist(), new_tokens, temperature=0.0, compile=compile):
                pass
    return fn


def bench_report(r: dict, form: str = "", decoding: bool = True) -> str:
    """bench's figures as a table; form follows the preset's name (the comparison in tests/speed.py names Mixtral's
    form there), and decoding=False leaves the decoding lines to the caller."""
    lines = [f"device {r['device']}, {r['dtype']}, preset {r['preset']}{form}, batch {r['batch_size']} x "
             f"{r['seq_len']} tokens",
             f"  training step        {r['step_seconds'] * 1e3:9.1f} ms   {r['tokens_per_s']:,.0f} tokens/s",
             f"  model FLOPs/token    {r['flops_per_token']:,}",
             f"  achieved             {r['achieved_flops'] / 1e9:9.1f} GFLOP/s = {r['utilization']:.1%} of "
             f"{r['peak_flops'] / 1e9:.1f} GFLOP/s peak",
             f"  MoE layer / dense    {r['moe_overhead']:9.2f}x   ({r['moe_layer_seconds'] * 1e3:.1f} vs "
             f"{r['dense_layer_seconds'] * 1e3:.1f} ms, same active FLOPs)",
             f"  peak memory          {r['peak_memory_bytes'] / 2**20:9.0f} MiB"]
    for suffix, batch in (("", 1), ("_batch8", 8)) if decoding else ():
        compiled = r.get(f"decode_compiled_tokens_per_s{suffix}")
        lines.append(f"  decode, batch {batch}      eager {r[f'decode_tokens_per_s{suffix}']:,.0f}"
                     + (f", compiled {compiled:,.0f}" if compiled is not None else "") + " tokens/s")
    return "\n".join(lines)


# --- The doctor ---------------------------------------------------------------
# `h64lm.py doctor` is what to run first on a new machine, as `accelerate test`
# and `flutter doctor` are for theirs: in about a minute, before hours go into a
# run, it says what this device will run and checks that it runs it right:
#   - the device, the torch, CUDA and cuDNN versions, and the peak FLOP/s that
#     MFU is measured against, with where that number comes from;
#   - the SDPA kernel each attention type reaches (read from the operator one
#     layer's real call dispatches to, then which other backends run alone)
#     and whether the grouped GEMM is torch's kernel or the loop, in the
#     dtype training uses;
#   - every fast path against its readable twin on this device, compared as
#     the tests compare them on a CPU, at a small width: attention, the MoE
#     dispatch, the loss, compiled decoding, and bf16 (and fp16 on CUDA)
#     against float32;
#   - three training steps (train_step) at the preset's width with its recipe's
#     optimizer: seconds per step, tokens/s, peak memory, finite losses;
#   - under torchrun, that an all-reduce sums right, that after those steps
#     the aux_free balance bias and the weights are the same on every process,
#     and that the small model's steps sharded (--shard) equal its steps in DDP
#     while each process holds its 1/N of the weights.
# A row is a fact (passed None) or a check (passed True or False); a failed
# check makes the exit status 1.


# How far a fast path may stray from its twin: the largest difference over the twin's largest magnitude (_gap), by
# the dtype training computes in here. float32 differs by summation order alone (the tests allow 1e-4 relative);
# bfloat16 keeps 8 bits of mantissa, so one rounding moves a value by up to 4e-3 and two layers of them add up.
TWIN_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


# The loss and the logits under bf16 or fp16 autocast against float32's, relative (_gap). At initialisation the loss
# is about ln(vocabulary) whatever the precision, so the logits, each rounded a few times, are compared too.
PRECISION_TOLERANCE = {"loss": 1e-2, "logits": 3e-2}


DOCTOR_STEPS = 3  # training steps; the first warms up, the others are timed


SDPA_KERNELS = {"FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "memory-efficient", "CUDNN_ATTENTION": "cuDNN",
                "MATH": "unfused math"}  # torch.nn.attention.SDPBackend's names, in words


def doctor(rt: Runtime, preset: str = "h64lm", log=print, debug: bool = False) -> dict:
    """Every row of the doctor (above) on this process's device, and the failed checks, each named with what was
    found. A part that raises is a failed check (with debug, the error is raised instead). Under torchrun the
    processes agree after every part on which of them failed it, and name it; after a failure anywhere, every
    process skips the parts that run collectives (DOCTOR_COLLECTIVE_PARTS)."""
    try:
        config = H64LMConfig.from_preset(preset)
    except ValueError as e:
        raise H64LMError(str(e)) from None
    small = doctor_config(config)
    parts = {"the device": lambda: device_rows(rt)}
    if rt.world_size > 1:  # before training, which needs it
        parts["the all-reduce"] = lambda: [all_reduce_row(rt)]
    parts |= {"attention kernels": lambda: attention_kernel_rows(config, rt),
              "grouped GEMM": lambda: [grouped_gemm_row(config, rt)],
              "fast paths against their twins": lambda: twin_rows(small, rt),
              "FlexAttention": lambda: [flex_row(small, rt)],
              "lower precision against float32": lambda: precision_rows(small, rt),
              "compiled decoding": lambda: [decoding_row(small, rt)],
              f"{DOCTOR_STEPS} training steps": lambda: training_rows(config, preset, rt)}
    if rt.world_size > 1:
        parts["sharded training (--shard)"] = lambda: sharded_rows(small, rt)
    rows, started, broken = [], time.perf_counter(), []
    for what, part in parts.items():
        log(f"doctor: {what}")
        key = re.sub(r"\W+", "_", what)
        if broken and what in DOCTOR_COLLECTIVE_PARTS:  # some process failed: it must not be waited for
            rows.append(_row(key, what, f"skipped: {broken[0]}"))
            continue
        error = None
        try:
            rows += part()
        except Exception as e:
            if debug:
                raise
            error = f"raised {one_sentence(e)}"
            rows.append(_row(key, what, error, False))
        for rank, elsewhere in failures_by_rank(error, rt).items():
            broken.append(f"{what} failed on rank {rank}")
            if rank != rt.rank:
                rows.append(_row(f"{key}_rank{rank}", f"{what} on rank {rank}", elsewhere, False))
    return {"preset": preset, "device": device_name(rt.device), "processes": rt.world_size,
            "seconds": time.perf_counter() - started, "checks": sum(r["passed"] is not None for r in rows),
            "failed": [f"{r['check']} ({r['value']})" for r in rows if r["passed"] is False],
            "rows": {r.pop("key"): r for r in rows}}


# The doctor's parts that every process must enter together (each runs collectives): after a part fails on any
# process, every process skips them, rather than some entering a collective the others never will.
DOCTOR_COLLECTIVE_PARTS = ("the all-reduce", f"{DOCTOR_STEPS} training steps", "sharded training (--shard)")


def failures_by_rank(error: str | None, rt: Runtime) -> dict[int, str]:
    """Under torchrun, what failed in the part just run on each process that failed it, known to all of them (a
    collective after every part)."""
    if rt.world_size == 1:
        return {}  # nothing to agree on, and no collective to skip
    errors = [None] * rt.world_size
    torch.distributed.all_gather_object(errors, error)
    return {rank: error for rank, error in enumerate(errors) if error}


def _row(key: str, check: str, value: str, passed: bool | None = None, **figures) -> dict:
    """One line of the report: key names it in --json, check in the table; value says what was found."""
    return {"key": key, "check": check, "value": value, "passed": passed, **figures}


def doctor_config(config: H64LMConfig) -> H64LMConfig:
    """The preset's model at a small width, for the checks that compare two computations of it: its attention type,
    window, experts, routing and balance, in 2 layers (dense, then MoE) 64 wide, with 4 query and 2 KV heads and a
    512-token vocabulary, as the tests' small models."""
    return dataclasses.replace(config, vocab_size=512, max_position_embeddings=64, hidden_size=64, num_layers=2,
                               num_heads=4, num_kv_heads=2, intermediate_size=128, expert_intermediate_size=64,
                               moe_layers="odd")


def device_rows(rt: Runtime) -> list[dict]:
    """The facts: the device, the versions, the dtype training computes in, the peak FLOP/s of MFU."""
    cuda = rt.device.type == "cuda"
    versions = (torch.__version__, torch.version.cuda if cuda else "n/a",
                str(torch.backends.cudnn.version()) if cuda else "n/a")
    dtype = str(rt.dtype).removeprefix("torch.")
    peak = peak_flops(rt.device)
    rate = f"{peak / 1e9:.1f} GFLOP/s" if peak < 1e12 else f"{peak / 1e12:.0f} TFLOP/s"
    return [_row("device", "device", device_name(rt.device)),
            _row("versions", "torch / CUDA / cuDNN", " / ".join(versions)),
            _row("precision", "training precision",
                 f"{dtype}, no autocast" if rt.dtype == torch.float32 else f"{dtype} autocast"),
            _row("peak_flops", "peak FLOP/s for MFU", f"{rate} ({peak_flops_source(rt.device)})", peak_flops=peak)]


def attention_kernel_rows(config: H64LMConfig, rt: Runtime) -> list[dict]:
    """The SDPA kernel each attention type reaches here: one layer with the preset's heads, forward and backward in
    the training dtype. The kernel is read from the operator SDPA dispatches to in a real call (torch decides at
    the call: on Hopper it moves cuDNN first in its order only then, so the order read before a call names the
    wrong kernel), and each backend is then tried alone, to list what else would run."""
    from torch.nn.attention import SDPBackend
    rows = []
    for attention_type in ATTENTION_TYPES:
        layer = dataclasses.replace(config, attention_type=attention_type, attn_impl="sdpa", num_layers=1,
                                    moe_layers="none", vocab_size=256, intermediate_size=64)
        torch.manual_seed(0)
        model = H64LM(layer).to(rt.device)
        ids = torch.randint(0, layer.vocab_size, (1, min(128, layer.max_position_embeddings)), device=rt.device)
        taken = sdpa_kernel_taken(model, ids, rt)
        also = [SDPA_KERNELS[name] for name in SDPA_KERNELS
                if SDPA_KERNELS[name] != taken and _runs_under(getattr(SDPBackend, name), model, ids, rt)]
        value = taken + (f" (also runs: {', '.join(also)})" if also else "")
        fused = taken != SDPA_KERNELS["MATH"]  # math stores every (B, H, T, S) score: a failure
        rows.append(_row(f"attention_{attention_type.replace('+', '_')}", f"attention kernel, {attention_type}",
                         value, fused, kernel=taken, runs=[taken, *also]))
    return rows


# The operators SDPA dispatches to, by kernel (aten's names; the CPU's flash kernel has its own). The math kernel
# is no operator of its own: it is written in matrix multiplies and a softmax, so a call that reaches none of
# these took it.
SDPA_OPERATORS = {"_scaled_dot_product_flash_attention": "FLASH_ATTENTION",
                  "_scaled_dot_product_flash_attention_for_cpu": "FLASH_ATTENTION",
                  "_scaled_dot_product_efficient_attention": "EFFICIENT_ATTENTION",
                  "_scaled_dot_product_cudnn_attention": "CUDNN_ATTENTION"}


def sdpa_kernel_taken(model: H64LM, ids: torch.Tensor, rt: Runtime) -> str:
    """The SDPA kernel a training forward of model takes, in SDPA_KERNELS' words, seen in the operators it runs."""
    from torch.utils._python_dispatch import TorchDispatchMode
    seen = []

    class Operators(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func._schema.name.removeprefix("aten::"))
            return func(*args, **(kwargs or {}))
    with Operators(), rt.autocast():
        model(ids, ids)
    kernels = [SDPA_OPERATORS[name] for name in seen if name in SDPA_OPERATORS]
    return SDPA_KERNELS[kernels[0] if kernels else "MATH"]


def _runs_under(backend, model: H64LM, ids: torch.Tensor, rt: Runtime) -> bool:
    """Whether a training forward and backward of model runs with SDPA held to this one backend."""
    from torch.nn.attention import sdpa_kernel
    try:
        with warnings.catch_warnings(), sdpa_kernel([backend]):
            warnings.simplefilter("ignore")  # torch explains, at length, why each kernel it cannot use was skipped
            with rt.autocast():
                loss = model(ids, ids).loss
            loss.backward()
    except RuntimeError:  # "No available kernel": this backend does not take these inputs here
        return False
    return True


def grouped_gemm_row(config: H64LMConfig, rt: Runtime) -> dict:
    """Whether the MoE layers' grouped GEMM is torch's kernel or the loop (native_grouped_mm, section 10), for the
    preset's expert shape in the dtype training multiplies in here."""
    x = torch.empty((), dtype=rt.dtype, device=rt.device).expand(8, config.hidden_size)  # shapes, no memory
    w = torch.empty((), dtype=rt.dtype, device=rt.device).expand(config.num_experts, config.hidden_size,
                                                                 config.expert_intermediate_size)
    dtype, native = str(rt.dtype).removeprefix("torch."), native_grouped_mm(x, w)
    if native is not None:
        kernel = "torch.nn.functional.grouped_mm" if hasattr(F, "grouped_mm") else "torch._grouped_mm"
        cast = "" if native == rt.dtype else ", multiplied in bfloat16"
        return _row("grouped_gemm", "grouped GEMM", f"torch's kernel, {dtype}{cast} ({kernel})", native=True)
    why = ("torch has no float32 grouped kernel" if rt.dtype == torch.float32 and rt.device.type == "cuda"
           else "torch's kernel: bf16 or fp16 on CUDA SM >= 8.0")
    return _row("grouped_gemm", "grouped GEMM", f"loop, {dtype} ({why})", native=False)


def twin_rows(config: H64LMConfig, rt: Runtime) -> list[dict]:
    """Each fast path against its readable twin on this device, in the dtype training uses, compared as
    tests/test_attention.py, test_moe.py and test_training.py compare them on a CPU: the attention of every
    attention type, the MoE dispatch, the loss; outputs and every gradient."""
    tolerance = TWIN_TOLERANCE[rt.dtype]
    x = _doctor_batch(config, rt)
    logits = dataclasses.replace(config, loss_impl="plain")  # so that the outputs compared are the logits
    attention = [twin_gaps(dataclasses.replace(logits, attention_type=t), "attn_impl", "sdpa", "plain", rt, x)
                 for t in ATTENTION_TYPES]
    pairs = [("sdpa_vs_plain_attention", "SDPA vs plain attention", "outputs", [max(g) for g in zip(*attention)]),
             ("grouped_vs_loop_moe", "grouped vs loop MoE", "outputs",
              twin_gaps(logits, "moe_impl", "grouped", "loop", rt, x)),
             ("chunked_vs_plain_loss", "chunked vs plain loss", "value",
              twin_gaps(config, "loss_impl", "chunked", "plain", rt, x))]
    rows = []
    for key, name, outputs, gaps in pairs:
        for what, gap in zip((outputs, "gradients"), gaps):
            rows.append(_gap_row(f"{key}_{what}", f"{name} {what}", gap, tolerance))
    return rows


def flex_row(config: H64LMConfig, rt: Runtime) -> dict:
    """FlexAttention (attn_impl="flex", opt-in) against plain attention, with the preset's attention type: outputs
    and gradients, on CUDA. A CPU runs its forward only, and training there takes SDPA: a fact, not a check (the
    tests compare that forward, and compiling it here would add seconds to every CPU doctor)."""
    if rt.device.type != "cuda":
        return _row("flex_vs_plain_attention", "FlexAttention (attn_impl=flex)",
                    "not checked: a CPU runs its forward only, and trains with SDPA")
    config = dataclasses.replace(config, loss_impl="plain")  # so that the outputs compared are the logits
    gaps = twin_gaps(config, "attn_impl", "flex", "plain", rt, _doctor_batch(config, rt))
    return _gap_row("flex_vs_plain_attention", "FlexAttention vs plain attention outputs and gradients", max(gaps),
                    TWIN_TOLERANCE[rt.dtype])


def _doctor_batch(config: H64LMConfig, rt: Runtime) -> torch.Tensor:
    """Two windows of random tokens, (2, T + 1): inputs x[:, :-1], targets x[:, 1:]."""
    torch.manual_seed(0)
    return torch.randint(0, config.vocab_size, (2, config.max_position_embeddings + 1), device=rt.device)


def twin_gaps(config: H64LMConfig, field: str, fast: str, readable: str, rt: Runtime,
              x: torch.Tensor, backward: bool = True) -> tuple[float, float]:
    """The _gap between two models with the same weights that differ only in how `field` is computed (fast or
    readable): in their outputs (the logits, or the loss when the loss is compared), and the largest over every
    parameter's gradient (0 with backward=False, which runs the forward alone, without gradients)."""
    models = [H64LM(dataclasses.replace(config, **{field: impl})).to(rt.device) for impl in (fast, readable)]
    models[0].load_state_dict(models[1].state_dict())
    outputs = []
    for model in models:
        torch.manual_seed(0)  # the same router noise in both, where the preset has any
        with rt.autocast(), torch.set_grad_enabled(backward):
            out = model(x[:, :-1], x[:, 1:])
        if backward:
            out.loss.backward()
        outputs.append(out.loss if field == "loss_impl" else out.logits)
    grads = [_gap(p.grad, q.grad) for p, q in zip(models[0].parameters(), models[1].parameters()) if backward]
    return _gap(*outputs), max(grads, default=0.0)


def _gap(fast: torch.Tensor, readable: torch.Tensor) -> float:
    """The largest difference between two computations of one tensor over the largest magnitude of the readable
    one: relative, so that one tolerance serves logits, losses and gradients of any scale. NaN if either has one."""
    fast, readable = fast.detach().float(), readable.detach().float()
    return float((fast - readable).abs().max() / readable.abs().max().clamp_min(torch.finfo(torch.float32).tiny))


def _gap_row(key: str, check: str, gap: float, tolerance: float) -> dict:
    passed = gap <= tolerance  # NaN fails
    return _row(key, check, f"max diff {gap:.1e} {'<=' if passed else '>'} {tolerance:.0e}", passed,
                max_diff=gap, tolerance=tolerance)


@torch.no_grad()
def precision_rows(config: H64LMConfig, rt: Runtime) -> list[dict]:
    """The loss and the logits of one batch under bf16 autocast (and fp16, on CUDA) against float32's, the same
    weights."""
    torch.manual_seed(0)
    model = H64LM(dataclasses.replace(config, loss_impl="plain")).to(rt.device)  # plain: it returns the logits
    x = _doctor_batch(config, rt)
    names = {torch.float32: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    outputs = {}
    for dtype in names if rt.device.type == "cuda" else (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        with dataclasses.replace(rt, dtype=dtype).autocast():
            outputs[dtype] = model(x[:, :-1], x[:, 1:])
    reference = outputs.pop(torch.float32)
    return [_gap_row(f"{names[dtype]}_vs_float32_{what}", f"{names[dtype]} vs float32 {what}",
                     _gap(getattr(out, what), getattr(reference, what)), tolerance)
            for dtype, out in outputs.items() for what, tolerance in PRECISION_TOLERANCE.items()]


def decoding_row(config: H64LMConfig, rt: Runtime) -> dict:
    """Greedy decoding with a static cache and a compiled step (section 13) against eager decoding, in float32: the
    same tokens. Compiling needs a C++ compiler on CPU and Triton on CUDA; without them the row says so."""
    name = "compiled vs eager decoding"
    if not torch._dynamo.is_dynamo_supported():
        return _row("compiled_decoding", name, f"skipped: torch.compile does not run on Python "
                    f"{platform.python_version()}")
    torch.manual_seed(0)
    model = H64LM(config).to(rt.device)
    prompts = [torch.randint(3, config.vocab_size, (n,)).tolist() for n in (5, 9)]  # of two lengths: left padding
    eager = generate(model, prompts, 8, temperature=0)
    try:
        compiled = generate(model, prompts, 8, temperature=0, compile=True)
    except torch._dynamo.exc.BackendCompilerFailed as e:  # no compiler for the backend: compiling is impossible here
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return _row("compiled_decoding", name, f"skipped: compiling is impossible here ({why})")
    finally:
        torch._dynamo.reset()
    differ = sum(a != b for row, other in zip(compiled, eager) for a, b in zip(row, other))
    return _row("compiled_decoding", name, f"{differ} of {sum(map(len, eager))} tokens differ", differ == 0)


def training_rows(config: H64LMConfig, preset: str, rt: Runtime) -> list[dict]:
    """DOCTOR_STEPS optimizer steps (train_step, section 15) of the preset's model with its recipe's optimizer, on
    random tokens, a micro-batch each: the recipe's on CUDA, 1 x 128 tokens on CPU, where a step of the h64lm
    model takes seconds. Under torchrun, then, whether the balance bias and the weights are the same everywhere."""
    cpu = {} if rt.device.type == "cuda" else {"batch_size": 1, "seq_len": min(128, config.max_position_embeddings)}
    tc = TrainConfig(**{**TRAIN_RECIPES.get(preset, {}), **cpu, "grad_accum": 1, "compile": False})  # eager: quick
    run = synthetic_run(config, tc, rt)
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    seconds, losses = [], []
    name = (f"{DOCTOR_STEPS} training steps ({tc.batch_size} x {run.seq_len} tokens"
            f"{' per process' if rt.world_size > 1 else ''}, {tc.optimizer})")
    for step in range(DOCTOR_STEPS):
        _sync(rt.device)
        started = time.perf_counter()
        try:
            losses.append(train_step(run, step)["lm_loss"])
        except H64LMError:  # diverged(): train_step refuses a loss or gradient that is not finite
            return [_row("training_steps", name, f"the loss or gradient became NaN or infinite at step {step}",
                         False)] + (same_state_rows(run) if rt.world_size > 1 else [])
        _sync(rt.device)  # the optimizer's last kernels included
        seconds.append(time.perf_counter() - started)
    per_step = _median(seconds[1:])  # the first step warms up
    memory = _peak_memory(rt.device)
    value = (f"{per_step:.2f} s/step, {run.tokens_per_step / per_step:,.0f} tokens/s, peak memory "
             f"{memory / 2**20:,.0f} MiB, losses {', '.join(f'{loss:.3f}' for loss in losses)}")
    rows = [_row("training_steps", name, value, True, seconds_per_step=per_step, losses=losses,
                 tokens_per_s=run.tokens_per_step / per_step, peak_memory_bytes=memory)]
    return rows + (same_state_rows(run) if rt.world_size > 1 else [])


def sharded_rows(config: H64LMConfig, rt: Runtime) -> list[dict]:
    """Under torchrun: DOCTOR_STEPS steps of the small model sharded (--shard, FSDP2) against the same steps in DDP,
    from the same weights on the same tokens (their losses, relative, within the tolerance of a fast path against
    its twin: the gradients are reduced in another order, and on CUDA gathered in bf16), the share of the weights
    each process holds, which must be its 1/N, and the aux_free bias, which must be the same on every process."""
    tc = TrainConfig(batch_size=2, grad_accum=1, seq_len=config.max_position_embeddings, optimizer="adamw",
                     compile=False)
    losses = {}
    for shard in (False, True):
        run = synthetic_run(config, dataclasses.replace(tc, shard=shard), rt)
        losses[shard] = [train_step(run, step)["lm_loss"] for step in range(DOCTOR_STEPS)]
    gap = max(abs(a - b) / abs(a) for a, b in zip(losses[False], losses[True]))
    held = torch.tensor([sum(local(p).numel() for p in run.model.parameters())], device=rt.device)
    torch.distributed.all_reduce(held, op=torch.distributed.ReduceOp.MAX)
    share, fair = held.item() / run.model.num_params(), 1 / rt.world_size
    return [_gap_row("sharded_vs_ddp_losses", f"sharded vs DDP losses ({DOCTOR_STEPS} steps)", gap,
                     TWIN_TOLERANCE[rt.dtype]),
            _row("sharded_share", "weights held by each process, sharded",
                 f"at most {share:.1%} of {run.model.num_params():,} parameters, 1/{rt.world_size} = {fair:.1%}",
                 share <= fair * 1.05, share=share), *same_state_rows(run)]


def all_reduce_row(rt: Runtime) -> dict:
    """Every process adds rank + 1, so n processes must sum to n (n + 1) / 2."""
    total = torch.tensor([rt.rank + 1.0], device=rt.device)
    torch.distributed.all_reduce(total)
    n = rt.world_size
    return _row("all_reduce", f"all-reduce ({torch.distributed.get_backend()})",
                f"sum {total.item():g} over {n} processes, expected {n * (n + 1) / 2:g}",
                total.item() == n * (n + 1) / 2)


def same_state_rows(run: Run) -> list[dict]:
    """Whether every process holds the same aux_free balance bias (which train_step moves by the all-reduced load)
    and, unless sharded, the same weights (which DDP's averaged gradients move alike): a digest of each from every
    process. A sharded run's bias is compared under keys and names of its own."""
    biases = [m.balance_bias for m in run.model.moe_layers().values() if m.balance_bias is not None]
    compared = [("same_balance_bias", "balance bias", biases)]
    if not run.tc.shard:  # a sharded process holds its own part of the weights
        compared.append(("same_weights", "weights", list(run.model.parameters())))
    rows = []
    for key, what, tensors in compared:
        digests = [None] * run.rt.world_size
        torch.distributed.all_gather_object(digests, _digest(tensors))
        same = len(set(digests)) == 1
        value = (f"no bias to compare (balance {run.config.balance})" if not tensors else
                 f"the same on all {len(digests)} processes" if same else
                 f"{len(set(digests))} different versions on {len(digests)} processes")
        key, what = (f"{key}_sharded", f"{what}, sharded,") if run.tc.shard else (key, what)
        rows.append(_row(key, f"{what} identical on every process", value, same if tensors else None))
    return rows


def _digest(tensors: list[torch.Tensor]) -> str:
    """SHA-256 of the tensors' bytes: two digests are equal when every bit is."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().contiguous().flatten().view(torch.uint8).cpu().numpy())
    return digest.hexdigest()


def doctor_report(report: dict) -> str:
    """The table: one row a line, ok or FAIL beside each check, then the verdict."""
    rows = report["rows"].values()
    width = max(len(r["check"]) for r in rows)
    n = report["processes"]
    lines = [f"h64lm doctor: preset {report['preset']}, {n} process{'es' if n > 1 else ''}, {report['seconds']:.0f} s"]
    lines += [f"  {r['check']:<{width}}  {({True: 'ok', False: 'FAIL'}.get(r['passed'], '')):4}  {r['value']}"
              for r in rows]
    return "\n".join(lines + [doctor_verdict(report)])


def doctor_verdict(report: dict) -> str:
    failed = report["failed"]
    if not failed:
        return f"doctor: all {report['checks']} checks passed"
    return f"doctor: {len(failed)} check{'s' if len(failed) > 1 else ''} failed: {'; '.join(failed)}"


# -----------------------------------------------------------------------------
# 24. Command line
# -----------------------------------------------------------------------------
#   python h64lm.py train    [--preset tiny] [--data sample] [--max-steps 200] [--resume] ...
#   python h64lm.py eval     --ckpt checkpoints/tiny [--split test] [--json]
#   python h64lm.py generate --ckpt checkpoints/tiny --prompt "The history of"
#   python h64lm.py analyze  --ckpt checkpoints/tiny
#   python h64lm.py bench    --preset tiny [--compile] [--json]
#   python h64lm.py doctor   [--preset h64lm] [--device cuda] [--json]
#   python h64lm.py compare  --preset tiny --data sample --variants dense,switch,aux_free --seeds 3
#   python h64lm.py export   --ckpt checkpoints/tiny --out checkpoints/tiny-export
#
# Every field of H64LMConfig and TrainConfig is a flag of `train`, and its help
# is the comment beside the field, so the two cannot drift apart. Every flag
# checks its value as it is parsed (a number against the Range of its name, a
# path with the check of what opens it), so a bad value is one sentence before
# anything runs. Problems found later (H64LMError), and whatever else escapes,
# print one sentence too and exit with status 2; --debug shows the traceback.


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (not the usage, which for `train` is a screenful) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message.rstrip('.')}; see `{self.prog} --help`.\n")


def argument_type(check):
    """Turn check(text) -> value, which raises ValueError or H64LMError with the reason, into an argparse type
    (argparse reports an ArgumentTypeError's reason as the flag's error)."""
    @functools.wraps(check)
    def parse(text: str):
        try:
            return check(text)
        except (ValueError, H64LMError) as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def number_flag(allowed: Range, optional: bool = False):
    """A number in `allowed`; with optional, 'none' gives None."""
    @argument_type
    def number(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            value = int(text) if allowed.integer else float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not {'an integer' if allowed.integer else 'a number'}") from None
        if why := allowed.refuse(value):
            raise ValueError(why)
        return value
    return number


# The numbers that only the command line takes. A number has one Range by its name, whichever command takes it:
# NUMBER_RANGES holds these and the configs' (eval's --batch-size is TrainConfig's batch_size, generate's --seed
# its seed).
FLAG_RANGES: dict[str, Range] = dict(
    seeds=COUNT, max_batches=COUNT, drop_one=COUNT, repeats=COUNT, decode_tokens=COUNT, max_new_tokens=COUNT,
    temperature=NON_NEGATIVE, top_k=Range(0, integer=True), top_p=Range(0, 1, low_open=True),
    repetition_penalty=POSITIVE)


NUMBER_RANGES: dict[str, Range] = {**H64LMConfig.RANGES, **TrainConfig.RANGES, **FLAG_RANGES}


def add_number(p, flag: str, optional: bool = False, **settings) -> None:
    """A number flag, --batch-size for batch_size, checked against the Range of its name."""
    p.add_argument(flag, type=number_flag(NUMBER_RANGES[flag[2:].replace("-", "_")], optional), **settings)


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@argument_type
def tokenizer_flag(text: str) -> str:
    """A folder that holds a tokenizer (load_tokenizer's check), or "recorded": the one the checkpoint records."""
    if text != "recorded":
        check_tokenizer_folder(Path(text))
    return text


@argument_type
def run_tokenizer_flag(text: str) -> str:
    """A run's tokenizer: a folder that holds one, or bpe:N (tokenizer_folder)."""
    if bpe_vocab(text) is None:
        check_tokenizer_folder(Path(text))
    return text


@argument_type
def output_folder_flag(text: str) -> str:
    """A folder to write into: it may not exist yet, but it must not be a file, nor lie under one."""
    path = Path(text).expanduser()
    if not (existing := _first_existing(path)).is_dir():
        raise ValueError(f"{text} is a file, not a folder" if existing == path else
                         f"{existing} is a file, so {text} cannot be a folder in it")
    return text


@argument_type
def image_file_flag(text: str) -> str:
    """An image file to write (.png, .pdf or .svg) in a folder that exists."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise ValueError(f"{text} is a folder; give a file name such as {path / 'routing.png'}")
    if path.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise ValueError(f"{text} should end in .png, .pdf or .svg")
    if not path.parent.is_dir():
        raise ValueError(f"the folder {path.parent} does not exist; create it first")
    return text


@argument_type
def new_checkpoint_flag(text: str) -> str:
    """A checkpoint file to write: a new .pt file in a folder that exists (nothing the user has is replaced)."""
    path = Path(text).expanduser()
    if path.exists():
        raise ValueError(f"{text} exists; give a new file name")
    if path.suffix != ".pt":
        raise ValueError(f"{text} should end in .pt")
    if not path.parent.is_dir():
        raise ValueError(f"the folder {path.parent} does not exist; create it first")
    return text


@argument_type
def run_name_flag(text: str) -> str:
    check_run_name(text)  # TrainConfig's check, here too because --resume finds its run by the name
    return text


@argument_type
def data_flag(text: str) -> str:
    """auto, wikitext-103, sample, or a folder (the loader's check; its files are checked when it is read)."""
    if text not in ("auto", "wikitext-103", "sample"):
        check_data_folder(Path(text).expanduser())
    return text


@argument_type
def text_flag(text: str) -> str:
    """Text from the command line: it must be UTF-8 (Python keeps other bytes as unpaired surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text is not valid UTF-8; give it in UTF-8") from None
    return text


@argument_type
def kind_file_flag(text: str) -> tuple[str, Path]:
    kind, sep, path = text_flag(text).partition("=")
    if not sep or not kind or not path:
        raise ValueError(f"{text!r} should be KIND=FILE, e.g. code=example.py")
    return kind, Path(path).expanduser()


@argument_type
def variants_flag(text: str) -> list[str]:
    names = [name.strip() for name in text_flag(text).split(",") if name.strip()]
    unknown = [n for n in names if n not in STUDY_VARIANTS]
    if not names or unknown:
        raise ValueError(f"{', '.join(unknown) or 'no variant'}: choose among {', '.join(STUDY_VARIANTS)}, "
                         "comma-separated, or define one with --variant NAME:FIELD=VALUE,...")
    return names


@argument_type
def custom_variant_flag(text: str) -> tuple[str, dict]:
    """NAME:FIELD=VALUE,... -> (NAME, {FIELD: VALUE}); a value is read as JSON (numbers, true, null) or else text."""
    name, sep, rest = text_flag(text).partition(":")
    known = {f.name for f in fields(H64LMConfig) if f.init and f.name not in IMPL_FIELDS} | {"granularity", "shared"}
    spec = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in known:
            raise ValueError(f"{item!r} should be FIELD=VALUE with FIELD a model setting (e.g. balance=aux_free)")
        try:
            spec[key.strip()] = json.loads(value)
        except ValueError:
            spec[key.strip()] = value.strip()
    if not sep or not re.fullmatch(r"[\w.+-]+", name) or not spec:
        raise ValueError(f"{text!r} should be NAME:FIELD=VALUE,... with a NAME of letters, digits and _.+-")
    return name, spec


# The types of the dataclass fields that are neither choices nor numbers.
FIELD_TYPES = {"data": data_flag, "run_name": run_name_flag, "out_dir": output_folder_flag,
               "tokenizer": run_tokenizer_flag, "cache_dir": output_folder_flag, "moe_layers": text_flag}


@functools.cache
def field_comments(cls) -> dict[str, str]:
    """The comment beside each field of a dataclass (with a comment line right under it as continuation). The class
    is found in this file's lines by its name: inspect.getsource would parse the whole file again for each class,
    a second of every command's start on 2 cores."""
    lines = Path(__file__).read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"class {cls.__name__}\b", line))
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines))
    comments, last = {}, None
    for line in lines[start:end]:
        if m := re.match(r"\s{4}(\w+): [^#]*?#\s(.*)$", line):
            last = m.group(1)
            comments[last] = m.group(2).strip()
        elif last and (m := re.match(r"\s{4}#\s(.*)$", line)):
            comments[last] += " " + m.group(1).strip()
        else:
            last = None
    return comments


def add_dataclass_flags(group, cls, overrides: dict[str, dict]) -> None:
    """One flag per field of cls; overrides maps a preset or recipe name to the fields it changes, for the help."""
    comments = field_comments(cls)
    for f in fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not MISSING else None
        changed = ", ".join(f"{name}: {values[f.name]}" for name, values in overrides.items() if f.name in values)
        text = comments.get(f.name, "").replace("%", "%%") + f" (default: {default}{'; ' + changed if changed else ''})"
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", "bool | None"):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        elif f.name in CHOICES:
            group.add_argument(flag, choices=CHOICES[f.name], default=argparse.SUPPRESS, help=text)
        elif f.name in cls.RANGES:
            add_number(group, flag, optional="None" in f.type, default=argparse.SUPPRESS, help=text,
                       metavar="N" if cls.RANGES[f.name].integer else "X")
        else:
            group.add_argument(flag, type=FIELD_TYPES[f.name], default=argparse.SUPPRESS, help=text, metavar="TEXT")


# Flags that several commands take, defined once; a command may change a setting (common(p, "--preset",
# default="tiny")) or say more in the help.
COMMON_FLAGS: dict[str, dict] = {
    "--preset": dict(choices=PRESETS),
    "--ckpt": dict(required=True, help="a run folder (its best.pt), a .pt file or an exported folder"),
    "--data": dict(default=None, type=data_flag),
    "--tokenizer": dict(default="recorded", type=tokenizer_flag,
                        help="folder of a Hugging Face tokenizer; recorded: the one the checkpoint was trained with "
                             "(mistral_tokenizer/ for a checkpoint that records none)"),
    "--cache-dir": dict(default=str(DEFAULT_CACHE), type=output_folder_flag, help="where tokenized splits are cached"),
    "--device": dict(default="auto", choices=CHOICES["device"]),
    "--precision": dict(default="auto", choices=CHOICES["precision"], help="auto: bf16 on CUDA, fp32 on CPU"),
}


def common(p, flag: str, **changes) -> None:
    """Add COMMON_FLAGS[flag] to p, with any of its settings changed."""
    p.add_argument(flag, **{**COMMON_FLAGS[flag], **changes})


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="h64lm.py", description="H64LM: pretrain, evaluate and sample from a "
                                     "Mixture-of-Experts language model.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in (add_train, add_compare, add_eval, add_generate, add_analyze, add_bench, add_doctor,
                        add_export, add_unshard):
        add_command(commands)
    return parser


def command(commands, name: str, func: Callable, help: str, description: str) -> argparse.ArgumentParser:
    """The subcommand `name`, which runs func(args); its help shows each flag's default."""
    sub = commands.add_parser(name, help=help, description=description,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub.set_defaults(func=func)
    return sub


def add_settings(p: argparse.ArgumentParser, model_title: str, train_title: str) -> None:
    """Every field of H64LMConfig and of TrainConfig as a flag (train's and compare's)."""
    add_dataclass_flags(p.add_argument_group(model_title), H64LMConfig, PRESETS)
    add_dataclass_flags(p.add_argument_group(train_title), TrainConfig, TRAIN_RECIPES)
    # ArgumentDefaultsHelpFormatter would print "(default: ==SUPPRESS==)" for these; the help says the default.
    p.formatter_class = argparse.HelpFormatter


def add_train(commands) -> None:
    p = command(commands, "train", cmd_train, "pretrain a model (or continue one with --resume)",
                "Pretrain a model from a preset, with any model or training setting overridden. Writes "
                "<out-dir>/<run>/: latest.pt, best.pt, training_history.json and PNG plots. Several processes: "
                "torchrun --nproc_per_node=N h64lm.py train ...")
    common(p, "--preset", default=argparse.SUPPRESS,
           help="model preset, and the training recipe of the same name (default: h64lm)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="continue the run in <out-dir>/<run> from its latest.pt, or the run at PATH (a run folder "
                        "or a .pt file); 'auto': continue the run if its folder holds latest.pt, else start it, so "
                        "one command both starts a run and continues it (torchrun --max-restarts relaunches it "
                        "unchanged; a folder named auto is ./auto). Settings come from the checkpoint; --preset and "
                        "model flags given must agree with it, and other flags may change only the schedule and "
                        "logging, not the data order")
    p.add_argument("--allow-mismatch", action="store_true", help="with --resume: go on although the tokenizer or "
                   "the text differ from the ones the checkpoint records")
    add_settings(p, "model (H64LMConfig)", "training (TrainConfig)")


def add_compare(commands) -> None:
    p = command(commands, "compare", cmd_compare,
                "a dense twin and MoE variants at equal FLOPs, several seeds: one table, one plot",
                "Train every variant with every seed on the same data and token budget, each with the same active "
                "FLOPs per token (the dense twin is as wide as the experts a token passes through), score each on "
                "the whole validation split, and write <out-dir>/<run-name>/compare.md, compare.json and "
                "compare.png. Every run is a train run in <out-dir>/<run-name>/<variant>-seed<S>: a stopped study "
                "goes on where it stopped. The model flags set the base MoE model (default: --preset tiny "
                "--moe-layers all); the training flags apply to every run.")
    common(p, "--preset", default=argparse.SUPPRESS,
           help="model preset and training recipe of the base model (default: tiny)")
    p.add_argument("--variants", type=variants_flag, default="dense,switch,aux_free",
                   help=f"comma-separated, from: {', '.join(STUDY_VARIANTS)}")
    p.add_argument("--variant", action="append", type=custom_variant_flag, default=[], metavar="NAME:FIELD=VALUE,...",
                   help="a variant of your own, e.g. 'mine:balance=aux_free,bias_update_rate=0.01' (fields of the "
                        "model, or granularity=G and shared=S for fine_grained); repeatable")
    add_number(p, "--seeds", default=3, help="runs per variant, with seeds --seed, --seed + 1, ...")
    add_settings(p, "base model (H64LMConfig)", "training of every run (TrainConfig)")


def add_eval(commands) -> None:
    p = command(commands, "eval", cmd_eval, "loss and perplexity of a checkpoint on a data split",
                "Score every token of a split once: mean loss (nats/token), token-level perplexity and word-level "
                "perplexity (total NLL over WikiText's word count: whitespace words plus one per line).")
    common(p, "--ckpt")
    common(p, "--data", help="auto, wikitext-103, sample or a folder; default: the data the checkpoint was trained on")
    p.add_argument("--split", default="test", choices=("train", "valid", "validation", "test"))
    add_number(p, "--batch-size", default=8, help="sequences per forward pass")
    add_number(p, "--seq-len", default=None, help="tokens per window; default: the training seq_len")
    add_number(p, "--max-batches", default=None, help="score only the first N batches (no word_ppl)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the keys checkpoint, data, "
                   "split, loss, token_ppl, word_ppl, nll, tokens, words, seq_len")
    _add_common(p)


def add_generate(commands) -> None:
    p = command(commands, "generate", cmd_generate, "continue a prompt with a trained model",
                "Stream the continuation of each --prompt to stdout.")
    common(p, "--ckpt")
    p.add_argument("--prompt", action="append", type=text_flag,
                   help="text to continue; give it several times for a batch")
    p.add_argument("--interactive", action="store_true",
                   help="a prompt line instead of --prompt: type the start of a text, the model continues it "
                        "(streamed); /help lists the settings that change between turns. A base model, it "
                        "continues text: it does not answer questions or follow instructions")
    for name, (kind, default, text) in SAMPLING_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=text)
    p.add_argument("--greedy", action="store_true", help="always the most likely token (--temperature 0)")
    p.add_argument("--no-eos", action="store_true", help="keep going after the model ends the text with </s>")
    p.add_argument("--compile", action="store_true",
                   help="decode with a static KV cache and a compiled step (gpt-fast's way): the same tokens, "
                        "faster once compiled, which takes seconds at the first token")
    _add_common(p, cache=False)


def add_analyze(commands) -> None:
    p = command(commands, "analyze", cmd_analyze, "which experts tokens of different kinds of text go to",
                "Run prose, code, dialogue and numbers through a trained model and show, per MoE layer, the share "
                "of token-expert assignments each expert received, the router entropy, and a warning for experts "
                "that get almost nothing, each layer's MaxVio and the experts most often chosen together. Writes "
                "heatmaps: share per kind of text, co-activation, and with --drop-one each expert's worth.")
    common(p, "--ckpt")
    p.add_argument("--out", default=None, type=image_file_flag,
                   help="heatmap (.png, .pdf or .svg) to write; default: routing.png beside the checkpoint")
    p.add_argument("--text", action="append", default=[], metavar="KIND=FILE", type=kind_file_flag,
                   help="analyse the text in FILE as KIND instead of the built-in examples (repeatable)")
    add_number(p, "--drop-one", default=None, metavar="N",
               help="also measure each expert's worth: the validation loss on N batches of 8 with the expert "
                    "masked out of routing, minus the loss with all (L x E + 1 evaluations); writes a heatmap")
    common(p, "--data", help="with --drop-one: the text whose validation split is scored; default: the training data")
    p.add_argument("--json", action="store_true", help="print the profile as one JSON object")
    _add_common(p)


def add_bench(commands) -> None:
    p = command(commands, "bench", cmd_bench, "time a training step, the MoE overhead and decoding",
                "Median of timed training steps (forward, backward, AdamW) after warm-up: tokens/s, model FLOPs "
                "per token, utilisation of the device's peak, peak memory; one MoE layer over a dense SwiGLU with "
                "the same active FLOPs; cached greedy decoding at batch 1 and 8, eager (and compiled with "
                "--compile). README, Speed, lists the --json keys.")
    common(p, "--preset", default="tiny")
    common(p, "--device")
    common(p, "--precision")
    add_number(p, "--seq-len", default=None, help="tokens per sequence; default: the preset's recipe")
    add_number(p, "--batch-size", default=8)
    add_number(p, "--repeats", default=10, help="timed steps; the median is reported")
    add_number(p, "--decode-tokens", default=32, help="new tokens per decode measurement")
    p.add_argument("--compile", action="store_true",
                   help="compile each block of the training step (compile_blocks), and time compiled decoding too")
    for name in IMPL_FIELDS:
        p.add_argument("--" + name.replace("_", "-"), choices=CHOICES[name], default=None,
                       help="override the preset's")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def add_doctor(commands) -> None:
    p = command(commands, "doctor", cmd_doctor,
                "check a machine before training on it: kernels, fast paths, three training steps",
                "What to run first on a new machine, in about a minute: the device and the torch, CUDA and cuDNN "
                "versions; the peak FLOP/s that MFU uses and where it comes from; the attention kernel each "
                "attention type reaches and whether the grouped GEMM is torch's kernel or the loop; each fast path "
                "against its readable twin on this device (attention, MoE dispatch, loss, compiled decoding, bf16 "
                "and on CUDA fp16 against float32); three training steps at the preset's width, with seconds per "
                "step, tokens/s and peak memory. Under torchrun also the all-reduce, that the balance bias and the "
                "weights stay the same on every process, and that sharded steps (--shard) equal DDP's. Exit status 1 "
                "when a check fails, naming it.")
    common(p, "--preset", default="h64lm",
           help="the model whose width the training steps take, with its recipe's optimizer")
    common(p, "--device")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table: preset, "
                   "device, processes, seconds, checks, failed, and rows, each with check, value and passed (true, "
                   "false, or null for a fact)")


def add_export(commands) -> None:
    p = command(commands, "export", cmd_export,
                "write a checkpoint's weights as safetensors, for h64lm.py or for transformers",
                "--format h64lm: <out>/model.safetensors and <out>/config.json, the weights alone in a format that "
                "cannot hold code; eval and generate read the folder. --format hf: a folder that transformers' "
                "AutoModelForCausalLM and AutoTokenizer load: a native Mixtral or Mistral when the model is exactly "
                "one (RoPE only, and every layer MoE with softmax routing and no shared experts or routing bias, or "
                "every layer dense), otherwise this file as remote code (trust_remote_code=True).")
    common(p, "--ckpt", help="a run folder (its best.pt) or a .pt file")
    p.add_argument("--out", required=True, type=output_folder_flag, help="folder to write")
    p.add_argument("--format", default="h64lm", choices=("h64lm", "hf"),
                   help="h64lm: this program's own; hf: Hugging Face transformers'")
    common(p, "--tokenizer", help="with --format hf, the tokenizer to save beside the model: a "
                                  + COMMON_FLAGS["--tokenizer"]["help"])
    p.add_argument("--allow-mismatch", action="store_true", help="with --format hf: save the tokenizer although "
                   "it is not the one the checkpoint records")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="precision of the stored weights; bfloat16 halves the file")


def add_unshard(commands) -> None:
    p = command(commands, "unshard", cmd_unshard, "turn a sharded checkpoint (train --shard) into one file",
                "Read the shards of a checkpoint written by train --shard in one process and write the single-file "
                "checkpoint a run without --shard writes: the whole weights and optimizer state, the run's history "
                "and settings. train --resume continues it without --shard, on any number of processes. (eval, "
                "generate, analyze and export read a sharded run as it is.)")
    common(p, "--ckpt", help="a sharded run folder (its best.pt) or its latest.pt or best.pt")
    p.add_argument("--out", required=True, type=new_checkpoint_flag, help="the .pt file to write (a new one)")


# generate's sampling settings: its flags, and the /commands of its prompt line, checked alike (by the Range of
# each name): name -> (type, default, help).
SAMPLING_FLAGS: dict[str, tuple[Callable, object, str]] = {
    name: (number_flag(NUMBER_RANGES[name], optional=default is None), default, text) for name, default, text in [
        ("max_new_tokens", 100, "tokens to generate per prompt"),
        ("temperature", 0.8, "divides the logits; 0 = greedy"),
        ("top_k", 50, "sample among the k most likely tokens; 0 = all"),
        ("top_p", 0.95, "nucleus sampling: the smallest set reaching probability p; 1 = all"),
        ("repetition_penalty", 1.1, "> 1 discourages tokens already in the text (CTRL)"),
        ("seed", None, "seed for sampling, for repeatable output; none = random")]}


def _add_common(p: argparse.ArgumentParser, cache: bool = True) -> None:
    """The flags of the commands that read a trained model with a tokenizer: eval, generate, analyze."""
    common(p, "--tokenizer")
    if cache:
        common(p, "--cache-dir")
    common(p, "--device")
    common(p, "--precision")
    p.add_argument("--allow-mismatch", action="store_true", help="use a tokenizer (or data) other than the one "
                   "the checkpoint records: only if you know they agree")


def with_defaults(train_config: dict) -> dict:
    """A saved run's training settings, with today's default for each field newer than the run."""
    return {**{f.name: f.default for f in fields(TrainConfig)}, **train_config}


# Flags that may differ when a run is resumed: they change neither the model nor which data each step sees.
RESUMABLE_FLAGS = {"max_steps", "stop_at", "eval_every", "save_every", "eval_batches", "log_every", "compile",
                   "gradient_checkpointing", "device", "precision", "lr", "min_lr", "warmup_steps", "grad_clip",
                   "weight_decay", "beta1", "beta2", "cache_dir", "tokenizer"}


def train_settings(args: argparse.Namespace) -> tuple[H64LMConfig, TrainConfig, str, Path | None, Trained | None]:
    """The model config, training config, run name, and the path and contents of the checkpoint to resume, that
    `train`'s flags ask for: defaults, then the preset and its recipe, then the flags given; with --resume, the
    checkpoint's settings (the checkpoint is opened here, once, and handed on to train). Only the flags given count:
    the parser leaves the others out of args (argparse.SUPPRESS)."""
    given = vars(args)
    model_flags, train_flags = settings_given(args)
    impl_flags = {name: model_flags.pop(name) for name in IMPL_FIELDS if name in model_flags}  # free on resume
    resume = resume_path(args.resume, given.get("preset"), train_flags)
    if resume is None:  # a new run; with --resume auto, one whose folder holds no checkpoint yet
        preset = given.get("preset", "h64lm")
        try:
            config = H64LMConfig.from_preset(preset, **model_flags, **impl_flags)
            tc = TrainConfig(**{**TRAIN_RECIPES[preset], **train_flags})
        except ValueError as e:
            raise H64LMError(str(e)) from None
        return config, tc, preset, None, None
    trained = open_trained(resume, latest=True, build=False)
    saved, saved_tc = trained.config, trained.ckpt.get("train_config")
    if not isinstance(saved_tc, dict) or "step" not in trained.ckpt:
        raise H64LMError(f"{resume} holds weights but no training state; start a new run instead.")
    check_same_model(saved, given.get("preset"), model_flags, resume)
    run_tc = with_defaults(saved_tc)
    fixed = [f"{flag_text(k, v)} (the run's: {flag_text(k, run_tc[k])})" for k, v in train_flags.items()
             if k not in RESUMABLE_FLAGS | {"run_name", "out_dir"} and run_tc[k] != v]
    if fixed:
        raise H64LMError(f"--resume cannot change {', '.join(fixed)}: the run would no longer continue the same "
                         "way; start a new --run-name instead.")
    try:  # the training settings not given are the run's own, never the preset's recipe
        tc = TrainConfig(**{**saved_tc, **train_flags, "out_dir": str(resume.parent.parent),
                            "run_name": resume.parent.name, "overwrite": False})
    except TypeError:
        raise H64LMError(f"{resume} was written by another version of h64lm.py (its training settings "
                         "differ); resume it with that version.") from None
    except ValueError as e:
        raise H64LMError(f"With these flags the resumed run's settings are not valid: {e}") from None
    return dataclasses.replace(saved, **impl_flags), tc, resume.parent.name, resume, trained


def settings_given(args: argparse.Namespace) -> tuple[dict, dict]:
    """The H64LMConfig and TrainConfig fields among the flags given (the parser leaves the others out of args)."""
    given = vars(args)
    return ({f.name: given[f.name] for f in fields(H64LMConfig) if f.init and f.name in given},
            {f.name: given[f.name] for f in fields(TrainConfig) if f.name in given})


def exit_status(stopped: str) -> int:
    """A run stopped by a signal exits as the signal's default would (128 + its number), as torchrun expects."""
    return 128 + signal.SIGTERM if "SIGTERM" in stopped else 130 if "SIGINT" in stopped else 0


def resume_path(flag: str | None, preset: str | None, train_flags: dict) -> Path | None:
    """The checkpoint --resume names, or None for a new run. The run folder is <out-dir>/<run-name or preset>, as
    train names it; --resume alone, with neither, takes the one run in out-dir. --resume auto is None while the
    folder holds no latest.pt: a job that torchrun --max-restarts relaunches, or that a person re-runs, repeats
    the command that started it, and that command must continue what the first attempt saved (torchtitan's way)."""
    if flag is None:
        return None
    out_dir = Path(train_flags.get("out_dir", TrainConfig.out_dir))
    name = train_flags.get("run_name") or preset
    if flag == "auto":
        if train_flags.get("overwrite"):
            raise H64LMError("--resume auto continues the run its folder holds and --overwrite replaces it; "
                             "give one of them.")
        path = out_dir / (name or "h64lm") / "latest.pt"
        return path if path.exists() else None
    if flag == "latest":
        if name:
            path = out_dir / name / "latest.pt"
        else:  # the one run in out_dir is the obvious one to continue
            runs = sorted(out_dir.glob("*/latest.pt"))
            if len(runs) > 1:
                raise H64LMError(f"{out_dir} holds several runs ({', '.join(r.parent.name for r in runs)}); "
                                 "say which with --run-name NAME.")
            path = runs[0] if runs else out_dir / "h64lm" / "latest.pt"
        if not path.exists():
            raise H64LMError(f"Nothing to resume: {path} does not exist; start the run without --resume (or with "
                             "--resume auto), or name it with --run-name NAME or --resume PATH.")
        return path
    return resolve_checkpoint(flag, latest=True)


def check_same_model(saved: H64LMConfig, preset: str | None, model_flags: dict, path: Path) -> None:
    """Refuse a --preset or model flag that asks for another model than the checkpoint holds, naming each one and
    both values; equal ones pass, so the command that started a run can continue it. A preset is the whole model
    it makes with the model flags given (to_dict: what the model is, the implementations left out)."""
    have = saved.to_dict()
    wanted = {**(H64LMConfig.from_preset(preset).to_dict() if preset else have), **model_flags}

    def same(k: str, v) -> bool:  # moe_layers by the layers it names: "odd" and "1,3" are one 4-layer model's
        if k != "moe_layers" or v == have[k]:
            return v == have[k]
        try:
            return saved._parse_moe_layers(v, saved.num_layers) == saved.moe_layer_ids
        except ValueError:
            return False
    differ = [f"{flag_text(k, v)} differs from its {'none' if have[k] is None else have[k]}"
              for k, v in model_flags.items() if not same(k, v)]
    by_preset = [f"{k} ({wanted[k]}, its {have[k]})" for k in have if k not in model_flags and not same(k, wanted[k])]
    if by_preset:
        differ.append(f"--preset {preset} differs in {', '.join(by_preset)}")
    if differ:
        raise H64LMError(f"--resume continues the model in {path}; {' and '.join(differ)}; drop "
                         f"{'it' if len(differ) == 1 else 'them'} or start a new --run-name.")


def flag_text(name: str, value) -> str:
    """A setting as the flag that asks for it: --hidden-size 64, --no-tie-word-embeddings, --sliding-window none."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {'none' if value is None else value}"


def cmd_train(args: argparse.Namespace) -> int:
    config, tc, preset, resume, trained = train_settings(args)
    history = train_guarded(config, tc, preset=preset, resume=resume, allow_mismatch=args.allow_mismatch,
                            trained=trained)
    return exit_status(history.get("stopped", ""))


def cmd_compare(args: argparse.Namespace) -> int:
    preset = getattr(args, "preset", "tiny")
    model_flags, train_flags = settings_given(args)
    try:
        base = H64LMConfig.from_preset(preset, **{"moe_layers": "all", **model_flags})
        tc = TrainConfig(**{**TRAIN_RECIPES[preset], "run_name": "compare", **train_flags})
    except ValueError as e:
        raise H64LMError(str(e)) from None
    variants = {name: STUDY_VARIANTS[name] for name in args.variants} | dict(args.variant)
    seeds = [tc.seed + i for i in range(args.seeds)]
    if seeds[-1] not in SEED:
        raise H64LMError(f"--seed {tc.seed} with --seeds {args.seeds} goes past the last seed, {int(SEED.high)}; "
                         "start lower.")
    result = compare(base, tc, variants, seeds)
    if "stopped" in result:  # a signal, or --stop-at
        return exit_status(result["stopped"])
    out = Path(tc.out_dir) / tc.run_name
    print(study_table(result))
    print(f"table: {out / 'compare.md'}\nplot: {out / 'compare.png'}\nnumbers: {out / 'compare.json'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    result = evaluate_checkpoint(args.ckpt, args.data, args.split, tokenizer=args.tokenizer,
                                 cache_dir=args.cache_dir, batch_size=args.batch_size, seq_len=args.seq_len,
                                 max_batches=args.max_batches, device=args.device, precision=args.precision,
                                 allow_mismatch=args.allow_mismatch,
                                 log=(lambda *a, **k: print(*a, **k, file=sys.stderr)) if args.json else print)
    if args.json:
        print(json.dumps(result))
    else:
        word = f"{result['word_ppl']:.2f}" if result["word_ppl"] is not None else "n/a (partial pass)"
        print(f"{result['data']}, {result['split']} split: {result['tokens']:,} tokens, "
              f"{result['words'] or 0:,} words\n"
              f"  loss             {result['loss']:.4f} nats/token\n"
              f"  token perplexity {result['token_ppl']:.2f}\n"
              f"  word perplexity  {word}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    rt = setup_runtime(args.device, args.precision)
    if not args.prompt and not args.interactive:
        raise H64LMError("Nothing to continue: give --prompt TEXT, or --interactive for a prompt line.")
    if args.prompt and args.interactive:
        raise H64LMError("--interactive reads its prompts from the prompt line; drop --prompt.")
    if any(not p.strip() for p in args.prompt or []):
        raise H64LMError("--prompt is empty; give some text for the model to continue.")
    trained = open_trained(args.ckpt, rt.device, tokenizer=args.tokenizer, allow_mismatch=args.allow_mismatch)
    settings = {name: getattr(args, name) for name in SAMPLING_FLAGS}
    if args.greedy:
        settings["temperature"] = 0.0
    check_new_tokens(settings["max_new_tokens"], trained.config)
    fixed = {"eos_id": None if args.no_eos else trained.tokenizer.eos_token_id, "compile": args.compile}
    with rt.autocast():  # --precision, as in training: bf16 on CUDA unless asked otherwise
        if args.interactive:
            return prompt_line(trained, settings, fixed)
        if len(args.prompt) == 1:
            print_continuation(trained, args.prompt[0], settings, fixed)
            return 0
        prompts = fitted_prompts(trained, args.prompt, settings)
        new_tokens = generate(trained.model, prompts, settings["max_new_tokens"], **sampling_options(settings, fixed))
    for ids, new in zip(prompts, new_tokens):  # several prompts: generated together, printed when all are done
        new = [t for t in new if t != fixed["eos_id"]]
        print(trained.tokenizer.decode(ids + new, skip_special_tokens=True), end="\n\n", flush=True)
    return 0


def check_new_tokens(max_new_tokens: int, config: H64LMConfig) -> None:
    """--max-new-tokens (or /max-new-tokens) against the model's context, before any prompt is read."""
    if why := new_tokens_refused(max_new_tokens, config):
        raise H64LMError(f"--max-new-tokens {why}.")


def fitted_prompts(trained: Trained, texts: list[str], settings: dict) -> list[list[int]]:
    """The prompts as token ids, cut to fit the context; fit_prompts's warning about a cut is said in one line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prompts = fit_prompts([trained.tokenizer(t)["input_ids"] for t in texts], settings["max_new_tokens"],
                              trained.config)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    return prompts


def sampling_options(settings: dict, fixed: dict) -> dict:
    """generate's settings (flag names, which the prompt line may change) and its fixed options (eos_id and
    compile) as stream_generate's options."""
    return dict(temperature=settings["temperature"], top_k=settings["top_k"] or None,
                top_p=settings["top_p"] if settings["top_p"] < 1 else None,
                repetition_penalty=settings["repetition_penalty"], seed=settings["seed"], **fixed)


def print_continuation(trained: Trained, text: str, settings: dict, fixed: dict) -> None:
    """Print text, then its continuation as it is generated: decode everything generated so far and print what is
    new (a word can span several tokens, so tokens are not printed one by one)."""
    ids = fitted_prompts(trained, [text], settings)[0]
    out, shown = [], ""
    prefix = trained.tokenizer.decode(ids, skip_special_tokens=True)
    print(text, end="", flush=True)
    with ctrl_c_between_tokens() as interrupted:
        for token in stream_generate(trained.model, [ids], settings["max_new_tokens"],
                                     **sampling_options(settings, fixed)):
            if interrupted.is_set():
                raise KeyboardInterrupt
            if token.item() == fixed["eos_id"]:
                break
            out.append(token.item())
            new = trained.tokenizer.decode(ids + out, skip_special_tokens=True)[len(prefix):]
            print(new[len(shown):], end="", flush=True)
            shown = new
    print()


@contextlib.contextmanager
def ctrl_c_between_tokens():
    """A Ctrl-C during a continuation, remembered and raised as KeyboardInterrupt at the next token. Python's own
    handler raises it wherever the main thread happens to be, where it can be lost; a flag read between tokens
    cannot be."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield interrupted
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.set())
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


PROMPT_LINE_HELP = """\
Type the start of a text and press Enter: the model continues it.

This is a base model: it was trained to continue text like its training text (Wikipedia articles), never to
follow instructions or to chat. Asked a question, it does not answer; it writes what might come next in a
document, often another question or a heading. Write the start of what you want instead: "The capital of
France is", not "What is the capital of France?". Each line is continued on its own; nothing is remembered.

Settings, for the turns that follow: /temperature X  /top-k N  /top-p X  /repetition-penalty X
/max-new-tokens N  /seed N (or none)  /greedy (= /temperature 0)  /settings  /help
Ctrl-C stops a continuation; Ctrl-D or /quit leaves."""


def prompt_line(trained: Trained, settings: dict, fixed: dict) -> int:
    """generate --interactive: read a line, stream its continuation, repeat. Lines starting with / change the
    sampling settings (checked as the flags are). Ctrl-C stops one continuation, Ctrl-D leaves."""
    if sys.stdin.isatty():
        importlib.import_module("readline")  # line editing and history for input(), when a person types
    print(PROMPT_LINE_HELP, file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:  # Ctrl-D, or the end of piped input
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, as Python's own prompt does
            print(file=sys.stderr)
            continue
        if line.startswith("/"):
            if line.strip() in ("/quit", "/exit"):
                return 0
            print(change_setting(line, settings, trained.config), file=sys.stderr)
        elif line.strip():
            try:
                print_continuation(trained, line, settings, fixed)
            except KeyboardInterrupt:
                print(" [stopped]", flush=True)


def change_setting(line: str, settings: dict, config: H64LMConfig) -> str:
    """Apply a /command of the prompt line to settings; returns what to tell the user."""
    command, _, value = line[1:].strip().partition(" ")
    if command == "help":
        return PROMPT_LINE_HELP
    if command == "settings":
        return "  ".join(f"{n.replace('_', '-')}={v}" for n, v in settings.items())
    if command == "greedy":
        command, value = "temperature", "0"
    name = command.replace("-", "_")
    if name not in SAMPLING_FLAGS:
        return f"error: unknown command {line.split()[0]!r}; /help lists them."
    try:
        new = SAMPLING_FLAGS[name][0](value.strip())
        if name == "max_new_tokens":
            check_new_tokens(new, config)
    except (argparse.ArgumentTypeError, H64LMError) as e:
        return f"error: /{command}: {e}"
    settings[name] = new
    return f"{command.replace('_', '-')} = {new}"


def cmd_analyze(args: argparse.Namespace) -> int:
    rt = setup_runtime(args.device, args.precision)
    trained = open_trained(args.ckpt, rt.device, tokenizer=args.tokenizer, allow_mismatch=args.allow_mismatch)
    model, tokenizer = trained.model, trained.tokenizer
    if not model.config.moe_layer_ids:
        raise H64LMError("This model has no MoE layers (moe_layers='none'); there is no routing to analyse.")
    texts = ANALYSIS_TEXTS
    if args.text:
        texts = {}
        for kind, path in args.text:  # (KIND, FILE) pairs, see kind_file_flag
            texts.setdefault(kind, []).extend(_read_lines_as_text(path))
    profile = routing_profile(model, tokenizer, texts)
    out = Path(args.out) if args.out else trained.path.parent / "routing.png"
    written = {"heatmap": out, "coactivation_heatmap": out.with_name(f"{out.stem}-coactivation{out.suffix}")}
    save_routing_heatmap(profile, written["heatmap"])
    save_coactivation_heatmap(profile, written["coactivation_heatmap"])
    delta = None
    if args.drop_one:
        delta = analyze_drop_one(trained, args, rt)
        written["drop_one_heatmap"] = out.with_name(f"{out.stem}-drop-one{out.suffix}")
        save_heatmaps({"validation loss with the expert masked out - with all": delta},
                      written["drop_one_heatmap"], "nats", [f"layer {i}" for i in profile["layers"]],
                      cmap="RdBu_r", centred=True)
    dead = dead_experts(profile)
    if args.json:
        print(json.dumps({"layers": profile["layers"], "kinds": profile["kinds"], "tokens": profile["tokens"],
                          "share": {k: v.tolist() for k, v in profile["share"].items()},
                          "entropy": {k: v.tolist() for k, v in profile["entropy"].items()},
                          "max_vio": profile["max_vio"].tolist(), "coactivation": profile["coactivation"].tolist(),
                          "drop_one": None if delta is None else delta.tolist(),
                          "dead_experts": [list(map(int, d)) for d in dead],
                          **{k: str(v) for k, v in written.items()}}))
        return 0
    print(routing_table(profile))
    if delta is not None:
        for row, layer in enumerate(profile["layers"]):
            order = np.argsort(-delta[row])
            print(f"layer {layer}, validation loss without each expert (nats above {delta.shape[1]} experts): " +
                  ", ".join(f"e{e} {delta[row, e]:+.3f}" for e in order))
    for layer, expert in dead:
        print(f"warning: expert {expert} of layer {layer} received under {DEAD_SHARE:.0%} of a uniform share: it is "
              "nearly dead")
    print("\n".join(f"{name}: {path}" for name, path in written.items()))
    return 0


def analyze_drop_one(trained: Trained, args: argparse.Namespace, rt: Runtime) -> np.ndarray:
    """drop_one_expert on --drop-one batches of the validation split of the checkpoint's data (or --data)."""
    _, splits = scored_text(trained, args.data, args.cache_dir, args.allow_mismatch,
                            log=lambda *a, **k: print(*a, **k, file=sys.stderr))
    seq_len = seq_len_of(trained.config, trained.ckpt.get("train_config", {}).get("seq_len"))
    check_seq_len(seq_len, trained.config)
    return drop_one_expert(trained.model, splits["valid"].tokens, seq_len, 8, rt, args.drop_one)


def _read_lines_as_text(path: Path) -> list[str]:
    text = "\n".join(_read_lines(path)) if path.is_file() else None
    if not text or not text.strip():
        raise H64LMError(f"--text {path}: no such file, or it is empty; give a UTF-8 text file.")
    return [text]


def cmd_bench(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name) for name in ("attn_impl", "moe_impl", "loss_impl") if getattr(args, name)}
    result = bench(args.preset, args.device, args.precision, args.seq_len, args.batch_size, args.repeats,
                   args.decode_tokens, args.compile, **overrides)
    print(json.dumps(result) if args.json else bench_report(result))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    rt = setup_runtime(args.device)  # the precision training uses here
    log = (lambda text: print(text, file=sys.stderr)) if rt.master else (lambda text: None)
    report = doctor(rt, args.preset, log, args.debug)
    if rt.master:
        print(json.dumps(report) if args.json else doctor_report(report))
    if rt.world_size > 1:
        torch.distributed.barrier()  # no process tears down the process group while another still uses it
        torch.distributed.destroy_process_group()
    return 1 if report["failed"] else 0


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (out / "model.safetensors").exists():
        raise H64LMError(f"{out} holds other files; export into an empty or new folder.")
    if args.format == "h64lm":
        path = export_checkpoint(args.ckpt, out, getattr(torch, args.dtype))
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) and config.json")
        return 0
    architecture = export_transformers(args.ckpt, out, args.tokenizer, getattr(torch, args.dtype),
                                       args.allow_mismatch)
    if architecture == "h64lm":
        print(f"wrote {out}: H64LM as remote code (h64lm.py, modeling_h64lm.py) with its tokenizer; load it with "
              "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)")
    else:
        print(f"wrote {out}: a native transformers {architecture.capitalize()} with its tokenizer; load it with "
              "AutoModelForCausalLM.from_pretrained(path)")
    return 0


def cmd_unshard(args: argparse.Namespace) -> int:
    path = unshard_checkpoint(args.ckpt, args.out)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): the whole checkpoint in one file")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # process-wide, so the program sets it, not the library
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        print(f"error: {one_sentence(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
