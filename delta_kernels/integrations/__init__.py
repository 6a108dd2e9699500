"""Drop-in DelTA for existing RL loops.

``capture_hidden_states`` works in any loop; ``delta_kernels.integrations.trl`` (TRL's
GRPOTrainer), ``delta_kernels.integrations.verl`` (verl's PPO trainers) and
``delta_kernels.integrations.openrlhf`` (OpenRLHF's PPO) import their framework only when
imported themselves; all three call ``delta_kernels.integrations.core``.
"""
from .capture import HiddenCapture, capture_hidden_states, decoder_body, response_hidden_states
from .options import DeltaSpec

__all__ = ["capture_hidden_states", "response_hidden_states", "decoder_body", "HiddenCapture", "DeltaSpec"]
