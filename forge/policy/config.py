"""The policy model's shape: one typed config that the model, the generator, checkpoint import
and the recipes share.

The presets span a CPU test model (`tiny`), a CPU recipe model (`small`), a ~100M-parameter
MoE + MSA model for one GPU (`msa_100m`) and a MiniMax-M2-like shape (`minimax_m2_like`) that is
only ever built on the meta device here, to check that the model definition counts the
published 230B total / 10B active parameters. MSA settings (`ModelConfig.msa`) are off unless a
recipe or preset turns them on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from forge.kernels.msa.config import MSAConfig

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
    msa: MSAConfig = field(default_factory=MSAConfig)
    """MiniMax Sparse Attention: which layers use it, its block selection and the index-branch training."""
    batch_invariant: bool = False
    """Numerics, not architecture: every shape-dependent reduction accumulates in fp64, so a
    token's logits and logprobs come out the same in a decoding step, a prefill and the
    trainer's prefix tree, and the sampler agrees with the trainer (forge.policy.invariant).
    On the CPU it costs about 2.1x the training step of the quickstart's model (1.7x its
    decoding); on a GPU it runs fp64 GEMMs and the plain-PyTorch attention, MSA and MoE, about
    25x slower than the default on an H100 (docs/benchmarks.md): a correctness mode."""

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
        if isinstance(self.msa, dict):
            # Forge checkpoints store the config as JSON; the nested section comes back as a mapping.
            self.msa = MSAConfig(**self.msa)
        if self.msa.enabled and self.msa.dense_layers >= self.num_layers:
            raise ValueError(
                f"msa.dense_layers ({self.msa.dense_layers}) leaves no MSA layer among num_layers={self.num_layers}; "
                "lower msa.dense_layers or set msa.enabled to false"
            )

    def is_msa_layer(self, layer: int) -> bool:
        """Whether block `layer` (0-based) attends through MSA rather than dense attention."""
        return self.msa.enabled and layer >= self.msa.dense_layers

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
    def msa_100m(cls) -> "ModelConfig":
        """A ~100M-parameter MoE + MSA model for one GPU: byte vocabulary, 10 layers of width 512.

        GQA 8q/2kv heads of 64, 32 experts of width 192 top-4 plus one shared expert, the first
        layer a dense MLP. MSA in every layer after the first two: blocks of 64 tokens, top 8
        (512 tokens per query), index dimension 64, dense below position 1024, so selection
        engages on sequences of a few thousand tokens. 97.7M parameters, 23.3M active per token.
        """
        return cls(
            vocab_size=BYTE_VOCAB_SIZE, hidden_size=512, num_layers=10, num_heads=8, num_kv_heads=2, head_dim=64,
            rotary_dim=64, qk_norm=True, num_experts=32, top_k=4, expert_width=192, num_shared_experts=1,
            dense_layers=1, dense_width=1536, tie_embeddings=False,
            msa=MSAConfig(enabled=True, block_size=64, top_k=8, index_dim=64, dense_layers=2,
                          dense_below_tokens=1024, index_loss_weight=1.0, dense_warmup_steps=0),
        )

    @classmethod
    def msa_1b(cls) -> "ModelConfig":
        """A ~1B-parameter MoE + MSA model for one GPU, the size issue 14's MFU target is set at.

        Byte vocabulary, 16 layers of width 1024, GQA 16q/4kv heads of 64, 40 experts of width
        512 top-4 plus one shared expert, the first layer a dense MLP of width 4096. MSA after
        the first two layers: blocks of 64, top 16 (1,024 tokens per query), index dimension 64,
        dense below position 2048. 1.03B parameters, 178M active per token.
        """
        return cls(
            vocab_size=BYTE_VOCAB_SIZE, hidden_size=1024, num_layers=16, num_heads=16, num_kv_heads=4, head_dim=64,
            rotary_dim=64, qk_norm=True, num_experts=40, top_k=4, expert_width=512, num_shared_experts=1,
            dense_layers=1, dense_width=4096, tie_embeddings=False,
            msa=MSAConfig(enabled=True, block_size=64, top_k=16, index_dim=64, dense_layers=2,
                          dense_below_tokens=2048, index_loss_weight=1.0, dense_warmup_steps=0),
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
