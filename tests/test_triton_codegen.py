"""The Triton kernel as compiled for Hopper (sm_90), without a GPU: 128-bit accesses, and registers.

- The H100 probes in shared/anchors measured 0.75 of copy bandwidth without vectorized accesses
  through table-loaded pointers and 0.98 with them: full aligned chunks must keep 128-bit accesses.
- On an H100 the kernel once used 255 registers per thread and spilled (ptxas: 532 bytes of spill
  stores for AdamW fp32, 688 for bf16); bf16 then reached only 0.70-0.74 of copy bandwidth, against
  0.93-0.94 for the CUDA kernel at 61 registers. It now takes 40-64 (triton 3.6 and 3.8). The guard:
  at most 80 registers (6 blocks of 128 threads per SM), which leaves room for another compiler's
  choices and still catches a return towards 128, and no spills.

It compiles in a subprocess because the interpreter (TRITON_INTERPRET=1) replaces triton.jit here,
and reads registers and spills from Triton's own ptxas (``ptxas -v``) on the PTX it produced.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from uba_fused import registry
from uba_fused.backends import triton as backend

RULES = ("adamw", "adabelief", "lion", "sgd", "adagrad", "adan")
# Every storage the kernels are built for, (parameter dtype, state dtype, codec, state rounding), twice: with Adan (the
# most registers) and with one of the other rules in turn, so that every rule meets many storages. Every rule with
# every storage took 105 compiles and up to 270 s of a 2-core CI machine.
CASES = [(r, *storage) for i, storage in enumerate(registry.STORAGES) for r in ("adan", RULES[i % (len(RULES) - 1)])]
# LARS is SGD with a per-tensor factor read from its pre-pass's sums: the storages it can take (no master slot), some
CASES += [("lars", *registry.STORAGES[i]) for i in (0, 1, 9, 19)]
# LAMB is Adam's update with a per-tensor factor: storages of each kind (its direction pre-pass is checked apart)
CASES += [("lamb", *registry.STORAGES[i]) for i in (0, 10, 12, 26)]
# DiffGrad is Adam with a third slot and an exp: storages of each kind
CASES += [("diffgrad", *registry.STORAGES[i]) for i in (0, 1, 7)]
# AdamP and SGDP are Adam's and SGD's updates with a coefficient gathered per element (its row's): storages of each kind
CASES += [("adamp", *registry.STORAGES[i]) for i in (0, 1, 12)] + [("sgdp", *registry.STORAGES[i]) for i in (0, 19)]
# SGD-SaI is SGD's update with a per-tensor g-SNR read (and written) beside the step count: storages of each kind
CASES += [("sgd_sai", *registry.STORAGES[i]) for i in (1, 12)]
IDS = [f"{r}-{d}" + (f"-state-{sd}" if sd != d else "") + (f"-{c}" if c != "nearest" else "") +
       ("-state-stochastic" if sr == "stochastic" else "") for r, d, sd, c, sr in CASES]
# Tensors each rule streams on a full chunk: (loaded, stored).
STREAMS = {name: spec.streams for name, spec in registry.RULES.items()}
MAX_REGISTERS = 80
# Adan streams 11 tensors (6 loaded, 5 stored): in bf16/fp16 one 16-byte vector per thread and tensor is 48
# live values before its 14 scalars. It took 96 registers (triton 3.8, no spills), 5 blocks of 128 threads
# per SM; its bandwidth on a GPU is not measured yet. A 16-bit parameter with float32 state carries 8 float32
# values per state slot and thread: Adan then took 114 (bf16) and 112 (fp16) registers, no spills (triton 3.8;
# 4 blocks per SM), the other rules at most 64; unmeasured on a GPU too.
# IEEE divisions (triton.py: _div, for the CUDA kernel's bits) took Adan from 96 to 111 registers in bf16 and from 80
# to 96 in fp32, AdamW fp32 from 56 to 64; unmeasured on a GPU.
# DiffGrad streams 9 tensors (three state slots) and computes an exp: 116 registers for float32 parameters with
# stochastically rounded bfloat16 state (triton 3.8, no spills), bf16 at ptxas's 80 with a 16-byte spill (KNOWN_SPILLS);
# unmeasured on a GPU.
# AdamP gathers each element's row's coefficient (a load per element; its nesterov and float64 decay took it from
# AdamW's 64 to 78 before them): 96 in bf16, 72 in fp32, no spills (triton 3.6, sm_90); unmeasured on a GPU.
MAX_REGISTERS_BY_RULE = {("adan", False): 112, ("adan", True): 128, ("diffgrad", False): 96, ("diffgrad", True): 96,
                         ("adamp", False): 96}
# A codec's own registers (registry.CODECS), on top (triton 3.8, sm_90, no spills anywhere): a master slot is one
# more tensor per thread (Adan bf16 with its remainder 112, fp16 with a float32 copy and float32 state 122); stochastic
# rounding runs one Philox call per 8 elements (AdamW and AdaBelief bf16 96, Adan 128 with bf16 state, 116 with
# float32; one call per element took AdamW to 124 and Adan to 154). None of them is measured on a GPU yet.
# An 8-bit correction (a Philox call per 8 elements, and an int8 slot): AdamW 95 (bf16 state) and 72 (float32 state),
# Adan 116-122, SGD 56, no spills.
CODEC_REGISTERS = {"nearest": 0, "remainder": 16, "copy": 8, "stochastic": 40, "correction": 24}
# bfloat16 state rounded stochastically (registry.STATE_ROUNDINGS) draws one Philox call per 8 elements and state
# slot, on top (triton 3.8, sm_90): AdamW and AdaBelief 80-96, Adan 120-128, Lion 62-64, SGD 54.
STATE_ROUNDING_REGISTERS = {"nearest": 0, "stochastic": 32}
# 8-bit state (registry.QUANTIZED) decodes with a gathered block scale and codes with a block-wide max, per slot, on top
# (triton 3.6, sm_90): AdamW 64-109, Lion 64-112, SGD 72-96, Adan 113-153 (with the 8-bit correction), no spills but
# those below. Unmeasured on a GPU.
QUANTIZED_REGISTERS = 40
# ptxas's own choice, with no register cap: it spills a few bytes to stay at 64 or 80 registers (8 or 6 blocks of 128
# threads per SM). Capped at 128 (Triton's maxnreg) it spills nothing: 87 and 108 registers. Which is faster is for a
# GPU to say; these are the only spills allowed, in bytes of spill stores.
# With IEEE divisions (2026-12-04) Adan's storages at ptxas's 96- and 128-register steps spill 8-20 bytes.
KNOWN_SPILLS = {("adamw", "float32", "bfloat16", "nearest", "nearest"): 4,
                ("adabelief", "float32", "int8", "nearest", "stochastic"): 4,
                ("lion", "bfloat16", "int8", "nearest", "nearest"): 4,
                ("adamw", "bfloat16", "int8", "stochastic", "nearest"): 12,
                ("adan", "float32", "bfloat16", "nearest", "nearest"): 8,
                ("adan", "bfloat16", "int8", "nearest", "stochastic"): 20,
                ("adan", "bfloat16", "int8", "stochastic", "nearest"): 8,
                ("adan", "bfloat16", "int8", "stochastic", "stochastic"): 8,
                ("adamw", "bfloat16", "bfloat16", "remainder", "nearest"): 8,
                ("adabelief", "float32", "bfloat16", "nearest", "nearest"): 4,
                ("adamw", "bfloat16", "bfloat16", "nearest", "stochastic"): 8,
                ("adabelief", "bfloat16", "bfloat16", "nearest", "stochastic"): 8,
                # compiled first when Adagrad joined the rotation of CASES (2026-12-04; their kernels unchanged)
                ("adagrad", "float32", "int8", "nearest", "stochastic"): 12,
                ("adamw", "bfloat16", "int8", "nearest", "nearest"): 12,
                ("lion", "float16", "float16", "copy", "nearest"): 4,
                # LARS (SGD, its float64 trust ratio per program) with Philox per 8 elements: ptxas stays at 56
                ("lars", "bfloat16", "bfloat16", "stochastic", "nearest"): 8,
                # LAMB's update spills as AdamW's does in the same storages (2026-12-04)
                ("lamb", "bfloat16", "int8", "nearest", "nearest"): 12,
                ("lamb", "bfloat16", "bfloat16", "remainder", "nearest"): 8,
                ("diffgrad", "bfloat16", "bfloat16", "nearest", "nearest"): 16}
# LAMB's direction pre-pass keeps two float64 accumulators per element of a thread's sub-tile: 8 elements in 16 bits,
# 32 registers, and took 92 in bfloat16 (triton 3.8, sm_90, no spills); 4 in float32. AdamP's four sums are added per
# sub-tile (four per element took 140): 72 in bfloat16, 64 in float32 (triton 3.6). Unmeasured on a GPU.
MAX_DIRECTION_REGISTERS = 96

SCRIPT = r"""
import json, os, re, shutil, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from uba_fused import registry
from uba_fused.backends import triton as backend
sig = {"work": "*i64", "tensors": "*i64", "grads": "*i64", "groups": "*fp64", "gaddr": "*i64", "done": "*i32",
       "norm": "*fp64", "reduced": "*fp64", "grad_scale": "*fp32", "found_inf": "*fp32", "n_rows": "i32",
       "n_groups": "i32", "advance": "i32", "squares": "*fp64", "squares_stride": "i32", "coefs": "*fp32",
       "RULE": "constexpr", "STATES": "constexpr", "NG": "constexpr", "DTYPE": "constexpr",
       "STATE_DTYPE": "constexpr", "CODEC": "constexpr", "STOCHASTIC_STATE": "constexpr", "BLOCK": "constexpr",
       "SUB": "constexpr", "GROUPS": "constexpr", "POSITIVE": "constexpr", "REDUCE": "constexpr",
       "REDUCES": "constexpr", "PROJECT": "constexpr", "SCALAR": "constexpr", "TABLES": "constexpr"}
ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
ptxas = ptxas if os.path.exists(ptxas) else shutil.which("ptxas")
out = {}
cases = [(*case, False, False) for case in json.loads(sys.argv[1])]
extras = sys.argv[2] == "1"  # one of the processes also compiles the pre-passes
if extras:  # the direction pre-passes: LAMB's, and AdamP's per row; and Table schedules' kernels (TABLES)
    cases += [(r, d, d, "nearest", "nearest", True, False) for r in ("lamb", "adamp") for d in ("float32", "bfloat16")]
    cases += [(r, d, d, "nearest", "nearest", False, True) for r in ("adamw", "adan") for d in ("float32", "bfloat16")]
