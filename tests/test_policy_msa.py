"""MSA layers in the policy: config, exactness of merged prefix-tree training, the index loss,
the dense warm-up, generation parity, checkpoints and the ~100M preset.

The tiny MSA model uses blocks of 4 and top_k 2, so selection drops blocks on sequences of a
few dozen tokens; the batch is test_sequence_logprobs.py's (shared prompt, shared assistant
segment, branches at several levels, a sequence ending at a branch point, a duplicate, a
second tree).
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from forge.kernels.msa import MSAConfig, msa_attention_naive, msa_index_loss_naive
from forge.policy.config import ModelConfig
from forge.policy.model import Transformer, advance_msa_step, count_parameters
from forge.policy.moe import moe_layers
from forge.prefix_tree import build_tree
from forge.trainer.logprobs import sequence_logprobs, sequence_scores
from forge.trainer.losses import LOSSES

PROMPT = list(range(40, 57))
SHARED = list(range(60, 67))


def batch() -> tuple[list[list[int]], list[int]]:
    g = PROMPT + SHARED
    seqs = [
        g + [1, 2, 3, 4],
        g + [1, 2, 5, 6, 7],
        g + [1, 2, 5, 8],
        g + [9, 9],
        g,
        PROMPT + [11, 12, 13],
        g + [1, 2, 3, 4],
        [200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211],
        [200, 201, 210],
    ]
    return seqs, [len(PROMPT)] * 7 + [2, 2]


def msa_config(**msa) -> ModelConfig:
    fields = dict(enabled=True, block_size=4, top_k=2, index_dim=8, dense_layers=1, dense_below_tokens=0)
    fields.update(msa)
    return dataclasses.replace(ModelConfig.tiny(), msa=MSAConfig(**fields))


def model(dtype: torch.dtype = torch.float64, **msa) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(msa_config(**msa)).to(dtype)
    for _, moe in moe_layers(m):
        moe.expert_bias.normal_(0, 0.05)
    # Larger index weights than the init's, so block scores are far apart and selection is not
    # decided by rounding.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "iq_proj" in name or "ik_proj" in name:
                p.normal_(0, 0.5)
    return m


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
INDEX = ("iq_proj", "ik_proj", "iq_norm", "ik_norm")


# Config


def test_msa_is_off_by_default_and_existing_presets_are_unchanged():
    for cfg in (ModelConfig(), ModelConfig.tiny(), ModelConfig.small()):
        assert not cfg.msa.enabled
        m = Transformer(cfg)
        assert not any(any(i in n for i in INDEX) for n, _ in m.named_parameters())
        assert "msa_step" not in m.state_dict()


@pytest.mark.parametrize("field,value,match", [
    ("block_size", 0, "msa.block_size"), ("top_k", 0, "msa.top_k"), ("index_dim", 7, "msa.index_dim"),
    ("dense_below_tokens", -1, "msa.dense_below_tokens"), ("index_loss_weight", -1.0, "msa.index_loss_weight"),
    ("dense_warmup_steps", -2, "msa.dense_warmup_steps"), ("dense_layers", -1, "msa.dense_layers"),
])
def test_bad_msa_values_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        MSAConfig(**{field: value})


def test_msa_must_leave_an_msa_layer():
    with pytest.raises(ValueError, match="lower msa.dense_layers or set msa.enabled"):
        msa_config(dense_layers=3)


def test_recipe_loader_fills_the_nested_msa_section():
    from forge.config import ConfigError, from_dict

    cfg = from_dict(ModelConfig, {"num_layers": 3, "msa": {"enabled": True, "block_size": 64}})
    assert cfg.msa == MSAConfig(enabled=True, block_size=64)
    with pytest.raises(ConfigError, match="did you mean 'model.msa.top_k'"):
        from_dict(ModelConfig, {"msa": {"topk": 3}}, prefix="model")
    with pytest.raises(ConfigError, match="msa.top_k must be >= 1"):
        from_dict(ModelConfig, {"msa": {"top_k": 0}}, prefix="model")


def test_first_layers_dense_the_rest_msa():
    m = model(dense_layers=1)
    has_index = [hasattr(block.attn, "iq_proj") for block in m.layers]
    assert has_index == [False, True, True]
    assert m.layers[1].attn.iq_proj.weight.shape == (2 * 8, 32) and m.layers[1].attn.ik_proj.weight.shape == (8, 32)


# The layer


def test_plain_msa_layer_equals_the_definition():
    m = model(torch.float32)
    attn = m.layers[1].attn
    x = torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(1))
    p = m._pass(torch.arange(37).expand(2, 37), plain_causal=True)
    q, k, v = attn._qkv(x, p.cos, p.sin)
    iq, ik = attn._index(x, p)
    expected = attn.o_proj(msa_attention_naive(q, k, v, iq, ik, block_size=4, top_k=2).reshape(2, 37, -1))
    torch.testing.assert_close(attn(x, p), expected, rtol=1e-5, atol=1e-6)
    dense = attn.o_proj(torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True,
    ).transpose(1, 2).reshape(2, 37, -1))
    assert (expected[:, 8:] - dense[:, 8:]).abs().amax() > 1e-3


def test_dense_below_keeps_early_positions_dense():
    seq = torch.arange(30)[None] + 70
    dense_model = model(dense_below_tokens=1000)
    thresh = model(dense_below_tokens=12)
    sparse = model(dense_below_tokens=0)
    ref, mid, sp = dense_model(seq), thresh(seq), sparse(seq)
    torch.testing.assert_close(mid[:, :12], ref[:, :12], rtol=1e-10, atol=1e-12)
    assert (mid[:, 12:] - ref[:, 12:]).abs().amax() > 1e-6
    assert (sp[:, 8:12] - ref[:, 8:12]).abs().amax() > 1e-6


# Merged equals unmerged


@pytest.mark.parametrize("dense_below", [0, 20], ids=["sparse", "dense-below-20"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_logprobs_entropies_and_index_loss_match(dtype, dense_below):
    m = model(dtype, dense_below_tokens=dense_below)
    seqs, _ = batch()
    assert build_tree(seqs).token_ratio() > 2
    merged = sequence_scores(m, seqs, with_entropy=True, with_index_loss=True)
    alone = sequence_scores(m, seqs, merge=False, with_entropy=True, with_index_loss=True)
    for a, b, ea, eb in zip(merged.logprobs, alone.logprobs, merged.entropies, alone.entropies):
        assert rel(a, b) <= TOL[dtype] and rel(ea, eb) <= TOL[dtype]
    assert alone.index_loss > 0
    assert rel(merged.index_loss, alone.index_loss) <= TOL[dtype]


@functools.cache
def merged_and_unmerged(dtype: torch.dtype, loss_name: str):
    m = model(dtype)
    seqs, prompt_len = batch()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        base = sequence_logprobs(m, seqs, merge=False)
    old = [b + (torch.rand(b.shape, generator=gen, dtype=b.dtype) - 0.5) for b in base]
    masks = [(torch.arange(len(s) - 1) >= p - 1).to(dtype) for s, p in zip(seqs, prompt_len)]
    adv = torch.randn(len(seqs), generator=gen, dtype=dtype)
    tokens = sum(len(s) for s in seqs)
    results = []
    for merge in (True, False):
        m.zero_grad(set_to_none=True)
        scores = sequence_scores(m, seqs, merge=merge, with_index_loss=True)
        loss = LOSSES[loss_name](scores.logprobs, old, masks, adv) + scores.index_loss / tokens
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    return results


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_loss_and_every_gradient_match(dtype, loss_name):
    (loss_m, grads_m), (loss_u, grads_u) = merged_and_unmerged(dtype, loss_name)
    assert loss_u.abs() > 0 and rel(loss_m, loss_u) <= TOL[dtype]
    assert grads_m.keys() == grads_u.keys()
    assert sum(any(i in n for i in INDEX) for n in grads_u) == 8  # 2 MSA layers x 4 index tensors
    for name, g in grads_u.items():
        if g.norm() == 0:
            assert grads_m[name].norm() == 0, name
        else:
            assert rel(grads_m[name], g) <= TOL[dtype], f"gradient of {name}"


# The index loss


def test_index_branch_learns_only_from_the_index_loss_and_the_backbone_never_does():
    m = model(torch.float64)
    seqs, _ = batch()
    scores = sequence_scores(m, seqs, with_index_loss=True)
    policy = -sum(lp.sum() for lp in scores.logprobs)
    policy.backward(retain_graph=True)
    for name, p in m.named_parameters():
        if any(i in name for i in INDEX):
            assert p.grad is None or p.grad.abs().max() == 0, name
    m.zero_grad(set_to_none=True)
    scores.index_loss.backward()
    touched = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    assert touched and all(any(i in n for i in INDEX) for n in touched), sorted(touched)
    assert {n for n in touched if "proj" in n} == {f"layers.{i}.attn.{w}.weight" for i in (1, 2)
                                                   for w in ("iq_proj", "ik_proj")}


def test_index_loss_of_a_row_is_the_definition_per_layer():
    """The model's index loss of one sequence is naive.py's loss of each MSA layer, times T."""
    m = model(torch.float32)
    ids = torch.arange(33)[None] + 80
    captured = []
    originals = {}
    for i in (1, 2):
        attn = m.layers[i].attn
        originals[i] = attn._msa

        def spy(q, k, v, iq, ik, p, _orig=originals[i]):
            captured.append((q, k, iq, ik))
            return _orig(q, k, v, iq, ik, p)

        attn._msa = spy
    _, loss = m(ids, return_index_loss=True)
    expected = sum(msa_index_loss_naive(q, k, iq, ik, block_size=4, top_k=2) for q, k, iq, ik in captured) * 33
    assert len(captured) == 2
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_dense_warmup_runs_dense_attention_and_a_dense_index_loss():
    ids = torch.arange(30)[None] + 90
    warm = model(torch.float64, dense_warmup_steps=2)
    dense = model(torch.float64, dense_below_tokens=10_000)
    sparse = model(torch.float64)
    logits_w, loss_w = warm(ids, return_index_loss=True)
    logits_d, loss_d = dense(ids, return_index_loss=True)
    logits_s, loss_s = sparse(ids, return_index_loss=True)
    torch.testing.assert_close(logits_w, logits_d, rtol=0, atol=0)
    torch.testing.assert_close(loss_w, loss_d, rtol=0, atol=0)
    assert (logits_w - logits_s).abs().max() > 1e-6 and (loss_w - loss_s).abs() > 1e-6
    advance_msa_step(warm)
    assert warm.msa_warming_up()
    advance_msa_step(warm)
    assert not warm.msa_warming_up()
    torch.testing.assert_close(warm(ids), logits_s, rtol=0, atol=0)


# Generation


def test_generation_logprobs_equal_the_training_forward_past_the_dense_prefix():
    """Prompts of 3, 11 and 7 tokens plus 14 sampled: well past top_k * block_size = 8 positions,
    batched with left padding and a shared prompt; dense below position 6 in MSA layers."""
    from forge.policy.generation import ModelGenerator
    from forge.policy.sampling import SamplingParams

    m = model(torch.float32, dense_below_tokens=6).eval()
    g = torch.Generator().manual_seed(3)
    a, b, c = (torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 11, 7))
    prompts = [a, b, b, c]
    params = SamplingParams(temperature=1.0, max_new_tokens=14)
    done = ModelGenerator(m, seed=0).generate(prompts, params)
    for prompt, completion in zip(prompts, done):
        ids = torch.tensor([prompt + completion.token_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(m(ids)[0], dim=-1)
        expected = logprobs[len(prompt) - 1 : -1].gather(-1, torch.tensor(completion.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(completion.logprobs), expected, rtol=0, atol=1e-5)


def test_padded_unmerged_batches_keep_the_index_loss_and_its_gradients():
    """Right padding never enters a real token's attention or block selection, and its zero
    token weight keeps it out of the index loss: padded=True equals one sequence at a time."""
    m = model(torch.float64, dense_below_tokens=6)
    seqs, _ = batch()

    def run(padded: bool):
        m.zero_grad()
        sc = sequence_scores(m, seqs, merge=False, with_index_loss=True, padded=padded)
        (sum((lp * (i + 1)).sum() for i, lp in enumerate(sc.logprobs)) + sc.index_loss).backward()
        return sc, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    alone, g_alone = run(False)
    padded, g_padded = run(True)
    assert rel(padded.index_loss, alone.index_loss) <= TOL[torch.float64] and alone.index_loss > 0
    for a, b in zip(padded.logprobs, alone.logprobs):
        assert rel(a, b) <= TOL[torch.float64]
    assert any(any(k in n for k in INDEX) for n in g_alone)
    for name in g_alone:
        assert rel(g_padded[name], g_alone[name]) <= TOL[torch.float64], name


@pytest.mark.parametrize("lengths", [(30, 36, 45), (41, 52, 47)], ids=["crossing", "all_past"])
def test_fixed_shape_decoding_step_equals_the_eager_one_across_the_dense_threshold(lengths, monkeypatch):
    """decode="static" runs `msa_decode` for every row (Triton's interpreter here) and dense
    attention where a row is still below dense_below_tokens; rows of a batch cross that position
    and top_k * block_size at different steps. Its tokens and logprobs are the eager loop's.
    When every prompt is past dense_below_tokens, the step skips the dense branch."""
    import forge.policy.model as model_module
    from forge.policy.generation import ModelGenerator
    from forge.policy.sampling import SamplingParams

    cfg = msa_config(block_size=16, top_k=2, index_dim=16, dense_below_tokens=40)
    torch.manual_seed(0)
    m = Transformer(dataclasses.replace(cfg, head_dim=16, rotary_dim=16)).eval()
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]
    dense_calls = []
    real_sdpa = model_module.F.scaled_dot_product_attention
    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention",
                        lambda q, k, *a, **kw: dense_calls.append(k.shape[2]) or real_sdpa(q, k, *a, **kw))
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    eager = ModelGenerator(m, seed=2, decode="eager").generate(prompts, params)
    dense_calls.clear()
    static = ModelGenerator(m, seed=2, decode="static").generate(prompts, params)
    for e, s in zip(eager, static):
        assert s.token_ids == e.token_ids
        torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(e.logprobs), rtol=0, atol=1e-5)
    # The MSA layers' dense branch attends over the first dense_below (40) positions.
    assert (40 in dense_calls) == (min(lengths) < 40)


def test_prefill_through_the_tree_kernels_equals_each_row_alone(monkeypatch):
    """A prefill from an empty cache runs msa_tree_triton in MSA layers and the tree-attention
    kernel in dense ones (Triton's interpreter here; on a GPU this keeps masked GQA attention off
    cuDNN's per-shape plans) over the left-padded batch, padding tokens as roots of their own:
    each row's logits equal the plain forward of its tokens alone (the CPU reference path)."""
    import forge.kernels.tree_attention.triton_tree as triton_tree
    from forge.policy.model import KVCache

    dense_calls = []
    real = triton_tree.tree_attention_triton
    monkeypatch.setattr(triton_tree, "tree_attention_triton", lambda *a, **kw: dense_calls.append(1) or real(*a, **kw))

    cfg = msa_config(block_size=16, top_k=2, index_dim=16, dense_below_tokens=20)
    torch.manual_seed(0)
    m = Transformer(dataclasses.replace(cfg, head_dim=16, rotary_dim=16)).eval()
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, 256, (n,), generator=g) for n in (50, 37, 64)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    position = torch.zeros_like(ids)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], valid[i, width - len(r):] = r, True
        position[i, width - len(r):] = torch.arange(len(r))
    cache = KVCache.allocate(m.config, len(rows), width, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        logits = m.forward_cached(ids, position, cache, valid)
        assert len(dense_calls) == 1  # the one dense layer's prefill
        for i, r in enumerate(rows):
            torch.testing.assert_close(logits[i, width - len(r):], m(r[None])[0], rtol=0, atol=1e-4)


# Checkpoints and the preset


def test_forge_checkpoint_round_trip_keeps_index_weights_and_warmup_state(tmp_path):
    from forge.policy.checkpoint import load_checkpoint, save_checkpoint

    m = model(torch.float32, dense_warmup_steps=5)
    advance_msa_step(m)
    save_checkpoint(m, tmp_path / "m.safetensors")
    back = load_checkpoint(tmp_path / "m.safetensors")
    assert back.config == m.config and int(back.msa_step) == 1
    for (name, a), (_, b) in zip(m.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.arange(25)[None] + 3
    torch.testing.assert_close(back(ids), m(ids), rtol=0, atol=0)


def test_hf_export_refuses_msa():
    from forge.policy.checkpoint import config_arch

    with pytest.raises(ValueError, match="MSA"):
        config_arch(msa_config())


def test_msa_100m_preset_counts_about_100m_parameters():
    cfg = ModelConfig.msa_100m()
    with torch.device("meta"):
        m = Transformer(cfg)
    total, active = count_parameters(m)
    assert 90e6 <= total <= 110e6, total
    assert active < total / 2
    msa_layers = [i for i in range(cfg.num_layers) if cfg.is_msa_layer(i)]
    assert msa_layers == list(range(2, 10))
    assert cfg.msa.top_k * cfg.msa.block_size == 512 and cfg.msa.triton_ok()
    index = sum(p.numel() for n, p in m.named_parameters() if any(i in n for i in INDEX))
    assert index == len(msa_layers) * (512 * 2 * 64 + 512 * 64 + 2 * 64)


def test_msa_1b_preset_counts_about_1b_parameters():
    cfg = ModelConfig.msa_1b()
    with torch.device("meta"):
        m = Transformer(cfg)
    total, active = count_parameters(m)
    assert 0.95e9 <= total <= 1.1e9, total
    assert 150e6 <= active <= 200e6, active
    assert cfg.msa.triton_ok() and cfg.msa.top_k * cfg.msa.block_size == 1024


def test_docs_yaml_is_the_msa_100m_preset():
    """The recipe keys docs/policy.md gives for the preset load to exactly the preset."""
    import pathlib

    import yaml

    from forge.config import from_dict

    text = (pathlib.Path(__file__).parents[1] / "docs" / "policy.md").read_text()
    block = text.split("A recipe selects it", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    assert from_dict(ModelConfig, yaml.safe_load(block)["model"], prefix="model") == ModelConfig.msa_100m()


# The trainer


def test_trainer_adds_the_index_loss_logs_it_and_ends_the_warmup():
    pytest.importorskip("deepspeed")
    import os
    import random

    from forge.middleware.types import Group, Trajectory, Turn
    from forge.trainer.config import AlgorithmConfig, TrainerConfig
    from forge.trainer.trainer import Trainer

    os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 1000))
    rng = random.Random(0)
    prompt = [256] + [rng.randrange(256) for _ in range(14)]
    trajs = [Trajectory("t", "g", prompt, [Turn([rng.randrange(256) for _ in range(9)], [-1.0] * 9, 0)],
                        reward=float(k == 0)) for k in range(3)]
    cfg = msa_config(dense_warmup_steps=1, index_loss_weight=0.5)
    trainer = Trainer(cfg, TrainerConfig(lr=1e-2), AlgorithmConfig(loss="grpo"), seed=0)
    index_before = trainer.model.layers[1].attn.iq_proj.weight.detach().clone()
    assert trainer.model.msa_warming_up()
    warm = trainer.train_step([Group("t", "g", trajs)])
    assert int(trainer.model.msa_step) == 1 and not trainer.model.msa_warming_up()
    sparse = trainer.train_step([Group("t", "g", trajs)])
    assert warm["train/index_loss"] > 0 and sparse["train/index_loss"] > 0
    assert not (trainer.model.layers[1].attn.iq_proj.weight == index_before).all()
    # The weights the rollout workers load carry the step count, so they leave the warm-up too.
    assert int(trainer.weights()["msa_step"]) == 2
    sft = trainer.sft_step([prompt + [1, 2, 3]], [[0] * len(prompt) + [1, 1, 1]], lr=1e-3)
    assert sft["warmstart/index_loss"] > 0 and int(trainer.model.msa_step) == 3


# On a GPU: the Triton kernels inside the model


def gpu_config() -> ModelConfig:
    """Tiny, with sizes the Triton kernels take: head and index dims 16, blocks of 16, top 2."""
    return dataclasses.replace(
        ModelConfig.tiny(), hidden_size=64, head_dim=16, rotary_dim=16,
        msa=MSAConfig(enabled=True, block_size=16, top_k=2, index_dim=16, dense_layers=1, dense_below_tokens=24),
    )


def gpu_model() -> Transformer:
    torch.manual_seed(0)
    m = Transformer(gpu_config()).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "iq_proj" in name or "ik_proj" in name:
                p.normal_(0, 0.5)
    return m


def _counting(monkeypatch, name: str) -> list:
    import forge.policy.model as model_module

    calls: list = []
    original = getattr(model_module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(model_module, name, counted)
    return calls


@pytest.mark.gpu
@pytest.mark.parametrize("tree", [False, True], ids=["plain-batch", "prefix-tree"])
def test_gpu_triton_msa_layer_equals_the_reference_path(monkeypatch, tree):
    """fp32 on CUDA: the layer's Triton path (forge.kernels.msa.tree_triton, for plain batches
    and trees alike) gives the reference path's output and index loss for the same kept blocks,
    to IEEE fp32 rounding, and its indexer keeps the reference's blocks for nearly every (query,
    group) (near-tied blocks may flip: the two sum the index products in different orders)."""
    from forge.kernels.msa.tree import kept_keys, msa_tree
    from forge.prefix_tree import build_tree

    import forge.policy.model as model_module

    chosen = []
    original = model_module.msa_tree_triton

    def spy(*a, **kw):
        out = original(*a, **kw)
        from forge.kernels.msa.triton_tree_indexer import select_blocks_tree_triton

        chosen.append(select_blocks_tree_triton(a[3].detach(), a[4].detach(), a[5].int(), a[6].int(),
                                                block_size=kw["block_size"], top_k=kw["top_k"]))
        return out

    monkeypatch.setattr(model_module, "msa_tree_triton", spy)
    m = gpu_model().cuda()
    attn = m.layers[1].attn
    if tree:
        g = torch.Generator().manual_seed(3)
        prompt = torch.randint(0, 256, (70,), generator=g).tolist()
        t = build_tree([prompt + torch.randint(0, 256, (n,), generator=g).tolist() for n in (80, 45, 60)])
        pos, se = t.position[None].cuda(), t.subtree_end[None].cuda()
        n = t.num_tokens
        p = m._pass(pos, subtree_end=se, with_index_loss=True)
    else:
        n = 150
        pos = torch.arange(n, device="cuda").expand(2, n)
        se = torch.full_like(pos, n)
        p = m._pass(pos, plain_causal=True, with_index_loss=True)
    x = torch.randn(pos.shape[0], n, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    q, k, v = attn._qkv(x, p.cos, p.sin)
    iq, ik = attn._index(x, p)
    out = attn._msa(q, k, v, iq, ik, p)
    assert len(chosen) == 1
    ref, loss = msa_tree(q, k, v, iq, ik, se, pos, block_size=16, top_k=2, dense_below=24, with_index_loss=True,
                         selected=chosen[0])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p.index_losses[0], loss, rtol=1e-5, atol=1e-5)
    visible = (torch.arange(n, device="cuda")[None, None, :] <= torch.arange(n, device="cuda")[None, :, None]) & (
        torch.arange(n, device="cuda")[None, :, None] < se[:, None, :])
    args = (visible, pos // 16, pos // 16, torch.zeros_like(visible[..., 0]))
    same = kept_keys(iq, ik, *args, top_k=2) == kept_keys(iq, ik, *args, top_k=2, selected=chosen[0])
    agree = same.all(-1).float().mean().item()
    print(f"Triton indexer keeps the reference's blocks for {agree:.1%} of (query, group)")
    assert agree >= 0.95


def _yardstick(reference: Transformer, model: Transformer, seqs: list[list[int]]) -> torch.Tensor:
    """|logprob| differences between the bf16 GPU forward and an fp32 CPU copy, per token."""
    a = torch.cat([lp.float().cpu() for lp in sequence_logprobs(model, seqs, merge=False)])
    b = torch.cat(sequence_logprobs(reference, seqs, merge=False))
    return (a - b).abs()


@pytest.mark.gpu
def test_gpu_bf16_merged_equals_unmerged_within_bf16_noise():
    reference = gpu_model()
    model = copy_to_gpu_bf16(reference)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 256, (90,), generator=g).tolist()
    seqs = [prompt + torch.randint(0, 256, (n,), generator=g).tolist() for n in (60, 35, 80, 1)]
    seqs += [seqs[0][:120] + [7] * 30, torch.randint(0, 256, (140,), generator=g).tolist()]
    with torch.no_grad():
        merged = sequence_scores(model, seqs, with_index_loss=True)
        alone = sequence_scores(model, seqs, merge=False, with_index_loss=True)
    gap = torch.cat([(a - b).abs().float().cpu() for a, b in zip(merged.logprobs, alone.logprobs)])
    noise = _yardstick(reference, model, seqs)
    print(f"bf16 merged-vs-unmerged |dlogprob| mean {gap.mean():.2e} max {gap.max():.2e}; "
          f"bf16-vs-fp32 mean {noise.mean():.2e} max {noise.max():.2e}; tokens {gap.numel()}")
    assert noise.max() > 0
    assert gap.mean() <= 2 * noise.mean() and gap.max() <= 2 * noise.max()
    assert abs(float(merged.index_loss) - float(alone.index_loss)) <= 0.02 * float(alone.index_loss)


def copy_to_gpu_bf16(model: Transformer) -> Transformer:
    import copy

    return copy.deepcopy(model).to("cuda", torch.bfloat16)


@pytest.mark.gpu
def test_gpu_bf16_generation_through_msa_decode_within_bf16_noise(monkeypatch):
    from forge.policy.generation import ModelGenerator
    from forge.policy.sampling import SamplingParams

    decodes = _counting(monkeypatch, "msa_decode_with_selection")
    reference = gpu_model()
    model = copy_to_gpu_bf16(reference)
    g = torch.Generator().manual_seed(4)
    base = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (40, 100, 70)]
    prompts = [p for p in base for _ in range(2)]
    done = ModelGenerator(model, seed=0).generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=48))
    generated = torch.tensor([lp for c in done for lp in c.logprobs])
    seqs = [p + c.token_ids for p, c in zip(prompts, done)]
    with torch.no_grad():
        forward = torch.cat([lp[len(p) - 1:].float().cpu() for p, lp in zip(prompts, sequence_logprobs(model, seqs, merge=False))])
        fp32 = torch.cat([lp[len(p) - 1:] for p, lp in zip(prompts, sequence_logprobs(reference, seqs, merge=False))])
    gap, noise = (generated - forward).abs(), (forward - fp32).abs()
    print(f"bf16 generator-vs-forward |dlogprob| mean {gap.mean():.2e} max {gap.max():.2e}; "
          f"bf16-vs-fp32 mean {noise.mean():.2e} max {noise.max():.2e}; tokens {gap.numel()}; decode calls {len(decodes)}")
    assert decodes, "the Triton decode path was not taken"
    assert gap.mean() <= 2 * noise.mean() and gap.max() <= 2 * noise.max()
