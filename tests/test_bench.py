"""Smoke tests of both benchmark entry points at tiny sizes: they run, and their numbers are sane."""

import json
import math
import os

import pytest
import torch

import uba_fused as uf
from uba_fused import registry
from uba_fused.bench import __main__ as bench_main
from uba_fused.bench import train, throughput
from uba_fused.bench.presets import PRESETS, Preset


def test_presets_match_the_published_model_shapes():
    # Counts from shared/anchors (GPT-2-medium: 292 tensors, 354.9M; the 1.3B list: 292, 1313.7M).
    assert len(PRESETS["gpt2-medium"].shapes) == 292 and round(PRESETS["gpt2-medium"].numel / 1e5) == 3549
    assert len(PRESETS["gpt2-1.3b"].shapes) == 292 and round(PRESETS["gpt2-1.3b"].numel / 1e5) == 13137
    assert round(PRESETS["gpt2-small"].numel / 1e6, 1) == 124.5


@pytest.mark.parametrize("rule,dtype,expected", [("adamw", torch.float32, 28), ("adabelief", torch.float32, 28),
                                                 ("lion", torch.float32, 20), ("sgd", torch.float32, 20),
                                                 ("adamw", torch.bfloat16, 14)])
def test_minimal_bytes_per_element(rule, dtype, expected):
    assert throughput.bytes_per_element(rule, dtype) == expected


@pytest.mark.parametrize("dtype,moved,kept", [
    (torch.float32, {"plain": 28, "bf16-state": 20}, {"plain": 8, "bf16-state": 4}),
    (torch.bfloat16, {"plain": 14, "bf16-state": 14, "fp32-state": 22, "master": 26, "master-bf16-state": 18,
                      "master8": 24, "master8-bf16-state": 16, "stochastic": 22},
     {"plain": 4, "bf16-state": 4, "fp32-state": 8, "master": 10, "master-bf16-state": 6, "master8": 9,
      "master8-bf16-state": 5, "stochastic": 8}),
    (torch.float16, {"plain": 14, "fp32-state": 22, "master": 30, "stochastic": 22},
     {"plain": 4, "fp32-state": 8, "master": 12, "stochastic": 8})])
def test_each_precision_layout_reports_the_bytes_its_real_tensors_hold(dtype, moved, kept):
    """AdamW per parameter: p read and written, g read, each state buffer (masters included) read and written; kept:
    the state (a bf16 master is its 2-byte remainder, an fp16 one a 4-byte copy)."""
    preset = Preset("tiny", ((33, 7), (5,)))
    cands = throughput.candidates(torch.device("cpu"), ["adamw"], ["torch"], False,
                                  throughput.layouts_for(dtype, list(moved)))  # (8-bit: the next test)
    rows = throughput.measure(preset, dtype, torch.device("cpu"), cands, steps=1, warmup=1, copy_gbps=1.0)
    assert {r.layout: r.bytes_per_param for r in rows} == moved
    assert {r.layout: r.state_bytes_per_param for r in rows} == kept


def test_8bit_layouts_report_the_bytes_of_codes_and_block_scales():
    """AdamW on one 64 x 128 tensor (over registry.QUANTIZE_MIN: 8-bit state): each moment 1 byte per parameter and a
    float32 scale per 256 (0.015625 per moment); the 8-bit master 1 byte more."""
    preset = Preset("8bit", ((64, 128),))
    scales = 2 * 4 / 256
    for dtype, moved, kept in ((torch.float32, {"8bit-state": 12 + 2 * (2 + scales)}, {"8bit-state": 2 + scales}),
                               (torch.bfloat16, {"8bit-state": 6 + 2 * (2 + scales),
                                                 "master8-8bit-state": 6 + 2 * (3 + scales)},
                                {"8bit-state": 2 + scales, "master8-8bit-state": 3 + scales})):
        cands = throughput.candidates(torch.device("cpu"), ["adamw"], ["torch"], False,
                                      throughput.layouts_for(dtype, list(moved)))
        rows = throughput.measure(preset, dtype, torch.device("cpu"), cands, steps=1, warmup=1, copy_gbps=1.0)
        assert {r.layout: r.bytes_per_param for r in rows} == moved
        assert {r.layout: r.state_bytes_per_param for r in rows} == kept


