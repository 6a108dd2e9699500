#!/usr/bin/env bash
# Create (or reuse) .venv and install everything the package, its tests and its trainer need.
# torch is installed only when none is importable: the CPU wheel torch==2.13.0 on a machine
# without a GPU, the default build otherwise. The native modules are built by `pip install -e .`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$VPY" -m pip install -q torch
  else
    "$VPY" -m pip install -q torch==2.13.0
  fi
fi
"$VPY" -m pip install -q setuptools wheel pybind11 ninja cmake numpy triton pytest hypothesis build \
  transformers matplotlib tqdm "trl==1.16.0" peft
# verl 0.9.1 pins transformers<5.11 and pulls a GPU stack; the tests need its algorithm and data
# modules (core_algos, DataProto) and its driver (ray_trainer: torchdata, cachetools, uvicorn, fastapi),
# so it is installed without its dependency list plus what those import.
"$VPY" -m pip install -q --no-deps "verl==0.9.1"
"$VPY" -m pip install -q "tensordict>=0.8.0,<=0.10.0,!=0.9.0" omegaconf hydra-core codetiming dill ray \
  torchdata cachetools uvicorn fastapi "transferqueue==0.1.11" aiohttp
# OpenRLHF 0.11.2 pins flash-attn (a CUDA build), deepspeed and transformers 5.15: installed without its dependency
# list, plus what its PPO modules import (deepspeed 0.19.6 builds no ops at install; vllm and flash-attn cannot
# install here, the tests stand in for their imports).
"$VPY" -m pip install -q --no-deps "openrlhf==0.11.2"
"$VPY" -m pip install -q "deepspeed==0.19.6" pylatexenc einops jsonlines optree torchmetrics loralib
"$VPY" -m pip install -q --no-build-isolation -e .
"$VPY" -c "import delta_kernels as dk; print('delta_kernels backends:', ', '.join(dk.available_backends()))"
