"""The policy model: one decoder-only transformer that the trainer, the generator and checkpoint
import all share, so that what was sampled is exactly what is trained.

Blocks are pre-norm: RMSNorm, grouped-query attention with (partial) RoPE and optional
QK-norm, RMSNorm, then a SwiGLU MLP or a Mixture-of-Experts (forge.policy.moe). Attention has
three paths over the same projections: causal (torch SDPA) for plain batches, the prefix-tree
mask (forge.kernels.tree_attention) for merged trajectories, and a KV cache for generation.
RoPE rotates the leading `rotary_dim` dims of each head in the rotate-half layout of the
Hugging Face Llama/Qwen code, so imported checkpoints need no permutation. Unlike those
implementations, RoPE and RMSNorm always compute in fp32 and cast back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from forge.kernels.dtypes import at_least_fp32
import torch.nn.functional as F
from torch import nn

from forge.kernels.tree_attention import tree_attention
from forge.policy.config import ModelConfig
from forge.policy.moe import MoE, SwiGLU


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = at_least_fp32(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(position_ids: torch.Tensor, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, rotary_dim] in fp32 for integer positions [B, T]."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, rotary_dim, 2, device=position_ids.device, dtype=torch.float32) / rotary_dim
    )  # [rotary_dim / 2]
    angles = position_ids.float()[..., None] * inv_freq  # [B, T, rotary_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)  # [B, T, rotary_dim]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the leading cos.shape[-1] dims of x [B, T, H, D]; the rest pass through."""
    r = cos.shape[-1]
    rot, rest = at_least_fp32(x[..., :r]), x[..., r:]
    half = r // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    out = rot * cos[:, :, None] + rotated * sin[:, :, None]
    return torch.cat([out.to(x.dtype), rest], dim=-1)


@dataclass
class KVCache:
    """Keys and values of every layer for a batch of rows, preallocated to `capacity` slots.

    k[i], v[i]: [B, Hkv, capacity, D]. `length` slots are filled; every row shares it (rows
    of different lengths are left-padded and the padding is masked by the caller).
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    length: int = 0

    @classmethod
    def allocate(cls, config: ModelConfig, batch: int, capacity: int, *, device, dtype) -> "KVCache":
        shape = (batch, config.num_kv_heads, capacity, config.head_dim)
        k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        return cls(k, v, 0)

    def select(self, rows: torch.Tensor, capacity: int) -> "KVCache":
        """A new cache of rows `rows` [B'] of this one, grown to `capacity` slots."""
        def grow(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros(len(rows), t.shape[1], capacity, t.shape[3])
            out[:, :, : self.length] = t[rows, :, : self.length]
            return out

        return KVCache([grow(t) for t in self.k], [grow(t) for t in self.v], self.length)


class Attention(nn.Module):
    """Grouped-query attention with (partial) RoPE and optional QK-norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        self.qk_norm_scope = c.qk_norm_scope if c.qk_norm else None
        if c.qk_norm:
            per_layer = c.qk_norm_scope == "layer"
            self.q_norm = RMSNorm(c.num_heads * c.head_dim if per_layer else c.head_dim, c.rms_eps)
            self.k_norm = RMSNorm(c.num_kv_heads * c.head_dim if per_layer else c.head_dim, c.rms_eps)

    def _qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projected, normed, rotated q [B, T, Hq, D] and k, v [B, T, Hkv, D]."""
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, H*D]
        if self.qk_norm_scope == "layer":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, self.num_heads, self.head_dim)  # [B, T, Hq, D]
        k = k.view(b, t, self.num_kv_heads, self.head_dim)  # [B, T, Hkv, D]
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm_scope == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        subtree_end: torch.Tensor | None = None,
        cache: tuple[torch.Tensor, torch.Tensor, int] | None = None,
        cache_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, H] -> [B, T, H]. `cache` is (k [B, Hkv, S, D], v, filled length) of this
        layer; the new keys are written after the filled slots and `cache_mask` [B, 1, T, S']
        says which of the first S' = length + T slots each query sees."""
        b, t, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        if subtree_end is not None:
            out = tree_attention(q, k, v, subtree_end, scale=self.head_dim**-0.5)  # [B, T, Hq, D]
            return self.o_proj(out.reshape(b, t, -1))
        q = q.transpose(1, 2)  # [B, Hq, T, D]
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, T, D]
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            k_cache, v_cache, length = cache
            k_cache[:, :, length : length + t] = k
            v_cache[:, :, length : length + t] = v
            k, v = k_cache[:, :, : length + t], v_cache[:, :, : length + t]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=cache_mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    """Pre-norm attention then pre-norm MLP or MoE, each with a residual."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.mlp: nn.Module = (
            MoE(config) if config.is_moe_layer(layer) else SwiGLU(config.hidden_size, config.dense_width)
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        subtree_end: torch.Tensor | None = None,
        token_weight: torch.Tensor | None = None,
        cache: tuple[torch.Tensor, torch.Tensor, int] | None = None,
        cache_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, H] -> [B, T, H]; the keyword arguments are those of Attention and MoE."""
        x = x + self.attn(self.attn_norm(x), cos, sin, subtree_end=subtree_end, cache=cache, cache_mask=cache_mask)
        h = self.mlp_norm(x)
        return x + (self.mlp(h, token_weight) if isinstance(self.mlp, MoE) else self.mlp(h))


