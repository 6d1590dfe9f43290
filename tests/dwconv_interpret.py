"""Runs dig.ops.dwconv_triton under Triton's CPU interpreter: `TRITON_INTERPRET=1 python dwconv_interpret.py IN OUT`.

IN holds a list of cases (x, weight, bias or None, the cotangent of y, autocast dtype or None, module settings).
OUT receives a dict: "cases", each case's y and the gradients of x, weight and bias; "compile", a report on
torch.compile(fullgraph=True) of a small function around the op (graphs, graph breaks, kernel launches, compiled
vs eager); "opcheck", the failures torch.library.opcheck finds in the two operators' registrations. A separate
process because Triton decides between interpreted and compiled kernels when the module is imported.
"""
import os
import sys

import interpreter  # tests/, the worker's folder (on sys.path as the script's own)
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
import dig.ops.dwconv_triton as module  # noqa: E402

DEFAULTS = {name: getattr(module, name) for name in ("TILE", "BWD_TILE", "FWD_ROWS", "BWD_ROWS", "BACKWARD",
                                                      "FORWARD", "TILE_TOKENS", "TILE_CHANNELS", "DW_TILE_TOKENS",
                                                      "DW_TILE_CHANNELS", "DW_PROGRAMS")}


def run_case(case):
    for name, value in {**DEFAULTS, **case["settings"]}.items():
        setattr(module, name, value)
    leaves = [None if t is None else t.clone().requires_grad_() for t in case["inputs"]]
    with torch.autocast("cpu", dtype=case["autocast"] or torch.bfloat16, enabled=case["autocast"] is not None):
        y = module.depthwise_conv3x3(*leaves)
    (y.double() * case["cotangent"]).sum().backward()
    for name, value in DEFAULTS.items():
        setattr(module, name, value)
    return {"y": y.detach(), "grads": [None if t is None else t.grad for t in leaves]}


def compile_report():
    """torch.compile(fullgraph=True) of elementwise ops around the op, forward and backward: one graph, no break,
    our kernels launched once each way, and the same values as eager."""

    def block(x, weight, bias):
        return (module.depthwise_conv3x3(x * 2, weight, bias) + 1).square()

    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 3, 5, 24, generator=gen), torch.randn(24, 1, 3, 3, generator=gen),
              torch.randn(24, generator=gen)]
    return interpreter.compile_report(module, block, inputs)


def opcheck_failures():
    """torch.library.opcheck on both operators (schema, fake tensors, autograd registration, AOT dispatch), with each
    of the operator's backwards."""
    gen = torch.Generator().manual_seed(1)
    x, weight = torch.randn(2, 3, 4, 16, generator=gen), torch.randn(16, 1, 3, 3, generator=gen)
    bias, dy = torch.randn(16, generator=gen), torch.randn(2, 3, 4, 16, generator=gen)
    failures = {}
    checks = (("forward", torch.ops.dig.depthwise_conv3x3, (x.requires_grad_(), weight, bias)),
              ("forward-no-bias", torch.ops.dig.depthwise_conv3x3, (x, weight, None)),
              ("backward", torch.ops.dig.depthwise_conv3x3_backward, (x.detach(), weight, dy)))
    # the autograd and backward checks run the forward and backward the settings select: each backward with the
    # default forward, each forward with the default backward
    pairs = [(DEFAULTS["FORWARD"], b) for b in module.BACKWARDS] + [(f, DEFAULTS["BACKWARD"]) for f in module.FORWARDS]
    for forward, backward in dict.fromkeys(pairs):
        module.FORWARD, module.BACKWARD = forward, backward
        for name, op, args in checks:
            for test, outcome in torch.library.opcheck(op, args, raise_exception=False).items():
                if outcome != "SUCCESS":
                    failures[f"{forward}/{backward}:{name}:{test}"] = str(outcome)[:500]
    module.FORWARD, module.BACKWARD = DEFAULTS["FORWARD"], DEFAULTS["BACKWARD"]
    return failures


cases = torch.load(sys.argv[1])
torch.save({"cases": [run_case(c) for c in cases], "compile": compile_report(), "opcheck": opcheck_failures()},
           sys.argv[2])
