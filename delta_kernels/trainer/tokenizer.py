"""Tokenizers the trainer uses: a character-level one for the embedded task, and an adapter
that gives a local Hugging Face tokenizer the same small interface.

Interface (both): ``encode(text) -> List[int]`` (a prompt, BOS first when the tokenizer has
one), ``decode(ids) -> str``, ``token_text(id) -> str`` (for the HTML view), and the ids
``pad_token_id``, ``eos_token_id``, ``bos_token_id`` (None when absent), ``vocab_size``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

CHARS = "0123456789+=- "


class CharTokenizer:
    """One token per character of ``CHARS`` plus <pad>=0, <bos>=1, <eos>=2."""

    SPECIALS = ("<pad>", "<bos>", "<eos>")

    def __init__(self, chars: str = CHARS):
        self.itos = list(self.SPECIALS) + list(chars)
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2
        self.vocab_size = len(self.itos)

    def encode(self, text: str) -> List[int]:
        unknown = sorted(set(text) - set(self.stoi))
        if unknown:
            raise ValueError(f"CharTokenizer: characters {unknown!r} are not in the vocabulary")
        return [self.bos_token_id] + [self.stoi[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the ids up to (not including) the first <eos>; other specials are dropped."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_token_id:
                break
            if i >= len(self.SPECIALS):
                out.append(self.itos[i])
        return "".join(out)

    def token_text(self, i: int) -> str:
        return self.itos[int(i)]


class HFTokenizerAdapter:
    """A transformers tokenizer behind the interface above (pad falls back to eos)."""

    def __init__(self, tok):
        self.tok = tok
        if tok.eos_token_id is None:
            raise ValueError("the tokenizer of --model has no eos token; the trainer needs one to end responses")
        self.eos_token_id = int(tok.eos_token_id)
        self.pad_token_id = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        self.bos_token_id: Optional[int] = None if tok.bos_token_id is None else int(tok.bos_token_id)
        self.vocab_size = len(tok)

    def encode(self, text: str) -> List[int]:
        ids = self.tok.encode(text, add_special_tokens=False)
        return ([self.bos_token_id] if self.bos_token_id is not None else []) + list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.eos_token_id in ids:
            ids = ids[:ids.index(self.eos_token_id)]
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_text(self, i: int) -> str:
        return self.tok.decode([int(i)])
