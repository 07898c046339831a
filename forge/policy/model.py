"""The policy model: one decoder-only transformer that the trainer, the generator and checkpoint
import all share, so that what was sampled is exactly what is trained.

Blocks are pre-norm: RMSNorm, grouped-query attention with (partial) RoPE and optional
QK-norm, RMSNorm, then a SwiGLU MLP or a Mixture-of-Experts (forge.policy.moe). Attention has
three paths over the same projections: causal (torch SDPA) for plain batches, the prefix-tree
mask (forge.kernels.tree_attention) for merged trajectories, and a KV cache for generation.
Layers from `config.msa.dense_layers` on may attend through MiniMax Sparse Attention instead
(forge.kernels.msa; docs/msa.md, "In the model"): an index branch on the detached input picks
blocks of positions, with the same three paths (on CUDA, the Triton kernels of
forge.kernels.msa.tree_triton for plain batches and trees alike, and msa_decode for decode
steps; forge.kernels.msa.tree elsewhere).
RoPE rotates the leading `rotary_dim` dims of each head in the rotate-half layout of the
Hugging Face Llama/Qwen code, so imported checkpoints need no permutation. Unlike those
implementations, RoPE and RMSNorm always compute in fp32 and cast back.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field

import torch

from forge.kernels.dtypes import at_least_fp32
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from forge.kernels.msa import MSAConfig, msa_decode_with_selection
from forge.kernels.msa.tree import msa_cache_attention, msa_tree, select_blocks_tree, select_cache_blocks
from forge.kernels.msa.tree_triton import msa_tree_triton, select_blocks_tree_triton
from forge.kernels.norm import fused_rms_norm, fused_rms_norm_ok, fused_rms_norm_rope, fused_rms_norm_rope_ok
from forge.kernels.tree_attention import tree_attention
from forge.kernels.tree_attention.piece_backends import cudnn_chosen
from forge.policy.choices import ChoiceRecorder, Choices, check_choices
from forge.policy.config import ModelConfig
from forge.policy.invariant import Linear, invariant_linear, wide, wide_call
from forge.policy.moe import MoE, SwiGLU


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (fp64 under `model.batch_invariant`)."""

    invariant = False

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def fuses(self, x: torch.Tensor, generating: bool) -> bool:
        """Whether this call may take the one-kernel norm (forge.kernels.norm): generation on a GPU
        in bf16 or fp16, without gradients and without batch-invariant numerics. The trainer never
        does, so its old and new logprobs share one arithmetic; nor does fp32 generation, which
        is there to match the trainer's numbers (issue 14 asks 1e-5), not to be fast."""
        return (generating and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and not self.invariant
                and not torch.is_grad_enabled())

    def forward(self, x: torch.Tensor, generating: bool = False) -> torch.Tensor:
        if self.fuses(x, generating) and fused_rms_norm_ok(x, self.weight):
            # The same arithmetic in one kernel instead of about eight (decoding steps run ~57 norms).
            return fused_rms_norm(x, self.weight, self.eps)
        xf = wide(x) if self.invariant else at_least_fp32(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(position_ids: torch.Tensor, rotary_dim: int, theta: float,
                exact: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, rotary_dim] in fp32 for integer positions [B, T]. `exact` (batch-invariant
    numerics) takes them in fp64 and rounds once: a vectorised cos and its scalar tail round
    differently, so in fp32 a position's entries would depend on how many positions the call has."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, rotary_dim, 2, device=position_ids.device, dtype=torch.float32) / rotary_dim
    )  # [rotary_dim / 2]
    dtype = torch.float64 if exact else torch.float32
    angles = position_ids.to(dtype)[..., None] * inv_freq.to(dtype)  # [B, T, rotary_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)  # [B, T, rotary_dim]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the leading cos.shape[-1] dims of x [B, T, H, D]; the rest pass through."""
    r = cos.shape[-1]
    rot, rest = at_least_fp32(x[..., :r]), x[..., r:]
    half = r // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    out = rot * cos[:, :, None] + rotated * sin[:, :, None]
    return torch.cat([out.to(x.dtype), rest], dim=-1)


def norm_rope(norm: RMSNorm, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              generating: bool = False) -> torch.Tensor:
    """apply_rope(norm(x), cos, sin) for x [B, T, H, D] normed per head; one kernel in generation
    on a GPU (forge.kernels.norm.fused_rms_norm_rope)."""
    if norm.fuses(x, generating) and fused_rms_norm_rope_ok(x, norm.weight, cos, sin):
        return fused_rms_norm_rope(x, norm.weight, norm.eps, cos, sin)
    return apply_rope(norm(x), cos, sin)