for rule, dtype, state_dtype, codec, state_rounding, reduce, tables in cases:
    dt = getattr(torch, dtype)
    spec = registry.RULES[rule]
    src = ASTSource(fn=backend._step_kernel, signature=sig, constexprs={
        "RULE": spec.id, "STATES": len(spec.states), "NG": len(registry.group_cols(rule)),
        "DTYPE": backend._TL_DTYPE[dt], "STATE_DTYPE": backend._TL_DTYPE[getattr(torch, state_dtype)],
        "CODEC": registry.CODECS.index(codec), "STOCHASTIC_STATE": state_rounding == "stochastic",
        "BLOCK": backend.BLOCK,
        "SUB": backend.sub_tile(dt, getattr(torch, state_dtype)), "GROUPS": 4,
        "POSITIVE": spec.positive_bits, "REDUCE": reduce, "REDUCES": len(spec.reduces),
        "PROJECT": spec.projects, "SCALAR": spec.scalar is not None, "TABLES": tables})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": backend.NUM_WARPS,
                                                                  "enable_fp_fusion": backend.FP_FUSION}).asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
    info = subprocess.run([ptxas, "-v", f"-arch={arch}", f.name, "-o", os.devnull], capture_output=True, text=True,
                          check=True).stderr
    os.unlink(f.name)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    kind = "-reduce" if reduce else "-table" if tables else ""
    out[f"{rule}{kind}/{dtype}/{state_dtype}/{codec}/{state_rounding}"] = {
        "v4_loads": len(re.findall(r"ld\.global(\.\w+)*\.v4", ptx)),
        "v4_stores": len(re.findall(r"st\.global(\.\w+)*\.v4", ptx)),
        "v2_loads": len(re.findall(r"ld\.global(\.\w+)*\.v2", ptx)),
        "v2_stores": len(re.findall(r"st\.global(\.\w+)*\.v2", ptx)),
        "approx_divisions": len(re.findall(r"div\.(?:full|approx)(?:\.ftz)?\.f32", ptx)),
        "fmas": len(re.findall(r"fma\.rn\.f32", ptx)),
        "registers": int(re.search(r"Used (\d+) registers", info).group(1)),
        "spill_stores": int(spills.group(1)), "spill_loads": int(spills.group(2))}
