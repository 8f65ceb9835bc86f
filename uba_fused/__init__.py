"""uba_fused: fused optimizer steps with the UBA learning-rate schedule computed on the device."""

from .backends import BackendUnavailableError, CaptureError
from .batch_size import NormTest
from .optim import (LAMB, LARS, SGDP, SGDSaI, AdamP, DiffGrad, SGD, AdaBelief, Adagrad, AdagradNorm, AdamW, Adan,
                    FusedOptimizer, Lion)
from .schedules import REX, UBA, AppliedLR, Constant, Cosine, Linear, LRScheduler, Refined, Schedule, Table

__version__ = "0.1.0"

__all__ = ["AdamW", "AdaBelief", "Adan", "Lion", "SGD", "Adagrad", "AdagradNorm", "LARS", "LAMB", "DiffGrad", "AdamP",
           "SGDP", "SGDSaI", "FusedOptimizer", "UBA", "Cosine", "Linear", "REX", "Constant", "Table", "Refined",
           "Schedule", "LRScheduler", "AppliedLR", "NormTest", "BackendUnavailableError", "CaptureError"]
