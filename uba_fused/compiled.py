"""The step as a ``torch.library`` custom op, so that ``torch.compile`` traces through ``opt.step()`` without a graph
break: ``torch.compile(train_step, fullgraph=True)`` and ``torch.compile(opt.step)``.

``uba_fused::step(int key, Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)[] state, Tensor? grad_scale,
Tensor? found_inf) -> ()`` runs one step of the
optimizer registered under ``key`` (backends/step.py's ``run``, with every check it makes: a parameter or state
buffer moved since the tables were built rebuilds them, or raises under a captured graph). Its arguments are what the
step reads and writes that a graph may also see:

- ``params``: every parameter of every group, in order (updated in place);
- ``grads``: their gradients as the graph has them (None for one without), which the step applies: where backward
  runs inside the graph, ``p.grad`` is only assigned after it, so the op binds these for the step and puts
  ``p.grad`` back;
- ``state``: every tensor the step writes besides the parameters, as ``Args`` lists them when the tables are built
  (each group's counter and applied lr, every parameter's state, the history of ``record_grad_norms`` and
  AdaGrad-Norm's sum), a view as its base (the step counts: one vector per device), so that no two overlap;
- ``grad_scale``, ``found_inf``: what GradScaler hands the step as the optimizer's attributes (None without it), as
  the traced code sees them: an attribute set inside a compiled function is only set on the object after its graph.

Nothing else reaches the graph: hyper-parameters, the schedule and the device tables are read by the op when it
runs, so a changed lr (a float set in the group, or a tensor lr filled in place) or an advanced step recompiles
nothing. The fake implementation changes nothing (the op returns nothing and only writes its inputs).

Where functionalization hands the op copies of its mutated inputs rather than the inputs themselves (Inductor
re-inplaces them when it can; aot_eager copies each), the op loads each copy into the
optimizer's own tensor, steps, and writes the result back into the copy, which the graph then copies into the input:
the same values either way, and what the op writes depends on its arguments' values, not on which tensors they are
(what ``torch.library.opcheck`` runs it on: copies).

The lists are made when a param group is set up and by each step that builds the tables (``Args``; backends/step.py's
``_hold``). A step that makes state (the first) lists more tensors, so the next call of a compiled function compiles
once more; after one eager step, nothing recompiles.

Two kinds of parameters keep the step outside the graph (a graph break):

- parameters that share a storage (views of one flat buffer): as mutable arguments in one storage, Inductor (torch
  2.11) wrote them back wrongly (NaN parameters);
- DTensor parameters. Handing the op their local shards traces, and steps right on one rank; but under FSDP2 on 2
  ranks Dynamo (torch 2.14) fails building its guards on the gradients, views into FSDP2's reduce-scatter buffer (an
  IndexError in the shape environment's guards), and leaving the gradients out of the graph would apply stale ones
  where backward runs inside it.
"""

from __future__ import annotations

import itertools
import sys
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .backends import step as pipeline
from .backends.work import is_dtensor

if TYPE_CHECKING:
    from .optim.base import FusedOptimizer

_OPTIMIZERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_KEYS = itertools.count()


@dataclass
class Args:
    """What a compiled graph hands ``uba_fused::step`` for one optimizer (module docstring)."""

    key: int
    params: list[torch.Tensor]
    state: list[torch.Tensor]


def key_of(opt: FusedOptimizer) -> int:
    """The optimizer's key in the op's registry (made on first use; the registry holds it weakly)."""
    key = getattr(opt, "_graph_key", None)
    if key is None:
        key = opt._graph_key = next(_KEYS)
        _OPTIMIZERS[key] = opt
    return key


