"""Checkpoints: Forge's own (one safetensors file with the config in its metadata) and import
from / export to local Hugging Face checkpoints of the Llama, Qwen2, Qwen3 and Qwen3-MoE
architectures (config.json plus safetensors; nothing is downloaded).

The mapping is by name and transposition only, because `forge.policy.model` keeps the
Hugging Face conventions (rotate-half RoPE, [out, in] linear weights); the experts' matrices
are stacked to [E, H, F] / [E, F, H] for the grouped kernels. Anything these architectures
can express that the model does not (rope scaling, sliding windows, biases beyond Qwen2's
q/k/v) is refused with an error that names the key, rather than imported approximately.
Export refuses what the target format cannot hold (sigmoid routing, a non-zero expert bias,
shared experts, partial RoPE), since such a checkpoint would load with different logits.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from forge.policy.config import ModelConfig
from forge.policy.model import Transformer
from forge.policy.moe import MoE

SUPPORTED = ("llama", "qwen2", "qwen3", "qwen3_moe")
_CONFIG_KEY = "forge_model_config"


def save_checkpoint(model: Transformer, path: str | Path, *, metadata: dict[str, str] | None = None) -> None:
    """Write the weights and expert biases to one safetensors file; the config rides in its metadata."""
    from safetensors.torch import save_file

    meta = dict(metadata or {})
    meta[_CONFIG_KEY] = json.dumps(dataclasses.asdict(model.config))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu") -> Transformer:
    """A `Transformer` from a file written by `save_checkpoint`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if _CONFIG_KEY not in meta:
        raise ValueError(f"{path} has no {_CONFIG_KEY!r} metadata; for a Hugging Face checkpoint use load_hf(directory)")
    config = ModelConfig(**json.loads(meta[_CONFIG_KEY]))
    return _build(config, load_file(str(path), device=str(device)), device)


