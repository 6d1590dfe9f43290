"""DiG's SwiGLU after its gate/up projection, out = (silu(gate) * up) @ weight^T, as one operator that saves only
gate/up and recomputes the product in its backward kernel.

Why. DiG's SwiGLU keeps only gate/up for the backward (`model.overrides.mlp_recompute`: 6 KB per token and block
less than saving the product too, which puts DiG-XL/2's peak memory at DiT's). As activation checkpointing under
torch.compile, that recompute is a kernel of its own in the backward that reads gate/up [tokens, 2F] once more only
to write the product for the down projection's weight gradient, beside the kernel that reads gate/up again for
d(gate/up) (1.04 ms and 2.79 ms of a DiG-XL/2 step at 256 px / 32 images on an H200, BENCHMARKS.md 2026-11-30).
Here one backward kernel reads gate/up and d(product) once and writes d(gate/up) and the product.

What. gate_up [..., 2F] (gate in the first F columns, up in the last F), weight [D, F], same dtype (float32,
bfloat16 or float16); math in float32, results in that dtype:
    forward:   product = silu(gate) * up;  out = product @ weight^T
    backward:  dproduct = dout @ weight
               dgate = dproduct * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate)));  dup = dproduct * silu(gate)
               dweight = dout^T @ product   (the product recomputed by the same kernel)
The GEMMs are torch's (cuBLAS). The product exists only inside the forward and inside the backward.

How it runs. Registered operators (`dig::swiglu_down`, `dig::swiglu_down_backward`) with fake implementations and
an autograd formula, so a compiled block stays one graph. `kernels_apply` says whether a tensor runs on them (CUDA,
or Triton's CPU interpreter in tests, TRITON_INTERPRET=1 read at import). The reference is `swiglu_torch.py`.
"""
from __future__ import annotations

import importlib.util
import os

import torch

# One program covers BLOCK_ROWS rows x BLOCK_F columns of F (4096 elements at F >= 256): the loads of gate and up
# are 512-byte runs of a row in bf16. The backward keeps gate, up, dproduct and three results live: 8 warps.
BLOCK_F = 256
TILE = 4096
FWD_WARPS = 4
BWD_WARPS = 8
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def kernels_apply(gate_up: torch.Tensor) -> bool:
    """gate_up runs on the Triton kernels: Triton installed, a CUDA tensor (or the interpreter), a kernel dtype."""
    return TRITON_INSTALLED and (gate_up.is_cuda or _INTERPRETED) and gate_up.dtype in KERNEL_DTYPES


