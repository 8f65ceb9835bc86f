"""8-bit optimizer state (``state_dtype=torch.int8``): which parameters keep it, and how it is made and converted.

A parameter that keeps 8-bit state (``quantized``) keeps each state slot as int8 codes laid out as the parameter, and
the float32 scales of every slot's blocks in its state ``"absmax"`` (backends/rounding.py: quantize defines both). A
block is a run of registry.QBLOCK elements of the parameter's memory. Where each row (a slice along dim 0) holds whole
blocks, the scales are shaped [slots, rows, blocks per row], else [slots, blocks]: the same memory either way, which
the kernels walk as [slots, blocks].

DTensor parameters (FSDP2, HSDP) keep 8-bit state where that row shape exists and every shard is a set of whole rows
(each ``Shard`` placement on dim 0): a shard boundary is then a block boundary, each rank quantizes the blocks of its
own rows, and the scales are a DTensor placed as the rows are (Shard(0) of the parameter is Shard(1) of the scales),
which torch.distributed.checkpoint saves and reshards with the codes. Any other DTensor parameter keeps float32
state, as does a parameter under registry.QUANTIZE_MIN elements. The codes mean nothing without their scales:
converting (a state-dict load, a changed ``state_dtype`` or layout) always goes through the float32 values, rounded
to nearest on the way back into codes.
"""

from __future__ import annotations

import torch

from .. import registry
from ..backends import rounding
from ..backends.work import dtensor_class, is_dtensor, local, placed_like

ABSMAX = "absmax"


def _row_blocks(p: torch.Tensor) -> int | None:
    """Blocks per row of ``p`` where every row (a slice along dim 0) holds whole blocks of registry.QBLOCK, else
    None."""
    if p.dim() < 2 or p.shape[0] == 0 or p.numel() // p.shape[0] % registry.QBLOCK:
        return None
    return p.numel() // p.shape[0] // registry.QBLOCK


def _by_rows(p: torch.Tensor) -> bool:
    """Whether DTensor ``p``'s local shard is whole rows, in blocks: row-blocked, contiguous, each placement
    Replicate() or Shard(0) (FSDP2's and HSDP's)."""
    from torch.distributed.tensor import Shard  # loaded: p is a DTensor
    return _row_blocks(p) is not None and local(p).is_contiguous() and \
        all(pl.is_replicate() or pl == Shard(0) for pl in p.placements)


def quantized(p: torch.Tensor) -> bool:
    """Whether ``p`` keeps 8-bit state in a group that asks for it: at least registry.QUANTIZE_MIN elements, and for a
    DTensor, a shard of whole rows in whole blocks (module docstring)."""
    return p.numel() >= registry.QUANTIZE_MIN and (not is_dtensor(p) or _by_rows(p))


def state_dtype_of(group: dict, p: torch.Tensor) -> torch.dtype:
    """The dtype of ``p``'s state buffers in ``group``: its ``state_dtype`` (None: the parameter's own), float32 for
    8-bit state of a parameter that cannot keep it (``quantized``)."""
    dtype = group.get("state_dtype") or p.dtype
    if dtype == torch.int8 and not quantized(p):
        return torch.float32
    return dtype


