"""``python -m uba_fused.bench``: optimizer-step throughput against torch.optim, on this machine.

On a GPU it measures GPT-2-shaped parameter lists (small, medium, 1.3B) in fp32 and bf16; on a
machine without one it runs a small CPU preset: backends "cpu" (what auto takes there) and "torch" (the
readable spec) against torch.optim's fused AdamW and SGD and an obvious foreach Lion and AdaBelief.
See --help for presets, optimizers, backends, dtypes and step counts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys

import torch

from .. import __version__
from . import throughput as tp
from .presets import PRESETS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m uba_fused.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--presets", nargs="+", choices=sorted(PRESETS), help="default: gpt2-small gpt2-medium "
                    "gpt2-1.3b on a GPU, cpu-small on the CPU")
    ap.add_argument("--optimizers", nargs="+", choices=sorted(tp.OURS), default=sorted(tp.OURS))
    ap.add_argument("--backends", nargs="+", choices=["torch", "cpu", "triton", "cuda"],
                    help="uba_fused backends to time (default: every usable one)")
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"],
                    help="default: float32 bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--layouts", nargs="+", choices=list(tp.LAYOUTS),
                    help="how uba_fused keeps 16-bit parameters (default: every layout the dtype can take)")
    ap.add_argument("--steps", type=int, help="timed steps per row (default 50 on a GPU, 10 on the CPU)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-torch", action="store_true", help="time only uba_fused, not torch.optim / timm")
    ap.add_argument("--json", metavar="PATH", help="write the raw numbers as JSON")
    ap.add_argument("--plot", metavar="PATH", help="write a PNG chart")
    args = ap.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.presets = args.presets or (["gpt2-small", "gpt2-medium", "gpt2-1.3b"] if gpu else ["cpu-small"])
    args.dtypes = args.dtypes or (["float32", "bfloat16"] if gpu else ["float32"])
    args.steps = args.steps or (50 if gpu else 10)
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    return args


def environment(device: torch.device) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "uba_fused": __version__, "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "device": str(device)}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["device_name"] = tp.device_name(device)
    env["copy"] = tp.copy_label(device)
    return env


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    args = parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)
    if device.type == "cpu":
        print("No GPU: timing backends cpu and torch against torch.optim on the CPU. The fused Triton and "
              "CUDA kernels need a GPU; run this on one to measure them.", file=sys.stderr)
    copy_gbps = tp.copy_bandwidth(device, tp.copy_size(device))
    env["copy_GBps"] = copy_gbps
    print(f"{env['device_name']}: {env['copy']} {copy_gbps:.1f} GB/s (read + write)", file=sys.stderr)

    plans = []
    for name in args.presets:
        for dt in args.dtypes:
            dtype = getattr(torch, dt)
            ours = tp.usable_backends(device, dtype, args.backends)
            plans.append((PRESETS[name], dtype, tp.candidates(device, args.optimizers, ours, not args.no_torch,
                                                              tp.layouts_for(dtype, args.layouts))))
    rows = []
    with tqdm(total=sum(len(c) for _, _, c in plans), desc="timing steps", file=sys.stderr) as bar:
        for preset, dtype, cands in plans:
            bar.set_postfix_str(f"{preset.name} {dtype}")
            rows += tp.measure(preset, dtype, device, cands, args.steps, args.warmup, copy_gbps, progress=bar)
    print(tp.format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "args": {k: v for k, v in vars(args).items()},
                       "rows": [r.as_dict() for r in rows]}, f, indent=1)
    if args.plot:
        tp.plot(rows, args.plot, f"{env['device_name']}, torch {env['torch']}, {env['date'][:10]}: "
                                 f"{env['copy']} {copy_gbps:.0f} GB/s", env["copy"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
