import os

import torch

# Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors. It is read when
# triton.jit decorates a kernel, so it must be set before uba_fused's Triton backend is imported.
# Likewise backend "cuda" runs its kernel body compiled for the host (csrc/fused_step.cuh).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("UBA_FUSED_CUDA_ON_CPU", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
