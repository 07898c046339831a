"""Settings of MSA layers, read by the policy (which layers use MSA) and the trainer (index loss)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MSAConfig:
    """MiniMax Sparse Attention settings of a model and its training."""

    enabled: bool = False
    """Use MSA in the layers after `dense_layers`; False keeps every layer dense."""
    block_size: int = 128
    """Tokens per block; also the page size of the KV cache for MSA layers."""
    top_k: int = 16
    """Blocks each (query, KV group) attends to, its own block included."""
    index_dim: int = 128
    """Dimension of the index queries and index keys (a power of two >= 16)."""
    dense_layers: int = 2
    """The first this-many layers stay dense."""
    dense_below_tokens: int = 4096
    """Sequences shorter than this use dense attention in every layer."""
    index_loss_weight: float = 1.0
    """Weight of the index branch's KL loss added to the policy loss."""
    dense_warmup_steps: int = 0
    """Optimizer steps that run dense attention while the index branch learns by KL over all tokens."""
