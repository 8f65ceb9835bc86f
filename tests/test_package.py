"""The package as a user meets it: import cost, and what `python -m uba_fused.env` says on a CPU."""

import os
import subprocess
import sys


def _run(code: str, **env) -> str:
    full = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "UBA_FUSED_CUDA_ON_CPU")}
    return subprocess.run([sys.executable, "-c", code], env={**full, **env}, capture_output=True, text=True,
                          check=True).stdout


def test_import_does_not_load_dynamo():
    # torch._dynamo took 1.4 s of `import uba_fused`'s 2.9 s (torch alone: 1.5 s); it now loads at the first step,
    # as with torch.optim's own optimizers.
    out = _run("import sys, uba_fused; print('torch._dynamo' in sys.modules, 'triton' in sys.modules)")
    assert out.split() == ["False", "False"]


def test_env_says_the_cpu_modes_of_the_kernels_are_slow_test_modes():
    out = _run("import uba_fused.env as e, torch; print(e.report())", TRITON_INTERPRET="1", UBA_FUSED_CUDA_ON_CPU="1")
    cpu = out[out.index("backends for parameters on cpu"):].splitlines()
    assert cpu[0].endswith("(auto -> cpu):")
    for name in ("triton", "cuda"):
        line = next(x for x in cpu if x.split()[:1] == [name])
        if "unavailable" not in line:
            assert "usable in a test mode only" in line and "slow, and auto never picks it" in line, line
    plain = _run("import uba_fused.env as e; print(e.report())")
    cpu = plain[plain.index("backends for parameters on cpu"):].splitlines()
    for name in ("triton", "cuda"):
        line = next(x for x in cpu if x.split()[:1] == [name])
        assert "unavailable" in line, line
        if "need CUDA parameters" in line:  # rather than the extension missing, say
            assert "slow test mode" in line, line