def args_of(opt: FusedOptimizer) -> Args | None:
    """The op's arguments as the optimizer holds its tensors now; None where the op cannot take them: DTensor
    parameters (module docstring), and parameters that share a storage (views of one flat buffer), which the op's
    mutable arguments must not (below). Their step stays outside the graph."""
    params = [p for g in opt.param_groups for p in g["params"]]
    if any(is_dtensor(p) for p in params):
        return None
    stored = [p.untyped_storage().data_ptr() for p in params if p.numel()]  # (an empty one has none)
    if len(set(stored)) < len(stored):
        return None
    state = [t for gi, g in enumerate(opt.param_groups) for t in (g["schedule_step"], opt._last_lr[gi])]
    for p in params:
        state += [v for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
    first = opt.param_groups[0]
    state += [first[k] for k in ("grad_norms", "norm_sum") if isinstance(first.get(k), torch.Tensor)]
    if opt._grad_norm is not None:
        state.append(opt._grad_norm)
    # No two mutable arguments may overlap: where they did (the step counts, 0-dim views of one vector per device:
    # FusedOptimizer._new_steps), Inductor (torch 2.11) wrote back some of them and not others, so the counts fell
    # behind. So a view is handed over as its base, once; the step writes the base's elements in place either way.
    state = list({id(r): r for r in (t if t._base is None else t._base for t in state)}.values())
    for t in state:  # torch._dynamo.mark_static_address(t), without importing Dynamo (1.4 s) where nothing compiles:
        t._dynamo_static_input_type = "unguarded"  # reduce-overhead's CUDA graphs take them where they are
    return Args(key_of(opt), params, state)


@torch.library.custom_op("uba_fused::step", mutates_args=("params", "state"))
def fused_step(key: int, params: list[torch.Tensor], grads: list[torch.Tensor | None], state: list[torch.Tensor],
               grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None) -> None:
    """One step of the optimizer registered under ``key`` (module docstring)."""
    opt = _OPTIMIZERS.get(key)
    if opt is None:
        raise RuntimeError(f"uba_fused::step: no optimizer is registered under key {key} (it was garbage-collected "
                           f"while a compiled graph still calls its step)")
    own = [p for g in opt.param_groups for p in g["params"]]
    if len(own) != len(params) or len(grads) != len(params):
        raise RuntimeError(f"uba_fused::step: the graph passed {len(params)} parameters and {len(grads)} gradients, "
                           f"the optimizer has {len(own)}: recompile after changing its param groups")
    # Inputs that functionalization copied (Inductor re-inplaces what it can; aot_eager copies every one): the step
    # starts from their values and writes its results back into them, which the graph then copies into the inputs
    mine = own + (opt._graph_args.state if opt._graph_args and len(opt._graph_args.state) == len(state) else [])
    copies = [(a, b) for a, b in zip(params + state, mine) if a is not b and a.data_ptr() != b.data_ptr()
              and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device]
    kept = [p.grad for p in own]
    amp = {name: getattr(opt, name, _UNSET) for name in _AMP}
    with torch.no_grad():
        for a, b in copies:
            b.copy_(a)
        try:
            for p, g in zip(own, grads):
                if g is not p.grad:
                    p.grad = g
            for name, value in zip(_AMP, (grad_scale, found_inf)):
                setattr(opt, name, value)
            pipeline.run(opt)
        finally:
            for p, g in zip(own, kept):
                p.grad = g
            for name, value in amp.items():
                if value is _UNSET:
                    delattr(opt, name)
                else:
                    setattr(opt, name, value)
        for a, b in copies:
            a.copy_(b)


@fused_step.register_fake
def _(key: int, params: list[torch.Tensor], grads: list[torch.Tensor | None], state: list[torch.Tensor],
      grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None) -> None:
    return None


_AMP = ("grad_scale", "found_inf")  # (the attributes GradScaler.step sets: backends/step.py's _amp reads them)
_UNSET = object()


def step(opt: FusedOptimizer) -> None:
    """``opt.step()`` under torch.compile (after its closure): the op, with the optimizer's arguments (``Args``); the
    step outside the graph where there are none (``args_of``: DTensor parameters, parameters sharing a storage)."""
    args = opt._graph_args
    if args is None:
        _outside_graphs(opt)
        return
    amp = pipeline._amp(opt)  # (GradScaler's hand-over, checked as the eager step checks it)
    fused_step(args.key, args.params, [p.grad for p in args.params], args.state,
               *((None, None) if amp is None else (amp.grad_scale, amp.found_inf)))


_frames_skipped = False


def skip_eager_frames() -> None:
    """Where Dynamo is loaded, mark the eager step (backends/step.py's ``run`` and all it calls) as code Dynamo runs as
    it is and never compiles: a ``step()`` entered eagerly while a compiled function runs (from a frame Dynamo leaves
    uncompiled, as GradScaler.step) would otherwise be traced as a frame of its own. Once; a flag's read after it, and
    before Dynamo is imported."""
    global _frames_skipped
    if _frames_skipped or "torch._dynamo" not in sys.modules:
        return
    _frames_skipped = True
    try:
        from torch._dynamo.eval_frame import set_code_exec_strategy
        from torch._dynamo.types import FrameAction, FrameExecStrategy
    except ImportError:  # (a torch without per-code strategies: Dynamo may trace it, as before)
        return
    set_code_exec_strategy(pipeline.run.__code__, FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP))


# The step the op cannot take (args_of): a graph break (torch's lazy form of
# torch.compiler.disable, which imports torch._dynamo when first called, under torch.compile, where it is loaded).
_outside_graphs = getattr(torch, "_disable_dynamo", torch.compiler.disable)(pipeline.run)
