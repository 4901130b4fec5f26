"""H64LM: a Mixture-of-Experts language model, from scratch, in one file.

Read it top to bottom: every part of a modern sparse transformer is built
before the whole that uses it, and each section is mirrored, with the same
number and title, by a section of the notebook H64LM.ipynb.

     1. Configuration              8. SwiGLU feed-forward
     2. RMSNorm                    9. The router and its losses
     3. Rotary position embedding 10. The Mixture-of-Experts layer
     4. ALiBi                     11. The transformer block
     5. Attention masks           12. The H64LM model
     6. The KV cache              13. Generation
     7. Grouped-query attention

The default model (the `h64lm` preset) is a 6-layer, 768-wide decoder whose odd
layers are top-2-of-8 Mixture-of-Experts layers: 250M parameters, of which
122M are active for any one token.

Importing this file only defines things; nothing runs until you call it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. Configuration
# -----------------------------------------------------------------------------
# One dataclass holds every architectural choice. Each field says what it means,
# its unit, and where its default comes from; values that follow from others are
# derived in __post_init__, so each default is set in exactly one place.

ATTENTION_TYPES = ("rope", "alibi", "rope+alibi")
ATTENTION_IMPLS = ("sdpa", "plain")
MOE_IMPLS = ("grouped", "loop")


@dataclass
class H64LMConfig:
    # Vocabulary and context.
    vocab_size: int = 32000  # tokens; the Mistral 7B v0.1 tokenizer in mistral_tokenizer/
    max_position_embeddings: int = 1024  # tokens; the longest sequence trained on or generated

    # Width and depth of the H64LM model.
    hidden_size: int = 768  # d_model, the residual stream width; GPT-2 small's width
    num_layers: int = 6  # transformer blocks
    num_heads: int = 12  # query heads; 768 / 12 = 64 per head, as in GPT-2
    num_kv_heads: int = 4  # key/value heads, each shared by num_heads / num_kv_heads query heads (GQA, Ainslie et al. 2023)
    intermediate_size: int = 3072  # hidden width of the dense SwiGLU layers; 4 x hidden_size (GPT-2's ratio)

    # Where attention gets its sense of position, and how far back it looks.
    attention_type: str = "rope+alibi"  # "rope" (Su et al. 2021), "alibi" (Press et al. 2022) or both
    rope_theta: float = 10000.0  # RoPE base wavelength; RoFormer's value, also Llama's and Mistral's
    sliding_window: int | None = None  # tokens a query may see, itself included; None = all earlier tokens (Mistral 7B uses 4096)

    # Mixture of Experts (Shazeer et al. 2017; Switch Transformer, Fedus et al. 2021; Mixtral, Jiang et al. 2024).
    moe_layers: str = "odd"  # which blocks are MoE: "odd", "even", "all", "none" or indices like "1,3"; the rest are dense
    num_experts: int = 8  # experts per MoE layer; Mixtral's 8
    num_experts_per_tok: int = 2  # k of top-k routing: experts each token is sent to; Mixtral's 2
    expert_intermediate_size: int = 3072  # hidden width of each expert's SwiGLU; same as the dense layers
    capacity_factor: float | None = None  # None = dropless (Mixtral, MegaBlocks); else each expert takes at most
    # ceil(capacity_factor * tokens * k / num_experts) tokens per batch while training (Switch uses 1.0 to 1.25)
    router_jitter_noise: float = 0.0  # training-time multiplicative noise on the router input, U(1-eps, 1+eps) (Switch; 0 = off)
    router_aux_loss_coef: float = 0.01  # alpha, weight of the load-balancing loss; Switch Transformer section 2.2 uses 1e-2
    router_z_loss_coef: float = 0.001  # c_z, weight of the router z-loss; ST-MoE (Zoph et al. 2022) uses 1e-3

    # Everything else.
    rms_norm_eps: float = 1e-5  # added to the mean square inside RMSNorm; Mistral's and Mixtral's value
    tie_word_embeddings: bool = False  # share the input embedding with the LM head; H64LM keeps them separate
    initializer_range: float = 0.02  # std of the normal init of every weight matrix; GPT-2's value
    attn_impl: str = "sdpa"  # "sdpa": PyTorch's fused attention kernels; "plain": the same math written out
    moe_impl: str = "grouped"  # "grouped": tokens sorted by expert, one pass each; "loop": the readable per-expert loop

    # Derived in __post_init__; not arguments.
    head_dim: int = field(init=False)  # channels per attention head
    moe_layer_ids: tuple[int, ...] = field(init=False)  # indices of the MoE blocks
    use_rope: bool = field(init=False)
    use_alibi: bool = field(init=False)

    def __post_init__(self):
        for name in ("vocab_size", "max_position_embeddings", "hidden_size", "num_layers", "num_heads",
                     "num_kv_heads", "intermediate_size", "num_experts", "num_experts_per_tok",
                     "expert_intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type must be one of {', '.join(ATTENTION_TYPES)}, got {self.attention_type!r}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}); "
                             "pick a head count that divides it.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads}), "
                             "so that each key/value head serves a whole group of query heads.")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed num_experts "
                             f"({self.num_experts}).")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be a positive number of tokens or None, got {self.sliding_window!r}.")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be positive or None (dropless), got {self.capacity_factor!r}.")
        if self.router_jitter_noise < 0 or self.router_jitter_noise >= 1:
            raise ValueError(f"router_jitter_noise must be in [0, 1), got {self.router_jitter_noise!r}.")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0 or self.initializer_range <= 0:
            raise ValueError("rope_theta, rms_norm_eps and initializer_range must all be positive.")
        if self.attn_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attn_impl must be one of {', '.join(ATTENTION_IMPLS)}, got {self.attn_impl!r}.")
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl must be one of {', '.join(MOE_IMPLS)}, got {self.moe_impl!r}.")

        self.head_dim = self.hidden_size // self.num_heads
        self.use_rope = "rope" in self.attention_type
        self.use_alibi = "alibi" in self.attention_type
        if self.use_rope and self.head_dim % 2:
            raise ValueError(f"RoPE rotates channel pairs, so the head size (hidden_size / num_heads = {self.head_dim}) "
                             "must be even; change hidden_size or num_heads, or use attention_type='alibi'.")
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

    def to_dict(self) -> dict:
        """The constructor arguments (not the derived fields), e.g. for saving in a checkpoint."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

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
        self.next_position = 0  # where a prompt-less continuation starts

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
        self.next_position = int(new_positions.max()) + 1

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
# out, so a reader can follow it; `F.scaled_dot_product_attention` runs fused
# kernels (flash attention on CPU and GPU when the mask is plain causal).
# tests/test_attention.py proves they agree.

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
        if self.impl == "plain":
            y = plain_attention(q, k, v, bias)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=bias is None,
                                               enable_gqa=self.num_heads != self.num_kv_heads)
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
# A linear router scores every expert for every token; softmax turns the scores
# into probabilities p; each token goes to its k most probable experts, whose
# weights are renormalised to sum to one (Mixtral). The softmax runs in float32
# even under bf16 autocast: small logit errors flip top-k choices (Switch
# Transformer's "selective precision", section 2.4).
#
# Left alone, a router learns to favour a few experts, which then get better
# and are favoured more. Two auxiliary losses keep it healthy:
#   load balancing (Switch Transformer, eqs. 4-6):  L_aux = E * sum_i f_i * P_i
#       f_i = fraction of tokens whose top-k choices include expert i
#       P_i = mean router probability of expert i
#     minimal when routing is uniform; f is not differentiable, P carries the
#     gradient. With top-k routing sum_i f_i = k, so the uniform value is k.
#   router z-loss (ST-MoE, Zoph et al. 2022, eq. 5):  L_z = mean_t (log sum_i exp z_ti)^2
#     keeps logits small, which keeps the float32 softmax well conditioned.

