"""Checkpoints: Hugging Face import gives transformers' logits, export loads back in transformers
with the same logits, Forge's own safetensors round-trip weights and expert biases.

The Hugging Face checkpoints are tiny, randomly initialised and written by the test with
save_pretrained; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from forge.policy.checkpoint import load_checkpoint, load_hf, save_checkpoint, save_hf
from forge.policy.config import ModelConfig
from forge.policy.model import Transformer

transformers = pytest.importorskip("transformers")

COMMON = dict(
    vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=128,
)
ARCHS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, head_dim=8, rope_theta=500000.0),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=16),
    "qwen3_moe-norm-topk": lambda: transformers.Qwen3MoeConfig(
        **COMMON, head_dim=8, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
        norm_topk_prob=True, mlp_only_layers=[0],
    ),
    "qwen3_moe-raw-softmax": lambda: transformers.Qwen3MoeConfig(
        **COMMON, head_dim=8, num_experts=4, num_experts_per_tok=3, moe_intermediate_size=16, norm_topk_prob=False,
    ),
}


def _hf_model(name: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(ARCHS[name]())
    # Random norms and biases (they start at 1 and 0), so a dropped or misplaced one shows up.
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "norm" in key or key.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
            elif "mlp.gate" in key or "experts" in key:
                p.normal_(0, 0.3)
    return model.float().eval()


def _hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_load_hf_matches_transformers_and_export_loads_back(name, tmp_path):
    hf = _hf_model(name)
    hf.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    expected = _hf_logits(hf, ids)

    model = load_hf(tmp_path / "hf").eval()
    assert model.config.num_layers == 3
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected, rtol=1e-4, atol=1e-4)

    arch = save_hf(model, tmp_path / "out")
    assert arch == name.split("-")[0]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    torch.testing.assert_close(_hf_logits(back, ids), expected, rtol=1e-4, atol=1e-4)


def test_qwen3_moe_import_keeps_dense_first_layers_and_softmax_routing(tmp_path):
    _hf_model("qwen3_moe-norm-topk").save_pretrained(tmp_path)
    config = load_hf(tmp_path).config
    assert (config.dense_layers, config.num_experts, config.top_k) == (1, 6, 2)
    assert (config.score_func, config.renormalize, config.qk_norm) == ("softmax", True, True)


def test_import_refuses_what_it_cannot_represent(tmp_path):
    _hf_model("llama").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    cfg.pop("rope_parameters", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        load_hf(tmp_path)
    cfg["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="llama, qwen2, qwen3, qwen3_moe"):
        load_hf(tmp_path)


def test_export_refuses_sigmoid_routing_and_partial_rope(tmp_path):
    with pytest.raises(ValueError, match="sigmoid"):
        save_hf(Transformer(dataclasses.replace(ModelConfig.tiny(), num_shared_experts=0)), tmp_path)
    with pytest.raises(ValueError, match="partial RoPE"):
        save_hf(Transformer(dataclasses.replace(ModelConfig.tiny(), rotary_dim=4)), tmp_path)


def test_forge_checkpoint_round_trips_weights_and_expert_bias(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.tiny()).eval()
    moe = model.layers[1].mlp
    moe.expert_bias.copy_(torch.linspace(-0.5, 0.5, 8))
    save_checkpoint(model, tmp_path / "step.safetensors", metadata={"step": "7"})
    loaded = load_checkpoint(tmp_path / "step.safetensors").eval()
    assert loaded.config == model.config
    torch.testing.assert_close(loaded.layers[1].mlp.expert_bias, moe.expert_bias, rtol=0, atol=0)
    assert loaded.layers[1].mlp.load.device.type == "cpu"
    ids = torch.randint(0, 267, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="load_hf"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        load_checkpoint(tmp_path / "other.safetensors")
