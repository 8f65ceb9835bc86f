"""Loads the compiled extension ``uba_fused._C`` if it was built, and keeps the reason if not."""

from __future__ import annotations

from types import ModuleType

_C: ModuleType | None
ERROR: str | None
try:
    from . import _C  # type: ignore[attr-defined]

    ERROR = None
except ImportError as exc:  # built without nvcc, or against another torch
    _C = None
    ERROR = (f"the compiled extension uba_fused._C is not available ({exc}); it is built by "
             "`pip install --no-build-isolation -e .` when nvcc and a CUDA build of torch are present")