def load_balancing_loss(probs: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's N * sum_i f_i * P_i. probs (N, E) in float32, expert_ids (N, k) -> scalar."""
    num_experts = probs.shape[-1]
    f = F.one_hot(expert_ids, num_experts).sum(dim=1).float().mean(dim=0)  # (E,) tokens routed to i / tokens
    P = probs.mean(dim=0)  # (E,) mean probability of expert i
    return num_experts * (f * P).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss: mean over tokens of logsumexp(logits)^2. logits (N, E) -> scalar."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


@dataclass
class RoutingStats:
    """What one MoE layer did in its latest forward pass (detached, kept on the device)."""
    tokens_per_expert: torch.Tensor  # (E,) token-expert assignments each expert processed
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
# compute per token only with k.
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
# expert once, so each expert reads one contiguous block of rows, with one
# gather, one scatter and one host sync instead of one per expert. On a 2-core
# CPU the two run at the same speed (an h64lm-sized layer, 1024 tokens, forward
# and backward: 1.06 s loop, 1.12 s grouped); the sorted layout is the input
# that grouped-GEMM kernels, one kernel for all experts, take on a GPU.

class MoE(nn.Module):
    def __init__(self, config: H64LMConfig):
        super().__init__()
        E, D, Fh = config.num_experts, config.hidden_size, config.expert_intermediate_size
        self.num_experts, self.top_k = E, config.num_experts_per_tok
        self.capacity_factor, self.jitter = config.capacity_factor, config.router_jitter_noise
        self.impl = config.moe_impl
        self.router = nn.Linear(D, E, bias=False)
        # The E experts' SwiGLU weights, stacked so that expert i is w_gate[i], w_up[i], w_down[i].
        self.w_gate = nn.Parameter(torch.empty(E, D, Fh))
        self.w_up = nn.Parameter(torch.empty(E, D, Fh))
        self.w_down = nn.Parameter(torch.empty(E, Fh, D))
        self.stats: RoutingStats | None = None

    def expert_weights(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(w_gate, w_up, w_down) of each expert. Split once per forward with unbind: indexing w_gate[i] for each
        expert instead makes backward write a zero-filled full-size (E, D, F) gradient per expert, which took
        58% of an h64lm-sized MoE layer's forward+backward on CPU (torch.profiler)."""
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
        rank = (onehot.cumsum(dim=0) * onehot).sum(dim=-1) - 1  # (A,) how many earlier assignments chose the same expert
        return (rank < capacity).view(N, k)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> output (B, T, D), load-balancing loss, router z-loss."""
        B, T, D = x.shape
        x = x.reshape(B * T, D)  # (N, D)
        router_in = x
        if self.training and self.jitter > 0:
            router_in = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(router_in.float(), self.router.weight.float())  # (N, E), float32
        probs = logits.softmax(dim=-1)  # (N, E)
        top_p, expert_ids = probs.topk(self.top_k, dim=-1)  # (N, k) each
        weights = top_p / top_p.sum(dim=-1, keepdim=True)  # (N, k), renormalised over the chosen experts

        routed_ids = expert_ids  # what the experts actually process; a dropped assignment goes to "expert E"
        if self.training and self.capacity_factor is not None:
            routed_ids = expert_ids.masked_fill(~self.capacity_keep(expert_ids), self.num_experts)

        dispatch = self._experts_grouped if self.impl == "grouped" else self._experts_loop
        y = dispatch(x, routed_ids, weights.to(x.dtype))  # (N, D)

        with torch.no_grad():
            counts = torch.bincount(routed_ids.reshape(-1), minlength=self.num_experts + 1)
            self.stats = RoutingStats(
                tokens_per_expert=counts[: self.num_experts],
                dropped_fraction=counts[self.num_experts] / routed_ids.numel(),
                router_entropy=-(probs * torch.log(probs.clamp_min(1e-20))).sum(dim=-1).mean(),
            )
        return y.view(B, T, D), load_balancing_loss(probs, expert_ids), router_z_loss(logits)

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
        """The same function with one gather and one scatter: sort the assignments by expert, then each expert
        multiplies one contiguous block of rows. Dropped assignments (id E) sort last and are skipped."""
        flat_ids = expert_ids.reshape(-1)  # (A,)
        order = torch.argsort(flat_ids, stable=True)  # (A,) assignments grouped by expert
        counts = torch.bincount(flat_ids, minlength=self.num_experts + 1)[: self.num_experts].tolist()
        order = order[: sum(counts)]  # drop the dropped
        token = order // self.top_k  # (A',) the token of each sorted assignment
        rows = x[token]  # (A', D), expert 0's rows first, then expert 1's, ...
        out = torch.cat([self.expert(block, *w) for block, w in zip(rows.split(counts), self.expert_weights())])
        out = out * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token, out)  # (N, D)


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

    def forward(self, x, rope, bias, cache):
        """x (B, T, D) -> x (B, T, D), and (load-balancing loss, z-loss) or None for a dense block."""
        x = x + self.attn(self.attn_norm(x), rope, bias, cache)
        if self.is_moe:
            h, balance, z = self.ffn(self.ffn_norm(x))
            return x + h, (balance, z)
        return x + self.ffn(self.ffn_norm(x)), None


# -----------------------------------------------------------------------------
# 12. The H64LM model
# -----------------------------------------------------------------------------
# token ids -> embedding -> N blocks -> RMSNorm -> LM head -> logits over the
# vocabulary. `forward` returns the logits and, given targets, the loss to
# minimise: cross-entropy plus the weighted router losses, averaged over the MoE
# layers so that their weight does not grow with depth.
#
# Initialisation follows GPT-2: every weight ~ N(0, 0.02), and the projections
# that write into the residual stream (attention output, FFN and expert down
# projections) scaled by 1/sqrt(2 * num_layers), so the stream's variance does
# not grow with depth (Radford et al. 2019, section 2.3).

@dataclass
class H64LMOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None = None  # lm_loss + router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss
    lm_loss: torch.Tensor | None = None  # mean next-token cross-entropy, in nats
    aux_loss: torch.Tensor | None = None  # load-balancing loss, mean over MoE layers (unweighted)
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
        # Non-persistent buffers: derived from the config, so they are rebuilt, never loaded.
        self.register_buffer("rope_inv_freq", rope_inverse_frequencies(config.head_dim, config.rope_theta),
                             persistent=False)
        self.register_buffer("alibi_slopes", alibi_slopes(config.num_heads), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)  # RMSNorm gains
            elif name.endswith(("o_proj.weight", "down_proj.weight", "w_down")):
                nn.init.normal_(p, mean=0.0, std=residual_std)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def attention_bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor, plain_causal: bool) -> torch.Tensor | None:
        """What every layer adds to its attention scores: None for the plain causal mask (fast kernels know it),
        a boolean mask (B, 1, T, S) without ALiBi, or a float bias (B, H, T, S) with ALiBi and -inf where masked."""
        config = self.config
        if plain_causal and not config.use_alibi:
            return None
        mask = attention_mask(q_pos, k_pos, config.sliding_window)
        if not config.use_alibi:
            return mask
        return alibi_bias(self.alibi_slopes, q_pos, k_pos).masked_fill(~mask, float("-inf"))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, cache: KVCache | None = None) -> H64LMOutput:
        """idx (B, T) token ids; targets (B, T) next tokens (-100 = ignore); positions (B or 1, T) of each token,
        -1 for padding (default: continue from the cache, or 0..T-1); cache: a KVCache to read and extend."""
        B, T = idx.shape
        default_positions = positions is None
        if default_positions:
            start = cache.next_position if cache is not None else 0
            positions = torch.arange(start, start + T, device=idx.device)[None]  # (1, T)
        last = start + T - 1 if default_positions else int(positions.max())  # no device sync in training
        if last >= self.config.max_position_embeddings:
            raise ValueError(f"Position {last} is beyond max_position_embeddings "
                             f"({self.config.max_position_embeddings}); use a shorter sequence.")
        k_pos = cache.key_positions(positions) if cache is not None else positions  # (B or 1, S)
        plain_causal = cache is None and default_positions and (self.config.sliding_window or T) >= T
        bias = self.attention_bias(positions, k_pos, plain_causal)
        rope = rope_cos_sin(positions, self.rope_inv_freq) if self.config.use_rope else None

        x = self.embed(idx)  # (B, T, D)
        router_losses = []
        for block in self.blocks:
            x, aux = block(x, rope, bias, cache)
            if aux is not None:
                router_losses.append(aux)
        if cache is not None:
            cache.advance(positions)
        logits = self.lm_head(self.norm(x))  # (B, T, V)

        if targets is None:
            return H64LMOutput(logits=logits)
        lm_loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        if router_losses:
            aux_loss = torch.stack([b for b, _ in router_losses]).mean()
            z_loss = torch.stack([z for _, z in router_losses]).mean()
        else:
            aux_loss = z_loss = torch.zeros((), device=idx.device)
        loss = lm_loss + self.config.router_aux_loss_coef * aux_loss + self.config.router_z_loss_coef * z_loss
        return H64LMOutput(logits=logits, loss=loss, lm_loss=lm_loss, aux_loss=aux_loss, z_loss=z_loss)

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_layers, self.config.sliding_window)

    def routing_stats(self) -> dict[int, RoutingStats]:
        """Each MoE layer's statistics from the latest forward pass, by layer index."""
        return {i: b.ffn.stats for i, b in enumerate(self.blocks) if b.is_moe and b.ffn.stats is not None}

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
            elif ".ffn." in name:
                group = "dense FFN"
            else:
                group = "norms"
            groups[group] = groups.get(group, 0) + p.numel()
        active_experts = groups.get("experts", 0) * config.num_experts_per_tok // config.num_experts
        lines = [f"{'part':<12}{'parameters':>15}{'active':>15}"]
        for group in ("embedding", "attention", "dense FFN", "routers", "experts", "norms", "LM head"):
            if group in groups:
                active = active_experts if group == "experts" else groups[group]
                lines.append(f"{group:<12}{groups[group]:>15,}{active:>15,}")
        lines.append(f"{'total':<12}{self.num_params():>15,}{self.num_params(active=True):>15,}")
        seq_len = seq_len or config.max_position_embeddings
        lines.append(f"training FLOPs per token at context {seq_len}: {self.flops_per_token(seq_len):,}")
        return "\n".join(lines)


# -----------------------------------------------------------------------------
# 13. Generation
# -----------------------------------------------------------------------------
# Autoregressive decoding in two phases (gpt-fast's split): `prefill` runs the
# whole prompt in one forward pass and fills the KV cache; `decode_one_token`
# then feeds one token at a time, attending to the cache. `sample` turns the
# last logits into the next token.
#
# Batched prompts of different lengths are left-padded so that every row's last
# prompt token is in the same column; padding slots get position -1, which the
# mask hides, and each row's real tokens are numbered from 0, so a padded row
# computes exactly what it would alone.
#
# Context: positions never exceed max_position_embeddings - 1. A prompt longer
# than max_position_embeddings - max_new_tokens keeps only its last tokens (with
# a warning), so the continuation always fits.

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
        logits = torch.where(seen, penalised, logits)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
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


@torch.inference_mode()
def prefill(model: H64LM, idx: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the prompts (B, T) through the model, filling the cache; return the last position's logits (B, V)."""
    return model(idx, positions=positions, cache=cache).logits[:, -1]


@torch.inference_mode()
def decode_one_token(model: H64LM, token: torch.Tensor, position: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Feed one token per row, token and position (B, 1), through the cached model; return its logits (B, V)."""
    return model(token, positions=position, cache=cache).logits[:, -1]


def stream_generate(model: H64LM, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
                    eos_id: int | None = None, pad_id: int = 0, seed: int | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every prompt (B,), step by step, until max_new_tokens or every row has produced
    eos_id. A row that has finished keeps yielding eos_id (or pad_id without one)."""
    config = model.config
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("Every prompt needs at least one token; a text prompt gets <s> from the tokenizer.")
    if not 1 <= max_new_tokens < config.max_position_embeddings:
        raise ValueError(f"max_new_tokens must be between 1 and {config.max_position_embeddings - 1} "
                         "(max_position_embeddings - 1).")
    room = config.max_position_embeddings - max_new_tokens
    if any(len(p) > room for p in prompts):
        warnings.warn(f"A prompt is longer than the {room} tokens that leave room for {max_new_tokens} new ones in "
                      f"a {config.max_position_embeddings}-token context; only its last {room} tokens are used.")
        prompts = [p[-room:] for p in prompts]

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max())
    pad = width - lengths  # (B,) padding slots at the left of each row
    idx = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)  # (B, T)
    positions = torch.arange(width, device=device)[None] - pad[:, None]  # (B, T), row b starts at -pad_b
    positions = positions.masked_fill(positions < 0, -1)
    seen = torch.zeros(len(prompts), config.vocab_size, dtype=torch.bool, device=device)
    seen.scatter_(1, idx, positions >= 0)  # tokens of the prompt, for the repetition penalty
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    filler = eos_id if eos_id is not None else pad_id

    was_training = model.training
    model.eval()  # no router jitter or capacity dropping while generating
    try:
        cache = model.new_cache()
        logits = prefill(model, idx, positions, cache)
        next_pos = lengths[:, None]  # (B, 1)
        for step in range(max_new_tokens):
            token = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                           repetition_penalty=repetition_penalty, seen=seen, generator=generator)
            token = token.masked_fill(done, filler)  # (B,)
            yield token
            if eos_id is not None:
                done |= token == eos_id
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            seen.scatter_(1, token[:, None], True)
            logits = decode_one_token(model, token[:, None], next_pos, cache)
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
