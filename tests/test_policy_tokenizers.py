"""Tokenizers: the Hugging Face one loads offline, adds the protocol markers it lacks as single
special tokens and keeps the ones it has; the byte tokenizer is the offline default."""

from __future__ import annotations

import pytest

from forge.policy.tokenizer import PROTOCOL_MARKERS, ByteTokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CORPUS = ["the agent calls a tool and reads the result", "think before you answer", "12 + 30 = 42"] * 20


@pytest.fixture
def hf_dir(tmp_path):
    """A tiny byte-level BPE tokenizer that already knows <think> (as Qwen3's does) but no other marker."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<think>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<think>"]})
    fast.save_pretrained(tmp_path)
    return tmp_path


def test_hf_tokenizer_adds_missing_markers_as_single_tokens(hf_dir):
    from forge.policy.hf_tokenizer import HFTokenizer

    raw = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    tok = HFTokenizer(hf_dir)
    assert tok.added_markers == tuple(m for m in PROTOCOL_MARKERS if m != "<think>")
    assert tok.token_id("<think>") == raw.convert_tokens_to_ids("<think>")
    assert tok.vocab_size == len(raw) + len(PROTOCOL_MARKERS) - 1
    for marker in PROTOCOL_MARKERS:
        assert tok.encode(marker) == [tok.token_id(marker)]
    text = "<think>12 + 30</think><tool_call>{\"expr\": \"12+30\"}</tool_call><answer>42</answer>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eos_id == raw.eos_token_id and tok.pad_id == tok.eos_id and tok.bos_id == tok.eos_id
    with pytest.raises(KeyError, match="not one token"):
        tok.token_id("<not-a-token>")


def test_byte_tokenizer_is_offline_and_round_trips_markers():
    tok = ByteTokenizer()
    text = "é<think>x</think><answer>1</answer>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids.count(tok.token_id("<think>")) == 1 and max(ids) < tok.vocab_size
