"""The VAE encoder stage: a Ray Data actor that turns a shard's cropped images into posterior mean/std for the
image and its horizontal flip."""
from __future__ import annotations

import numpy as np

PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but this worker sees no CUDA GPU")
    return device


def resolve_memory_format(memory_format: str, device: str, compiled: bool = False,
                          fused_group_norm: bool = False) -> str:
    """auto: channels-last on a GPU for the compiled encoder or with the fused GroupNorm kernels (which read
    channels-last rows), contiguous NCHW otherwise. Measured on an H200 (BENCHMARKS.md, encoder settings, bf16,
    batch 64): eager with torch's GroupNorm, channels-last ran at 282 images/s against 374 contiguous; eager with
    the fused kernels, channels-last 569; compiled, channels-last 657 (torch's GroupNorm) and 759 (fused)."""
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"unknown memory format {memory_format!r}; choose one of {list(MEMORY_FORMATS)}")
    if memory_format == "auto":
        return "channels_last" if device == "cuda" and (compiled or fused_group_norm) else "contiguous"
    return memory_format


def _group_norm_kernels_run() -> bool:
    import warnings

    import torch

    from dig.ops.group_norm_triton import kernels_launch

    why = kernels_launch(torch.device("cuda"))
    if why:
        warnings.warn(f"fused_group_norm: the Triton GroupNorm kernels do not run on this node ({why}); the encoder "
                      "uses torch's GroupNorm instead (slower; fused_group_norm: false silences this)", stacklevel=3)
    return why is None


class LatentEncoder:
    """Callable class for `Dataset.map_batches(..., batch_size=1)`: one row is one shard.

    Per shard: every chunk of `batch_size` crops goes to the device (through pinned memory on a GPU) and through
    the encode step; the results stay on the device until the shard is done, then come back in one copy, so the
    host never waits for the GPU between chunks. With `compile`, the step is compiled for one fixed batch shape
    and a shard's last, smaller chunk is padded to it (the padded rows are dropped): no recompiles, whatever
    the shard sizes. `pad_final_batch` forces the padding on or off (default: on exactly when compiling).
    `fused_group_norm`: on a GPU, the VAE's GroupNorms (and the SiLUs after them) through
    dig.ops.group_norm_triton's kernels, which read channels-last rows (with memory_format auto, channels-last
    is chosen for them); if the kernels cannot launch on this node, a warning and torch's GroupNorm."""

    def __init__(self, vae: str, precision: str = "fp32", device: str = "auto", batch_size: int = 64,
                 storage_dtype: str = "float16", memory_format: str = "auto", compile: bool = False,
                 compile_mode: str = "default", pad_final_batch: bool | None = None, fused_group_norm: bool = True):
        import torch

        from dig.vae import PosteriorEncoder, load_vae

        from .encode_step import EncodeStep

        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {compile_mode!r}; choose one of {list(COMPILE_MODES)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device = resolve_device(device)
        # The kernels read channels-last rows: only on a GPU, with a layout that is or becomes channels-last, and once
        # they have launched here (the probe runs only then).
        self.fused_group_norm = (bool(fused_group_norm) and self.device == "cuda"
                                 and memory_format in ("auto", "channels_last") and _group_norm_kernels_run())
        self.memory_format = resolve_memory_format(memory_format, self.device, bool(compile), self.fused_group_norm)
        self.precision = precision
        self.batch_size = batch_size
        self.storage_dtype = storage_dtype
        self.compile = bool(compile)
        # Eager, a last chunk of a new size costs one cuDNN autotune (at most one per size below the batch), which
        # is cheaper than encoding up to batch_size - 1 padded rows in every shard; compiled, it would recompile.
        self.pad_final_batch = self.compile if pad_final_batch is None else bool(pad_final_batch)
        if self.device == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest convolutions
        # Loaded on the host in fp32; only the encoder half (no decoder) goes to the device.
        self.step = EncodeStep(PosteriorEncoder(load_vae(vae)), device=self.device,
                               dtype=getattr(torch, PRECISIONS[precision]), memory_format=self.memory_format,
                               storage_dtype=getattr(torch, storage_dtype),
                               fused_group_norm=self.fused_group_norm).eval()
        # dynamic=False: one graph for the one (padded) batch shape, never a dynamic-shape recompile.
        self.run_step = torch.compile(self.step, mode=compile_mode, dynamic=False) if self.compile else self.step

    def _to_device(self, chunk: np.ndarray):
        import torch

        if self.device == "cuda":
            # One host copy into pinned memory (Ray's arrays are read-only, so some copy is needed anyway), then
            # an asynchronous upload; the pinned block is not reused before that upload has finished.
            pinned = torch.empty(chunk.shape, dtype=torch.uint8, pin_memory=True)
            pinned.numpy()[...] = chunk
            return pinned.to(self.device, non_blocking=True)
        # torch warns about read-only arrays, so copy only when not writable
        return torch.from_numpy(np.require(chunk, requirements=["C", "W"]))

    def encode_images(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, H, W, 3] -> (mean, std), each [N, 2, C, h, w] in the storage dtype; [:, 1] is the flip."""
        import torch

        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 crops [N, H, W, 3], got {images.dtype} {list(images.shape)}")
        if not len(images):
            return np.zeros((0, 2, 0, 0, 0), self.storage_dtype), np.zeros((0, 2, 0, 0, 0), self.storage_dtype)
        means = stds = None
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                chunk = images[start:start + self.batch_size]
                crops = self._to_device(chunk)
                rows = len(chunk)
                if self.pad_final_batch and rows < self.batch_size:
                    crops = torch.cat([crops, crops.new_zeros((self.batch_size - rows, *crops.shape[1:]))])
                mean, std = self.run_step(crops)
                if means is None:
                    means = mean.new_empty((len(images), *mean.shape[1:]))
                    stds = std.new_empty((len(images), *std.shape[1:]))
                means[start:start + rows] = mean[:rows]
                stds[start:start + rows] = std[:rows]
        return means.cpu().numpy(), stds.cpu().numpy()

    def __call__(self, batch: dict) -> dict:
        out = {k: v for k, v in batch.items() if k != "images"}
        means, stds = zip(*(self.encode_images(np.asarray(images)) for images in batch["images"]))
        out["mean"] = _stack(means)
        out["std"] = _stack(stds)
        return out


def _stack(arrays) -> np.ndarray:
    """Rows of (possibly) different shapes as one column: a regular array when they agree, else objects."""
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    column = np.empty(len(arrays), dtype=object)
    column[:] = list(arrays)
    return column