for dtype in ("float32", "bfloat16", "float16") if extras else ():  # the pre-pass (one accumulator per element)
    for param in (False, True):  # of the gradients (clipping), of the parameters (Rule.reduces)
        dt = getattr(torch, dtype)
        src = ASTSource(fn=backend._sumsq_kernel, signature={
            "work": "*i64", "tensors": "*i64", "grads": "*i64", "out": "*fp64", "STATES": "constexpr",
            "DTYPE": "constexpr", "BLOCK": "constexpr", "SUB": "constexpr", "PARAM": "constexpr"}, constexprs={
            "STATES": 2, "DTYPE": backend._TL_DTYPE[dt], "BLOCK": backend.BLOCK, "SUB": backend.sub_tile(dt),
            "PARAM": param})
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": backend.NUM_WARPS,
                                                                      "enable_fp_fusion": backend.FP_FUSION}).asm["ptx"]
        out[f"sumsq{'-param' if param else ''}/{dtype}"] = {"v4_loads": len(re.findall(r"ld\.global(\.\w+)*\.v4", ptx))}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    # Two processes, each compiling every other case, side by side: the suite runs one test at a time, and the 90
    # compiles of a cold Triton cache took 140 s of one core in a clean CI run (2026-12-04)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(CASES[i::2]), str(int(i == 0))], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    out = {}
    for proc, (stdout, stderr) in [(p, p.communicate()) for p in procs]:
        if proc.returncode != 0:
            if "ptxas" in stderr or "NVIDIA" in stderr and "backend" in stderr:
                pytest.skip(f"this triton cannot compile for sm_90 here: {stderr[-300:]}")
            raise AssertionError(f"the Triton kernel failed to compile for sm_90:\n{stderr[-3000:]}")
        out.update(json.loads(stdout.strip().splitlines()[-1]))
    return out


