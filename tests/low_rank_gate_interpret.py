"""Runs dig.ops.low_rank_gate_triton under Triton's CPU interpreter:
`TRITON_INTERPRET=1 python low_rank_gate_interpret.py IN OUT`.

IN holds a list of cases (low, weight, bias, normalizer, the cotangent of g, module settings). OUT receives a dict:
"cases", each case's g and the gradients of low, weight and bias; "compile", a report on torch.compile(fullgraph=True)
of a small function around the op; "opcheck", the failures torch.library.opcheck finds in the two operators'
registrations; "gla_layer", DiG's GLA layer with the kernels against the same layer without them. A separate
process: Triton picks interpreted or compiled kernels at import.
"""
import os
import sys

import interpreter  # tests/, the worker's folder (on sys.path as the script's own)
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
import dig.ops.low_rank_gate_triton as module  # noqa: E402

DEFAULTS = {"BLOCK_T": module.BLOCK_T, "BLOCK_N": module.BLOCK_N, "BLOCK_T_BWD": module.BLOCK_T_BWD}


def run_case(case):
    for name, value in {**DEFAULTS, **case["settings"]}.items():
        setattr(module, name, value)
    try:
        leaves = [x.clone().requires_grad_() for x in case["inputs"]]
        g = module.low_rank_gate(*leaves, case["normalizer"])
        (g.double() * case["cotangent"]).sum().backward()
    finally:
        for name, value in DEFAULTS.items():
            setattr(module, name, value)
    return {"g": g.detach(), "grads": [x.grad for x in leaves]}


def compile_report():
    def block(low, weight, bias):
        return (module.low_rank_gate(low * 2, weight, bias, 16.0) + 1).square()

    gen = torch.Generator().manual_seed(0)
    return interpreter.compile_report(module, block, [torch.randn(2, 5, 16, generator=gen),
                                                      torch.randn(40, 16, generator=gen) / 4,
                                                      torch.randn(40, generator=gen)])


def opcheck_failures():
    gen = torch.Generator().manual_seed(1)
    low, weight, bias = torch.randn(3, 4, 16, generator=gen), torch.randn(40, 16, generator=gen), torch.randn(40)
    dg = torch.randn(3, 4, 40, generator=gen)
    failures = {}
    checks = (("forward", torch.ops.dig.low_rank_gate, (low.requires_grad_(), weight.requires_grad_(),
                                                        bias.requires_grad_(), 16.0)),
              ("backward", torch.ops.dig.low_rank_gate_backward, (low.detach(), weight.detach(), bias.detach(), dg,
                                                                  16.0)))
    for name, op, args in checks:
        for test, outcome in torch.library.opcheck(op, args, raise_exception=False).items():
            if outcome != "SUCCESS":
                failures[f"{name}:{test}"] = str(outcome)[:500]
    return failures


def gla_layer():
    """DiG's GLA layer (D 64, 2 heads; the torch GLA backend on the CPU) in float32 with forget_gate_kernel on and
    off: the output and every parameter's gradient, and how often the kernels ran."""
    from dig.models.dig import GatedLinearAttention

    results = {}
    for kernel in (True, False):
        torch.manual_seed(3)
        layer = GatedLinearAttention(64, 2, backend="torch", forget_gate_kernel=kernel)
        with torch.no_grad():
            layer.gk_proj[1].bias.normal_(0, 2)  # the release initialises it to 0: make the bias matter
        x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(4)).requires_grad_()
        calls = []
        forward = module._forward
        module._forward = lambda *a: calls.append(1) or forward(*a)
        try:
            y = layer(x)
        finally:
            module._forward = forward
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(5))).sum().backward()
        results[kernel] = {"y": y.detach(), "grads": {"x": x.grad, **{k: p.grad for k, p in layer.named_parameters()}},
                           "kernel_calls": len(calls)}
    return results


cases = torch.load(sys.argv[1])
torch.save({"cases": [run_case(c) for c in cases], "compile": compile_report(), "opcheck": opcheck_failures(),
            "gla_layer": gla_layer()}, sys.argv[2])