def _build(config: ModelConfig, state: dict[str, torch.Tensor], device) -> Transformer:
    """A model whose parameters are exactly `state`'s tensors (no random init is paid for)."""
    with torch.device("meta"):
        model = Transformer(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the config: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    for module in model.modules():
        if isinstance(module, MoE):
            # The load counter is not saved; it starts at zero on the weights' device.
            module.load = torch.zeros(module.num_experts, device=module.router.device)
    return model.to(device)


def _hf_rope_theta(hf: dict[str, Any]) -> float:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ValueError(f"rope type {kind!r} is not supported; only unscaled RoPE ('default') imports exactly")
    return float(hf.get("rope_theta", rope.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """ModelConfig of a Hugging Face config.json (a dict)."""
    arch = hf.get("model_type")
    if arch not in SUPPORTED:
        raise ValueError(f"model_type {arch!r} is not supported; load_hf reads {', '.join(SUPPORTED)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported; the MLPs are SwiGLU (silu)")
    if hf.get("use_sliding_window") or (arch == "llama" and hf.get("sliding_window")):
        raise ValueError("use_sliding_window is set; sliding-window attention is not supported")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias is set; the MLPs have no biases")
    if arch != "qwen2" and hf.get("attention_bias"):
        raise ValueError(f"attention_bias is set for {arch}; only Qwen2's q/k/v biases are supported")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    rotary = int(head_dim * hf.get("partial_rotary_factor", 1.0))
    fields: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
        rotary_dim=rotary, rope_theta=_hf_rope_theta(hf), qk_norm=arch in ("qwen3", "qwen3_moe"),
        qkv_bias=arch == "qwen2", rms_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dense_width=hf["intermediate_size"],
    )
    if arch == "qwen3_moe":
        fields.update(_moe_fields_from_hf(hf))
    return ModelConfig(**fields)


def _moe_fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    layers = hf["num_hidden_layers"]
    step = hf.get("decoder_sparse_step", 1)
    dense_only = set(hf.get("mlp_only_layers") or [])
    moe = [i not in dense_only and (i + 1) % step == 0 for i in range(layers)]
    dense_layers = moe.index(True) if any(moe) else layers
    if not all(moe[dense_layers:]):
        raise ValueError(
            f"mlp_only_layers={sorted(dense_only)} with decoder_sparse_step={step} interleaves dense and MoE "
            "layers; only a run of dense first layers (ModelConfig.dense_layers) is supported"
        )
    return dict(
        num_experts=hf.get("num_experts", hf.get("num_local_experts")), top_k=hf["num_experts_per_tok"],
        expert_width=hf["moe_intermediate_size"], score_func="softmax",
        renormalize=bool(hf.get("norm_topk_prob", False)), dense_layers=dense_layers,
    )


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors in {directory}; convert the weights with "
            "transformers' save_pretrained(..., safe_serialization=True)"
        )
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _expert_stack(hf: dict[str, torch.Tensor], prefix: str, num_experts: int) -> tuple[torch.Tensor, ...]:
    """w_gate, w_up [E, H, F] and w_down [E, F, H] from per-expert or fused expert tensors."""
    if f"{prefix}.gate_up_proj" in hf:
        gate_up, down = hf.pop(f"{prefix}.gate_up_proj"), hf.pop(f"{prefix}.down_proj")  # [E, 2F, H], [E, H, F]
        gate, up = gate_up.chunk(2, dim=1)
        return gate.transpose(1, 2), up.transpose(1, 2), down.transpose(1, 2)
    mats = {
        name: torch.stack([hf.pop(f"{prefix}.{e}.{name}.weight").t() for e in range(num_experts)])
        for name in ("gate_proj", "up_proj", "down_proj")
    }
    return mats["gate_proj"], mats["up_proj"], mats["down_proj"]


def load_hf(
    directory: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> Transformer:
    """A Forge model from a local Hugging Face checkpoint of a supported architecture.

    dtype: None keeps the checkpoint's dtype. Unused checkpoint tensors are an error (they would
    mean a part of the architecture was silently dropped).
    """
    directory = Path(directory)
    config = config_from_hf(json.loads((directory / "config.json").read_text()))
    hf = _read_safetensors(directory)
    hf = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}
    state: dict[str, torch.Tensor] = {"embed.weight": hf.pop("model.embed_tokens.weight"), "norm.weight": hf.pop("model.norm.weight")}
    if config.tie_embeddings:
        hf.pop("lm_head.weight", None)
    else:
        state["lm_head.weight"] = hf.pop("lm_head.weight")
    for i in range(config.num_layers):
        src, dst = f"model.layers.{i}", f"layers.{i}"
        state[f"{dst}.attn_norm.weight"] = hf.pop(f"{src}.input_layernorm.weight")
        state[f"{dst}.mlp_norm.weight"] = hf.pop(f"{src}.post_attention_layernorm.weight")
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[f"{dst}.attn.{name}.weight"] = hf.pop(f"{src}.self_attn.{name}.weight")
            if config.qkv_bias and name != "o_proj":
                state[f"{dst}.attn.{name}.bias"] = hf.pop(f"{src}.self_attn.{name}.bias")
        if config.qk_norm:
            for name in ("q_norm", "k_norm"):
                state[f"{dst}.attn.{name}.weight"] = hf.pop(f"{src}.self_attn.{name}.weight")
        if config.is_moe_layer(i):
            state[f"{dst}.mlp.router"] = hf.pop(f"{src}.mlp.gate.weight")
            gate, up, down = _expert_stack(hf, f"{src}.mlp.experts", config.num_experts)
            state[f"{dst}.mlp.w_gate"], state[f"{dst}.mlp.w_up"], state[f"{dst}.mlp.w_down"] = gate, up, down
            state[f"{dst}.mlp.expert_bias"] = torch.zeros(config.num_experts)
        else:
            for name in ("gate_proj", "up_proj", "down_proj"):
                state[f"{dst}.mlp.{name}.weight"] = hf.pop(f"{src}.mlp.{name}.weight")
    if hf:
        raise ValueError(f"{directory}: tensors not used by the {config_arch(config)} mapping: {sorted(hf)[:8]}")
    state = {k: v.contiguous() if dtype is None or k.endswith("expert_bias") else v.to(dtype).contiguous() for k, v in state.items()}
    return _build(config, state, device)


def config_arch(config: ModelConfig) -> str:
    """The Hugging Face model_type that holds this config exactly; raises if none does."""
    if config.msa.enabled:
        raise ValueError("MSA layers (index projections, sparse attention) have no Llama/Qwen equivalent; use save_checkpoint")
    if config.rotary_dim != config.head_dim:
        raise ValueError("partial RoPE (rotary_dim < head_dim) has no Llama/Qwen equivalent; use save_checkpoint")
    if config.qk_norm and config.qk_norm_scope != "head":
        raise ValueError("a QK-norm over all heads has no Llama/Qwen equivalent; use save_checkpoint")
    if config.num_experts:
        problems = [
            "it routes by sigmoid, Qwen3-MoE by softmax" if config.score_func != "softmax" else "",
            "it has shared experts" if config.num_shared_experts else "",
            "it has no QK-norm" if not config.qk_norm else "",
            "it has q/k/v biases" if config.qkv_bias else "",
        ]
        if any(problems):
            raise ValueError(f"cannot export as Qwen3-MoE: {'; '.join(p for p in problems if p)}; use save_checkpoint")
        return "qwen3_moe"
    if config.qk_norm and config.qkv_bias:
        raise ValueError("QK-norm with q/k/v biases has no Llama/Qwen equivalent; use save_checkpoint")
    return "qwen3" if config.qk_norm else "qwen2" if config.qkv_bias else "llama"


_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def _hf_config(config: ModelConfig, arch: str, dtype: torch.dtype) -> dict[str, Any]:
    c = config
    hf: dict[str, Any] = {
        "architectures": [_CLASS[arch]], "model_type": arch, "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.dense_width, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "hidden_act": "silu", "rms_norm_eps": c.rms_eps, "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_embeddings, "attention_bias": False, "max_position_embeddings": 32768,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if arch == "qwen3_moe":
        hf.update(
            num_experts=c.num_experts, num_experts_per_tok=c.top_k, moe_intermediate_size=c.expert_width,
            norm_topk_prob=c.renormalize, decoder_sparse_step=1, mlp_only_layers=list(range(c.dense_layers)),
        )
    return hf


def save_hf(model: Transformer, directory: str | Path) -> str:
    """Write config.json and model.safetensors that transformers loads with the same logits.

    Returns the model_type written. Raises if the model's config or a non-zero expert bias
    cannot be expressed in any supported architecture.
    """
    from safetensors.torch import save_file

    config = model.config
    arch = config_arch(config)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for i in range(config.num_layers):
        src, dst = f"layers.{i}", f"model.layers.{i}"
        out[f"{dst}.input_layernorm.weight"] = state[f"{src}.attn_norm.weight"]
        out[f"{dst}.post_attention_layernorm.weight"] = state[f"{src}.mlp_norm.weight"]
        for key, value in state.items():
            if key.startswith(f"{src}.attn."):
                out[f"{dst}.self_attn." + key.removeprefix(f"{src}.attn.")] = value
        if config.is_moe_layer(i):
            if state[f"{src}.mlp.expert_bias"].abs().max() > 0:
                raise ValueError(f"layer {i} has a non-zero expert bias, which Qwen3-MoE routing ignores; use save_checkpoint")
            out[f"{dst}.mlp.gate.weight"] = state[f"{src}.mlp.router"]
            for name, key in (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down")):
                for e, mat in enumerate(state[f"{src}.mlp.{key}"]):
                    out[f"{dst}.mlp.experts.{e}.{name}.weight"] = mat.t()
        else:
            for name in ("gate_proj", "up_proj", "down_proj"):
                out[f"{dst}.mlp.{name}.weight"] = state[f"{src}.mlp.{name}.weight"]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = model.embed.weight.dtype
    (directory / "config.json").write_text(json.dumps(_hf_config(config, arch, dtype), indent=2))
    save_file({k: v.contiguous() for k, v in out.items()}, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return arch
