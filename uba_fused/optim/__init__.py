"""The optimizer classes: each module lists its public classes in ``__all__``, gathered here."""

from . import adam, base, lion, sgd
from .adam import *  # noqa: F403
from .base import FusedOptimizer
from .lion import *  # noqa: F403
from .sgd import *  # noqa: F403

__all__ = [*adam.__all__, *lion.__all__, *sgd.__all__, *base.__all__]
