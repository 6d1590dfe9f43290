"""Runs dig.ops.swiglu_triton under Triton's CPU interpreter: `TRITON_INTERPRET=1 python swiglu_interpret.py IN OUT`.

IN holds a list of cases (gate_up, weight, the cotangent of out, module settings). OUT receives a dict: "cases",
each case's out and the gradients of gate_up and weight; "compile", a report on torch.compile(fullgraph=True) of a
small function around the op; "opcheck", the failures torch.library.opcheck finds in the two operators'
registrations; "swiglu_module", DiG's SwiGLU with the operator against the same module with activation
checkpointing (its other recompute). A separate process: Triton picks interpreted or compiled kernels at import.
"""
import os
import sys

import interpreter  # tests/, the worker's folder (on sys.path as the script's own)
import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
import dig.ops.swiglu_triton as module  # noqa: E402

DEFAULTS = {"TILE": module.TILE, "BLOCK_F": module.BLOCK_F}


def run_case(case):
    for name, value in {**DEFAULTS, **case["settings"]}.items():
        setattr(module, name, value)
    try:
        gate_up, weight = (x.clone().requires_grad_() for x in case["inputs"])
        out = module.swiglu_down(gate_up, weight)
        (out.double() * case["cotangent"]).sum().backward()
    finally:
        for name, value in DEFAULTS.items():
            setattr(module, name, value)
    return {"out": out.detach(), "grads": [gate_up.grad, weight.grad]}


def compile_report():
    def block(gate_up, weight):
        return (module.swiglu_down(gate_up * 2, weight) + 1).square()

    gen = torch.Generator().manual_seed(0)
    return interpreter.compile_report(module, block, [torch.randn(2, 5, 2 * 40, generator=gen),
                                                      torch.randn(24, 40, generator=gen) / 6])


def opcheck_failures():
    gen = torch.Generator().manual_seed(1)
    gate_up, weight = torch.randn(3, 4, 2 * 40, generator=gen), torch.randn(24, 40, generator=gen)
    dout = torch.randn(3, 4, 24, generator=gen)
    failures = {}
    checks = (("forward", torch.ops.dig.swiglu_down, (gate_up.requires_grad_(), weight.requires_grad_())),
              ("backward", torch.ops.dig.swiglu_down_backward, (gate_up.detach(), weight.detach(), dout)))
    for name, op, args in checks:
        for test, outcome in torch.library.opcheck(op, args, raise_exception=False).items():
            if outcome != "SUCCESS":
                failures[f"{name}:{test}"] = str(outcome)[:500]
    return failures


def swiglu_module():
    """DiG's SwiGLU (D 48, F 256, float32 parameters) with the operator and with checkpointing, in float32 and
    under bf16 autocast (as DiG trains): outputs and the gradients of x, gate_proj's and down_proj's weights, and
    whether the operator ran."""
    from dig.models.dig import SwiGLU

    gen = torch.Generator().manual_seed(2)
    results = {}
    for autocast in (False, True):
        for kernel in (True, False):
            torch.manual_seed(3)
            mlp = SwiGLU(48, 4.0, recompute_product=True, kernel=kernel)
            x = torch.randn(2, 7, 48, generator=gen.manual_seed(4)).requires_grad_()
            calls = []
            forward = module._forward
            module._forward = lambda *a: calls.append(1) or forward(*a)
            saved = []
            try:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
                        torch.autograd.graph.saved_tensors_hooks(lambda z: saved.append(tuple(z.shape)) or z,
                                                                 lambda z: z):
                    y = mlp(x)
            finally:
                module._forward = forward
            (y.float() * torch.randn(y.shape, generator=gen.manual_seed(5))).sum().backward()
            results[autocast, kernel] = {"y": y.detach(), "operator_calls": len(calls), "saved": saved,
                                         "intermediate": mlp.intermediate_size,
                                         "grads": [x.grad, mlp.gate_proj.weight.grad, mlp.down_proj.weight.grad]}
    return results


def float32_under_autocast():
    """The operator on float32 inputs inside a bf16 autocast region: the GEMMs inside it stay float32 (out's dtype
    is what the fake implementation promises) and the backward runs."""
    gen = torch.Generator().manual_seed(6)
    gate_up = torch.randn(3, 5, 2 * 40, generator=gen, dtype=torch.float64)
    weight = torch.randn(24, 40, generator=gen, dtype=torch.float64) / 40 ** 0.5
    leaves = [x.float().requires_grad_() for x in (gate_up, weight)]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the backward too: its GEMMs must stay float32 as well
        out = module.swiglu_down(*leaves)
        out.sum().backward()
    return {"inputs": (gate_up, weight), "out": out.detach(), "grads": [x.grad for x in leaves]}


cases = torch.load(sys.argv[1])
torch.save({"cases": [run_case(c) for c in cases], "compile": compile_report(), "opcheck": opcheck_failures(),
            "swiglu_module": swiglu_module(), "float32_under_autocast": float32_under_autocast()}, sys.argv[2])
