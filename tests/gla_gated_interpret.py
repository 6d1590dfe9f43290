"""Runs dig.ops.gla_gated (the GLA and its output norm-gate as one operator on q | k | v | gate packed in one
tensor) under Triton's CPU interpreter: `TRITON_INTERPRET=1 python gla_gated_interpret.py IN OUT`.

IN holds a list of cases (qkvz, g, the norm weight, eps, the cotangent of y, splits, a token order). OUT receives
each case's y and the gradients of qkvz, g and the weight, where the backward's kernels wrote dq, dk, dv and dgate
(data pointers, in bytes from the start of the gradient they were given), and a report on torch.compile(fullgraph=
True) of the operator inside a small function. A separate process because Triton decides between interpreted and
compiled kernels when its modules are imported.
"""
import importlib
import os
import sys

import interpreter  # tests/, the worker's folder (on sys.path as the script's own)
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
import dig.ops.gla_gated as module  # noqa: E402
import dig.ops.norm_gate_triton as norm_gate_triton  # noqa: E402

gla_triton = importlib.import_module("dig.ops.gla_triton")  # (dig.ops exports a function of that name)

written = {}
gla_backward, norm_gate_backward = gla_triton._backward, norm_gate_triton._backward


def spied_gla_backward(*args, grads_into=None, **kwargs):
    written["dq, dk, dv"] = None if grads_into is None else [x.data_ptr() for x in grads_into]
    return gla_backward(*args, grads_into=grads_into, **kwargs)


def spied_norm_gate_backward(*args, dgate_into=None, **kwargs):
    written["dgate"] = None if dgate_into is None else dgate_into.data_ptr()
    return norm_gate_backward(*args, dgate_into=dgate_into, **kwargs)


def run_case(case):
    written.clear()
    gla_triton._backward, norm_gate_triton._backward = spied_gla_backward, spied_norm_gate_backward
    try:
        leaves = [x.clone().requires_grad_() for x in case["inputs"]]
        qkvz, g, weight = leaves
        y = module.gla_gated_packed_triton(qkvz, g, weight, case["eps"], splits=case["splits"],
                                           token_order=case["order"])
        (y.double() * case["cotangent"]).sum().backward()
    finally:
        gla_triton._backward, norm_gate_triton._backward = gla_backward, norm_gate_backward
    start = written["dq, dk, dv"][0]  # dq's view starts the gradient: the offsets of the others from it
    offsets = {"dq, dk, dv": [p - start for p in written["dq, dk, dv"]], "dgate": written["dgate"] - start}
    return {"y": y.detach(), "grads": [x.grad for x in leaves], "offsets": offsets}


def compile_report():
    """torch.compile(fullgraph=True) of elementwise ops around the operator, forward and backward."""

    def block(qkvz, g, weight):
        return (module.gla_gated_packed_triton(qkvz * 2, g, weight, 1e-6) + 1).square()

    gen = torch.Generator().manual_seed(0)
    H, K, V = 2, 16, 32
    inputs = [torch.randn(2, 20, 2 * H * K + 2 * H * V, generator=gen),
              torch.nn.functional.logsigmoid(torch.randn(2, 20, H, K, generator=gen)) / 16,
              1 + 0.1 * torch.randn(V, generator=gen)]
    return interpreter.compile_report(gla_triton, block, inputs)


cases = torch.load(sys.argv[1])
torch.save({"cases": [run_case(c) for c in cases], "compile": compile_report()}, sys.argv[2])
