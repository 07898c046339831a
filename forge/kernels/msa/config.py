"""Settings of MSA layers, read by the policy (which layers use MSA) and the trainer (index loss)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MSAConfig:
    """MiniMax Sparse Attention settings of a model and its training."""

    enabled: bool = False
    """Use MSA in the layers after `dense_layers`; False keeps every layer dense."""
    block_size: int = 128
    """Tokens per block, counted in position space; the Triton kernels need a power of two >= 16."""
    top_k: int = 16
    """Blocks each (query, KV group) attends to, its own block included."""
    index_dim: int = 128
    """Dimension of the index queries and index keys (even; the Triton kernels need a power of two >= 16)."""
    dense_layers: int = 2
    """The first this-many layers stay dense."""
    dense_below_tokens: int = 4096
    """Queries at positions below this attend densely in MSA layers (a rule on each query's own position)."""
    index_loss_weight: float = 1.0
    """Weight of the index branch's KL loss (mean per token and MSA layer) added to the policy loss."""
    dense_warmup_steps: int = 0
    """Optimizer steps that run dense attention while the index branch learns by KL over all tokens."""

    def __post_init__(self) -> None:
        checks = [
            (self.block_size >= 1, f"msa.block_size must be >= 1, got {self.block_size}"),
            (self.top_k >= 1, f"msa.top_k must be >= 1 (the query's own block), got {self.top_k}"),
            (self.index_dim >= 2 and self.index_dim % 2 == 0,
             f"msa.index_dim must be even and >= 2 (RoPE rotates pairs), got {self.index_dim}"),
            (self.dense_layers >= 0, f"msa.dense_layers must be >= 0, got {self.dense_layers}"),
            (self.dense_below_tokens >= 0, f"msa.dense_below_tokens must be >= 0, got {self.dense_below_tokens}"),
            (self.index_loss_weight >= 0, f"msa.index_loss_weight must be >= 0, got {self.index_loss_weight}"),
            (self.dense_warmup_steps >= 0, f"msa.dense_warmup_steps must be >= 0, got {self.dense_warmup_steps}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def triton_ok(self) -> bool:
        """Whether the Triton kernels accept this block size and index dimension."""
        return _pow2_at_least_16(self.block_size) and _pow2_at_least_16(self.index_dim)


def _pow2_at_least_16(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0
