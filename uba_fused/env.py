"""``python -m uba_fused.env``: versions, GPU, and which backends can run here (and why not)."""

from __future__ import annotations

import platform
import shutil
import sys

import torch

from . import __version__, _ext, backends


# How the kernel backends run on CPU tensors: tools for testing the kernels' math without a GPU.
TEST_MODES = {"triton": "TRITON_INTERPRET=1 runs the Triton kernel in Triton's interpreter",
              "cuda": f"{backends.CUDA_ON_CPU}=1 runs the CUDA kernel's body on the host, one chunk at a time"}


def report() -> str:
    lines = [f"uba_fused {__version__}", f"python    {sys.version.split()[0]} ({platform.platform()})",
             f"torch     {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU build'})"]
    try:
        import triton

        lines.append(f"triton    {triton.__version__}")
    except ImportError as exc:
        lines.append(f"triton    not importable ({exc})")
    lines.append(f"nvcc      {shutil.which('nvcc') or 'not on PATH'}")
    lines.append(f"extension {'uba_fused._C built' if _ext._C is not None else _ext.ERROR}")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}    {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
        devices.append(torch.device("cuda", torch.cuda.current_device()))
    else:
        lines.append("GPU       none visible to torch")
    for dev in devices:
        lines.append(f"backends for parameters on {dev} (auto -> {backends.resolve('auto', dev)}):")
        for name, reason in backends.availability(dev).items():
            if reason is not None:
                state = f"unavailable: {reason}"
            elif dev.type == "cpu" and name in TEST_MODES:
                state = f"usable in a test mode only: {TEST_MODES[name]}; slow, and auto never picks it"
            else:
                state = "usable"
            lines.append(f"  {name:7s} {state}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
