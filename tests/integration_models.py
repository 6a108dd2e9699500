"""Tiny offline models and tokenizers for the integration tests (no download)."""
from __future__ import annotations

import torch

from delta_kernels.trainer.model import ModelSize, build_default_model
from delta_kernels.trainer.tokenizer import CHARS, CharTokenizer

SIZE = ModelSize(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, max_positions=64)


def char_tokenizer():
    """A transformers fast tokenizer, one token per character, built with ``tokenizers``
    (same vocabulary as the trainer's CharTokenizer: <pad>=0, <bos>=1, <eos>=2)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    ref = CharTokenizer(CHARS)
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(ref.itos)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<pad>", padding_side="left")


def tiny_model(seed: int = 0):
    ref = CharTokenizer(CHARS)
    model, _ = build_default_model(ref.vocab_size, SIZE, seed, ref.pad_token_id, ref.bos_token_id, ref.eos_token_id)
    return model


def context_free_model():
    """Zero decoder layers: each token's hidden state depends on its id only, so packing several
    sequences in one row (which eager attention does not isolate) changes nothing and an
    independent padded forward is the reference for the packed layout. Vocabulary of 17."""
    return build_default_model(17, ModelSize(hidden_size=32, num_layers=0, num_heads=2, num_kv_heads=1,
                                             intermediate_size=64), 0, 0, 1, 2)[0]


def prompts(n: int):
    g = torch.Generator().manual_seed(1)
    xs = torch.randint(0, 50, (n, 2), generator=g).tolist()
    return [f"{a}+{b}=" for a, b in xs]
