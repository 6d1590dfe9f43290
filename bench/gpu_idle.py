"""Where a step leaves the GPU idle, from a torch.profiler (Kineto) chrome trace of a few steps.

The GPU is busy while any kernel, copy or memset runs (the union of their intervals); the rest of the profiled
window is idle. Every idle gap ends with some GPU activity, launched from the host by a runtime call (kernel launch,
graph launch, copy) that the trace links to it by its correlation id. The gap is charged to what the host was
doing at that launch: the innermost user annotation (the step's phases, e.g. "forward", "optimizer step") and the
innermost operator around it; launches from a thread that never entered a phase (on CUDA, the autograd engine's
backward thread) are charged to OTHER_THREAD. A launch made after the GPU went idle means the GPU waited for the
host; a launch made earlier means the GPU waited on something else (a stream wait, a copy on another stream) —
counted apart.

    report = gpu_idle(json.load(open(trace)), steps=5)
    python3 -m bench.gpu_idle TRACE.json[.gz] --steps 3      # a kept trace (bench_trainer_overhead --trace)

Used by `bench.bench_trainer_overhead --gpu-idle N` for the bare and the trainer loop.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
# A launch from a thread that never entered a phase: on CUDA the autograd engine runs the backward on a thread of its
# own, so this is mostly the backward (or a data thread's copies).
OTHER_THREAD = "(another thread: autograd backward / data)"
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


class _Spans:
    """Host spans of one category on each thread; the innermost one containing a time."""

    def __init__(self, events: list[dict]):
        self.by_thread: dict[tuple, list[tuple[float, float, str]]] = collections.defaultdict(list)
        for e in events:
            self.by_thread[(e.get("pid"), e.get("tid"))].append((e["ts"], e["ts"] + e.get("dur", 0), e["name"]))
        for spans in self.by_thread.values():
            spans.sort()

    def innermost(self, thread: tuple, t: float) -> str | None:
        """Host spans nest, so the innermost span around t is the latest-starting one still open at t."""
        spans = self.by_thread.get(thread, [])
        for i in range(bisect.bisect_right(spans, (t, float("inf"), "")) - 1, -1, -1):
            if spans[i][1] >= t:
                return spans[i][2]
        return None


def gpu_idle(trace: dict, steps: int, top: int = 12, window: tuple[float, float] | None = None) -> dict:
    """Per-step GPU busy and idle ms over the profiled window, idle ms per host phase and operator, and the
    largest gaps. `window` (µs, the trace's clock): the span to account; default from the first host annotation
    to the last GPU activity (the loop synchronises before and after its steps)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES), key=lambda e: e["ts"])
    if not gpu:
        raise ValueError("the trace holds no GPU activity (kernels, copies): was CUDA profiled?")
    annotations = [e for e in events if e.get("cat") == "user_annotation"]
    if window is None:
        start = min((e["ts"] for e in annotations), default=gpu[0]["ts"])
        window = (start, max(e["ts"] + e.get("dur", 0) for e in gpu))
    lo, hi = window
    busy = _union([(max(lo, e["ts"]), min(hi, e["ts"] + e.get("dur", 0))) for e in gpu
                   if e["ts"] + e.get("dur", 0) > lo and e["ts"] < hi])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})}
    phases, ops = _Spans(annotations), _Spans([e for e in events if e.get("cat") == "cpu_op"])
    next_activity = {round(e["ts"], 3): e for e in reversed(gpu)}  # the first GPU event at each start time

    ends = sorted((e["ts"] + e.get("dur", 0), e["name"]) for e in gpu)
    gaps = []
    edges = [(lo, lo)] + busy + [(hi, hi)]
    for (_, gap_start), (gap_end, _) in zip(edges, edges[1:]):
        if gap_end - gap_start <= 0:
            continue
        ending = next_activity.get(round(gap_end, 3))
        launch = launches.get(ending["args"].get("correlation")) if ending else None
        if launch is not None:
            thread, t = (launch.get("pid"), launch.get("tid")), launch["ts"]
            host_late = t + launch.get("dur", 0) >= gap_start
            phase = phases.innermost(thread, t) or (OTHER_THREAD if thread not in phases.by_thread else "(no phase)")
            op = ops.innermost(thread, t) or launch["name"]
        else:
            host_late, phase, op = False, "(no phase)", "(end of window)" if gap_end >= hi else "(unlinked)"
        before = bisect.bisect_right(ends, (gap_start, "\uffff")) - 1  # the activity the GPU finished last
        gaps.append({"ms": (gap_end - gap_start) / 1e3, "phase": phase, "op": op, "host_late": host_late,
                     "after": ends[before][1][:80] if before >= 0 else None,
                     "next": ending["name"][:80] if ending else None})

    span_ms = (hi - lo) / 1e3
    busy_ms = sum(b - a for a, b in busy) / 1e3
    by_phase: dict[str, float] = collections.defaultdict(float)
    by_op: dict[str, float] = collections.defaultdict(float)
    by_next: dict[str, float] = collections.defaultdict(float)
    for gap in gaps:
        key = gap["phase"] if gap["host_late"] else f"{gap['phase']} (GPU waiting, host ahead)"
        by_phase[key] += gap["ms"] / steps
        by_op[gap["op"]] += gap["ms"] / steps
        by_next[gap["next"] or "(end of window)"] += gap["ms"] / steps
    return {
        "steps": steps, "step_ms": span_ms / steps, "gpu_busy_ms": busy_ms / steps,
        "gpu_idle_ms": (span_ms - busy_ms) / steps, "busy_fraction": busy_ms / span_ms if span_ms else 0.0,
        "gaps_per_step": len(gaps) / steps,
        "gpu_activities_per_step": sum(1 for e in gpu if lo <= e["ts"] < hi) / steps,
        "idle_ms_by_phase": dict(sorted(by_phase.items(), key=lambda kv: -kv[1])),
        "idle_ms_by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1])[:top]),
        # on a GPU-bound step (host ahead) the gaps are the GPU moving between kernels: which kernels wait most
        "idle_ms_by_next_activity": dict(sorted(by_next.items(), key=lambda kv: -kv[1])[:top]),
        "largest_gaps": sorted(gaps, key=lambda g: -g["ms"])[:top],
    }


