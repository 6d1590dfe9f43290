"""Runs dig.ops.gla_triton under Triton's CPU interpreter: `TRITON_INTERPRET=1 python gla_triton_interpret.py IN OUT`.

IN holds a list of cases (inputs, cotangents, module settings); OUT receives each case's output, final state,
input gradients and each GLA kernel launch's two dot precisions. A separate process because Triton chooses
interpreted or compiled kernels when they are defined, and the GPU tests of the same session need the compiled
ones.
"""
import importlib
import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
module = importlib.import_module("dig.ops.gla_triton")


class RecordedLaunches:
    """A kernel whose launches are written down as (name, PRECISION, FAST_PRECISION) before they run."""

    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, kwargs.get("PRECISION"), kwargs.get("FAST_PRECISION")))
            return self.kernel[grid](*args, **kwargs)
        return launch


launches = []
kernels = module._kernels()
module._kernels = lambda: tuple(RecordedLaunches(name, kernel, launches)
                                for name, kernel in zip(module.KERNELS, kernels))

results = []
for case in torch.load(sys.argv[1]):
    launches.clear()
    for name, value in case["settings"].items():
        setattr(module, name, value)
    leaves = [None if x is None else x.clone().requires_grad_() for x in case["inputs"]]
    do, dstate = case["cotangents"]
    if case["stateless"]:  # the registered operator (DiG's case)
        o, state = module.gla_triton(*leaves[:4], splits=case["splits"], token_order=case["order"])
        (o.double() * do).sum().backward()
    else:  # the autograd Function with initial and final states
        o, state = module.gla_triton(*leaves[:4], initial_state=leaves[4], output_final_state=True,
                                     token_order=case["order"])
        ((o.double() * do).sum() + (state.double() * dstate).sum()).backward()
    results.append({"o": o.detach(), "state": None if state is None else state.detach(),
                    "grads": [None if x is None else x.grad for x in leaves], "launches": list(launches)})
torch.save(results, sys.argv[2])