if TRITON_INSTALLED:
    import triton
    import triton.language as tl

    @triton.jit
    def _tile(rows, F: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_F: tl.constexpr):
        """This program's rows (int64, as a column) and columns of F (as a row), and the tile's mask."""
        row = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        col = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        return row[:, None], col[None, :], (row[:, None] < rows) & (col[None, :] < F)

    @triton.jit
    def _gate_and_up(gate_up_ptr, row, col, mask, F: tl.constexpr):
        gate = tl.load(gate_up_ptr + row * (2 * F) + col, mask=mask, other=0.).to(tl.float32)
        up = tl.load(gate_up_ptr + row * (2 * F) + F + col, mask=mask, other=0.).to(tl.float32)
        return gate, up

    @triton.jit
    def swiglu_product_kernel(gate_up_ptr, product_ptr, rows, F: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                        BLOCK_F: tl.constexpr):
        row, col, mask = _tile(rows, F, BLOCK_ROWS, BLOCK_F)
        gate, up = _gate_and_up(gate_up_ptr, row, col, mask, F)
        product = gate / (1. + tl.exp(-gate)) * up
        tl.store(product_ptr + row * F + col, product.to(product_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def swiglu_backward_kernel(gate_up_ptr, dproduct_ptr, dgate_up_ptr, product_ptr, rows, F: tl.constexpr,
                         BLOCK_ROWS: tl.constexpr, BLOCK_F: tl.constexpr):
        row, col, mask = _tile(rows, F, BLOCK_ROWS, BLOCK_F)
        gate, up = _gate_and_up(gate_up_ptr, row, col, mask, F)
        dproduct = tl.load(dproduct_ptr + row * F + col, mask=mask, other=0.).to(tl.float32)
        sig = 1. / (1. + tl.exp(-gate))
        silu = gate * sig
        dtype = dgate_up_ptr.dtype.element_ty
        tl.store(dgate_up_ptr + row * (2 * F) + col, (dproduct * up * sig * (1. + gate * (1. - sig))).to(dtype),
                 mask=mask)
        tl.store(dgate_up_ptr + row * (2 * F) + F + col, (dproduct * silu).to(dtype), mask=mask)
        tl.store(product_ptr + row * F + col, (silu * up).to(product_ptr.dtype.element_ty), mask=mask)


def _launch(kernel, rows: int, F: int, *tensors, num_warps: int) -> None:
    block_f = min(BLOCK_F, triton.next_power_of_2(F))
    block_rows = max(1, TILE // block_f)
    if rows:
        kernel[(triton.cdiv(rows, block_rows), triton.cdiv(F, block_f))](*tensors, rows, F, BLOCK_ROWS=block_rows,
                                                                         BLOCK_F=block_f, num_warps=num_warps)


# (A custom operator's implementation runs with the caller's autocast state: the GEMMs below are kept in the
# inputs' dtype, as the fake implementations promise.)
def _forward(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    with torch.autocast(gate_up.device.type, enabled=False):
        gate_up = gate_up.contiguous()
        F = gate_up.shape[-1] // 2
        product = torch.empty(gate_up.shape[:-1] + (F,), dtype=gate_up.dtype, device=gate_up.device)
        _launch(swiglu_product_kernel, gate_up.numel() // (2 * F), F, gate_up, product, num_warps=FWD_WARPS)
        return torch.matmul(product, weight.t())


def _backward(gate_up: torch.Tensor, weight: torch.Tensor, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.autocast(gate_up.device.type, enabled=False):
        gate_up = gate_up.contiguous()
        F = gate_up.shape[-1] // 2
        rows = gate_up.numel() // (2 * F)
        dout = dout.reshape(rows, weight.shape[0]).to(gate_up.dtype)
        dproduct = torch.matmul(dout, weight)
        dgate_up = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
        # (a buffer of its own: writing the product over dproduct would be safe only if every element's load and
        # store fell to the same thread, which Triton's layouts do not promise)
        product = torch.empty(rows, F, dtype=gate_up.dtype, device=gate_up.device)
        _launch(swiglu_backward_kernel, rows, F, gate_up, dproduct, dgate_up, product, num_warps=BWD_WARPS)
        del dproduct
        return dgate_up, torch.matmul(dout.t(), product)


@torch.library.custom_op("dig::swiglu_down", mutates_args=())
def swiglu_down_op(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _forward(gate_up, weight)


@swiglu_down_op.register_fake
def _(gate_up, weight):
    return gate_up.new_empty(gate_up.shape[:-1] + (weight.shape[0],))


@torch.library.custom_op("dig::swiglu_down_backward", mutates_args=())
def swiglu_down_backward(gate_up: torch.Tensor, weight: torch.Tensor,
                         dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(gate_up, weight, dout)


@swiglu_down_backward.register_fake
def _(gate_up, weight, dout):
    return (torch.empty_like(gate_up, memory_format=torch.contiguous_format),
            torch.empty_like(weight, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_down_grad(ctx, dout):
    gate_up, weight = ctx.saved_tensors
    return torch.ops.dig.swiglu_down_backward(gate_up, weight, dout)


swiglu_down_op.register_autograd(_swiglu_down_grad, setup_context=_setup_context)


def swiglu_down(gate_up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(silu(gate) * up) @ weight^T for gate_up [..., 2F] (gate | up) and weight [D, F] of gate_up's dtype, on the
    Triton kernels (callers check `kernels_apply` first; the reference is swiglu_torch.swiglu_down_torch). Saves
    only gate_up and weight for the backward."""
    if weight.dim() != 2 or gate_up.dim() < 1 or weight.shape[1] == 0 or gate_up.shape[-1] != 2 * weight.shape[1]:
        raise ValueError(f"swiglu_down: gate_up must be [..., 2F] and weight [D, F], F > 0; got gate_up "
                         f"{tuple(gate_up.shape)}, weight {tuple(weight.shape)}")
    if weight.dtype != gate_up.dtype or weight.device != gate_up.device:
        raise ValueError(f"swiglu_down: weight ({weight.dtype}, {weight.device}) must have gate_up's dtype and "
                         f"device ({gate_up.dtype}, {gate_up.device})")
    if not kernels_apply(gate_up):
        raise ValueError(f"swiglu_down: no Triton kernels for a {gate_up.dtype} tensor on {gate_up.device}")
    return torch.ops.dig.swiglu_down(gate_up, weight)