def format_report(label: str, report: dict) -> str:
    lines = [f"{label}: step {report['step_ms']:.1f} ms, GPU busy {report['gpu_busy_ms']:.1f} ms "
             f"({report['busy_fraction'] * 100:.1f} %), idle {report['gpu_idle_ms']:.1f} ms in "
             f"{report['gaps_per_step']:.0f} gaps per step, {report['gpu_activities_per_step']:.0f} kernels/copies "
             f"per step",
             "  idle ms/step by host phase at the launch that ended the gap:"]
    lines += [f"    {ms:8.2f}  {name}" for name, ms in report["idle_ms_by_phase"].items()]
    lines.append("  idle ms/step by host operator at that launch:")
    lines += [f"    {ms:8.2f}  {name}" for name, ms in report["idle_ms_by_op"].items()]
    lines.append("  idle ms/step by the GPU activity that ended the gap:")
    lines += [f"    {ms:8.2f}  {name[:100]}" for name, ms in report["idle_ms_by_next_activity"].items()]
    lines.append("  largest gaps (ms, phase, host op, host late?, after → next):")
    lines += [f"    {g['ms']:8.3f}  {g['phase']} | {g['op']} | {'host' if g['host_late'] else 'gpu'} | "
              f"{g['after']} → {g['next']}" for g in report["largest_gaps"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="GPU idle report of a kept profiler trace (bench.gpu_idle)")
    ap.add_argument("trace", help="chrome trace, .json or .json.gz")
    ap.add_argument("--steps", type=int, required=True, help="how many steps the trace holds")
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args(argv)
    with (gzip.open if a.trace.endswith(".gz") else open)(a.trace, "rt") as f:
        report = gpu_idle(json.load(f), a.steps, top=a.top)
    print(format_report(a.trace, report))


if __name__ == "__main__":
    main()
