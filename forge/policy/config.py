"""The policy model's shape: one typed config that the model, the generator, checkpoint import
and the recipes share.

The presets span a CPU test model (`tiny`), a CPU recipe model (`small`) and a MiniMax-M2-like
shape (`minimax_m2_like`) that is only ever built on the meta device here, to check that the
model definition counts the published 230B total / 10B active parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# The ByteTokenizer's vocabulary: 256 bytes, 3 control tokens and 8 protocol markers. Written out
# rather than imported so that this config module stays free of tokenizer state.
BYTE_VOCAB_SIZE = 256 + 3 + 8


@dataclass
class ModelConfig:
    """A decoder-only transformer: GQA attention with (partial) RoPE, SwiGLU MLP or MoE."""

    vocab_size: int = BYTE_VOCAB_SIZE
    """Rows of the token embedding and the output head."""
    hidden_size: int = 64
    """Width of the residual stream."""
    num_layers: int = 2
    """Transformer blocks."""
    num_heads: int = 4
    """Query heads."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention); divides num_heads."""
    head_dim: int = 16
    """Width of one attention head."""
    rotary_dim: int = 16
    """Leading dimensions of each head that RoPE rotates (partial RoPE when < head_dim)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    qk_norm: bool = False
    """RMSNorm on queries and keys before RoPE."""
    qk_norm_scope: Literal["head", "layer"] = "head"
    """'head': one norm over each head's dims (Qwen3); 'layer': over all heads at once (MiniMax-M2)."""
    qkv_bias: bool = False
    """Bias on the q/k/v projections (Qwen2)."""
    rms_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Output head reuses the token embedding matrix."""
    num_experts: int = 0
    """Routed experts per MoE layer; 0 makes every layer a dense MLP."""
    top_k: int = 2
    """Experts each token is routed to."""
    expert_width: int = 64
    """Hidden width of one routed expert's SwiGLU."""
    score_func: Literal["sigmoid", "softmax"] = "sigmoid"
    """Router score function; softmax only for imported checkpoints that route that way."""
    renormalize: bool = True
    """Routing weights of the chosen experts are rescaled to sum to one."""
    num_shared_experts: int = 0
    """Always-on experts (one SwiGLU of num_shared_experts * expert_width) beside the routed ones."""
    dense_layers: int = 0
    """The first dense_layers layers use a dense MLP instead of MoE."""
    dense_width: int = 128
    """Hidden width of the dense MLP (dense layers, or all layers when num_experts is 0)."""
    bias_update_rate: float = 1e-3
    """Fixed step by which each expert's routing bias moves towards balanced load per optimizer step."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of every weight matrix."""

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(f"rotary_dim must be even and in [2, head_dim={self.head_dim}], got {self.rotary_dim}")
        if self.num_experts and not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if not 0 <= self.dense_layers <= self.num_layers:
            raise ValueError(f"dense_layers must be in [0, num_layers={self.num_layers}], got {self.dense_layers}")

    def is_moe_layer(self, layer: int) -> bool:
        """Whether block `layer` (0-based) has a MoE feed-forward."""
        return self.num_experts > 0 and layer >= self.dense_layers

    @classmethod
    def tiny(cls) -> "ModelConfig":
        """A few layers for unit tests: byte vocabulary, GQA 4q/2kv, 8 experts top-2, one dense layer."""
        return cls(
            vocab_size=BYTE_VOCAB_SIZE, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
            rotary_dim=8, qk_norm=True, num_experts=8, top_k=2, expert_width=16, dense_layers=1, dense_width=64,
            num_shared_experts=1,
        )

    @classmethod
    def small(cls) -> "ModelConfig":
        """A ~5M-parameter model for the CPU recipes: byte vocabulary, 16 experts top-4."""
        return cls(
            vocab_size=BYTE_VOCAB_SIZE, hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=2, head_dim=32,
            rotary_dim=32, qk_norm=True, num_experts=16, top_k=4, expert_width=64, dense_layers=1,
            dense_width=512, num_shared_experts=0, tie_embeddings=True,
        )

    @classmethod
    def minimax_m2_like(cls) -> "ModelConfig":
        """MiniMax-M2's published shape: 62 layers, 48q/8kv heads of 128, 256 experts of 1536, top-8.

        Partial RoPE over 64 of 128 dims and a QK-norm over all heads of a layer, as in the
        released config; every layer is MoE, no shared expert, untied head.
        """
        return cls(
            vocab_size=200064, hidden_size=3072, num_layers=62, num_heads=48, num_kv_heads=8, head_dim=128,
            rotary_dim=64, rope_theta=5_000_000.0, qk_norm=True, qk_norm_scope="layer", num_experts=256,
            top_k=8, expert_width=1536, score_func="sigmoid", renormalize=True, num_shared_experts=0,
            dense_layers=0, dense_width=1536, tie_embeddings=False,
        )
