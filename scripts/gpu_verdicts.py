"""One verdict line per claim from a pytest JUnit XML report (scripts/gpu_check.sh quick writes it).

    python scripts/gpu_verdicts.py REPORT.xml

A claim passes when every test it names passed and at least one ran; a skip counts as a failure unless its
reason is one the claim allows (a second GPU this machine lacks). Tests that no claim names are checked too,
under "every other test". Exits 1 when any claim fails.
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET

# claim -> (test id pattern, skip reasons allowed)
CLAIMS = {
    "whole-iteration graphs equal eager (2 groups, 2 dtypes, fp32 state, clipping, a frozen parameter)":
        (r"test_whole_iteration_graph_equals_eager", ()),
    "two graphs sharing a memory pool, captured back to back, replayed in turn, equal eager":
        (r"test_two_graphs_sharing_a_memory_pool", ()),
    "steps enqueued behind a stalled stream (run-ahead) equal backend torch":
        (r"test_steps_enqueued_behind_a_stalled_stream|test_gpu_step_does_not_wait", ()),
    "one pinned host-to-device copy per step when gradients moved, none when not":
        (r"test_one_host_to_device_copy_per_step", ()),
    "no step syncs or copies from pageable memory (clipping included)":
        (r"test_no_pageable_copy_and_no_sync|test_gpu_step_never_syncs", ()),
    "steps on two streams run in order; the counters end at zero":
        (r"test_steps_on_two_streams", ()),
    "tables made on a side stream are not reused while another stream may read them":
        (r"test_tables_made_on_a_side_stream", ()),
    "parameters on a device other than the current one (needs 2 GPUs)":
        (r"test_parameters_on_another_device", ("needs a second CUDA device",)),
    "p.data = ..., model.half().float(), replaced state and counters, natively":
        (r"test_moved\.py", ()),
    "the capture path (own table, pinned rows, what a capture keeps, the rules), natively":
        (r"test_capture\.py", ()),
    "NaN / inf / huge gradient norms clip as clip_grad_norm_ (float64 pre-pass), natively":
        (r"test_a_non_finite_gradient_norm|test_the_norm_of_gradients_above", ()),
    "torch.compile(fullgraph, reduce-overhead) train step with the step inside the graph: no CUDA graph skipped, "
    "bit for bit the compile without CUDA graphs, eager within Inductor's rounding":
        (r"test_reduce_overhead_compile", ()),
    "both kernel backends against the float64 oracle, torch backend and each other, natively":
        (r"test_kernels\.py", ("UBA_FUSED_BIG_TESTS",)),
}


def main(path: str) -> int:
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        # classname "tests.test_kernels", name "test_x[param]" -> "tests/test_kernels.py::test_x[param]"
        name = re.sub(r"^tests\.(\w+)::", r"tests/\1.py::", f"{case.get('classname', '')}::{case.get('name', '')}")
        status, reason = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                status, reason = tag, node.get("message", "")
                break
        cases.append((name, status, reason))
    claimed, failed = set(), 0
    for claim, (pattern, allowed) in list(CLAIMS.items()) + [("every other test", (None, ("UBA_FUSED_BIG_TESTS",)))]:
        mine = [c for c in cases if (re.search(pattern, c[0]) if pattern else c[0] not in claimed)]
        claimed.update(c[0] for c in mine)
        bad = [c for c in mine if c[1] in ("failure", "error")
               or c[1] == "skipped" and not any(a in c[2] for a in allowed)]
        ran = [c for c in mine if c[1] == "passed"]
        skipped_ok = [c for c in mine if c[1] == "skipped" and c not in bad]
        ok = not bad and (ran or skipped_ok and pattern is not None and allowed)
        verdict = "PASS" if ok and ran else "SKIP" if ok else "FAIL"
        failed += verdict == "FAIL"
        detail = f"{len(ran)} passed" + (f", {len(skipped_ok)} skipped (allowed)" if skipped_ok else "")
        if bad:
            detail += "; " + "; ".join(f"{n} {s}: {r[:200]}" for n, s, r in bad[:5])
        elif not mine:
            detail = "no test ran"
        print(f"CHECK {verdict}  {claim}: {detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