def test_throughput_cli_on_cpu(tmp_path, capsys):
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    # (the 8-bit layouts' bytes: test_8bit_layouts_report_the_bytes_of_codes_and_block_scales; on a CPU their steps
    # run the spec, 1 s each here)
    assert bench_main.main(["--device", "cpu", "--presets", "cpu-small", "--steps", "2", "--warmup", "1",
                            "--layouts", "plain", "bf16-state", "--json", str(out_json), "--plot", str(out_png)]) == 0
    data = json.loads(out_json.read_text())
    assert data["environment"]["copy_GBps"] > 0 and data["environment"]["torch"] == torch.__version__
    # On the CPU the baseline is a copy in host memory, and the device is the CPU's model, not "x86_64".
    assert data["environment"]["copy"] == "host memory copy (CPU)"
    assert data["environment"]["device_name"] == throughput.device_name(torch.device("cpu"))
    assert data["environment"]["device_name"].endswith(f"({os.cpu_count()} cores)")
    names = [r["name"] for r in data["rows"]]
    assert {"uba_fused.AdamW [torch]", "uba_fused.Lion [torch]", "torch AdamW fused"} <= set(names)
    numel = PRESETS["cpu-small"].numel
    for r in data["rows"]:
        assert set(r) >= {"preset", "dtype", "name", "rule", "tensors", "numel", "bytes_per_step", "ms", "gbps",
                          "frac_copy", "host_us", "speedup_vs_torch_fused"}
        assert r["numel"] == numel and r["tensors"] == len(PRESETS["cpu-small"].shapes)
        if r.get("layout", "plain") == "plain":
            assert r["bytes_per_step"] == throughput.bytes_per_element(r["rule"], torch.float32) * numel
        else:  # bf16 state: 2 bytes less per state slot read and written (and read again by a direction pre-pass)
            spec = registry.RULES[r["rule"]]
            n_states = len(spec.state_names({"momentum": 0.9}))
            want = throughput.bytes_per_element(r["rule"], torch.float32) - 4 * n_states
            want -= 2 * n_states if spec.reduces_direction else 0
            assert r["layout"] == "bf16-state" and r["bytes_per_step"] == want * numel
        assert math.isfinite(r["ms"]) and r["ms"] > 0 and r["host_us"] > 0
        assert r["gbps"] == pytest.approx(r["bytes_per_step"] / (r["ms"] * 1e-3) / 1e9)
        assert r["frac_copy"] == pytest.approx(r["gbps"] / data["environment"]["copy_GBps"])
    fused = next(r for r in data["rows"] if r["name"] == "torch AdamW fused")
    assert fused["speedup_vs_torch_fused"] == pytest.approx(1.0)
    assert out_png.stat().st_size > 10_000
    assert "uba_fused.AdamW [torch]" in capsys.readouterr().out


def test_training_study_tiny(tmp_path):
    out_json, out_png = tmp_path / "t.json", tmp_path / "t.png"
    scheds = ["UBA phi=0.5", "Constant"]
    assert train.main(["--budgets", "4", "8", "--seeds", "2", "--lrs", "1e-3", "1e-2", "--schedules", *scheds,
                       "--device", "cpu", "--workers", "1", "--json", str(out_json), "--plot", str(out_png)]) == 0
    data = json.loads(out_json.read_text())
    assert {"environment", "args", "budgets", "lrs", "fixed_lr", "summary", "best", "phi", "phi_correlation",
            "runs"} <= set(data)
    tasks = list(train.TASKS)
    assert len(data["runs"]) == len(tasks) * 2 * len(scheds) * 2 * 2  # tasks x budgets x schedules x lrs x seeds
    # Each summary cell is the seeds' mean and spread, recomputed here from the runs.
    for s in data["summary"]:
        key = (s["task"], s["budget"], s["schedule"], s["lr"])
        losses = [r["loss"] for r in data["runs"] if (r["task"], r["budget"], r["schedule"], r["lr"]) == key]
        assert s["seeds"] == len(losses) == 2 and s["diverged"] == 0
        assert s["loss"] == pytest.approx(sum(losses) / 2)
        assert s["loss_std"] == pytest.approx(abs(losses[0] - losses[1]) / 2 ** 0.5)
        if s["task"] == "digits":
            assert 0.0 <= s["accuracy"] <= 1.0
    # The best lr is the argmin of the mean loss over the grid, for every task, budget and schedule.
    assert len(data["best"]) == len(tasks) * 2 * len(scheds)
    for b in data["best"]:
        key = (b["task"], b["budget"], b["schedule"])
        cells = [s for s in data["summary"] if (s["task"], s["budget"], s["schedule"]) == key]
        assert b["loss"] == min(s["loss"] for s in cells) and b["edge"]  # a grid of two: every lr is an edge
    # The best phi: UBA's only phi here.
    assert {(p["task"], p["budget"], p["best_phi"]) for p in data["phi"]} == \
        {(t, b, 0.5) for t in tasks for b in (4, 8)}
    # Training learns something: the char LM's held-out loss falls below that of a uniform guess, ln 256.
    lm = {(s["budget"], s["schedule"], s["lr"]): s["loss"] for s in data["summary"] if s["task"] == "charlm"}
    assert lm[(8, "Constant", 1e-2)] < math.log(256) - 0.1
    assert out_png.stat().st_size > 10_000


