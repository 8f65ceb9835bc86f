from .adabelief import AdaBelief
from .adamw import AdamW
from .base import FusedOptimizer
from .lion import Lion
from .sgd import SGD

__all__ = ["AdamW", "AdaBelief", "Lion", "SGD", "FusedOptimizer"]
