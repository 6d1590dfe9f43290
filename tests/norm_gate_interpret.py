"""Runs dig.ops.norm_gate_triton under Triton's CPU interpreter:
`TRITON_INTERPRET=1 python norm_gate_interpret.py IN OUT`.

IN holds a list of cases (o, gate, weight, eps, the cotangent of y, module settings). OUT receives a dict:
"cases", each case's y and the gradients of o, gate and weight; "compile", a report on torch.compile(fullgraph=True)
of a small function around the op (graphs, graph breaks, kernel launches, compiled vs eager); "opcheck", the
failures torch.library.opcheck finds in the two operators' registrations. A separate process because Triton
decides between interpreted and compiled kernels when the module is imported, and GPU tests of the same pytest
session need compiled ones.
"""
import os
import sys

import interpreter  # tests/, the worker's folder (on sys.path as the script's own)
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
import dig.ops.norm_gate_triton as module  # noqa: E402

DEFAULTS = {"TILE": module.TILE}


def run_case(case):
    settings = dict(case["settings"])
    gate_columns = settings.pop("gate_columns", None)
    for name, value in {**DEFAULTS, **settings}.items():
        setattr(module, name, value)
    leaves = [x.clone().requires_grad_() for x in case["inputs"]]
    o, gate, weight = leaves
    out = {}
    if gate_columns is not None:  # the gate as columns left .. left + H * D of a wider [N, T, X] leaf
        left, right = gate_columns
        N, T, H, D = gate.shape
        wide = torch.zeros(N, T, left + H * D + right, dtype=gate.dtype)
        wide[..., left:left + H * D] = gate.detach().flatten(2)
        wide.requires_grad_()
        gate = wide[..., left:left + H * D].view(N, T, H, D)
        out["gate_read_in_place"] = module._gate_rows(gate)[1]["H"] > 1
    y = module.rms_norm_swish_gate(o, gate, weight, case["eps"])
    (y.double() * case["cotangent"]).sum().backward()
    for name, value in DEFAULTS.items():
        setattr(module, name, value)
    grads = [x.grad for x in leaves]
    if gate_columns is not None:
        grads[1] = wide.grad[..., left:left + H * D].reshape(N, T, H, D)
        others = torch.cat([wide.grad[..., :left], wide.grad[..., left + H * D:]], dim=-1)
        out["other_columns_grad_max"] = others.abs().max().item()
    return {"y": y.detach(), "grads": grads, **out}


def compile_report():
    """torch.compile(fullgraph=True) of elementwise ops around the op, forward and backward: one graph, no break,
    our kernels launched once each way, and the same values as eager."""

    def block(o, gate, weight):
        return (module.rms_norm_swish_gate(o * 2, gate, weight, 1e-6) + 1).square()

    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 5, 3, 24, generator=gen), torch.randn(2, 5, 3, 24, generator=gen).bfloat16(),
              1 + 0.1 * torch.randn(24, generator=gen)]
    return interpreter.compile_report(module, block, inputs)


def opcheck_failures():
    """torch.library.opcheck on both operators (schema, fake tensors, autograd registration, AOT dispatch)."""
    gen = torch.Generator().manual_seed(1)
    o, gate = torch.randn(3, 4, 2, 24, generator=gen), torch.randn(3, 4, 2, 24, generator=gen).bfloat16()
    weight, dy = torch.randn(24, generator=gen), torch.randn(3, 4, 2, 24, generator=gen)
    failures = {}
    checks = (("forward", torch.ops.dig.rms_norm_swish_gate, (o.requires_grad_(), gate, weight, 1e-6)),
              ("backward", torch.ops.dig.rms_norm_swish_gate_backward, (o.detach(), gate, weight, dy, 1e-6)))
    for name, op, args in checks:
        for test, outcome in torch.library.opcheck(op, args, raise_exception=False).items():
            if outcome != "SUCCESS":
                failures[f"{name}:{test}"] = str(outcome)[:500]
    return failures


cases = torch.load(sys.argv[1])
torch.save({"cases": [run_case(c) for c in cases], "compile": compile_report(), "opcheck": opcheck_failures()},
           sys.argv[2])
