"""Reference RLVR trainer (GRPO advantages, DAPO loss) with DelTA credit assignment.

``python -m delta_kernels.trainer`` (or ``delta-train``) runs the embedded default: a small
Qwen3-architecture model with a character tokenizer, 2-digit addition with an exact-answer
reward, a short supervised warm start, then RL. Files, in the order of a step:
task.py (problems, reward), tokenizer.py, model.py, rollout.py (sampling with a KV cache),
advantages.py (GRPO), step.py (old-log-prob pass = the model's body + the fused LM-head
log-prob/sketch kernel, DelTA coefficients, clipped-surrogate updates through the fused LM-head
loss: no [tokens x vocab] logits in either), distributed.py (data parallel under torchrun),
warm_start.py, evaluate.py, report.py, loop.py, config.py, __main__.py (CLI).

Data parallel: ``torchrun --nproc_per_node=N -m delta_kernels.trainer ...`` (gloo on the CPU,
NCCL on CUDA); --prompts-per-step is the global count, split between the ranks.
"""
from .config import TrainerConfig


def run(cfg: "TrainerConfig"):
    """Run the trainer with ``cfg`` (see loop.run)."""
    from .loop import run as _run
    return _run(cfg)


__all__ = ["TrainerConfig", "run"]
