"""Parameter lists shaped like real models, for the throughput benchmark."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    shapes: tuple[tuple[int, ...], ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def gpt2_shapes(d: int, layers: int, vocab: int = 50304, ctx: int = 1024) -> tuple[tuple[int, ...], ...]:
    """GPT-2's parameters (tied embeddings): 4 + 12 * layers tensors."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),        # ln_1, attention
                   (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]    # ln_2, MLP
    return tuple(shapes + [(d,), (d,)])                                   # ln_f


PRESETS = {
    "gpt2-small": Preset("gpt2-small", gpt2_shapes(768, 12)),      # 148 tensors, 124.5M
    "gpt2-medium": Preset("gpt2-medium", gpt2_shapes(1024, 24)),   # 292 tensors, 354.9M
    "gpt2-1.3b": Preset("gpt2-1.3b", gpt2_shapes(2048, 24)),       # 292 tensors, 1313.7M
    "cpu-small": Preset("cpu-small", gpt2_shapes(128, 4, vocab=4096, ctx=256)),  # 52 tensors, 1.4M
}
