"""uba_fused: fused optimizer steps with the UBA learning-rate schedule computed on the device."""

from .backends import BackendUnavailableError, CaptureError
from . import optim
from .optim import *  # noqa: F403  (every optimizer class)
from .schedules import REX, UBA, AppliedLR, Constant, Cosine, Linear, LRScheduler, Schedule

__version__ = "0.1.0"

__all__ = [*optim.__all__, "UBA", "Cosine", "Linear", "REX", "Constant",
           "Schedule", "LRScheduler", "AppliedLR", "BackendUnavailableError", "CaptureError"]