@dataclass
class KVCache:
    """Keys and values of every layer for a batch of rows, preallocated to `capacity` slots.

    Dense layers: k[i], v[i] [B, Hkv, capacity, D], one slot per column of the left-padded
    batch; `length` slots are filled and every row shares it (padding is masked by the caller).
    MSA layers: k[i], v[i] [B, S, Hkv, D] and index keys ik[i] [B, S, Di], indexed by position
    (slot j of a row holds its position j; S is capacity rounded up to a multiple of the block
    size), so that `block_size` consecutive slots are one MSA block: the page layout that
    `msa_decode` reads. ik[i] is None for dense layers.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    length: int = 0
    ik: list[torch.Tensor | None] = field(default_factory=list)
    block_size: int = 1
    """MSA block size; position-indexed slots are allocated in whole blocks."""

    @classmethod
    def allocate(cls, config: ModelConfig, batch: int, capacity: int, *, device, dtype) -> "KVCache":
        bs = config.msa.block_size
        k, v, ik = [], [], []
        for i in range(config.num_layers):
            if config.is_msa_layer(i):
                slots = -(-capacity // bs) * bs
                shape: tuple[int, ...] = (batch, slots, config.num_kv_heads, config.head_dim)
                ik.append(torch.zeros(batch, slots, config.msa.index_dim, device=device, dtype=dtype))
            else:
                shape = (batch, config.num_kv_heads, capacity, config.head_dim)
                ik.append(None)
            k.append(torch.zeros(shape, device=device, dtype=dtype))
            v.append(torch.zeros(shape, device=device, dtype=dtype))
        return cls(k, v, 0, ik, bs)

    def empty(self, batch: int, capacity: int) -> "KVCache":
        """A zeroed cache of this one's layout, dtype and device: `batch` rows, `capacity` slots
        (position-indexed MSA slots in whole blocks)."""
        def new(t: torch.Tensor, slot_dim: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[0] = batch
            shape[slot_dim] = -(-capacity // self.block_size) * self.block_size if slot_dim == 1 else capacity
            return t.new_zeros(shape)

        msa = self._msa_layers()
        return KVCache(
            [new(t, 1 if m else 2) for t, m in zip(self.k, msa)],
            [new(t, 1 if m else 2) for t, m in zip(self.v, msa)],
            0,
            [new(t, 1) if t is not None else None for t in self.ik],
            self.block_size,
        )

    def select(self, rows: torch.Tensor, capacity: int) -> "KVCache":
        """A new cache of rows `rows` [B'] of this one, grown to `capacity` slots."""
        out = self.empty(len(rows), capacity)
        out.length = self.length
        # Positions (MSA layers, slot dim 1) and dense slots (dim 2) below `length` are filled.
        for mine, theirs, slot_dim in self.paired(out):
            filled = (slice(None),) * slot_dim + (slice(0, self.length),)
            theirs[filled] = mine[rows][filled]
        return out

    def paired(self, other: "KVCache") -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """(this cache's tensor, other's, its slot dim: 1 for positions, 2 for dense slots) for
        every key, value and index-key tensor of two caches of one layout."""
        msa = self._msa_layers()
        pairs = [(a, b, 1 if m else 2) for a, b, m in zip(self.k, other.k, msa)]
        pairs += [(a, b, 1 if m else 2) for a, b, m in zip(self.v, other.v, msa)]
        pairs += [(a, b, 1) for a, b in zip(self.ik, other.ik) if a is not None]
        return pairs

    def _msa_layers(self) -> list[bool]:
        return [x is not None for x in self.ik] if self.ik else [False] * len(self.k)


@dataclass
class _Pass:
    """What every layer of one forward pass shares."""

    cos: torch.Tensor
    sin: torch.Tensor
    position: torch.Tensor
    """[B, T] positions of the tokens of this pass."""
    subtree_end: torch.Tensor | None = None
    token_weight: torch.Tensor | None = None
    plain_causal: bool = False
    """A plain causal batch at positions arange(T) (the layout the prefill kernels take)."""
    index_cos: torch.Tensor | None = None
    index_sin: torch.Tensor | None = None
    msa_dense: bool = False
    """The dense warm-up: MSA layers attend densely, the index loss covers every visible key."""
    msa_all_dense: bool = False
    """Every query of the pass is dense (warm-up, or every position below msa.dense_below_tokens)."""
    msa_blocks: int = 1
    """More than the largest block index of the pass (read from the device once per pass)."""
    first_position: int = 0
    last_position: int = 0
    with_index_loss: bool = False
    index_losses: list[torch.Tensor] = field(default_factory=list)
    cache_mask: torch.Tensor | None = None
    """[B, 1, T, S'] visibility of the left-padded slots (dense layers, generation)."""
    new_valid: torch.Tensor | None = None
    """[B, T] bool, False for padding tokens (generation)."""
    new_all_valid: bool = True
    """No padding among the new tokens (decode steps): their keys are written without a gather."""
    decode_slot: torch.Tensor | None = None
    """[1] long: a fixed-shape decoding step (`Transformer.forward_decode`), the dense layers'
    cache slot of the new token; then cache_mask is [B, 1, 1, capacity] and no host read happens."""
    generating: bool = False
    """A KV-cached pass of generation: norms and rotary embeddings may take the one-kernel forms
    (forge.kernels.norm) on a GPU without gradients."""
    impose: Choices | None = None
    """Choices to impose on the pass's tokens (routing replay, forge.policy.choices)."""
    impose_unknown_sparse: bool = True
    """Some imposed token at or past msa.dense_below_tokens is unknown: MSA layers select too."""
    record: ChoiceRecorder | None = None
    """Where the pass writes the choices it made."""


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense causal attention, q [B, T, Hq, D], k, v [B, T, Hkv, D] -> [B, T, Hq, D].

    fp32 on CUDA runs the tree-attention Triton kernel on the causal row (IEEE fp32, O(T)
    memory): SDPA has no fused fp32 GQA kernel and its math fallback keeps [B, Hq, T, T] per
    layer, which ran a 52K-token batch of the 100M model out of an 80 GB card.
    """
    if q.is_cuda and q.dtype == torch.float32:
        from forge.kernels.tree_attention.triton_tree import tree_attention_triton

        b, t = q.shape[:2]
        return tree_attention_triton(q, k, v, torch.full((b, t), t, device=q.device, dtype=torch.int32))
    with _without_cudnn(q):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True)
    return out.transpose(1, 2)


def _without_cudnn(q: torch.Tensor):
    """SDPA's backends without cuDNN on CUDA, unless `FORGE_CUDNN_ATTENTION=1`
    (`piece_backends.cudnn_chosen`). torch puts cuDNN first on Hopper, and cuDNN builds a plan
    per new (batch, length): padded training batches change shape every step. Flash attention
    takes causal GQA without one."""
    if not q.is_cuda or cudnn_chosen():
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _masked_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                fold: bool | None = None) -> torch.Tensor:
    """Masked GQA attention over a KV cache: q [B, Hq, T, D], k, v [B, Hkv, S, D], mask
    [B, 1, T, S] bool (True = attend) -> [B, Hq, T, D].

    SDPA takes a mask with GQA only in cuDNN (a plan per new shape: every prefill after a
    cached prefix brings one) or its math kernel (the [B, Hq, T, S] scores in memory). Folded
    (`fold`, the default on CUDA unless `FORGE_CUDNN_ATTENTION=1`), the query heads of a group
    become rows of one head, [B, Hkv, rep x T, D], with the mask repeated per row: plain masked
    attention, which the memory-efficient kernel takes for any shape (cuDNN left out, as in
    training), reading each group's keys and values once. The same attention either way."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    if fold is None:
        fold = q.is_cuda and not cudnn_chosen()
    if not fold:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=hq != hkv)
    rep = hq // hkv
    # Head h = g * rep + r of query row i becomes row r * T + i of group g.
    rows = q.reshape(b, hkv, rep * t, d)
    mask = mask.expand(b, 1, t, -1)
    with _without_cudnn(q):
        out = F.scaled_dot_product_attention(rows, k, v, attn_mask=mask.repeat(1, 1, rep, 1) if rep > 1 else mask)
    return out.reshape(b, hq, t, d)


