"""Capture the hidden states that enter a causal LM's head, in any training loop.

The hook sits on the decoder body (``get_decoder()`` / ``base_model``), not on ``lm_head``:
fused heads (TRL's ``add_fused_lm_head``, verl's ``use_fused_kernels``) read ``lm_head.weight``
and never call the module, but every framework runs the body.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, List, Optional

import torch


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP/FSDP-style ``.module`` wrappers and PEFT's ``get_base_model()``."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module) and not hasattr(model, "lm_head"):
            model = model.module
    return model


def decoder_body(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose output (``last_hidden_state``, final norm included) enters the LM head.

    Looks through PEFT (``get_base_model()``) and ``.module`` wrappers, then takes
    ``get_decoder()`` or ``base_model``. Raises ValueError naming what to change when neither
    gives a proper sub-module."""
    inner = _unwrap(model)
    body = None
    if hasattr(inner, "get_decoder"):
        try:
            body = inner.get_decoder()
        except (AttributeError, NotImplementedError):
            body = None
    if body is None:
        body = getattr(inner, "base_model", None)
    if not isinstance(body, torch.nn.Module) or body is inner:
        raise ValueError(f"model: {type(inner).__name__} exposes no decoder body (get_decoder() or base_model "
                         "returning a sub-module): pass a transformers *ForCausalLM model (or a PEFT wrapper of one), "
                         "whose body's last_hidden_state is the input of lm_head")
    _check_head(inner)
    return body


def _check_head(model: torch.nn.Module) -> None:
    """Refuse an LM head whose input is split across ranks (a DTensor sharded on the hidden dim):
    the body's output then is not the head's full input on any one rank."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    placements = getattr(weight, "placements", None)
    if placements is None:
        return
    for p in placements:
        dim = getattr(p, "dim", None)
        if callable(getattr(p, "is_shard", None)) and p.is_shard() and dim in (1, -1):
            raise ValueError(f"model: lm_head.weight is a DTensor sharded on the hidden dimension ({placements}); "
                             "its input is split across ranks and cannot be captured whole. Shard the head on the "
                             "vocabulary dimension (Shard(0), as FSDP2 and colwise tensor parallelism do) or "
                             "replicate it")


def lm_head_parameters(model: torch.nn.Module):
    """(weight [V, H], bias [V] or None) of ``model``'s LM head, detached, whole (a DTensor head,
    e.g. FSDP2's Shard(0), is gathered): what head_gradient_sketch needs beside the captured states."""
    inner = _unwrap(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"model: {type(inner).__name__} has no output embeddings (get_output_embeddings()) with a "
                         "weight; vectors='head' needs the LM head")
    whole = [None if p is None else (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()
             for p in (head.weight, getattr(head, "bias", None))]
    return whole[0], whole[1]


def _last_hidden(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    h = getattr(output, "last_hidden_state", None)
    if h is None and isinstance(output, (tuple, list)) and output:
        h = output[0]
    if not isinstance(h, torch.Tensor):
        raise TypeError(f"the decoder body returned {type(output).__name__} without a last_hidden_state tensor")
    return h


class HiddenCapture:
    """Hidden states collected by ``capture_hidden_states``: one detached tensor per body forward,
    shaped like the body's ``last_hidden_state`` ([B, S, H], or [1, nnz, H] when packed)."""

    def __init__(self) -> None:
        self.hidden_states: List[torch.Tensor] = []

    def _hook(self, module, args, output) -> None:
        h = _last_hidden(output).detach()
        if hasattr(h, "full_tensor"):  # DTensor (sequence/tensor parallel body output): gather it
            h = h.full_tensor()
        self.hidden_states.append(h)

    def pop(self) -> torch.Tensor:
        """The only captured tensor; clears the list. Raises when there is not exactly one."""
        if len(self.hidden_states) != 1:
            raise RuntimeError(f"expected exactly one body forward in the capture, got {len(self.hidden_states)}")
        return self.hidden_states.pop()


@contextmanager
def capture_hidden_states(model: torch.nn.Module) -> Iterator[HiddenCapture]:
    """Collect the hidden states entering ``model``'s LM head, one tensor per body forward.

    Works whether or not the loop calls ``lm_head`` (fused heads included). Adds no forward;
    the tensors are detached (no graph is kept alive). The hook is removed on exit, also when
    the block raises.

    Example::

        with torch.no_grad(), capture_hidden_states(model) as cap:
            logits = model(input_ids, attention_mask=mask).logits
        h = response_hidden_states(cap.pop(), response_length=R)   # [B, R, H]
    """
    body = decoder_body(model)
    cap = HiddenCapture()
    handle = body.register_forward_hook(cap._hook)
    try:
        yield cap
    finally:
        handle.remove()


def response_hidden_states(hidden: torch.Tensor, response_length: int,
                           attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The hidden states that predict the response tokens: [B, S, H] -> [B, R, H].

    Layout: each row is ``[prompt (left-padded) | response (right-padded)]`` with the responses in
    the last R = ``response_length`` columns (TRL's ``logits_to_keep``, verl's ``responses`` width).
    Response token t is predicted from position S - R - 1 + t (the one-position label shift), so
    the result is ``hidden[:, S-R-1 : S-1]``, aligned with the response log-probs and mask.

    attention_mask: optional [B, S]; when given, checks that every prompt ends in the column just
    before the responses (left padding), which the shift assumes.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden: expected [B, S, H], got shape {list(hidden.shape)}")
    s = hidden.shape[1]
    if not 0 < response_length < s:
        raise ValueError(f"response_length: {response_length} must be in [1, {s - 1}] for hidden of length {s}")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"attention_mask: shape {list(attention_mask.shape)} must be {list(hidden.shape[:2])}")
        if not bool(attention_mask[:, s - response_length - 1].bool().all()):
            raise ValueError("attention_mask: some prompt does not end right before the responses; left-pad the "
                             "prompts (padding_side='left') so that response token t follows position S - R - 1 + t")
    return hidden[:, s - response_length - 1:s - 1]
