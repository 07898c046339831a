"""A Hugging Face tokenizer from a local directory, behind Forge's `Tokenizer` protocol.

The turn protocol's markers (forge.policy.tokenizer.PROTOCOL_MARKERS) must each be one token,
so the ones the tokenizer lacks are added as special tokens; their new ids follow the existing
vocabulary and must fit the model's embedding (checkpoints such as Qwen's pad it beyond the
tokenizer's size; `ModelGenerator` checks). Encoding adds no BOS/EOS by itself: the agent
loop decides where they go. A tokenizer without a pad or BOS token uses its EOS id for them,
as GPT-2-style models that separate documents with end-of-text do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from forge.policy.tokenizer import PROTOCOL_MARKERS


class HFTokenizer:
    """`Tokenizer` over transformers' AutoTokenizer, loaded offline from `directory`."""

    def __init__(self, directory: str | Path, *, markers: Sequence[str] = PROTOCOL_MARKERS) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise ImportError(
                "HFTokenizer needs transformers (pip install 'transformers>=4.50'); "
                "the built-in ByteTokenizer needs nothing"
            ) from exc
        self.hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        vocab = self.hf.get_vocab()
        missing = [m for m in markers if m not in vocab]
        self.added_markers: tuple[str, ...] = tuple(missing)
        """Markers this tokenizer did not have and that were added as special tokens."""
        if missing:
            self.hf.add_tokens(missing, special_tokens=True)
        if self.hf.eos_token_id is None:
            raise ValueError(f"the tokenizer in {directory} has no eos_token; set one in its tokenizer_config.json")
        self.eos_id: int = self.hf.eos_token_id
        self.pad_id: int = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos_id
        self.bos_id: int = self.hf.bos_token_id if self.hf.bos_token_id is not None else self.eos_id
        self.vocab_size: int = len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without added BOS/EOS; a marker in the text is its one id."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens and markers included, spaces as they were."""
        return self.hf.decode(list(map(int, ids)), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def token_id(self, token: str) -> int:
        """Id of one token of the vocabulary, e.g. `token_id('<answer>')`."""
        ids = self.hf.convert_tokens_to_ids([token])
        if not ids or ids[0] is None or (ids[0] == self.hf.unk_token_id and token != self.hf.unk_token):
            raise KeyError(f"{token!r} is not one token of this tokenizer; markers: {', '.join(PROTOCOL_MARKERS)}")
        return int(ids[0])
