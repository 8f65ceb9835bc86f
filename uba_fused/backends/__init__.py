"""Backend registry and the one ``backend=`` option.

Every backend module exposes ``prepare(rule, work, cache, grads) -> Step`` (an optional pre-pass over the
gradients, then the update) with the semantics written in ``work.py``; the optimizer classes never know
which one runs. ``resolve`` turns a requested name into a usable backend for the
parameters' device, once per param group.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable, Iterable, Sequence

import torch

from . import snr
from .plan import CaptureError, GradScan, is_dense, stream_of_step
from .cache import Held, StepCache
from .work import Amp, Capture, GradSource, GroupWork, Selection, Step, local

__all__ = ["Amp", "NAMES", "KERNEL_DTYPES", "snr", "GroupWork", "GradSource", "GradScan", "Capture", "CaptureError",
           "Selection",
           "Step", "StepCache", "Held", "BackendUnavailableError", "availability", "resolve", "check_params", "get",
           "capturing", "stream_of_step"]

NAMES = ("auto", "torch", "cpu", "triton", "cuda")
# "auto" tries these in order; the first usable one wins. CUDA first: on an H100 (GPT-2-medium list,
# steps back to back, benchmarks/RESULTS.md) it was as fast as Triton or faster in every row, and in
# bf16 1.74 ms against 2.35 ms (AdamW); its host path per step was also shorter (157 us against 251).
AUTO_ORDER = ("cuda", "triton", "torch")
# With this set to 1, backend "cuda" also takes CPU parameters: the kernel body compiled for the host
# walks the same tables one work item at a time (csrc/fused_step.cuh). Like TRITON_INTERPRET, a test tool.
CUDA_ON_CPU = "UBA_FUSED_CUDA_ON_CPU"
# Backends that read the gradients from GroupWork.grads; the kernel backends walk device tables instead.
READS_GRADS = ("torch", "cpu")
# What the kernels store; they compute in float32 (float64 parameters take backend "cpu" or "torch").
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


def _triton_reason(device: torch.device) -> str | None:
    try:
        importlib.import_module(f"{__name__}.triton")
    except ImportError as exc:
        return f"triton cannot be imported ({exc})"
    except NotImplementedError as exc:
        return str(exc)
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") == "1" and device.type == "cpu":
        return None
    return (f"the Triton kernels need CUDA parameters, got {device} (TRITON_INTERPRET=1 takes CPU ones, as a slow "
            f"test mode)")


def _cuda_reason(device: torch.device) -> str | None:
    from .. import _ext

    if _ext._C is None:
        return _ext.ERROR
    try:
        importlib.import_module(f"{__name__}.cuda")
    except NotImplementedError as exc:
        return str(exc)
    if device.type == "cuda":
        return None
    if os.environ.get(CUDA_ON_CPU) == "1" and device.type == "cpu":
        return None
    return f"the CUDA kernels need CUDA parameters, got {device} ({CUDA_ON_CPU}=1 takes CPU ones, as a slow test mode)"


def _dtype_reason(dtypes: Iterable[torch.dtype]) -> str | None:
    bad = sorted({str(d) for d in dtypes if d not in KERNEL_DTYPES})
    return f"the kernels take {', '.join(map(str, KERNEL_DTYPES))} parameters, got {', '.join(bad)}" if bad else None


def availability(device: torch.device | str, dtypes: Iterable[torch.dtype] = ()) -> dict[str, str | None]:
    """For each backend: None if it can run parameters of ``dtypes`` on ``device``, else the reason it cannot."""
    device = torch.device(device)
    dtype_reason = _dtype_reason(dtypes)
    out: dict[str, str | None] = {"torch": None}
    out["cpu"] = None if device.type == "cpu" else f"backend 'cpu' updates CPU parameters, got {device}"
    for name, reason in (("triton", _triton_reason(device)), ("cuda", _cuda_reason(device))):
        out[name] = reason or dtype_reason
    return out


def resolve(requested: str, device: torch.device | str, dtypes: Iterable[torch.dtype] = ()) -> str:
    """The backend that runs parameters of ``dtypes`` on ``device`` when ``requested`` is asked for."""
    if requested not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {requested!r}")
    device = torch.device(device)
    avail = availability(device, dtypes)
    if requested == "auto":
        # The interpreter and the host run of the CUDA kernel are test tools, never the path for CPU tensors:
        # those take torch's own fast CPU paths ("cpu"); any other device the readable per-tensor spec.
        order = AUTO_ORDER if device.type == "cuda" else ("cpu", "torch")
        return next(name for name in order if avail[name] is None)
    reason = avail[requested]
    if reason is not None:
        raise BackendUnavailableError(f"backend={requested!r} is unavailable for parameters on {device}: {reason}")
    return requested


def check_params(backend: str, labels: Sequence[str], params: Sequence[torch.Tensor]) -> None:
    """Raise unless ``backend`` can walk one param group of ``params`` (named by ``labels``): a kernel backend
    walks device tables, so its parameters must share one device and be dense."""
    if backend in READS_GRADS:
        return
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"backend={backend!r} needs every parameter of a group on one device, got {devices}")
    for what, p in zip(labels, params):
        if not is_dense(local(p)):
            raise ValueError(f"{what} (shape {tuple(local(p).shape)}, strides {local(p).stride()}) has gaps or "
                             f"overlaps in memory; backend={backend!r} walks parameters linearly: use "
                             f"backend='torch' for it, or a dense parameter")


PrepareFn = Callable[[str, Sequence[GroupWork], StepCache, "GradSource | None"], Step]


def capturing(devices: Sequence[torch.device] = ()) -> bool:
    """Whether the current stream of any of ``devices`` (an optimizer's CUDA devices) is capturing a CUDA graph (a
    step then keeps what the graph reads). Each device's own current stream is asked, whichever device is
    current. An optimizer with no CUDA parameters passes none and gets False without asking CUDA, which cost 40
    us of a CPU step on a 2-core VM once the update had flushed the caches (benchmarks/RESULTS.md)."""
    for device in devices:
        if device.index == torch.cuda.current_device():
            if torch.cuda.is_current_stream_capturing():
                return True
        else:
            with torch.cuda.device(device):
                if torch.cuda.is_current_stream_capturing():
                    return True
    return False


@functools.cache  # called every step: skip the import machinery after the first time
def get(name: str) -> PrepareFn:
    module = {"torch": "reference", "cpu": "cpu", "triton": "triton", "cuda": "cuda"}[name]
    return importlib.import_module(f"{__name__}.{module}").prepare
