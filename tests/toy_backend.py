"""A pytest plugin (``-p toy_backend``) that registers one more backend: the torch reference
under the name "toy", CPU only, float16/bfloat16/float32, lowest priority. tests/test_backends.py
runs the conformance suite with it: one registry entry is all a new backend needs to be tested."""
import torch

from delta_kernels._backends import PHASES, Backend, register

register(Backend("toy", "delta_kernels.reference", ("cpu",), (torch.float16, torch.bfloat16, torch.float32), PHASES,
                 priority=-1))
