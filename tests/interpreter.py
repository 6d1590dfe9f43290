"""Runs a worker script of this folder under Triton's CPU interpreter, in a subprocess: Triton decides between
interpreted and compiled kernels when a kernel module is imported, and GPU tests in the same pytest session need
compiled ones. The worker reads its cases from IN and writes its results to OUT (torch.save files)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch


def run_interpreted(worker: str, cases, folder: Path, timeout: int = 600):
    """torch.save(cases) -> `TRITON_INTERPRET=1 python tests/<worker> IN OUT` -> torch.load(OUT)."""
    torch.save(cases, folder / "in.pt")
    root = str(Path(__file__).parents[1])  # this checkout's dig first (an editable install may point elsewhere)
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name(worker)), str(folder / "in.pt"),
                           str(folder / "out.pt")], env=env, capture_output=True, text=True, timeout=timeout, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(folder / "out.pt")


def compile_report(module, block, inputs: list) -> dict:
    """For a worker: torch.compile(fullgraph=True) of `block(*inputs)` around a registered operator whose Python
    launchers are `module._forward` and `module._backward`, forward and backward: graphs and graph breaks (dynamo's
    explain), the `dig` operators in the graph, how often each launcher ran eagerly and compiled, and the
    norm-relative difference of the compiled output and input gradients from eager's."""
    launches = {"forward": 0, "backward": 0}
    forward, backward = module._forward, module._backward

    def counted(kind, fn):
        def wrapper(*args, **kwargs):
            launches[kind] += 1
            return fn(*args, **kwargs)
        return wrapper

    explained = torch._dynamo.explain(block)(*inputs)
    ops_in_graph = [str(n.target) for g in explained.graphs for n in g.graph.nodes if "dig" in str(n.target)]
    results = {}
    for name, fn in (("eager", block), ("compiled", torch.compile(block, fullgraph=True))):
        module._forward, module._backward = counted("forward", forward), counted("backward", backward)
        launches.update(forward=0, backward=0)
        try:
            leaves = [x.clone().requires_grad_() for x in inputs]
            y = fn(*leaves)
            y.sum().backward()
        finally:
            module._forward, module._backward = forward, backward
        results[name] = [y.detach(), *(x.grad for x in leaves)]
        results[f"{name}_launches"] = dict(launches)

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    return {"graphs": explained.graph_count, "graph_breaks": explained.graph_break_count,
            "ops_in_graph": ops_in_graph, "eager_launches": results["eager_launches"],
            "compiled_launches": results["compiled_launches"],
            "compiled_vs_eager": [rel(a, b) for a, b in zip(results["compiled"], results["eager"])]}
