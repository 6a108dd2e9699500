"""The policy: a small Qwen3-architecture model built from a config (the embedded default,
no download), or any local causal-LM checkpoint with its tokenizer (``--model PATH``)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Tuple

import torch

from .._optional import require


@dataclass(frozen=True)
class ModelSize:
    """The embedded model's shape; ``embedded_size`` derives the trainer's from its three flags."""
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_positions: int = 64


def embedded_size(hidden_size: int, num_layers: int, num_heads: int, max_positions: int = 64) -> ModelSize:
    """The trainer's embedded model (--hidden-size, --num-layers, --num-heads): half as many
    key-value heads (at least one) and an MLP 8/3 as wide as the hidden size."""
    return ModelSize(hidden_size, num_layers, num_heads, max(num_heads // 2, 1), hidden_size * 8 // 3, max_positions)


def default_config_class():
    """transformers.Qwen3Config when the installed transformers has it, else LlamaConfig."""
    transformers = require("transformers", "trainer")
    if hasattr(transformers, "Qwen3Config"):
        return transformers.Qwen3Config, transformers.Qwen3ForCausalLM, "qwen3"
    # transformers < 4.51
    return transformers.LlamaConfig, transformers.LlamaForCausalLM, "llama (Qwen3Config missing from this transformers)"


def build_default_model(vocab_size: int, size: ModelSize, seed: int, pad_token_id: int,
                        bos_token_id: int, eos_token_id: int) -> Tuple[torch.nn.Module, str]:
    """A freshly initialised small causal LM (float32, eager attention). Returns (model, arch)."""
    config_cls, model_cls, arch = default_config_class()
    if size.hidden_size % size.num_heads:
        raise ValueError(f"hidden size {size.hidden_size} is not a multiple of the {size.num_heads} heads")
    kwargs = dict(vocab_size=vocab_size, hidden_size=size.hidden_size, intermediate_size=size.intermediate_size,
                  num_hidden_layers=size.num_layers, num_attention_heads=size.num_heads,
                  num_key_value_heads=size.num_kv_heads, max_position_embeddings=size.max_positions,
                  tie_word_embeddings=True, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                  eos_token_id=eos_token_id, attn_implementation="eager")
    if arch == "qwen3":
        kwargs["head_dim"] = size.hidden_size // size.num_heads
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config_cls(**kwargs))
    return model, arch


def load_pretrained(path: str, device: torch.device):
    """(model, tokenizer) from a local checkpoint directory; a clear error when it is missing."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--model: path {path!r} does not exist (pass a local checkpoint directory; "
                                "nothing is downloaded)")
    transformers = require("transformers", "trainer")
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    return model.to(device=device, dtype=torch.float32), tok


def lm_head_of(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose input is the hidden state entering the LM head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        head = getattr(model, "lm_head", None)
    if head is None:
        raise ValueError("the model has no output embeddings / lm_head to capture hidden states from")
    return head


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def body_of(model: torch.nn.Module) -> torch.nn.Module:
    """The model without its LM head (a transformers CausalLM's ``get_decoder()``, e.g.
    Qwen3ForCausalLM.model): its ``last_hidden_state`` is the input of the LM head, final norm
    included. Models that transform the head's output (logit soft-capping, logit scaling) are
    refused, since the fused LM-head kernels compute plain ``hidden @ weight.T + bias``."""
    config = getattr(model, "config", None)
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise ValueError(f"the model's config sets {name}={getattr(config, name)!r}: its logits are not "
                             "hidden @ lm_head.weight.T + bias, which the fused LM-head kernels compute")
    body = model.get_decoder() if hasattr(model, "get_decoder") else None
    if body is None:
        body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise ValueError("the model exposes no body (get_decoder() / base_model) to run without its LM head")
    return body
