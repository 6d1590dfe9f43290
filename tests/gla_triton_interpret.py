"""Runs dig.ops.gla_triton under Triton's CPU interpreter: `TRITON_INTERPRET=1 python gla_triton_interpret.py IN OUT`.

IN holds a list of cases (inputs, cotangents, module settings, and optionally the columns of one [B, T, X] tensor
that q, k, v and g are sliced from); OUT receives each case's output, final state, input gradients (and that
tensor's gradient), each GLA kernel launch's two dot precisions and its token sums' precisions (every kernel's
(name, GATE_PRECISION, SUM_PRECISION)), which inputs each kernel read in place, at what
token stride, and the token strides the dk/dv/dg sweep wrote dq, dk and dv at. A separate process because Triton
chooses interpreted or compiled kernels when they are defined, and the GPU tests of the same session need the
compiled ones.
"""
import importlib
import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
module = importlib.import_module("dig.ops.gla_triton")
INPUTS = ("q", "k", "v", "g")


class RecordedLaunches:
    """A kernel whose launches are written down before they run: (name, PRECISION, FAST_PRECISION) in `precisions`
    (the GLA kernels' own log), and in `reads` (name, {input: (read where the caller's tensor lies, token stride)})
    for the inputs among q, k, v, g that it takes."""

    def __init__(self, name, kernel, precisions, reads):
        self.name, self.kernel, self.precisions, self.reads = name, kernel, precisions, reads

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if self.precisions is not None:
                self.precisions.append((self.name, kwargs.get("PRECISION"), kwargs.get("FAST_PRECISION")))
            sums.append((self.name, kwargs.get("GATE_PRECISION"), kwargs.get("SUM_PRECISION")))
            passed = dict(zip(self.kernel.arg_names, args))
            self.reads.append((self.name, {x: (passed[x].data_ptr() == given[x].data_ptr(),
                                               kwargs[f"STRIDE_{x.upper()}"]) for x in INPUTS if x in passed}))
            if "GRAD_STRIDE_K" in kwargs:
                grad_strides.append((kwargs["GRAD_STRIDE_K"], kwargs["GRAD_STRIDE_V"]))
            return self.kernel[grid](*args, **kwargs)
        return launch


launches, sums, reads, grad_strides, given = [], [], [], [], {}
kernels, split_kernels = module._kernels(), module._split_kernels()
module._kernels = lambda: tuple(RecordedLaunches(name, kernel, launches, reads)
                                for name, kernel in zip(module.KERNELS, kernels))
module._split_kernels = lambda: (RecordedLaunches("split_states", split_kernels[0], None, reads),
                                 RecordedLaunches("split_state_grads", split_kernels[1], None, reads),
                                 split_kernels[2])


def sliced_inputs(inputs, columns, width):
    """q, k, v, g as views of one [B, T, width] leaf at their `columns` ({name: first column}; inputs not named stay
    leaves of their own), the other columns random: (the big leaf, [q, k, v, g, h0] views and leaves)."""
    q = inputs[0]
    big = torch.randn(*q.shape[:2], width, generator=torch.Generator().manual_seed(7), dtype=q.dtype)
    for x, name in zip(inputs, INPUTS):
        if name in columns:
            big[..., columns[name]:columns[name] + x[0, 0].numel()] = x.flatten(2)
    big.requires_grad_()
    views = [big[..., columns[name]:columns[name] + x[0, 0].numel()].view(x.shape) if name in columns
             else x.clone().requires_grad_() for x, name in zip(inputs, INPUTS)]
    return big, views + [None if inputs[4] is None else inputs[4].clone().requires_grad_()]


results = []
for case in torch.load(sys.argv[1]):
    launches.clear()
    sums.clear()
    reads.clear()
    grad_strides.clear()
    for name, value in case["settings"].items():
        setattr(module, name, value)
    big = None
    if case.get("columns"):  # slices of one [B, T, X] tensor (DiG's packed projections)
        big, leaves = sliced_inputs(case["inputs"], *case["columns"])
    elif case.get("transposed"):  # a layout the kernels cannot read in place: heads outermost, [B, H, T, D] memory
        leaves = [x.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in case["inputs"][:4]]
        leaves.append(None if case["inputs"][4] is None else case["inputs"][4].clone().requires_grad_())
    else:
        leaves = [None if x is None else x.clone().requires_grad_() for x in case["inputs"]]
    given.update(zip(INPUTS, leaves))
    do, dstate = case["cotangents"]
    if case["stateless"]:  # the registered operator (DiG's case)
        o, state = module.gla_triton(*leaves[:4], splits=case["splits"], token_order=case["order"])
        (o.double() * do).sum().backward()
    else:  # the autograd Function with initial and final states
        o, state = module.gla_triton(*leaves[:4], initial_state=leaves[4], output_final_state=True,
                                     token_order=case["order"])
        ((o.double() * do).sum() + (state.double() * dstate).sum()).backward()
    grads = [None if x is None else (x.grad if x.is_leaf else None) for x in leaves]
    if big is not None:  # each sliced input's gradient: its columns of the big tensor's
        columns = case["columns"][0]
        grads[:4] = [big.grad[..., columns[n]:columns[n] + x[0, 0].numel()].reshape(x.shape) if n in columns else gx
                     for x, n, gx in zip(leaves, INPUTS, grads)]
    results.append({"o": o.detach(), "state": None if state is None else state.detach(), "grads": grads,
                    "big_grad": None if big is None else big.grad, "launches": list(launches), "sums": list(sums),
                    "reads": list(reads),
                    "grad_strides": list(grad_strides)})
torch.save(results, sys.argv[2])