def scales_shape(p: torch.Tensor, slots: int) -> tuple[int, ...]:
    """The (global) shape of the block scales of ``slots`` state slots of ``p``."""
    per_row = _row_blocks(p)
    return (slots, -(-p.numel() // registry.QBLOCK)) if per_row is None else (slots, p.shape[0], per_row)


def new_absmax(p: torch.Tensor, slots: int) -> torch.Tensor:
    """The block scales of ``slots`` state slots of 8-bit state for ``p``, all 0 (codes of 0 then hold 0): for a
    DTensor, a DTensor placed as its rows."""
    shape = scales_shape(p, slots)
    if not is_dtensor(p):
        return torch.zeros(shape, dtype=torch.float32, device=p.device)
    mine = torch.zeros(slots, local(p).shape[0], *shape[2:], dtype=torch.float32, device=p.device)
    return dtensor_class().from_local(mine, p.device_mesh, _scales_placements(p), run_check=False,
                                      shape=torch.Size(shape), stride=torch.empty(shape, device="meta").stride())


def _scales_placements(p: torch.Tensor) -> tuple:
    """How the scales of DTensor ``p`` (whose shards are whole rows: ``_by_rows``) are placed: as its rows, which
    are their dim 1."""
    from torch.distributed.tensor import Shard
    return tuple(Shard(1) if pl == Shard(0) else pl for pl in p.placements)  # any other: Replicate()


def flat(st: dict) -> torch.Tensor | None:
    """The local block scales of a parameter's state ``st`` as the kernels walk them, [slots, blocks] (a view); None
    without 8-bit state."""
    scales = st.get(ABSMAX)
    return None if scales is None else local(scales).flatten(1)


def value(st: dict, rule: str, name: str) -> torch.Tensor:
    """State slot ``name`` of a parameter's state ``st`` as its values: 8-bit codes decoded (float32, placed as the
    codes), else itself."""
    v = st[name]
    if v.dtype != torch.int8:
        return v
    j, positive = registry.RULES[rule].slot(name)
    return placed_like(rounding.dequantize(local(v), flat(st)[j], positive, registry.QBLOCK), v)


def scales_fit(st: dict, rule: str, p: torch.Tensor) -> bool:
    """Whether ``st`` holds block scales of ``rule``'s slots for ``p``, placed as ``new_absmax`` places them."""
    scales = st.get(ABSMAX)
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32:
        return False
    return tuple(scales.shape) == scales_shape(p, len(registry.RULES[rule].states)) and \
        is_dtensor(scales) == is_dtensor(p) and (not is_dtensor(p) or scales.placements == _scales_placements(p))


def missing(rule: str, p: torch.Tensor) -> str:
    """How an error names the block scales ``p``'s 8-bit state lacks."""
    return f"block scales [{ABSMAX!r}] (float32 {list(scales_shape(p, len(registry.RULES[rule].states)))})"


def fit(p: torch.Tensor, st: dict, rule: str, names: tuple[str, ...], dtype: torch.dtype, zeros_like,
        where: str) -> bool:
    """Make the 8-bit slots among ``names`` of ``p``'s state ``st`` fit: decoded into ``dtype`` where the group keeps
    another (``zeros_like(p, dtype)`` makes a buffer), coded anew in ``p``'s layout where it changed; scales only
    beside codes. Whether anything changed; raises (naming ``where``) for codes without their scales."""
    coded = [n for n in names if isinstance(st.get(n), torch.Tensor) and st[n].dtype == torch.int8]
    if coded and not scales_fit(st, rule, p):
        raise ValueError(f"{where} keeps 8-bit state {coded} without its {missing(rule, p)}: the codes mean nothing "
                         f"without them. Drop the parameter's state (del opt.state[p]) to start it afresh")
    changed = False
    for n in coded:
        if dtype != torch.int8 or local(st[n]).stride() != local(p).stride():
            remake(p, st, rule, n, value(st, rule, n), dtype, zeros_like)
            changed = True
    if ABSMAX in st and not any(isinstance(st.get(n), torch.Tensor) and st[n].dtype == torch.int8 for n in names):
        del st[ABSMAX]
        changed = True
    return changed


def remake(p: torch.Tensor, st: dict, rule: str, name: str, x: torch.Tensor, dtype: torch.dtype, zeros_like) -> None:
    """Slot ``name`` of ``p``'s state ``st`` made anew in ``dtype``, laid out as ``p``, holding the values ``x``: coded
    to nearest (put) when 8-bit."""
    if dtype != torch.int8:
        st[name] = zeros_like(p, dtype).copy_(x)
        return
    st[name] = zeros_like(p, torch.int8)
    put(st, rule, name, zeros_like(p, torch.float32).copy_(x))


def put(st: dict, rule: str, name: str, x: torch.Tensor) -> None:
    """Write float values ``x`` (laid out as the codes ``st[name]``) into 8-bit slot ``name``, rounded to nearest (its
    scales made, all 0, if ``st`` has none)."""
    if ABSMAX not in st:
        st[ABSMAX] = new_absmax(x, len(registry.RULES[rule].states))
    j, positive = registry.RULES[rule].slot(name)
    codes, absmax = rounding.quantize(local(x).float(), positive, None, registry.QBLOCK)
    local(st[name]).copy_(codes)
    flat(st)[j].copy_(absmax)


def load(p: torch.Tensor, st: dict, saved: dict, rule: str, names: tuple[str, ...], dtype: torch.dtype,
         zeros_like) -> list[str]:
    """After torch.optim's load (which cast every saved tensor to ``p``'s dtype) of a parameter's ``saved`` state into
    ``st``: each slot among ``names`` that was saved in 8 bits, or is kept in 8 bits (``dtype``), taken from
    ``saved``: codes and scales as saved where both are 8-bit in ``p``'s layout (bit for bit), else through the
    values (decoded, and coded to nearest). The slots it wrote."""
    st.pop(ABSMAX, None)
    done = []
    for n in names:
        v = saved.get(n)
        if not isinstance(v, torch.Tensor) or torch.int8 not in (v.dtype, dtype):
            continue
        if v.dtype == torch.int8 and dtype == torch.int8 and local(v).stride() == local(p).stride():
            st[n] = zeros_like(p, torch.int8).copy_(v)
            if ABSMAX not in st:
                st[ABSMAX] = new_absmax(p, len(registry.RULES[rule].states))
            j = registry.RULES[rule].slot(n)[0]
            flat(st)[j].copy_(flat(saved)[j])
        else:
            remake(p, st, rule, n, value(saved, rule, n), dtype, zeros_like)
        done.append(n)
    return done