def _pow2_at_least_16(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


class Attention(nn.Module):
    """Grouped-query attention with (partial) RoPE and optional QK-norm; MSA in MSA layers.

    An MSA layer adds the index branch: `iq_proj` (one index-query head per KV group) and
    `ik_proj` (one shared index-key head), each RMS-normed per head and rotated by RoPE like the
    main branch, computed from the detached layer input so that the index loss never reaches the
    backbone.
    """

    invariant = False
    """Attention in fp64 (`model.batch_invariant`; forge.policy.invariant)."""

    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)
        self.qk_norm_scope = c.qk_norm_scope if c.qk_norm else None
        if c.qk_norm:
            per_layer = c.qk_norm_scope == "layer"
            self.q_norm = RMSNorm(c.num_heads * c.head_dim if per_layer else c.head_dim, c.rms_eps)
            self.k_norm = RMSNorm(c.num_kv_heads * c.head_dim if per_layer else c.head_dim, c.rms_eps)
        self.msa: MSAConfig | None = c.msa if c.is_msa_layer(layer) else None
        self.msa_slot = sum(c.is_msa_layer(i) for i in range(layer))
        """This layer's index among the MSA layers (its slot in a `Choices.blocks` record)."""
        if self.msa is not None:
            di = self.msa.index_dim
            self.iq_proj = Linear(c.hidden_size, c.num_kv_heads * di, bias=False)
            self.ik_proj = Linear(c.hidden_size, di, bias=False)
            self.iq_norm = RMSNorm(di, c.rms_eps)
            self.ik_norm = RMSNorm(di, c.rms_eps)

    def _qkv(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, generating: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projected, normed, rotated q [B, T, Hq, D] and k, v [B, T, Hkv, D]."""
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, H*D]
        if self.qk_norm_scope == "layer":
            q, k = self.q_norm(q, generating), self.k_norm(k, generating)
        q = q.view(b, t, self.num_heads, self.head_dim)  # [B, T, Hq, D]
        k = k.view(b, t, self.num_kv_heads, self.head_dim)  # [B, T, Hkv, D]
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm_scope == "head":
            return norm_rope(self.q_norm, q, cos, sin, generating), norm_rope(self.k_norm, k, cos, sin, generating), v
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _index(self, x: torch.Tensor, p: _Pass) -> tuple[torch.Tensor, torch.Tensor]:
        """Index queries iq [B, T, Hkv, Di] and index keys ik [B, T, Di] from the detached input."""
        b, t, _ = x.shape
        x = x.detach()
        iq = norm_rope(self.iq_norm, self.iq_proj(x).view(b, t, self.num_kv_heads, -1), p.index_cos, p.index_sin,
                       p.generating)
        ik = norm_rope(self.ik_norm, self.ik_proj(x).view(b, t, 1, -1), p.index_cos, p.index_sin, p.generating)
        return iq, ik[:, :, 0]

    def forward(self, x: torch.Tensor, p: _Pass, cache: tuple | None = None) -> torch.Tensor:
        """x [B, T, H] -> [B, T, H].

        `cache` is this layer's (k, v, ik, filled length) of a `KVCache`: dense layers write the
        new keys after the filled slots and `p.cache_mask` [B, 1, T, S'] says which of the first
        S' = length + T slots each query sees; MSA layers write them at their positions.
        """
        b, t, _ = x.shape
        q, k, v = self._qkv(x, p.cos, p.sin, p.generating)
        if self.msa is None:
            out = self._dense(q, k, v, p, cache)
        elif cache is not None:
            out = self._msa_cached(q, k, v, *self._index(x, p), p, cache)
        else:
            out = self._msa(q, k, v, *self._index(x, p), p)
        return self.o_proj(out.reshape(b, t, -1).to(x.dtype))

    def _wide(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The tensors in fp64 under `model.batch_invariant` (attention then sums a query's keys
        alike whatever their layout), else as they are. Caches keep the model's dtype."""
        return tuple(wide(t) for t in tensors) if self.invariant else tensors

    def _dense(self, q, k, v, p: _Pass, cache: tuple | None) -> torch.Tensor:
        """Dense attention (causal, prefix tree or KV cache): [B, T, Hq, D]."""
        t = q.shape[1]
        if p.subtree_end is not None:
            scale = self.head_dim**-0.5
            if self.invariant:
                return wide_call(lambda q, k, v: tree_attention(q, k, v, p.subtree_end, scale=scale), q, k, v)
            return tree_attention(q, k, v, p.subtree_end, scale=scale)
        if cache is None:
            return wide_call(_causal_sdpa, q, k, v) if self.invariant else _causal_sdpa(q, k, v)
        k_cache, v_cache, _, length = cache
        if p.decode_slot is not None:
            # Fixed shapes: write at a slot held on the device, attend over every slot, masked.
            k_cache.index_copy_(2, p.decode_slot, k.transpose(1, 2))
            v_cache.index_copy_(2, p.decode_slot, v.transpose(1, 2))
            q, k, v = self._wide(q, k_cache, v_cache)
            return _masked_gqa(q.transpose(1, 2), k, v, p.cache_mask).transpose(1, 2)
        k_cache[:, :, length : length + t] = k.transpose(1, 2)
        v_cache[:, :, length : length + t] = v.transpose(1, 2)
        if length == 0 and t > 1 and self._dense_prefill_ok(q):
            return self._tree_prefill(q, k, v, p)
        q, k, v = self._wide(q, k_cache[:, :, : length + t], v_cache[:, :, : length + t])  # k, v [B, Hkv, S', D]
        return _masked_gqa(q.transpose(1, 2), k, v, p.cache_mask).transpose(1, 2)

    def _dense_prefill_ok(self, q: torch.Tensor) -> bool:
        """Whether a prefill from an empty cache takes the tree-attention kernel (`_tree_prefill`):
        on CUDA, or under Triton's CPU interpreter in fp32 (tests), never with batch-invariant
        numerics."""
        if self.invariant or not _pow2_at_least_16(self.head_dim):
            return False
        if q.is_cuda:
            return q.dtype in (torch.bfloat16, torch.float16, torch.float32)
        return _interpreting() and q.dtype == torch.float32

    def _tree_prefill(self, q, k, v, p: _Pass) -> torch.Tensor:
        """Dense attention of a left-padded prefill from an empty cache through the trainer's
        tree-attention kernel: each padding token a root of its own, seen by nothing else, so a
        real token attends as in its unpadded sequence. SDPA with a mask and GQA has only cuDNN
        as a fused kernel, which builds an execution plan for every new (batch, length), and
        rollouts bring new lengths at every call."""
        from forge.kernels.tree_attention.triton_tree import tree_attention_triton

        return tree_attention_triton(q, k, v, _padded_forest(p), scale=self.head_dim**-0.5)

    def _triton_ok(self, q: torch.Tensor) -> bool:
        return (not self.invariant and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16, torch.float32)
                and self.msa.triton_ok() and _pow2_at_least_16(self.head_dim))

    def _interpreted_ok(self, q: torch.Tensor) -> bool:
        """The inference kernels under Triton's CPU interpreter (tests), in fp32 only."""
        return (not self.invariant and _interpreting() and q.dtype == torch.float32 and self.msa.triton_ok()
                and _pow2_at_least_16(self.head_dim))

    def _msa(self, q, k, v, iq, ik, p: _Pass) -> torch.Tensor:
        """MSA over a causal batch or a prefix tree; appends the index-loss sum to p.index_losses."""
        m = self.msa
        b, t = q.shape[:2]
        scale = self.head_dim**-0.5
        q, k, v, iq, ik = self._wide(q, k, v, iq, ik)
        subtree_end = p.subtree_end if p.subtree_end is not None else torch.full_like(p.position, t)
        kw = dict(block_size=m.block_size, top_k=m.top_k, dense_below=m.dense_below_tokens, dense=p.msa_dense,
                  scale=scale, token_weight=p.token_weight)
        # On CUDA one set of Triton kernels serves chains and trees, so that a token's blocks are
        # selected bitwise alike merged or unmerged (forge.kernels.msa.tree_triton).
        triton = self._triton_ok(q)
        msa = msa_tree_triton if triton else functools.partial(msa_tree, n_blocks=p.msa_blocks)

        def select() -> torch.Tensor:
            if triton:
                return select_blocks_tree_triton(iq, ik, subtree_end, p.position, block_size=m.block_size,
                                                 top_k=m.top_k)
            return select_blocks_tree(iq.detach(), ik.detach(), subtree_end, p.position, block_size=m.block_size,
                                      top_k=m.top_k)

        kw["selected"] = self._replayed_blocks(p, select)
        loss = None
        if p.msa_all_dense:
            # Every row keeps every visible key: the dense kernels compute it faster.
            out = self._dense(q, k, v, p, None)
        else:
            out, loss = msa(q, k, v, iq, ik, subtree_end, p.position, with_index_loss=p.with_index_loss, **kw)
        if p.with_index_loss:
            if loss is None:
                _, loss = msa(q, k, None, iq, ik, subtree_end, p.position, with_attention=False, with_index_loss=True,
                              **kw)
            p.index_losses.append(loss)
        return out

    def _replayed_blocks(self, p: _Pass, select) -> torch.Tensor | None:
        """The blocks to attend to when the pass imposes or records choices, else None (the
        kernels select): imposed blocks where the token's record is known, `select()`'s
        elsewhere. Records what the rows attended to, rows that attend densely as unknown (-1)."""
        imposed = None if p.impose is None or p.impose.blocks is None else p.impose.blocks[:, :, self.msa_slot]
        selected = None
        if not p.msa_all_dense:
            if imposed is not None and not p.impose_unknown_sparse:
                # Unknown tokens are dense rows or padding here: their own block keeps their
                # softmax non-empty, and nothing depends on what else they keep.
                own = torch.full_like(imposed, -1, dtype=torch.int32)
                own[..., -1] = (p.position // self.msa.block_size)[:, :, None]
                selected = torch.where(imposed[..., -1:] >= 0, imposed.to(torch.int32), own).contiguous()
            elif imposed is not None or p.record is not None:
                selected = select()
                if imposed is not None:
                    selected = torch.where(imposed[..., -1:] >= 0, imposed.to(torch.int32), selected).contiguous()
        if p.record is not None:
            self._record_blocks(p, selected, p.position)
        return selected

    def _record_blocks(self, p: _Pass, selected: torch.Tensor | None, position: torch.Tensor) -> None:
        """Write this layer's kept blocks [B, T, Hkv, K] (None: every row dense) to p.record,
        rows at positions below msa.dense_below_tokens (or all, in the dense warm-up) as unknown."""
        m = self.msa
        b, t = position.shape
        if selected is None or p.msa_dense:
            rec = torch.full((b, t, self.num_kv_heads, m.top_k), -1, dtype=torch.int32, device=position.device)
        else:
            rec = torch.where((position < m.dense_below_tokens)[:, :, None, None], -1, selected.to(torch.int32))
        p.record.blocks[self.msa_slot] = rec

    def _msa_cached(self, q, k, v, iq, ik, p: _Pass, cache: tuple) -> torch.Tensor:
        """MSA of new tokens against a position-indexed cache, after writing their keys at their positions."""
        m = self.msa
        k_cache, v_cache, ik_cache, length = cache
        b, t = q.shape[:2]
        if p.new_all_valid:
            rows, slots = torch.arange(b, device=q.device)[:, None].expand(b, t), p.position
            k_cache[rows, slots], v_cache[rows, slots], ik_cache[rows, slots] = k, v, ik
        else:
            rows, cols = p.new_valid.nonzero(as_tuple=True)
            slots = p.position[rows, cols]
            k_cache[rows, slots] = k[rows, cols]
            v_cache[rows, slots] = v[rows, cols]
            ik_cache[rows, slots] = ik[rows, cols]
        if self.invariant:
            q, iq, k_cache, v_cache, ik_cache = self._wide(q, iq, k_cache, v_cache, ik_cache)
        if p.decode_slot is not None:
            return self._msa_decode_static(q, iq, k_cache, v_cache, ik_cache, p)
        decode = (t == 1 and not p.msa_dense and self._triton_ok(q) and p.first_position >= m.dense_below_tokens)
        if decode:
            return self._paged_decode(q, iq, k_cache, v_cache, ik_cache, p)
        if length == 0 and t > 1 and (self._triton_ok(q) or self._interpreted_ok(q)):
            return self._msa_prefill(q, k, v, iq, ik, p)
        s = p.last_position + 1
        selected = None
        if p.record is not None:
            selected = select_cache_blocks(iq, ik_cache[:, :s], p.position, block_size=m.block_size, top_k=m.top_k)
            self._record_blocks(p, selected, p.position)
        return msa_cache_attention(q, iq, k_cache[:, :s], v_cache[:, :s], ik_cache[:, :s], p.position,
                                   block_size=m.block_size, top_k=m.top_k, dense_below=m.dense_below_tokens,
                                   dense=p.msa_dense, scale=self.head_dim**-0.5, selected=selected)

    def _msa_prefill(self, q, k, v, iq, ik, p: _Pass) -> torch.Tensor:
        """A prefill from an empty cache through the trainer's kernels (`msa_tree_triton`): each
        left-padded row is a forest whose padding tokens are roots of their own, seen by nothing
        else, so a real token attends exactly as in its unpadded sequence."""
        m = self.msa
        subtree_end = _padded_forest(p)
        selected = None
        if p.record is not None:
            selected = select_blocks_tree_triton(iq, ik, subtree_end, p.position, block_size=m.block_size,
                                                 top_k=m.top_k)
            self._record_blocks(p, selected, p.position)
        out, _ = msa_tree_triton(q, k, v, iq, ik, subtree_end, p.position, block_size=m.block_size, top_k=m.top_k,
                                 dense_below=m.dense_below_tokens, dense=p.msa_dense, scale=self.head_dim**-0.5,
                                 selected=selected)
        return out

    def _paged_decode(self, q, iq, k_cache, v_cache, ik_cache, p: _Pass) -> torch.Tensor:
        """`msa_decode` over the position-indexed cache seen as pages of one block each."""
        m, b = self.msa, q.shape[0]
        pages = k_cache.shape[1] // m.block_size
        page_table = torch.arange(b * pages, device=q.device, dtype=torch.int32).view(b, pages)

        def paged(x: torch.Tensor) -> torch.Tensor:
            return x.view(b * pages, m.block_size, *x.shape[2:])

        out, selected = msa_decode_with_selection(q, iq, paged(k_cache), paged(v_cache), paged(ik_cache), page_table,
                                                  p.position[:, 0] + 1, top_k=m.top_k, scale=self.head_dim**-0.5)
        if p.record is not None:
            self._record_blocks(p, selected, p.position)
        return out

    def _msa_decode_static(self, q, iq, k_cache, v_cache, ik_cache, p: _Pass) -> torch.Tensor:
        """One new token per row, keys already written, with no host read: `msa_decode` for every
        row, and where a row is below `dense_below_tokens`, dense attention over the first slots."""
        m = self.msa
        if not (self._triton_ok(q) or self._interpreted_ok(q)):
            selected = None
            if p.record is not None:
                selected = select_cache_blocks(iq, ik_cache, p.position, block_size=m.block_size, top_k=m.top_k)
                self._record_blocks(p, selected, p.position)
            return msa_cache_attention(q, iq, k_cache, v_cache, ik_cache, p.position, block_size=m.block_size,
                                       top_k=m.top_k, dense_below=m.dense_below_tokens,
                                       scale=self.head_dim**-0.5, selected=selected)
        out = self._paged_decode(q, iq, k_cache, v_cache, ik_cache, p)
        n = min(m.dense_below_tokens, k_cache.shape[1])
        if n == 0 or p.first_position >= m.dense_below_tokens:
            # No row below dense_below (first_position is a host-known lower bound): sparse only.
            return out
        visible = torch.arange(n, device=q.device)[None, :] <= p.position  # [B, n]
        dense = F.scaled_dot_product_attention(
            q.transpose(1, 2), k_cache[:, :n].transpose(1, 2), v_cache[:, :n].transpose(1, 2),
            attn_mask=visible[:, None, None, :], enable_gqa=True).transpose(1, 2)
        return torch.where((p.position < m.dense_below_tokens)[:, :, None, None], dense, out)


def _padded_forest(p: _Pass) -> torch.Tensor:
    """subtree_end [B, T] of a left-padded prefill as a forest: real tokens seen by every later
    token of their row, each padding token only by itself."""
    t = p.position.shape[1]
    index = torch.arange(t, device=p.position.device)
    valid = p.new_valid if p.new_valid is not None else torch.ones_like(p.position, dtype=torch.bool)
    return torch.where(valid, torch.full_like(p.position, t), index + 1)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class Block(nn.Module):
    """Pre-norm attention then pre-norm MLP or MoE, each with a residual."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.attn = Attention(config, layer)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.mlp: nn.Module = (
            MoE(config) if config.is_moe_layer(layer) else SwiGLU(config.hidden_size, config.dense_width)
        )

    def forward(self, x: torch.Tensor, p: _Pass, cache: tuple | None = None) -> torch.Tensor:
        """x [B, T, H] -> [B, T, H]; `p` and `cache` are Attention's, p.token_weight the MoE's."""
        x = x + self.attn(self.attn_norm(x, p.generating), p, cache)
        h = self.mlp_norm(x, p.generating)
        if isinstance(self.mlp, MoE):
            imposed = None if p.impose is None or p.impose.experts is None else p.impose.experts[:, :, self.mlp.moe_slot]
            return x + self.mlp(h, p.token_weight, generating=p.generating, imposed=imposed,
                                record=None if p.record is None else p.record.experts)
        return x + self.mlp(h)


class Transformer(nn.Module):
    """The policy. `forward` returns logits [B, T, V] (float32, or float64 for an fp64 model) for ids [B, T].

    With MSA on, the buffer `msa_step` counts the optimizer steps taken (the trainer advances it
    with `advance_msa_step`); it rides with the weights, so a generator that loads them runs the
    dense warm-up exactly when the trainer does.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        for i, block in enumerate(self.layers):
            if isinstance(block.mlp, MoE):
                block.mlp.moe_slot = sum(config.is_moe_layer(j) for j in range(i))
        self.norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.msa.enabled:
            self.register_buffer("msa_step", torch.zeros((), dtype=torch.long))
        if config.batch_invariant:
            for module in self.modules():
                if hasattr(type(module), "invariant"):
                    module.invariant = True
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

    def msa_warming_up(self) -> bool:
        """Whether MSA layers run the dense warm-up (fewer than msa.dense_warmup_steps steps taken)."""
        msa = self.config.msa
        return msa.enabled and msa.dense_warmup_steps > 0 and int(self.msa_step) < msa.dense_warmup_steps

    def _head(self, h: torch.Tensor, generating: bool = False) -> torch.Tensor:
        h = self.norm(h, generating)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        if self.config.batch_invariant:
            return at_least_fp32(invariant_linear(h, weight))
        return at_least_fp32(F.linear(h, weight))

    def _pass(self, position_ids: torch.Tensor, *, static: bool = False, **fields) -> _Pass:
        """The pass's shared tables; `static` reads nothing from the device (a graph-captured step)."""
        c = self.config
        cos, sin = rope_tables(position_ids, c.rotary_dim, c.rope_theta, exact=c.batch_invariant)
        p = _Pass(cos, sin, position_ids, **fields)
        if c.msa.enabled:
            rotary = min(c.rotary_dim, c.msa.index_dim)
            p.index_cos, p.index_sin = (cos, sin) if rotary == c.rotary_dim else rope_tables(
                position_ids, rotary, c.rope_theta, exact=c.batch_invariant)
            if static:
                return p
            p.msa_dense = self.msa_warming_up()
            p.first_position, p.last_position = int(position_ids.min()), int(position_ids.max())
            p.msa_all_dense = p.msa_dense or p.last_position < c.msa.dense_below_tokens
            p.msa_blocks = p.last_position // c.msa.block_size + 1
        return p

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        subtree_end: torch.Tensor | None = None,
        token_weight: torch.Tensor | None = None,
        return_index_loss: bool = False,
        choices: Choices | None = None,
        record: ChoiceRecorder | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T, V] in float32 (float64 for an fp64 model).

        input_ids: [B, T] long. position_ids: [B, T], default arange(T) per row; give the
        prefix tree's depths with subtree_end. subtree_end: [B, T] or None; if given, query q
        sees key k iff k <= q < subtree_end[k] (flattened prefix tree), else causal attention.
        token_weight: [B, T] float or None (1), each token's multiplicity, 0 for padding; it
        weights the MoE load statistics and the index loss, never the outputs.
        return_index_loss: also return the MSA index-branch KL (forge.kernels.msa.tree), summed
        over MSA layers and over tokens weighted by token_weight, averaged over KV groups; a
        scalar (0 without MSA layers) that trains only the index projections.
        choices: routing replay (forge.policy.choices): each token's recorded MoE experts and MSA
        blocks, [B, T, ...] as `Choices` documents, imposed where known. record: a
        `ChoiceRecorder` that receives the choices this pass made.
        """
        b, t = input_ids.shape
        plain = position_ids is None and subtree_end is None
        if position_ids is None:
            if subtree_end is not None:
                raise ValueError("subtree_end needs position_ids (each token's depth in the prefix tree)")
            position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        p = self._pass(position_ids, subtree_end=subtree_end, token_weight=token_weight, plain_causal=plain,
                       with_index_loss=return_index_loss and self.config.msa.enabled, record=record)
        if choices is not None:
            self._impose(p, choices, token_weight)
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h, p)
        logits = self._head(h)
        if not return_index_loss:
            return logits
        zero = torch.zeros((), device=logits.device, dtype=logits.dtype)
        return logits, sum(p.index_losses, zero)

    def _impose(self, p: _Pass, choices: Choices, token_weight: torch.Tensor | None) -> None:
        """Check `choices` against the pass (three host reads) and hand them to its layers."""
        check_choices(self.config, choices, tuple(p.position.shape))
        p.impose = choices.to(p.position.device)
        blocks = p.impose.blocks
        if blocks is not None:
            # Does any token that would attend sparsely (and is not padding) lack a record?
            unknown = (blocks[..., -1] < 0).any(dim=(2, 3)) & (p.position >= self.config.msa.dense_below_tokens)
            if token_weight is not None:
                unknown &= token_weight != 0
            p.impose_unknown_sparse = bool(unknown.any())

    def forward_cached(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: KVCache, key_valid: torch.Tensor,
        record: ChoiceRecorder | None = None,
    ) -> torch.Tensor:
        """Run T new tokens per row against a KV cache and append their keys and values.

        input_ids, position_ids: [B, T]; key_valid: [B, cache.length + T] bool, False for
        padding slots. Each new token sees the valid slots up to and including its own; a
        padding token also sees itself, so no row of the softmax is empty. MSA layers see the
        positions up to the token's own (their cache is indexed by position). Returns logits
        [B, T, V] float32 and advances cache.length by T. `record` receives the pass's choices
        (forge.policy.choices), padding tokens included.
        """
        b, t = input_ids.shape
        total = cache.length + t
        if key_valid.shape != (b, total):
            raise ValueError(f"key_valid must be [{b}, {total}] (cache length + new tokens), got {list(key_valid.shape)}")
        slots = torch.arange(total, device=input_ids.device)  # [S']
        query_slot = cache.length + torch.arange(t, device=input_ids.device)  # [T]
        causal = slots[None, :] <= query_slot[:, None]  # [T, S']
        mask = (key_valid[:, None, :] & causal) | (slots[None, :] == query_slot[:, None])  # [B, T, S']
        new_valid = key_valid[:, cache.length :]
        p = self._pass(position_ids, generating=True, cache_mask=mask[:, None], new_valid=new_valid,
                       new_all_valid=not self.config.msa.enabled or bool(new_valid.all()), record=record)
        h = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, p, (cache.k[i], cache.v[i], cache.ik[i] if cache.ik else None, cache.length))
        cache.length = total
        return self._head(h, generating=True)

    def forward_decode(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, slot: torch.Tensor, slot_valid: torch.Tensor,
        cache: KVCache, *, min_position: int = 0, record: ChoiceRecorder | None = None,
    ) -> torch.Tensor:
        """One new token per row with fixed shapes and no host synchronisation: the decoding step
        that `ModelGenerator` captures in a CUDA graph. Computes what `forward_cached` does.

        input_ids, position_ids: [B, 1]; slot: [1] long, the dense layers' cache slot of the new
        tokens (one column of the left-padded batch); slot_valid: [B, capacity] bool, the dense
        slots each row sees, True at `slot` and at the row's earlier real tokens. MSA layers
        write at the positions. Returns logits [B, 1, V]; `cache.length` is left alone. Needs the
        MSA dense warm-up to be over (`msa_warming_up()`, which the caller checks once: reading
        the step counter here would synchronise). `min_position`: a lower bound of position_ids that
        the caller knows on the host; at or past `msa.dense_below_tokens`, MSA layers skip the dense
        branch that rows below that position need. `record` receives the step's choices (under a
        CUDA graph, in the graph's own buffers).
        """
        b, t = input_ids.shape
        if t != 1 or slot.shape != (1,) or slot_valid.shape[0] != b:
            raise ValueError(f"forward_decode takes one token per row ([B, 1] ids, a [1] slot, [B, capacity] "
                             f"slot_valid); got ids {list(input_ids.shape)}, slot {list(slot.shape)}, "
                             f"slot_valid {list(slot_valid.shape)}")
        p = self._pass(position_ids, static=True, generating=True, cache_mask=slot_valid[:, None, None, :],
                       decode_slot=slot, first_position=min_position, record=record)
        h = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            h = layer(h, p, (cache.k[i], cache.v[i], cache.ik[i] if cache.ik else None, None))
        return self._head(h, generating=True)


def advance_msa_step(model: Transformer) -> None:
    """Count one optimizer step towards the end of the MSA dense warm-up (no-op without MSA)."""
    if model.config.msa.enabled:
        model.msa_step += 1


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
