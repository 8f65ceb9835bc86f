"""8-bit optimizer state (``state_dtype=torch.int8``): which parameters keep it, and how it is made and converted.

A parameter of at least registry.QUANTIZE_MIN elements keeps each state slot as int8 codes laid out as the parameter,
and the float32 scales of every slot's blocks in its state ``"absmax"`` ([slots, blocks]; backends/rounding.py:
quantize defines both). A smaller one keeps float32 state. The codes mean nothing without their scales, and a block is
a run of the parameter's memory: converting (a state-dict load, a changed ``state_dtype`` or layout) always goes
through the float32 values, rounded to nearest on the way back into codes.
"""

from __future__ import annotations

import torch

from .. import registry
from ..backends import rounding
from ..backends.work import local

ABSMAX = "absmax"


def state_dtype_of(group: dict, p: torch.Tensor) -> torch.dtype:
    """The dtype of ``p``'s state buffers in ``group``: its ``state_dtype`` (None: the parameter's own), float32 for
    8-bit state of a parameter under registry.QUANTIZE_MIN elements."""
    dtype = group.get("state_dtype") or p.dtype
    if dtype == torch.int8 and p.numel() < registry.QUANTIZE_MIN:
        return torch.float32
    return dtype


def blocks(p: torch.Tensor) -> int:
    """Blocks of registry.QBLOCK elements in ``p``'s (local) memory."""
    return -(-local(p).numel() // registry.QBLOCK)


def new_absmax(p: torch.Tensor, slots: int) -> torch.Tensor:
    """The block scales of ``slots`` state slots of 8-bit state for ``p``, all 0 (codes of 0 then hold 0)."""
    return torch.zeros(slots, blocks(p), dtype=torch.float32, device=p.device)


def value(st: dict, rule: str, name: str) -> torch.Tensor:
    """State slot ``name`` of a parameter's state ``st`` as its values: 8-bit codes decoded (float32), else itself."""
    v = st[name]
    if v.dtype != torch.int8:
        return v
    j, positive = registry.RULES[rule].slot(name)
    return rounding.dequantize(v, st[ABSMAX][j], positive, registry.QBLOCK)


def scales_fit(st: dict, rule: str, p: torch.Tensor) -> bool:
    """Whether ``st`` holds block scales of ``rule``'s slots for ``p``."""
    scales = st.get(ABSMAX)
    return isinstance(scales, torch.Tensor) and scales.dtype == torch.float32 and \
        tuple(scales.shape) == (len(registry.RULES[rule].states), blocks(p))


def fit(p: torch.Tensor, st: dict, rule: str, names: tuple[str, ...], dtype: torch.dtype, zeros_like,
        where: str) -> bool:
    """Make the 8-bit slots among ``names`` of ``p``'s state ``st`` fit: decoded into ``dtype`` where the group keeps
    another (``zeros_like(p, dtype)`` makes a buffer), coded anew in ``p``'s layout where it changed; scales only
    beside codes. Whether anything changed; raises (naming ``where``) for codes without their scales."""
    coded = [n for n in names if isinstance(st.get(n), torch.Tensor) and st[n].dtype == torch.int8]
    if coded and not scales_fit(st, rule, p):
        raise ValueError(f"{where} keeps 8-bit state {coded} without its block scales state[{ABSMAX!r}] (float32 "
                         f"[{len(registry.RULES[rule].states)}, {blocks(p)}]): the codes mean nothing without them. "
                         f"Drop the parameter's state (del opt.state[p]) to start it afresh")
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
    codes, absmax = rounding.quantize(x.float(), positive, None, registry.QBLOCK)
    st[name].copy_(codes)
    st[ABSMAX][j].copy_(absmax)


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
            st[ABSMAX][j].copy_(saved[ABSMAX][j])
        else:
            remake(p, st, rule, n, value(saved, rule, n), dtype, zeros_like)
        done.append(n)
    return done