def test_precision_study_trains_each_layout_in_its_dtype(tmp_path):
    out_json = tmp_path / "p.json"
    precisions = ["fp32", "bf16", "bf16-master"]
    assert train.main(["--tasks", "teacher-k10", "--budgets", "6", "--seeds", "1", "--lrs", "1e-2", "--schedules",
                       "Constant", "--precisions", *precisions, "--device", "cpu", "--workers", "1", "--json",
                       str(out_json)]) == 0
    data = json.loads(out_json.read_text())
    assert [r["precision"] for r in data["runs"]] == precisions
    assert [s["schedule"] for s in data["summary"]] == ["Constant", "Constant [bf16]", "Constant [bf16-master]"]
    losses = [r["loss"] for r in data["runs"]]
    assert all(math.isfinite(x) for x in losses) and len(set(losses)) == 3  # bf16 runs differ from fp32's
    model = train.InDtype(torch.nn.Linear(3, 2), torch.bfloat16)
    assert model.model.weight.dtype == torch.bfloat16 and model(torch.ones(1, 3)).dtype == torch.float32


def test_a_precision_study_without_float32_rows_plots(tmp_path):
    """The layouts of this issue alone (no float32 row, so no UBA phi to plot): the run and its plot complete."""
    out_png = tmp_path / "p.png"
    assert train.main(["--tasks", "teacher-k10", "--budgets", "6", "--seeds", "1", "--lrs", "1e-2", "--schedules",
                       "Constant", "--precisions", "fp32-bf16-state", "bf16-master8-bf16-state", "--device", "cpu",
                       "--workers", "1", "--plot", str(out_png)]) == 0
    assert out_png.stat().st_size > 10_000


def test_training_study_gives_the_same_runs_in_worker_processes():
    args = ["--tasks", "teacher-k10", "--budgets", "6", "--seeds", "2", "--lrs", "1e-2", "--schedules", "REX"]
    a1, a2 = train.parse_args(args + ["--workers", "1"]), train.parse_args(args + ["--workers", "2"])
    jobs = [train.Job("teacher-k10", 6, "REX", 1e-2, seed) for seed in range(2)]
    one, two = train.run_all(jobs, a1), train.run_all(jobs, a2)
    assert [r["seed"] for r in two] == [0, 1] and one[0]["loss"] != one[1]["loss"]
    for r, q in zip(one, two):
        assert q["loss"] == pytest.approx(r["loss"], rel=1e-5)