@pytest.mark.parametrize("rule,dtype,state_dtype,codec,state_rounding", CASES, ids=IDS)
def test_full_aligned_chunks_are_vectorized(compiled, rule, dtype, state_dtype, codec, state_rounding):
    # A sub-tile is one 16-byte access per thread of the narrower of the parameter's and the state's dtypes (the
    # wider takes two); a master slot is one more tensor (an int8 one takes 8-byte accesses: not counted).
    # 8-bit state counts as 16-bit (8 codes per thread: 64-bit accesses, counted apart).
    narrow = min(max(getattr(torch, d).itemsize, 2) for d in (dtype, state_dtype))
    assert backend.sub_tile(getattr(torch, dtype), getattr(torch, state_dtype)) * narrow == 16 * 32 * backend.NUM_WARPS
    master = registry.MASTER_DTYPE.get(codec) not in (None, "int8")
    coded = len(registry.RULES[rule].states) if state_dtype == registry.QUANTIZED else 0
    loads, stores = (n + master - coded for n in STREAMS[rule])
    got = compiled[f"{rule}/{dtype}/{state_dtype}/{codec}/{state_rounding}"]
    assert got["v4_loads"] >= loads, f"full chunks lost 128-bit loads ({got['v4_loads']} < {loads})"
    assert got["v4_stores"] >= stores, f"full chunks lost 128-bit stores ({got['v4_stores']} < {stores})"
    assert got["v2_loads"] >= coded and got["v2_stores"] >= coded, f"8-bit codes lost their 64-bit accesses: {got}"


