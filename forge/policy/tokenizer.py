"""Tokenizers: a built-in byte-level one with the turn protocol's markers as special tokens.

Ids 0..255 are raw bytes; special tokens follow. Encoding is exact and offline: any text
round-trips through `decode(encode(text))`, and a marker written in the text becomes its one
special id, so the policy samples a marker as a single token.
"""

from __future__ import annotations

import re
from typing import Protocol, Sequence

#: The turn protocol's markers, in a fixed order that fixes their ids.
PROTOCOL_MARKERS: tuple[str, ...] = (
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_result>",
    "</tool_result>",
    "<answer>",
    "</answer>",
)
CONTROL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>")


class Tokenizer(Protocol):
    """What the agent loop and the generator need of a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_id(self, token: str) -> int: ...


class ByteTokenizer:
    """UTF-8 bytes plus control tokens and the protocol markers as special tokens."""

    def __init__(self, extra_special: Sequence[str] = ()) -> None:
        specials = list(CONTROL_TOKENS) + list(PROTOCOL_MARKERS)
        for tok in extra_special:
            if tok not in specials:
                specials.append(tok)
        self.special_tokens: tuple[str, ...] = tuple(specials)
        self._special_to_id = {tok: 256 + i for i, tok in enumerate(specials)}
        self._id_to_special = {i: tok for tok, i in self._special_to_id.items()}
        # Longest first so that a marker that is a prefix of another never wins.
        alternatives = sorted(specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(s) for s in alternatives) + ")")
        self.vocab_size = 256 + len(specials)
        self.pad_id = self._special_to_id["<pad>"]
        self.bos_id = self._special_to_id["<bos>"]
        self.eos_id = self._special_to_id["<eos>"]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; markers become their special ids, the rest UTF-8 bytes."""
        ids: list[int] = []
        for piece in self._split.split(text):
            if not piece:
                continue
            special = self._special_to_id.get(piece)
            if special is not None:
                ids.append(special)
            else:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; invalid UTF-8 (a sampled split of a multi-byte char) is replaced."""
        ids = [int(i) for i in ids]
        if all(0 <= i < 256 for i in ids):  # the common case: no marker, one UTF-8 decode
            return bytes(ids).decode("utf-8", errors="replace")
        out: list[str] = []
        start = 0
        for at, i in enumerate(ids):
            if 0 <= i < 256:
                continue
            if at > start:
                out.append(bytes(ids[start:at]).decode("utf-8", errors="replace"))
            start = at + 1
            tok = self._id_to_special.get(i)
            if tok is None:
                raise ValueError(f"token id {i} is outside this tokenizer's vocabulary (size {self.vocab_size})")
            out.append(tok)
        if start < len(ids):
            out.append(bytes(ids[start:]).decode("utf-8", errors="replace"))
        return "".join(out)

    def token_id(self, token: str) -> int:
        """Id of one special token, e.g. `token_id('<answer>')`."""
        try:
            return self._special_to_id[token]
        except KeyError:
            raise KeyError(f"{token!r} is not a special token; known: {', '.join(self.special_tokens)}") from None
