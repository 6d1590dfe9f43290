"""bench.gpu_idle against a hand-built Kineto trace whose busy time, gaps and their owners are worked out below."""
import pytest

from bench.gpu_idle import OTHER_THREAD, format_report, gpu_idle

HOST, AUTOGRAD, STREAM7, STREAM9 = (1, 1), (1, 2), (0, 7), (0, 9)


def span(cat, name, ts, dur, where, correlation=None):
    event = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": where[0], "tid": where[1]}
    if correlation is not None:
        event["args"] = {"correlation": correlation}
    return event


def trace():
    """One step, µs. Host: phase "forward" 0-100 launches A (at 15, inside aten::mm inside aten::linear) and B (at
    30); phase "optimizer step" 100-200 launches D early (at 120) and C late (at 150); a thread without phases (the
    autograd engine's) launches F at 196. GPU: A 20-50 with E 22-30 on another stream (overlap, counted once),
    B 50-60, C 151-170, D 180-190 (after C on its stream), F 200-205."""
    return {"traceEvents": [
        span("user_annotation", "forward", 0, 100, HOST),
        span("user_annotation", "optimizer step", 100, 100, HOST),
        span("cpu_op", "aten::linear", 5, 20, HOST),
        span("cpu_op", "aten::mm", 10, 10, HOST),
        span("cuda_runtime", "cudaLaunchKernel", 15, 1, HOST, correlation=1),
        span("cuda_runtime", "cudaLaunchKernel", 17, 1, HOST, correlation=5),
        span("cpu_op", "aten::add", 28, 4, HOST),
        span("cuda_runtime", "cudaLaunchKernel", 30, 1, HOST, correlation=2),
        span("cpu_op", "aten::copy_", 118, 7, HOST),
        span("cuda_runtime", "cudaLaunchKernel", 120, 1, HOST, correlation=4),
        span("cpu_op", "aten::_fused_adamw_", 140, 20, HOST),
        span("cuda_runtime", "cudaLaunchKernel", 150, 1, HOST, correlation=3),
        span("cpu_op", "aten::fill_", 195, 4, AUTOGRAD),
        span("cuda_runtime", "cudaLaunchKernel", 196, 1, AUTOGRAD, correlation=6),
        span("kernel", "A", 20, 30, STREAM7, correlation=1),
        span("kernel", "E", 22, 8, STREAM9, correlation=5),
        span("gpu_user_annotation", "forward", 20, 40, STREAM7),  # not GPU work
        span("kernel", "B", 50, 10, STREAM7, correlation=2),
        span("kernel", "C", 151, 19, STREAM7, correlation=3),
        span("gpu_memcpy", "D", 180, 10, STREAM7, correlation=4),
        span("kernel", "F", 200, 5, STREAM7, correlation=6),
        {"ph": "i", "name": "marker", "ts": 5},  # not a span
    ]}


def test_busy_idle_and_gap_owners_match_the_worked_out_trace():
    report = gpu_idle(trace(), steps=1)
    # window 0 (first annotation) .. 205 (last GPU end); busy A∪E 20-50, B 50-60, C 151-170, D 180-190, F 200-205
    # = 74 µs
    assert report["step_ms"] == pytest.approx(0.205)
    assert report["gpu_busy_ms"] == pytest.approx(0.074)
    assert report["gpu_idle_ms"] == pytest.approx(0.131)
    assert report["gaps_per_step"] == 4
    # 0-20 ends with A, launched at 15 (after the window opened: the GPU waited for the host) in forward/aten::mm;
    # 60-151 ends with C, launched at 150 in the optimizer step; 170-180 ends with D, launched at 120, long
    # before the GPU went idle: the GPU waited on something other than the host
    # 190-200 ends with F, launched at 196 from the thread without phases, after the GPU went idle
    assert report["idle_ms_by_phase"] == pytest.approx(
        {"optimizer step": 0.091, "forward": 0.020, "optimizer step (GPU waiting, host ahead)": 0.010,
         OTHER_THREAD: 0.010})
    assert report["idle_ms_by_op"] == pytest.approx(
        {"aten::_fused_adamw_": 0.091, "aten::mm": 0.020, "aten::copy_": 0.010, "aten::fill_": 0.010})
    largest = report["largest_gaps"][0]
    assert (largest["after"], largest["next"], largest["host_late"]) == ("B", "C", True)
    assert report["largest_gaps"][2]["after"] == "C" and not report["largest_gaps"][2]["host_late"]
    assert "aten::_fused_adamw_" in format_report("t", report)


def test_per_step_figures_divide_by_the_step_count():
    one, two = gpu_idle(trace(), steps=1), gpu_idle(trace(), steps=2)
    assert two["gpu_idle_ms"] == pytest.approx(one["gpu_idle_ms"] / 2)
    assert two["idle_ms_by_phase"]["forward"] == pytest.approx(one["idle_ms_by_phase"]["forward"] / 2)


def test_a_trace_without_gpu_work_is_a_clear_error():
    with pytest.raises(ValueError, match="no GPU activity"):
        gpu_idle({"traceEvents": [span("cpu_op", "aten::mm", 0, 5, HOST)]}, steps=1)


def test_idle_is_also_charged_to_the_activity_that_ended_each_gap():
    report = gpu_idle(trace(), steps=1)
    assert report["gpu_activities_per_step"] == 6  # A, E, B, C, D, F
    assert report["idle_ms_by_next_activity"] == pytest.approx({"C": 0.091, "A": 0.020, "D": 0.010, "F": 0.010})


def test_command_line_reads_a_gzipped_trace(tmp_path, capsys):
    import gzip
    import json

    from bench.gpu_idle import main

    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(trace(), f)
    main([str(path), "--steps", "1"])
    out = capsys.readouterr().out
    assert "idle 0.1 ms in 4 gaps per step, 6 kernels/copies per step" in out
    assert "aten::_fused_adamw_" in out
