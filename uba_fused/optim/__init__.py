from .adagrad import Adagrad, AdagradNorm
from .adamp import AdamP, SGDP
from .adam import AdaBelief, AdamW, Adan
from .diffgrad import DiffGrad
from .lamb import LAMB
from .lars import LARS
from .base import FusedOptimizer
from .lion import Lion
from .sgd import SGD
from .sgd_sai import SGDSaI

__all__ = ["AdamW", "AdaBelief", "Adan", "Lion", "SGD", "Adagrad", "AdagradNorm", "LARS", "LAMB", "DiffGrad", "AdamP",
           "SGDP", "SGDSaI", "FusedOptimizer"]