class Transformer(nn.Module):
    """The policy. `forward` returns logits [B, T, V] (float32, or float64 for an fp64 model) for ids [B, T]."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for every matrix, zero biases, unit norms, zero expert bias."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, MoE):
                for p in (module.router, module.w_gate, module.w_up, module.w_down):
                    nn.init.normal_(p, std=std)
                module.expert_bias.zero_()
                module.load.zero_()

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return at_least_fp32(F.linear(h, weight))

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        subtree_end: torch.Tensor | None = None,
        token_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] in float32 (float64 for an fp64 model).

        input_ids: [B, T] long. position_ids: [B, T], default arange(T) per row; give the
        prefix tree's depths with subtree_end. subtree_end: [B, T] or None; if given, query q
        sees key k iff k <= q < subtree_end[k] (flattened prefix tree), else causal attention.
        token_weight: [B, T] float or None (1), each token's multiplicity, 0 for padding; it
        weights the MoE load statistics only, never the outputs.
        """
        b, t = input_ids.shape
        if position_ids is None:
            if subtree_end is not None:
                raise ValueError("subtree_end needs position_ids (each token's depth in the prefix tree)")
            position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        cos, sin = rope_tables(position_ids, self.config.rotary_dim, self.config.rope_theta)
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h, cos, sin, subtree_end=subtree_end, token_weight=token_weight)
        return self._head(h)

    def forward_cached(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: KVCache, key_valid: torch.Tensor
    ) -> torch.Tensor:
        """Run T new tokens per row against a KV cache and append their keys and values.

        input_ids, position_ids: [B, T]; key_valid: [B, cache.length + T] bool, False for
        padding slots. Each new token sees the valid slots up to and including its own; a
        padding token also sees itself, so no row of the softmax is empty. Returns logits
        [B, T, V] float32 and advances cache.length by T.
        """
        b, t = input_ids.shape
        total = cache.length + t
        if key_valid.shape != (b, total):
            raise ValueError(f"key_valid must be [{b}, {total}] (cache length + new tokens), got {list(key_valid.shape)}")
        slots = torch.arange(total, device=input_ids.device)  # [S']
        query_slot = cache.length + torch.arange(t, device=input_ids.device)  # [T]
        causal = slots[None, :] <= query_slot[:, None]  # [T, S']
        mask = (key_valid[:, None, :] & causal) | (slots[None, :] == query_slot[:, None])  # [B, T, S']
        cos, sin = rope_tables(position_ids, self.config.rotary_dim, self.config.rope_theta)
        h = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, cache=(cache.k[i], cache.v[i], cache.length), cache_mask=mask[:, None])
        cache.length = total
        return self._head(h)


def count_parameters(model: Transformer) -> tuple[int, int]:
    """(total, active per token) parameter counts.

    Total counts every parameter (embedding, attention, norms, router, all experts, head) but not
    the expert-bias buffers. Active counts what one token's forward multiplies with: everything
    except the input embedding (a lookup, not a matmul) and the routed experts it was not sent
    to (top_k of num_experts per MoE layer).
    """
    total = sum(p.numel() for p in model.parameters())
    active = total - model.embed.weight.numel()
    if model.lm_head is None:
        # Tied: the matrix is still multiplied with once, by the head.
        active += model.embed.weight.numel()
    for block in model.layers:
        if isinstance(block.mlp, MoE):
            per_expert = block.mlp.w_gate[0].numel() + block.mlp.w_up[0].numel() + block.mlp.w_down[0].numel()
            active -= (block.mlp.num_experts - block.mlp.top_k) * per_expert
    return total, active