@pytest.mark.parametrize("rule,dtype,state_dtype,codec,state_rounding", CASES, ids=IDS)
def test_float32_math_divides_as_ieee_and_contracts_nothing(compiled, rule, dtype, state_dtype, codec, state_rounding):
    """As the CUDA kernel (nvcc -fmad=false; IEEE division by default): Triton's ``/`` was div.full.f32 (2 units in
    the last place) and a * b + c became FMAs where it chose, so the two kernels' bits differed on a GPU. (The cosine
    of the schedule is libdevice's, whose own FMAs are fma.rn.ftz: not counted.)"""
    got = compiled[f"{rule}/{dtype}/{state_dtype}/{codec}/{state_rounding}"]
    assert got["approx_divisions"] == 0 and got["fmas"] == 0, got


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_the_pre_pass_reads_full_aligned_chunks_in_128_bit_loads(compiled, dtype):
    for of in ("sumsq", "sumsq-param"):  # gradients (clipping), parameters (Rule.reduces)
        assert compiled[f"{of}/{dtype}"]["v4_loads"] >= 1, (of, compiled[f"{of}/{dtype}"])


@pytest.mark.parametrize("rule,dtype,state_dtype,codec,state_rounding", CASES, ids=IDS)
def test_registers_stay_bounded_without_spills(compiled, rule, dtype, state_dtype, codec, state_rounding):
    got = compiled[f"{rule}/{dtype}/{state_dtype}/{codec}/{state_rounding}"]
    bound = MAX_REGISTERS_BY_RULE.get((rule, state_dtype != dtype), MAX_REGISTERS) + CODEC_REGISTERS[codec] + \
        STATE_ROUNDING_REGISTERS[state_rounding] + QUANTIZED_REGISTERS * (state_dtype == registry.QUANTIZED)
    assert got["registers"] <= bound, f"{got['registers']} registers per thread (at most {bound})"
    spills = KNOWN_SPILLS.get((rule, dtype, state_dtype, codec, state_rounding), 0)
    assert got["spill_stores"] <= spills and got["spill_loads"] <= 2 * spills, f"registers spill to local memory: {got}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rule", ["lamb", "adamp"])
def test_the_direction_pre_pass_loads_what_the_update_loads_and_stores_nothing(compiled, rule, dtype):
    """LAMB's and AdamP's pre-passes (Rule.reduces_direction) are the update kernel computing its direction: p, g and
    both moments in 128-bit loads on full chunks (AdamP's: of a row, starting at a multiple of the sub-tile), no 128-bit
    store (it writes 2 or 4 float64 sums per program), its math as the update's (IEEE divisions, no contraction), no
    spills."""
    got = compiled[f"{rule}-reduce/{dtype}/{dtype}/nearest/nearest"]
    assert got["v4_loads"] >= STREAMS[rule][0] and got["v4_stores"] == 0, got
    assert got["approx_divisions"] == 0 and got["fmas"] == 0 and got["spill_stores"] == 0, got
    assert got["registers"] <= MAX_DIRECTION_REGISTERS, got


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rule", ["adamw", "adan"])
def test_a_table_schedules_kernel_keeps_the_rules_bounds(compiled, rule, dtype):
    """The kernel a plan with a Table schedule launches (TABLES: one more load per program, for the lr): the rule's
    register bound, its 128-bit accesses, IEEE math, no spills."""
    got = compiled[f"{rule}-table/{dtype}/{dtype}/nearest/nearest"]
    assert got["registers"] <= MAX_REGISTERS_BY_RULE.get((rule, False), MAX_REGISTERS), got
    assert got["v4_loads"] >= STREAMS[rule][0] and got["v4_stores"] >= STREAMS[rule][1], got
    assert got["approx_divisions"] == 0 and got["fmas"] == 0 and got["spill_stores"] == 0, got