def test_training_study_picks_the_best_finite_lr_and_names_divergence():
    def row(lr, loss, schedule="UBA phi=1", budget=10):
        return {"task": "t", "budget": budget, "schedule": schedule, "lr": lr, "seeds": 2, "loss": loss,
                "loss_std": 0.0 if math.isfinite(loss) else math.nan, "diverged": 0 if math.isfinite(loss) else 1}
    summary = [row(1e-3, 0.9), row(1e-2, 0.5), row(1e-1, math.inf),
               row(1e-3, 0.7, "UBA phi=0.5"), row(1e-2, 0.4, "UBA phi=0.5"), row(1e-1, 0.45, "UBA phi=0.5"),
               row(1e-3, math.inf, "Linear"), row(1e-2, math.inf, "Linear")]
    best = {b["schedule"]: b for b in train.best_lrs(summary)}
    assert (best["UBA phi=1"]["lr"], best["UBA phi=1"]["edge"]) == (1e-2, False)
    assert (best["UBA phi=0.5"]["lr"], best["UBA phi=0.5"]["loss"]) == (1e-2, 0.4)
    assert not math.isfinite(best["Linear"]["loss"])
    assert train.best_phis(list(best.values())) == [
        {"task": "t", "budget": 10, "best_phi": 0.5, "loss_by_phi": {"0.5": 0.4, "1": 0.5}}]
    table = train.format_tables(summary, list(best.values()), [], {})
    assert "diverged" in table.split("Linear")[1].splitlines()[0]
    assert train.phi_correlations([{"task": "t", "budget": b, "best_phi": 1.0} for b in (1, 2, 4)]) == \
        {"budget": None, "kappa": None}
    rising = [{"task": f"teacher-k{k:g}", "budget": b, "best_phi": p}
              for k, b, p in [(10, 1, 0.5), (10, 2, 1.0), (1000, 4, 2.0), (1000, 8, 4.0)]]
    # kappa ranks 1.5, 1.5, 3.5, 3.5 against phi ranks 1-4: a correlation of 4 / (2 * 5 ** 0.5)
    assert train.phi_correlations(rising) == {"budget": pytest.approx(1.0), "kappa": pytest.approx(2 / 5 ** 0.5)}


def test_stdlib_text_is_deterministic():
    a, b = train.stdlib_text(10_000), train.stdlib_text(10_000)
    assert a == b and len(a) == 10_000


@pytest.mark.parametrize("dtensor", [False, True], ids=["tensors", "fsdp2-dtensors"])
def test_host_overhead_script_runs_on_the_cpu(dtensor):
    """benchmarks/host_overhead.py tracks the host cost of step() without a GPU (launch stubbed); with
    --dtensor on FSDP2's parameters (one-rank gloo mesh), with a row for torch.optim.AdamW."""
    import pathlib
    import re
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "host_overhead.py"
    out = subprocess.run([sys.executable, str(script), "--steps", "20"] + ["--dtensor"] * dtensor,
                         capture_output=True, text=True, check=True).stdout
    rows = re.findall(r"^(triton|cuda|torch\.optim)\s+(.+?)\s+p10\s+(\d+) us\s+median\s+(\d+) us\s+\(\d+ steps, "
                      r"\d+ (\w+)", out, re.M)
    expected = {"gradients at the same addresses", "gradients at new addresses", "a new subset of gradients"}
    for backend in ("triton", "cuda") + ("torch.optim",) * dtensor:
        if f"{backend}: skipped" in out:
            continue
        got = {label for b, label, *_ in rows if b == backend}
        assert got == expected, out
    assert all(0 < int(p10) <= int(med) for _, _, p10, med, _ in rows), out
    assert {kind for *_, kind in rows} == {"DTensors" if dtensor else "tensors"}, out


