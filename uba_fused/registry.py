"""The one registry: every name that Python, Triton and C++ share, with the number each side knows it by.

- ``RULES``: one ``Rule`` per update rule. It gives the state buffers in the kernels' slot order (and which of them
  are never negative), the rule's columns of the group table with their host values (computed here once, in float64,
  and read by every backend, the readable reference included), and the tensors a step streams.
- ``SCHEDULE_KINDS``: the schedule families, in the kernels' kind order (``schedules.py`` defines them).
- The device tables' columns (``TENSOR_COLS``, ``GROUP_COLS``), the kernel dtypes, the parameter codecs and
  the (parameter dtype, state dtype, codec, state rounding) storages (``DTYPES``, ``CODECS``, ``STATE_ROUNDINGS``,
  ``STORAGES``), 8-bit state's blocks (``QBLOCK``, ``QUANTIZE_MIN``), ``CHUNK`` and ``NO_GRAD`` (``backends/plan.py``
  documents the tables).

Numbers are positions in these tuples, never written anywhere by hand. ``csrc/registry.h`` is generated
from this file (``python uba_fused/registry.py``; setup.py does it before each build, and a test keeps the
committed copy current). The compiled extension exports the registry it was built from, and backend
"cuda" refuses to run when that differs from this one (a stale build), saying so.

This module imports nothing outside the standard library: setup.py loads it by path, before anything
is built.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

# -- the device tables (backends/plan.py) ---------------------------------------------------------------
# Per tensor, int64: addresses of the parameter, its gradient's slot in the gradient table, the step count's
# address, sizes, the address of its master slot (CODECS), the address of its 8-bit state's block scales (QUANTIZED),
# the address of its per-tensor float32 state (Rule.scalar); then one address per state slot of the rule
# (STATE_COL + i).
TENSOR_COLS = ("param", "grad_slot", "step", "numel", "group", "info", "master", "absmax", "scalar")
STATE_COL = len(TENSOR_COLS)
# Per group, float64: what every rule reads (the lr and its schedule, gradient clipping), then the rule's own
# (Rule.consts).
GROUP_COLS = ("lr", "kind", "warmup", "total", "min_ratio", "phi", "has_state", "max_grad_norm", "clip_eps", "seed")
# Per group, int64: the addresses of its step counter (int64, schedule_step), where the applied lr is written (float32,
# lr_out) and its schedule's table (float32, schedules.Table; 0 for another kind).
GROUP_ADDRESSES = ("counter", "lr_out", "table")
DTYPES = ("float32", "bfloat16", "float16", "int8")  # what the kernels store (they compute in float32; int8: QUANTIZED)
# How a parameter is read before its update and written after it (the master_weights option):
# - "nearest": as it is, rounded to nearest on the way back (a 16-bit parameter loses every update smaller than
#   half its last bit);
# - "remainder": a bfloat16 parameter with the 16 low bits of its float32 master in its state "master" (int16): the
#   two are the master, bit for bit (the parameter is the master rounded to nearest, ties away from zero: the
#   rounding whose remainder fits 16 bits);
# - "copy": a float16 parameter with a float32 copy of its master in its state "master" (float16 is not the top half
#   of a float32);
# - "stochastic": a 16-bit parameter rounded stochastically, from random bits keyed by the seed, the group's step
#   counter, the tensor and the element (Philox 4x32-10);
# - "correction": a bfloat16 parameter with the next 8 bits of its master in its state "master" (int8): a 24-bit
#   master (15 mantissa bits), to which each update's float32 result is rounded stochastically (from the random bits
#   of "stochastic"), then split as "remainder" splits (FlashOptim's 3-byte split; 1 byte less than "remainder").
CODECS = ("nearest", "remainder", "copy", "stochastic", "correction")
# How 16-bit state is written (the state_rounding option): to nearest, or stochastically from the random bits of
# "stochastic" above, drawn from a stream of their own per state slot (backends/rounding.py: random_bits). Float32 state
# is written as it is ("nearest"); stochastic rounding is built for bfloat16 state.
STATE_ROUNDINGS = ("nearest", "stochastic")
# 8-bit state (state_dtype=torch.int8; backends/rounding.py: quantize is the spec): each state slot of a parameter of at
# least QUANTIZE_MIN elements is kept as int8 codes, one per element, and one float32 scale per block of QBLOCK elements
# (element i in block i // QBLOCK of the tensor's memory, whatever the launch) in the parameter's state "absmax"
# (float32 [slots, blocks]). A smaller parameter keeps float32 state (as bitsandbytes and torchao do below 4096).
QBLOCK = 256
QUANTIZE_MIN = 4096
QUANTIZED = "int8"
MASTER_DTYPE = {"remainder": "int16", "copy": "float32", "correction": "int8"}  # the codecs that keep a "master"
MASTER_WEIGHTS = (None, "exact", "stochastic", "8bit")  # the option's values


def codec(master_weights: str | None, dtype: str) -> str | None:
    """The codec of a ``dtype`` parameter in a group whose ``master_weights`` is as given; None: not built."""
    if master_weights is None:
        return "nearest"
    if master_weights == "exact":
        return {"bfloat16": "remainder", "float16": "copy"}.get(dtype)
    if master_weights == "8bit":
        return "correction" if dtype == "bfloat16" else None
    return "stochastic" if master_weights == "stochastic" and dtype in ("bfloat16", "float16") else None


def state_rounding(option: str | None, state_dtype: str | None) -> str:
    """How a group rounds its 16-bit or 8-bit state (STATE_ROUNDINGS), from its ``state_rounding`` and ``state_dtype``
    options: None chooses stochastic for a 16-bit or 8-bit ``state_dtype`` asked for (rounding a moving average to
    nearest in 16 bits stalls it: 0.999 v rounds back to v), and nearest for state kept in its parameter's dtype
    (torch.optim's)."""
    if option is not None:
        return option
    return "stochastic" if state_dtype in ("bfloat16", "float16", QUANTIZED) else "nearest"


# The (parameter dtype, state dtype, codec, state rounding) storages the kernels are compiled for: one plan part (one
# launch) is one. State is kept in its parameter's dtype (torch.optim's way), in float32 for a 16-bit parameter, or in
# bfloat16 for a float32 one; bfloat16 state is rounded to nearest or stochastically (each a kernel of its own: a
# branch on it cost every kernel with 16-bit state the registers of both).
_PAIRS = (("float32", "float32"), ("bfloat16", "bfloat16"), ("float16", "float16"), ("bfloat16", "float32"),
          ("float16", "float32"), ("float32", "bfloat16"), ("float32", QUANTIZED), ("bfloat16", QUANTIZED))
# The master_weights value that chooses each codec (for a parameter of a dtype it can keep).
OPTION_OF_CODEC = {"nearest": None, "remainder": "exact", "copy": "exact", "stochastic": "stochastic",
                   "correction": "8bit"}
STORAGES = tuple((p, s, c, r) for c in CODECS for p, s in _PAIRS if codec(OPTION_OF_CODEC[c], p) == c
                 for r in STATE_ROUNDINGS if r == "nearest" or s in ("bfloat16", QUANTIZED))
STORAGE_IDS = {storage: i for i, storage in enumerate(STORAGES)}
CHUNK = 4096     # elements per work item, in both kernels
NO_GRAD = -1     # a gradient-table entry for a parameter without a gradient this step (an empty tensor's is 0)

# -- schedules (schedules.py: the formulas) ---------------------------------------------------------------
SCHEDULE_KINDS = ("constant", "uba", "cosine", "linear", "rex", "table")
KIND = {name: i for i, name in enumerate(SCHEDULE_KINDS)}


# -- update rules ---------------------------------------------------------------------------------------
def _log(b: float) -> float:
    return math.log(b) if b > 0 else -math.inf


def _betas(group: Mapping, n: int) -> dict[str, float]:
    """beta_i, 1 - beta_i and log beta_i, in float64: in float32, 1 - 0.999f is off by 1.3e-5 relative,
    which the kernels' parity tests see; log beta turns b^k into one exp in the kernels."""
    out: dict[str, float] = {}
    for i, b in enumerate(group["betas"][:n], 1):
        b = float(b)
        out.update({f"beta{i}": b, f"one_minus_beta{i}": 1.0 - b, f"log_beta{i}": _log(b)})
    return out


def _adam(group: Mapping) -> dict[str, float]:
    return {**_betas(group, 2), "eps": float(group["eps"]), "weight_decay": float(group["weight_decay"])}


def _lion(group: Mapping) -> dict[str, float]:
    return {**_betas(group, 2), "weight_decay": float(group["weight_decay"])}


def _sgd(group: Mapping) -> dict[str, float]:
    return {"momentum": float(group["momentum"]), "one_minus_dampening": 1.0 - float(group["dampening"]),
            "nesterov": float(bool(group["nesterov"])), "weight_decay": float(group["weight_decay"])}


def _adagrad(group: Mapping) -> dict[str, float]:
    return {"lr_decay": float(group["lr_decay"]), "eps": float(group["eps"]),
            "weight_decay": float(group["weight_decay"])}


def _adagrad_initial(group: Mapping) -> dict[str, float]:
    return {"sum": float(group["initial_accumulator_value"])}


def _adapts(group: Mapping) -> float:
    """Whether LARS's or LAMB's trust ratio applies (timm's rule): where the group decays, or always_adapt."""
    return float(float(group["weight_decay"]) != 0.0 or bool(group["always_adapt"]))


def _lars(group: Mapping) -> dict[str, float]:
    return {**_sgd(group), "trust_coeff": float(group["trust_coeff"]), "eps": float(group["eps"]),
            "trust_clip": float(bool(group["trust_clip"])), "adapt": _adapts(group)}


def _lamb(group: Mapping) -> dict[str, float]:
    # timm's Lamb: without grad_averaging the gradient enters m whole (beta3 = 1); without bias_correction,
    # log beta = -inf makes 1 - b^k = 1 in every backend
    (b1, b2), corrected = (float(b) for b in group["betas"]), bool(group["bias_correction"])
    return {"beta1": b1, "beta2": b2, "beta3": 1.0 - b1 if group["grad_averaging"] else 1.0,
            "one_minus_beta2": 1.0 - b2, "log_beta1": _log(b1) if corrected else -math.inf,
            "log_beta2": _log(b2) if corrected else -math.inf, "eps": float(group["eps"]),
            "weight_decay": float(group["weight_decay"]), "trust_clip": float(bool(group["trust_clip"])),
            "adapt": _adapts(group)}


def _sgd_sai(group: Mapping) -> dict[str, float]:
    m = float(group["momentum"])
    return {"momentum": m, "one_minus_momentum": 1.0 - m, "eps": float(group["eps"]),
            "weight_decay": float(group["weight_decay"])}


def _projection(group: Mapping) -> dict[str, float]:
    return {"delta": float(group["delta"]), "wd_ratio": float(group["wd_ratio"]), "eps": float(group["eps"]),
            "nesterov": float(bool(group["nesterov"]))}


def _adamp(group: Mapping) -> dict[str, float]:
    return {**_adam(group), **_projection(group)}


def _sgdp(group: Mapping) -> dict[str, float]:
    return {**_sgd(group), **_projection(group)}


def _adan(group: Mapping) -> dict[str, float]:
    return {**_betas(group, 3), "eps": float(group["eps"]), "weight_decay": float(group["weight_decay"]),
            "no_prox": float(bool(group["no_prox"]))}


_ADAM = ("beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "log_beta1", "log_beta2", "eps", "weight_decay")


def _always(group: Mapping) -> bool:
    return True


def _zeros(group: Mapping) -> dict[str, float]:
    return {}


def _torch_clip_eps(group: Mapping) -> float:
    return 1e-6  # torch.nn.utils.clip_grad_norm_'s


def _own_eps(group: Mapping) -> float:
    return float(group["eps"])


def _no_clip_eps(group: Mapping) -> float:
    return 0.0  # timm's Lamb divides by max(1, norm / max_grad_norm)


# AdamP's and SGDP's per-row sums (Rule.projects): p^2, g^2 (the gradient as applied), p g and p d (d: the direction)
# over each row of a parameter (its index along dim 0; a parameter of under 2 dims is one row, never projected).
PROJECTION = ("param", "grad", "param_grad", "param_update")
# SGD-SaI's per-tensor sums (Rule.measures): the gradient's sum and sum of squares (as backward left it) and its count
# of elements, at a tensor's first step (backends/snr.py).
GSNR = ("grad_sum", "grad", "count")


@dataclass(frozen=True)
class Rule:
    """What every layer needs to know about one update rule; the math itself is in backends/reference.py
    (the spec) and its mirrors in backends/triton.py and csrc/updates.cuh."""

    name: str
    states: tuple[str, ...]              # state buffers, in the kernels' slot order
    consts: tuple[str, ...]              # the rule's group-table columns, after GROUP_COLS
    constants: Callable[[Mapping], dict[str, float]]  # their values for a param group (float64, host side)
    streams: tuple[int, int]             # tensors loaded and stored per element by the update (its pre-pass, if it
                                         # reduces, loads one more per reduction): the bytes a step moves
    positive: tuple[str, ...] = ()       # the state slots that are never negative (averages of squares): their
                                         # 8-bit codes take the map for non-negative values (rounding.quantize)
    keeps_state: Callable[[Mapping], bool] = field(default=_always)  # SGD without momentum keeps none
    reduces: tuple[str, ...] = ()        # per-tensor sums of squares the update reads (REDUCIBLE), taken by a
                                         # pre-pass before it and summed over a tensor's shards
    initial: Callable[[Mapping], dict[str, float]] = field(default=_zeros)  # a state slot's first value where it is
                                                                          # not 0 (Adagrad's initial_accumulator_value)
    clip_eps: Callable[[Mapping], float] = field(default=_torch_clip_eps)  # see clipping()
    scalar: str | None = None            # a state of one value per tensor (beside its step count; float32, which the
                                         # kernels read, or float64 for a float64 parameter): SGD-SaI's
                                         # gsnr, which the update writes where it measures it (Rule.measures)
    grad_norms_ord: int = 2              # the gradient norm a history records (record_grad_norms) and
                                         # schedules.Refined weighs: 2 for SGD's kind (Defazio et al.'s Algorithm 1),
                                         # 1 for a rule that scales each coordinate by its own statistics (Adam's kind,
                                         # Lion's sign; their Algorithm 2)

    @property
    def id(self) -> int:
        """The rule's number in the kernels (its position in RULES)."""
        return RULE_IDS[self.name]

    def slot(self, name: str) -> tuple[int, bool]:
        """State ``name``'s slot j in the kernels' order, and whether it is never negative (its 8-bit map:
        backends/rounding.py, quantize)."""
        return self.states.index(name), name in self.positive

    @property
    def positive_bits(self) -> int:
        """Which slots are never negative, as bits (bit j: slot j): what the kernels take."""
        return sum(1 << j for j, n in enumerate(self.states) if n in self.positive)

    def state_names(self, group: Mapping) -> tuple[str, ...]:
        """The state a param group of this rule keeps per parameter (besides its step count)."""
        return self.states if self.keeps_state(group) else ()

    def row(self, group: Mapping) -> tuple[float, ...]:
        """The values of ``consts`` for a param group, in column order."""
        values = self.constants(group)
        return tuple(values[c] for c in self.consts)

    def clipping(self, group: Mapping) -> tuple[float, float]:
        """(max_grad_norm, eps) of a param group: before its update, each gradient is scaled by
        min(1, max_grad_norm / (norm + eps)), norm the L2 norm of every gradient of the optimizer's step
        (max_grad_norm 0, or none: not scaled). eps is torch.nn.utils.clip_grad_norm_'s 1e-6, so that a
        clipped step is that function followed by the step, except for Adan, whose reference clips with
        the group's own eps."""
        return float(group.get("max_grad_norm", 0.0)), self.clip_eps(group)

    @property
    def reduces_direction(self) -> bool:
        """Whether the pre-pass reduces the update's direction ("update"; LAMB, AdamP), which it computes from the
        gradient and the state without storing anything, rather than the gradient as backward left it ("grad";
        LARS)."""
        return "update" in self.reduces or self.projects

    @property
    def projects(self) -> bool:
        """Whether the rule projects its direction per row (PROJECTION: AdamP's and SGDP's sums per output channel)."""
        return self.reduces == PROJECTION

    @property
    def measures(self) -> bool:
        """Whether the rule's per-tensor sums are taken at a tensor's first step only (GSNR: SGD-SaI's g-SNR, kept in
        its scalar state), so that a step runs its pre-pass only while some tensor may not have taken one."""
        return self.reduces == GSNR

    @property
    def prepass_loads(self) -> int:
        """Tensors the per-tensor pre-pass loads per element: the parameter and the gradient, or (a rule that reduces
        its direction) everything the update loads; none for one that measures at a tensor's first step only."""
        if self.measures:
            return 0
        return self.streams[0] if self.reduces_direction else len(self.reduces)

    def bytes_per_element(self, itemsize: int) -> int:
        """Bytes a step moves per element of ``itemsize``: the update's streams and its pre-pass's reads."""
        return (sum(self.streams) + self.prepass_loads) * itemsize


RULES: dict[str, Rule] = {r.name: r for r in (
    Rule("adamw", ("exp_avg", "exp_avg_sq"), _ADAM, _adam, (4, 3), positive=("exp_avg_sq",), grad_norms_ord=1),
    Rule("adabelief", ("exp_avg", "exp_avg_var"), _ADAM, _adam, (4, 3), positive=("exp_avg_var",), grad_norms_ord=1),
    Rule("lion", ("exp_avg",), ("beta1", "beta2", "one_minus_beta1", "one_minus_beta2", "weight_decay"), _lion,
         (3, 2), grad_norms_ord=1),
    Rule("sgd", ("momentum_buffer",), ("momentum", "one_minus_dampening", "nesterov", "weight_decay"), _sgd, (3, 2),
         keeps_state=lambda group: group["momentum"] != 0),
    Rule("adan", ("exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad"),
         ("beta1", "beta2", "beta3", "one_minus_beta1", "one_minus_beta2", "one_minus_beta3", "log_beta1",
          "log_beta2", "log_beta3", "eps", "weight_decay", "no_prox"), _adan, (6, 5), positive=("exp_avg_sq",),
         clip_eps=_own_eps, grad_norms_ord=1),
    # torch.optim.Adagrad: L2 decay into the gradient, lr / (1 + (k - 1) lr_decay), the sum of squares from
    # initial_accumulator_value
    Rule("adagrad", ("sum",), ("lr_decay", "eps", "weight_decay"), _adagrad, (3, 2), positive=("sum",),
         initial=_adagrad_initial, grad_norms_ord=1),
    # timm's Lars: SGD whose gradient (with L2 decay) is scaled per tensor by trust_coeff ||p|| / (||g|| + wd ||p|| +
    # eps); its pre-pass reads p and g once more than SGD does (28 bytes per fp32 parameter against SGD's 20)
    Rule("lars", ("momentum_buffer",), ("momentum", "one_minus_dampening", "nesterov", "weight_decay", "trust_coeff",
                                        "eps", "trust_clip", "adapt"), _lars, (3, 2), reduces=("param", "grad"),
         keeps_state=lambda group: group["momentum"] != 0),
    # torch-optimizer's DiffGrad: Adam with L2 decay whose first moment is scaled per element by the friction
    # 1 / (1 + exp(-|g_prev - g|)); it keeps the last gradient (with its decay): 36 bytes per fp32 parameter
    Rule("diffgrad", ("exp_avg", "exp_avg_sq", "previous_grad"), _ADAM, _adam, (5, 4), positive=("exp_avg_sq",),
         grad_norms_ord=1),
    # timm's Lamb: Adam's direction plus L2 decay, r = m / bc1 / (sqrt(v / bc2) + eps) + wd p, times the trust ratio
    # ||p|| / ||r|| of the whole tensor. The pre-pass computes r to take its norm and stores nothing; the update
    # computes it again, bit for bit, and applies it: 44 bytes per fp32 parameter (AdamW's 28, and p, g, m, v once
    # more), where storing the moments in the pre-pass and reading them back would move 40 (state rounded to 16 or
    # 8 bits would then differ between the norm and the step)
    Rule("lamb", ("exp_avg", "exp_avg_sq"), ("beta1", "beta2", "beta3", "one_minus_beta2", "log_beta1", "log_beta2",
                                             "eps", "weight_decay", "trust_clip", "adapt"), _lamb, (4, 3),
         positive=("exp_avg_sq",), reduces=("param", "update"), clip_eps=_no_clip_eps,
         grad_norms_ord=1),
    # The adamp package's AdamP: Adam's direction d (nesterov optional) with its radial part removed where the
    # gradient is nearly orthogonal to the weight, per output channel or else per tensor, and the decoupled decay then
    # scaled by wd_ratio (backends/projection.py). The pre-pass computes d to take per-row sums of p^2,
    # g^2, p g and p d, and stores nothing: 44 bytes per fp32 parameter, as LAMB
    Rule("adamp", ("exp_avg", "exp_avg_sq"), _ADAM + ("delta", "wd_ratio", "nesterov"), _adamp, (4, 3),
         positive=("exp_avg_sq",), reduces=PROJECTION, grad_norms_ord=1),
    # The adamp package's SGDP: its momentum (from 0, with dampening; nesterov optional) projected as AdamP's, the
    # decay divided by 1 - momentum: 32 bytes per fp32 parameter (SGD's 20, and p, g, buf once more)
    Rule("sgdp", ("momentum_buffer",), ("momentum", "one_minus_dampening", "nesterov", "weight_decay", "eps", "delta",
                                        "wd_ratio"), _sgdp, (3, 2), reduces=PROJECTION),
    # The sgd-sai package's SGD_sai: each tensor's g-SNR ||g|| / (std(g) + eps) of its first gradient, kept as its
    # scalar "gsnr"; b = g at the first step, then momentum b + (1 - momentum) g; p = p (1 - lr wd) - lr gsnr b:
    # 20 bytes per fp32 parameter, as SGD (the measuring pre-pass reads each gradient at a tensor's first step only)
    Rule("sgd_sai", ("momentum_buffer",), ("momentum", "one_minus_momentum", "eps", "weight_decay"), _sgd_sai, (3, 2),
         reduces=GSNR, scalar="gsnr", keeps_state=lambda group: group["momentum"] != 0),
)}
RULE_IDS = {name: i for i, name in enumerate(RULES)}
# What a rule may reduce per tensor (Rule.reduces): the sum of squares of the parameter (as its codec reads it), then of
# the gradient as backward left it (the update scales its norm by the gradient's factor) or of the update's direction
# (computed by the pre-pass from the gradient as applied and the state, which it does not store); per row (PROJECTION);
# or the gradient's moments at a tensor's first step (GSNR).
REDUCIBLE = (("param", "grad"), ("param", "update"), PROJECTION, GSNR)
assert all(not r.reduces or r.reduces in REDUCIBLE for r in RULES.values()), "reductions are one of REDUCIBLE"
MAX_STATES = max(len(r.states) for r in RULES.values())


def group_cols(rule: str) -> tuple[str, ...]:
    """Every column of a group row of ``rule``: GROUP_COLS, then the rule's."""
    return GROUP_COLS + RULES[rule].consts


def abi() -> dict:
    """Every shared number by name: what csrc/registry.h encodes, and what uba_fused._C reports it was built
    from (``_C.REGISTRY``), so that a stale build is named, not run."""
    return {"tensor_cols": list(TENSOR_COLS), "group_cols": list(GROUP_COLS), "group_addresses": list(GROUP_ADDRESSES),
            "dtypes": list(DTYPES),
            "codecs": list(CODECS), "state_roundings": list(STATE_ROUNDINGS),
            "storages": [list(storage) for storage in STORAGES],
            "chunk": CHUNK, "no_grad": NO_GRAD, "schedule_kinds": list(SCHEDULE_KINDS), "qblock": QBLOCK,
            "rules": {r.name: {"id": r.id, "states": list(r.states), "consts": list(r.consts),
                               "positive": list(r.positive), "reduces": list(r.reduces), "scalar": r.scalar}
                      for r in RULES.values()}}


# -- csrc/registry.h ----------------------------------------------------------------------------------------
def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _enum(name: str, items: list[tuple[str, int]]) -> str:
    return f"enum {name} : int {{ " + ", ".join(f"k{_camel(n)} = {v}" for n, v in items) + " };"


def cpp_header() -> str:
    """csrc/registry.h: this module's numbers as C++ names (kernels use the names, never the numbers)."""
    lines = [
        "// Generated from uba_fused/registry.py by `python uba_fused/registry.py`: do not edit by hand.",
        "#pragma once", "", "namespace uf {", "",
        _enum("TensorCol", [(c, i) for i, c in enumerate(TENSOR_COLS)] + [("state0", STATE_COL)]),
        _enum("GroupCol", [(c, i) for i, c in enumerate(GROUP_COLS)] + [("group_cols", len(GROUP_COLS))]),
        _enum("GroupAddress", [(f"{c}_address", i) for i, c in enumerate(GROUP_ADDRESSES)]
              + [("group_addresses", len(GROUP_ADDRESSES))]),
        _enum("DType", [(d, i) for i, d in enumerate(DTYPES)] + [("num_dtypes", len(DTYPES))]),
        _enum("Codec", [(c, i) for i, c in enumerate(CODECS)] + [("num_codecs", len(CODECS))]),
        _enum("StateRounding", [(f"state_{c}", i) for i, c in enumerate(STATE_ROUNDINGS)]),
        _enum("ScheduleKind", [(k, i) for i, k in enumerate(SCHEDULE_KINDS)] + [("num_kinds", len(SCHEDULE_KINDS))]),
        _enum("RuleId", [(r, i) for i, r in enumerate(RULES)] + [("num_rules", len(RULES))]),
        "// The storages the kernels are compiled for, by id: X(id, param DType, state DType, Codec, StateRounding).",
        "#define UF_STORAGES(X) " + " ".join(f"X({i}, k{_camel(a)}, k{_camel(b)}, k{_camel(c)}, kState{_camel(r)})"
                                             for i, (a, b, c, r) in enumerate(STORAGES)),
        f"constexpr int kNumStorages = {len(STORAGES)};",
        f"constexpr int kChunk = {CHUNK};",
        f"constexpr long long kNoGrad = {NO_GRAD};",
        f"constexpr int kMaxStates = {MAX_STATES};",
        f"constexpr int kQBlock = {QBLOCK};",
        "",
        "// Each rule's group-table columns (after GroupCol), its id, its number of state slots, which of them",
        "// are never negative (Rule.positive, bit j for slot j) and how many per-tensor sums it reads (Rule.reduces):",
        "// a struct, so that a template can take it (csrc/updates.cuh).",
    ]
    for r in RULES.values():
        cols = [(c, len(GROUP_COLS) + i) for i, c in enumerate(r.consts)] + [("cols", len(GROUP_COLS) + len(r.consts))]
        lines.append(f"struct {r.name} {{ static constexpr int kId = {r.id}, kStates = {len(r.states)}, "
                     f"kPositive = {r.positive_bits}, kReduces = {len(r.reduces)}, kProjects = {int(r.projects)}, "
                     f"kMeasures = {int(r.measures)}; "
                     f"{_enum('Col', cols)} }};")
    text = json.dumps(abi(), sort_keys=True, separators=(",", ":"))
    lines += ["", "// abi() of registry.py, which uba_fused._C exports as REGISTRY.",
              f"constexpr const char* kRegistry = R\"json({text})json\";", "", "}  // namespace uf", ""]
    return "\n".join(lines)


if __name__ == "__main__":  # python uba_fused/registry.py [path]: write csrc/registry.h (or print it)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(cpp_header())
    else:
        sys.stdout.write(cpp_header())
