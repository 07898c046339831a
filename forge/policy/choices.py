"""Routing replay: the discrete choices of a forward pass, recorded where tokens are sampled and
imposed where they are trained.

Two choices in the policy are discrete functions of continuous values: each MoE layer's top-k
experts and each MSA layer's kept blocks. The sampler's batch and the trainer's layout (merged or
unmerged) round those values differently by about 1e-7, and near a tie the choice flips; one
flipped block moves a token's logprob by 1e-3 to 1e-2 (docs/policy.md, "Routing replay"). The
sampler therefore records what it chose for every token it ran, and the trainer imposes it, in
the merged and the unmerged layout alike. This is MoE routing replay (R3, as verl and slime do
it) extended to MSA's blocks, which are positions, so a record does not depend on the layout.

Per token:

- `experts` [..., n_moe_layers, top_k]: the experts of each MoE layer, in layer order; -1 in
  every slot where the token's choice is unknown (the trainer's router then chooses).
- `blocks` [..., n_msa_layers, num_kv_heads, msa.top_k]: each MSA layer's kept blocks per KV
  head in the indexer's layout (the `top_k - 1` other blocks, -1 for empty slots, then the
  token's own block last). An own-block slot of -1 marks the token unknown for that layer (the
  trainer's indexer then selects); rows that attend densely (below `msa.dense_below_tokens`,
  the dense warm-up) record -1 throughout, as their blocks decide nothing.

Imposed weights are the trainer's own router scores of the imposed experts (their gradient is
the router's), and the MSA index loss is taken over the imposed blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Choices:
    """Discrete choices of a batch of tokens (see the module docstring). Leading dims [B, T]."""

    experts: torch.Tensor | None
    """[B, T, n_moe_layers, top_k] integer, or None for a model without MoE layers."""
    blocks: torch.Tensor | None
    """[B, T, n_msa_layers, num_kv_heads, msa.top_k] integer, or None without MSA layers."""

    def to(self, device) -> "Choices":
        return Choices(*(None if x is None else x.to(device) for x in (self.experts, self.blocks)))

    def rows(self, index) -> "Choices":
        """The tokens `index` selects along the leading dims, e.g. `[0]`, `(rows, cols)`, or a slice."""
        return Choices(*(None if x is None else x[index] for x in (self.experts, self.blocks)))

    def token_keys(self) -> list[bytes]:
        """One key per token of a [T]-led record (prefix-tree keys: tokens merge only where their
        choices agree): the bytes of its experts and blocks, each layer's sorted, so that the
        same sets in another order are the same key (0.26 s for 150K tokens of msa_100m on
        a 2-core CPU). A record of neither kind (no MoE or MSA layers) has no keys."""
        parts = []
        if self.experts is not None:
            experts = torch.sort(self.experts.to(torch.int16), dim=-1).values
            parts.append(experts.reshape(experts.shape[0], -1))
        if self.blocks is not None:
            b = self.blocks.to(torch.int16)
            others = torch.sort(b[..., :-1], dim=-1).values
            parts.append(torch.cat([others, b[..., -1:]], dim=-1).reshape(b.shape[0], -1))
        if not parts:
            return []
        flat = np.ascontiguousarray(torch.cat(parts, dim=1).cpu().numpy())
        return flat.view(np.dtype((np.void, flat.shape[1] * flat.itemsize)))[:, 0].tolist()


def concat(parts: list[Choices], dim: int = 0) -> Choices:
    """Records laid end to end along `dim` (e.g. a prompt's tokens, then the sampled ones)."""

    def cat(name: str) -> torch.Tensor | None:
        xs = [getattr(c, name) for c in parts]
        return None if xs[0] is None else torch.cat(xs, dim=dim)

    return Choices(cat("experts"), cat("blocks"))


def _layer_counts(config) -> tuple[int, int]:
    """(MoE layers, MSA layers) of a model config."""
    layers = range(config.num_layers)
    return sum(map(config.is_moe_layer, layers)), sum(map(config.is_msa_layer, layers))


def unknown(config, batch: int, length: int, device=None) -> Choices:
    """A record that imposes nothing: every token unknown."""
    n_moe, n_msa = _layer_counts(config)
    experts = torch.full((batch, length, n_moe, config.top_k), -1, dtype=torch.int16, device=device) if n_moe else None
    blocks = (torch.full((batch, length, n_msa, config.num_kv_heads, config.msa.top_k), -1, dtype=torch.int32,
                         device=device) if n_msa else None)
    return Choices(experts, blocks)


def check_choices(config, choices: Choices, shape: tuple[int, int]) -> None:
    """Raise a ValueError naming the fix unless `choices` fits a [B, T] batch of this model."""
    b, t = shape
    n_moe, n_msa = _layer_counts(config)
    want = {"experts": (b, t, n_moe, config.top_k) if n_moe else None,
            "blocks": (b, t, n_msa, config.num_kv_heads, config.msa.top_k) if n_msa else None}
    for name, shape_wanted in want.items():
        x = getattr(choices, name)
        if shape_wanted is None:
            if x is not None:
                raise ValueError(f"choices.{name} given for a model without such layers; pass None")
            continue
        if x is None or tuple(x.shape) != shape_wanted:
            got = None if x is None else list(x.shape)
            raise ValueError(f"choices.{name} must be {list(shape_wanted)} for this model and batch, got {got}: "
                             f"record choices with the same model config (ModelGenerator(record_choices=True))")
    if n_moe and choices.experts.numel():
        lo, hi = int(choices.experts.min()), int(choices.experts.max())
        if lo < -1 or hi >= config.num_experts:
            raise ValueError(f"choices.experts must lie in [-1, {config.num_experts}), got {lo}..{hi}")


class ChoiceRecorder:
    """Collects a pass's choices layer by layer (the model writes, the caller reads `choices()`).

    The tensors it holds are the pass's own outputs: under a CUDA graph they are the graph's
    static buffers, rewritten by every replay, so read them after each replay.
    """

    def __init__(self) -> None:
        self.experts: dict[int, torch.Tensor] = {}
        self.blocks: dict[int, torch.Tensor] = {}

    def choices(self) -> Choices:
        """The pass's record, [B, T, ...], in new tensors: experts int16, blocks int32."""
        def stack(d: dict[int, torch.Tensor], dtype: torch.dtype) -> torch.Tensor | None:
            return torch.stack([d[i].to(dtype) for i in sorted(d)], dim=2) if d else None

        return Choices(stack(self.experts, torch.int16), stack(self.blocks, torch.int32))


def record_alone(model, sequences) -> list[Choices]:
    """Each sequence's record as a forward of it alone makes it ([len]-led, on the CPU): what a
    sampler that ran the sequence by itself would report. `model`: a forge.policy.Transformer."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for seq in sequences:
            rec = ChoiceRecorder()
            model(torch.as_tensor(seq, device=device)[None], record=rec)
            out.append(rec.choices().rows(0).to("cpu"))
    return out


def pack(choices: Choices) -> tuple[bytes, bytes]:
    """A [T]-led record as (experts, blocks) bytes for transport (`Trajectory.choice_experts`,
    `choice_blocks`): int16 each, little-endian, token-major; b"" for a kind the model lacks."""

    def raw(x: torch.Tensor | None, what: str) -> bytes:
        if x is None:
            return b""
        x = x.detach().to("cpu")
        if x.numel() and int(x.max()) > torch.iinfo(torch.int16).max:
            raise ValueError(f"choices.{what} holds {int(x.max())}, past int16; positions this long need a wider "
                             "record format")
        return x.to(torch.int16).contiguous().numpy().astype("<i2").tobytes()

    return raw(choices.experts, "experts"), raw(choices.blocks, "blocks")


def unpack(config, experts: bytes, blocks: bytes, length: int) -> Choices:
    """`pack`'s bytes back as a [length]-led record for a model of `config`; tokens past the
    packed ones (and every token, for empty bytes) unknown. Raises ValueError naming the fix when
    the bytes do not fit the model."""
    out = unknown(config, 1, length)
    out = out.rows(0)
    for name, data in (("experts", experts), ("blocks", blocks)):
        target = getattr(out, name)
        if not data:
            continue
        if target is None:
            raise ValueError(f"the record holds {name} but the model has no such layers; train the model that sampled")
        per_token = target[0].numel() if length else 0
        values = torch.frombuffer(bytearray(data), dtype=torch.int16)
        if per_token == 0 or values.numel() % per_token or values.numel() // per_token > length:
            raise ValueError(f"the record's {name} ({values.numel()} values) do not fit {length} tokens of this "
                             f"model ({per_token} per token); train the model config that sampled")
        n = values.numel() // per_token
        target[:n] = values.view(n, *target.shape[1:]).to(target.dtype)
    return out