def test_loop_benchmark_tiny(tmp_path):
    """The training-loop benchmark's CPU version: both rows run, report what the table promises, and train
    alike (torch's AdamW with the UBA schedule as a LambdaLR, uba_fused's with it on the device)."""
    from uba_fused.bench import loop

    out_json, out_png = tmp_path / "l.json", tmp_path / "l.png"
    assert loop.main(["--device", "cpu", "--rounds", "2", "--iters", "2", "--json", str(out_json),
                      "--plot", str(out_png), "--compile-backend", "aot_eager"]) == 0
    data = json.loads(out_json.read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert set(rows) == {"torch AdamW fused + LambdaLR", "uba_fused AdamW [torch]", "uba_fused AdamW [torch], compiled"}
    assert rows["uba_fused AdamW [torch], compiled"]["host_us"] is None  # (no optimizer part to time apart)
    del rows["uba_fused AdamW [torch], compiled"]["host_us"]
    d, layers, heads, ctx, batch = loop.SIZES["tiny"]
    for r in rows.values():
        assert r["size"] == "tiny" and r["rounds"] == 2 and r["ms_min"] <= r["ms"] <= r["ms_max"]
        assert r["tokens_per_s"] == pytest.approx(batch * ctx / (r["ms"] * 1e-3))
        assert r.get("host_us", 1) > 0 and r["optimizer_gpu_ms"] is None
        assert 0 < r["final_loss"] < math.log(256) + 0.5
    a, b, c = (rows[n]["final_loss"] for n in ("torch AdamW fused + LambdaLR", "uba_fused AdamW [torch]",
                                               "uba_fused AdamW [torch], compiled"))
    assert a == pytest.approx(b, rel=1e-5) and c == b  # (aot_eager: eager's kernels, the same steps)
    assert out_png.stat().st_size > 10_000


def test_cpu_step_script_times_every_rule_against_its_baseline():
    """benchmarks/cpu_step.py: backend cpu against torch.optim's fastest for each rule, interleaved."""
    import importlib.util
    import pathlib
    import re
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "cpu_step.py"
    out = subprocess.run([sys.executable, str(script), "--rounds", "2", "--block", "2"],
                         capture_output=True, text=True, check=True).stdout
    rows = re.findall(r"^(\w+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x\s+(.+)$", out, re.M)
    extra = ["adamp", "sgdp"] if importlib.util.find_spec("adamp") else []  # (their baseline: the adamp package)
    extra += ["sgd_sai"] if importlib.util.find_spec("sgd_sai") else []  # (the sgd-sai package)
    assert [r[0] for r in rows] == ["adamw", "sgd", "lion", "adabelief", "adan", "adagrad", "lamb", "diffgrad", *extra], out
    for _, ours, base, ratio, _ in rows:
        assert float(ours) > 0 and float(base) > 0
        assert float(ratio) == pytest.approx(float(ours) / float(base), abs=0.01), out


def test_the_refined_runs_take_the_schedule_refined_from_linears_best_lr():
    """Refined runs Linear first (recording its norms), then every lr and seed of the grid on the table that
    uf.Refined makes from the mean over seeds of the norms of Linear at its best lr (AdamW's L1 norms), after the
    study's 5% warmup; its rows name it and carry no table."""
    a = train.parse_args(["--tasks", "teacher-k10", "--budgets", "6", "--seeds", "2", "--lrs", "1e-3", "1e-2",
                          "--schedules", "Refined", "--workers", "1", "--device", "cpu"])
    jobs = [train.Job("teacher-k10", 6, "Linear", lr, seed, record=True) for lr in a.lrs for seed in range(2)]
    results = train.run_all(jobs, a)
    assert all(len(r["grad_norms"]) == 6 and min(r["grad_norms"]) > 0 for r in results)
    best = min(a.lrs, key=lambda lr: sum(r["loss"] for r in results if r["lr"] == lr))
    mean = torch.tensor([r["grad_norms"] for r in results if r["lr"] == best], dtype=torch.float64).mean(0)
    want = uf.Refined(mean, ord=1, warmup_steps=1).factors.tolist()
    second = train.refined_jobs(results, jobs)
    assert [(j.schedule, j.lr, j.seed) for j in second] == [("Refined", j.lr, j.seed) for j in jobs]
    assert all(list(j.factors) == want for j in second)
    rows = train.run_all(second, a)
    assert all(r["schedule"] == "Refined" and "factors" not in r and math.isfinite(r["loss"]) for r in rows)


def test_the_batch_size_study_runs_each_arm_and_the_adaptive_one_grows(capsys):
    """python -m uba_fused.bench.batch, tiny: each arm sees the samples asked for, the fixed ones at their batch, and
    an adaptive arm whose norm test is strict (eta 0.1) takes more micro-batches than the 2 it starts with; the whole
    study runs with AdaGrad-Norm too."""
    from uba_fused.bench import batch
    a = batch.parse_args(["--tasks", "teacher-k10", "--samples", "64", "--fixed", "2", "--etas", "0.1", "--seeds", "1",
                          "--lrs", "0.1"])
    data = train.TASKS["teacher-k10"].data(a, torch.device("cpu"))
    fixed = batch.train_one(batch.Run("teacher-k10", "fixed-2", 0.1, 0), a, data)
    assert fixed["steps"] == 64 // 8 and fixed["batch_at_quarters"] == [8, 8, 8, 8] and math.isfinite(fixed["loss"])
    grown = batch.train_one(batch.Run("teacher-k10", "adaptive-0.1", 0.1, 0), a, data)
    assert grown["batch_at_quarters"][-1] > 8 and grown["steps"] < fixed["steps"]
    assert batch.main(["--tasks", "teacher-k10", "--samples", "32", "--fixed", "2", "--etas", "1", "--seeds", "2",
                       "--lrs", "0.1", "0.3", "--rule", "adagrad-norm"]) == 0
    out = capsys.readouterr().out
    assert "fixed-2" in out and "adaptive-1" in out and out.startswith("AdagradNorm")
