"""Latent pipeline throughput against the bare encoder, same machine, same VAE, same batch; and the encoder's
speed options side by side (issue 12).

  bare encoder  LatentEncoder.encode_images on already-cropped uint8 images in memory (host->device copy,
                normalise, VAE encode of image + flip, cast to the storage dtype, copy back): the ceiling.
  pipeline      python -m data_pipeline's job on a local Ray (or RAY_ADDRESS) over an ImageFolder of JPEGs:
                list, read, decode, ADM crop, encode, write tar shards + done records + manifest.
Both count source images per second (each image is encoded twice: as is and mirrored; encodes/s = 2x).

  .venv/bin/python bench/bench_pipeline.py --vae config:sd --resolution 256 --images 64 --batch 16

Encoder settings (`--only encoder`): one setting from the flags, or several in one process with `--settings`
(comma-separated) or `--sweep` (the issue-12 table). A setting is
PRECISION[+cl][+compile|+autotune][+freeze][+allalgos][+torchgn][@BATCH]:
  fp32 | fp16 | bf16   encoder arithmetic;      +cl        channels-last memory format (else contiguous NCHW)
  +compile             torch.compile'd step;    +autotune  the same in mode max-autotune-no-cudagraphs (slow compile)
  +freeze              inductor's freezing (weights folded in as constants; with +compile or +autotune)
  +allalgos            cuDNN's benchmark tries every convolution algorithm (torch.backends.cudnn.benchmark_limit=0;
                       torch's default tries 10)
  +torchgn             torch's GroupNorm and SiLU (inductor's kernels when compiled) instead of the pipeline's
                       default, dig.ops.group_norm_triton (fused_group_norm: false)
  @BATCH               images per forward (default --batch)
  legacy-bf16@64       the encoder stage as it was before issue 12 (kept here for before/after in one run)
`--profile` adds, per setting, where one timed call's GPU time goes (kernels by kind, the busiest kernels).
Every row reports source images/s, encodes/s, its warm-up (first call: cuDNN autotune, compile) and the max abs
difference of its stored mean/std against a strict fp32 encode (TF32 off) of the same images through diffusers'
own AutoencoderKL.encode; `--no-reference` skips that encode.

  python bench/bench_pipeline.py --only encoder --sweep --vae config:sd --resolution 256 --images 1024
Synthetic ImageNet-like JPEGs (random sizes around 500x375) are generated unless --input is given; random VAE
weights are fine for speed ("config:sd" is the sd-vae-ft-ema architecture).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import fmt_table, kernel_kind, versions  # noqa: E402
from data_pipeline.config import PipelineConfig  # noqa: E402
from data_pipeline.encoder import LatentEncoder  # noqa: E402

SWEEP = ["legacy-bf16", "fp32", "bf16", "bf16+cl", "bf16+cl+torchgn", "fp16+cl", "bf16+cl+compile",
         "bf16+cl+compile+torchgn", "fp16+cl+compile", "bf16+cl@32", "bf16+cl@128", "bf16+cl+compile@32",
         "bf16+cl+compile@128"]
SETTING = re.compile(r"^(?P<legacy>legacy-)?(?P<precision>fp32|fp16|bf16)"
                     r"(?P<flags>(\+(cl|compile|autotune|freeze|allalgos|torchgn))*)"
                     r"(@(?P<batch>[1-9][0-9]*))?$")


@dataclass
class EncoderSetting:
    name: str
    precision: str
    memory_format: str  # "channels_last" | "contiguous"
    compile: bool
    batch: int
    legacy: bool = False
    compile_mode: str = "default"
    freeze: bool = False  # inductor's freezing
    all_algorithms: bool = False  # cuDNN benchmark over every algorithm
    fused_group_norm: bool = True  # the pipeline's GroupNorm kernels (+torchgn: False)


def parse_setting(spec: str, default_batch: int) -> EncoderSetting:
    match = SETTING.match(spec.strip())
    if not match:
        raise ValueError(f"bad encoder setting {spec!r}: expected "
                         "PRECISION[+cl][+compile|+autotune][+freeze][+allalgos][+torchgn][@BATCH], e.g. bf16+cl+compile@64, "
                         "or legacy-bf16")
    flags = set(filter(None, match["flags"].split("+")))
    if match["legacy"] and flags:
        raise ValueError(f"bad encoder setting {spec!r}: the legacy path takes no +flags")
    if {"compile", "autotune"} <= flags:
        raise ValueError(f"bad encoder setting {spec!r}: +autotune is a compile mode; give +compile or +autotune")
    if "freeze" in flags and not flags & {"compile", "autotune"}:
        raise ValueError(f"bad encoder setting {spec!r}: +freeze is an option of the compiled step; add +compile")
    batch = int(match["batch"]) if match["batch"] else default_batch
    name = spec.strip() if match["batch"] else f"{spec.strip()}@{batch}"
    return EncoderSetting(name=name, precision=match["precision"],
                          memory_format="channels_last" if "cl" in flags else "contiguous",
                          compile=bool(flags & {"compile", "autotune"}), batch=batch, legacy=bool(match["legacy"]),
                          compile_mode="max-autotune-no-cudagraphs" if "autotune" in flags else "default",
                          freeze="freeze" in flags, all_algorithms="allalgos" in flags,
                          fused_group_norm="torchgn" not in flags)


def make_jpeg_folder(root: str, count: int, classes: int = 4, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = int(rng.integers(400, 600)), int(rng.integers(300, 450))
        # Smooth random colour fields compress like photos (pure noise would make huge JPEGs).
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        folder = os.path.join(root, f"class{i % classes:03d}")
        os.makedirs(folder, exist_ok=True)
        image.save(os.path.join(folder, f"img{i:06d}.JPEG"), quality=90)


class LegacyEncoder:
    """The encoder stage as it was before issue 12 (measured at 306.7 img/s, bf16, batch 64, one H200), restated
    for before/after in one run: the whole VAE on the device; per chunk a pageable upload, the [-1, 1] scaling in
    fp32 on a channels-last view fed to an NCHW network, diffusers' encode, and a device->host copy (a sync)."""

    def __init__(self, vae: str, precision: str, device: str, batch_size: int, storage_dtype: str = "float16"):
        import torch

        from data_pipeline.encoder import PRECISIONS, resolve_device
        from dig.vae import load_vae

        self.device = resolve_device(device)
        if self.device == "cuda":
            torch.backends.cudnn.benchmark = True
        self.vae = load_vae(vae, device=self.device, dtype=getattr(torch, PRECISIONS[precision]))
        self.batch_size = batch_size
        self.storage_dtype = storage_dtype

    def encode_images(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from dig.vae import encode

        means, stds = [], []
        to_store = getattr(torch, self.storage_dtype)
        for start in range(0, len(images), self.batch_size):
            chunk = torch.from_numpy(np.require(images[start:start + self.batch_size], requirements=["C", "W"]))
            x = chunk.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            n = x.shape[0]
            mean, std = encode(self.vae, torch.cat([x, x.flip(-1)]))
            means.append(mean.float().unflatten(0, (2, n)).transpose(0, 1).to(to_store).cpu().numpy())
            stds.append(std.float().unflatten(0, (2, n)).transpose(0, 1).to(to_store).cpu().numpy())
        return np.concatenate(means), np.concatenate(stds)


def reference_encode(vae_spec: str, images: np.ndarray, batch: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    """Strict fp32 (TF32 off) through diffusers' own AutoencoderKL.encode, contiguous NCHW, the scaling in float64:
    (mean, std), each float64 [N, 2, C, h, w]; [:, 1] is the mirror image."""
    import torch

    from dig.vae import encode, load_vae

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vae = load_vae(vae_spec, device=device)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    means, stds = [], []
    try:
        for start in range(0, len(images), batch):
            x = torch.from_numpy(images[start:start + batch]).to(device).permute(0, 3, 1, 2).double() / 127.5 - 1
            n = x.shape[0]
            mean, std = encode(vae, torch.cat([x, x.flip(-1)]).float().contiguous())
            means.append(mean.double().unflatten(0, (2, n)).transpose(0, 1).cpu().numpy())
            stds.append(std.double().unflatten(0, (2, n)).transpose(0, 1).cpu().numpy())
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
        del vae
    return np.concatenate(means), np.concatenate(stds)


ENCODER_KERNEL_KINDS = [  # (kind, regex over the kernel name), first match wins
    ("group norm (ours)", r"^_(stats|normalize)_kernel$"),
    # inductor names a kernel after the ops it fused and the ops it feeds: its own GroupNorm kernels mention
    # "convolution" too (so this comes before conv), and a conv's bias add feeding our op mentions "group_norm"
    ("group norm (inductor)", r"^triton_.*native_group_norm"),
    ("other elementwise (inductor)", r"^triton_"),
    ("layout transforms", r"nchwToNhwc|nhwcToNchw"),
    ("conv (cuDNN)", r"fprop|implicit_gemm|conv|xmma|cudnn"),
    ("attention", r"flash|fmha|attention"),
    ("matmul", r"gemm|cutlass|nvjet|wgmma|matmul"),
    ("copies", r"memcpy|copy"),
]


def profile_encoder(encoder, images: np.ndarray, top: int = 12) -> dict:
    """GPU kernel time of one encode_images call, by kind and for the busiest kernels, beside its wall time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        encoder.encode_images(images)
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3
    kinds: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for evt in prof.key_averages():
        if evt.device_type != torch.autograd.DeviceType.CUDA or evt.device_time_total <= 0:
            continue  # operator events carry their kernels' time too: count kernels only
        ms = evt.device_time_total / 1e3
        kind = kernel_kind(evt.key, ENCODER_KERNEL_KINDS)
        kinds[kind] = kinds.get(kind, 0.0) + ms
        kernels[evt.key] = kernels.get(evt.key, 0.0) + ms
    busiest = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    return {"wall_ms": round(wall_ms, 1), "kernel_ms": round(sum(kinds.values()), 1),
            "by_kind_ms": {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "busiest_kernels_ms": {k[:160]: round(v, 2) for k, v in busiest}}


def measure_encoder(setting: EncoderSetting, args, images: np.ndarray, reference) -> dict:
    import contextlib

    import torch

    if setting.compile:
        torch._dynamo.reset()  # each compiled row starts from a clean cache (and its own compile time)
    with contextlib.ExitStack() as scope:
        if setting.freeze:  # held through the warm-up call, where the step compiles
            import torch._inductor.config as inductor_config

            scope.enter_context(inductor_config.patch(freezing=True))
        if setting.all_algorithms:
            saved_limit = torch.backends.cudnn.benchmark_limit
            torch.backends.cudnn.benchmark_limit = 0
            scope.callback(setattr, torch.backends.cudnn, "benchmark_limit", saved_limit)
        return _measure_encoder(setting, args, images, reference)


def _measure_encoder(setting: EncoderSetting, args, images: np.ndarray, reference) -> dict:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if setting.legacy:
            encoder = LegacyEncoder(args.vae, setting.precision, args.device, setting.batch, args.storage_dtype)
        else:
            encoder = LatentEncoder(args.vae, precision=setting.precision, device=args.device,
                                    batch_size=setting.batch, storage_dtype=args.storage_dtype,
                                    memory_format=setting.memory_format, compile=setting.compile,
                                    compile_mode=setting.compile_mode, fused_group_norm=setting.fused_group_norm)
    device = torch.device(encoder.device)
    start = time.perf_counter()
    encoder.encode_images(images)  # warm-up: allocator, cuDNN autotune of every shape, compile
    warmup = time.perf_counter() - start
    times = []
    for _ in range(args.repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        mean, std = encoder.encode_images(images)  # returns host arrays: includes the device->host copy
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    row = {"setting": setting.name, "device": encoder.device, "precision": setting.precision,
           "memory_format": "legacy" if setting.legacy else setting.memory_format,
           "compile": setting.compile_mode if setting.compile else False,
           "batch": setting.batch, "images": len(images), "seconds": round(seconds, 4),
           "source_img_per_s": round(len(images) / seconds, 2), "encodes_per_s": round(2 * len(images) / seconds, 2),
           "warmup_s": round(warmup, 2)}
    if args.profile and device.type == "cuda":
        row["profile"] = profile_encoder(encoder, images)
        print(f"[bench_pipeline] {setting.name}: one call {row['profile']['wall_ms']} ms wall, "
              f"{row['profile']['kernel_ms']} ms of kernels: " + json.dumps(row["profile"]["by_kind_ms"]), flush=True)
        for name, ms in row["profile"]["busiest_kernels_ms"].items():
            print(f"    {ms:9.2f} ms  {name}", flush=True)
    if reference is not None:
        row["mean_max_abs_diff"] = float(np.abs(mean.astype(np.float64) - reference[0]).max())
        row["std_max_abs_diff"] = float(np.abs(std.astype(np.float64) - reference[1]).max())
    del encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def encoder_settings(args) -> list[EncoderSetting]:
    if args.sweep or args.settings:
        specs = SWEEP if args.sweep else [s for s in args.settings.split(",") if s.strip()]
        return [parse_setting(spec, args.batch) for spec in specs]
    from data_pipeline.encoder import resolve_device, resolve_memory_format

    memory_format = resolve_memory_format(args.memory_format, resolve_device(args.device), args.compile,
                                          fused_group_norm=True)
    name = args.precision + ("+cl" if memory_format == "channels_last" else "")
    name += ("+autotune" if args.compile_mode != "default" else "+compile") if args.compile else ""
    return [EncoderSetting(name=f"{name}@{args.batch}", precision=args.precision, memory_format=memory_format,
                           compile=args.compile, batch=args.batch, compile_mode=args.compile_mode)]


def bench_encoder(args) -> list[dict]:
    """Every requested encoder setting on the same images in one process; each row as soon as it is measured
    (printed, and written to --out), so a run cut short keeps the rows it finished."""
    from data_pipeline.encoder import resolve_device

    settings = encoder_settings(args)  # bad specs fail before any work
    images = np.random.default_rng(0).integers(0, 256, (args.images, args.resolution, args.resolution, 3),
                                               dtype=np.uint8)
    reference = summary = None
    if not args.no_reference:
        start = time.perf_counter()
        reference = reference_encode(args.vae, images, max(s.batch for s in settings), resolve_device(args.device))
        mean, std = reference
        summary = {"seconds": round(time.perf_counter() - start, 2), "mean_max_abs": float(np.abs(mean).max()),
                   "std_max_abs": float(np.abs(std).max()),
                   # what storing the fp32 reference itself in the storage dtype changes: the floor of the diffs
                   "storage_rounding_mean": float(np.abs(mean.astype(args.storage_dtype) - mean).max()),
                   "storage_rounding_std": float(np.abs(std.astype(args.storage_dtype) - std).max())}
        print(f"[bench_pipeline] fp32 reference encode (TF32 off) {summary['seconds']} s; max |mean| "
              f"{summary['mean_max_abs']:.4g}, max |std| {summary['std_max_abs']:.4g}; {args.storage_dtype} storage "
              f"alone changes them by up to {summary['storage_rounding_mean']:.3g} / "
              f"{summary['storage_rounding_std']:.3g}", flush=True)
    rows = []
    for setting in settings:
        if setting.batch > args.images:
            print(f"[bench_pipeline] {setting.name}: skipped, its batch is larger than --images {args.images}",
                  flush=True)
            continue
        rows.append({"mode": "bare encoder", **measure_encoder(setting, args, images, reference)})
        print("[bench_pipeline] " + json.dumps({"vae": args.vae, "resolution": args.resolution, **rows[-1]}),
              flush=True)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "encoder_bench.json"), "w") as f:
                json.dump({"env": versions(), "vae": args.vae, "resolution": args.resolution,
                           "images": args.images, "storage_dtype": args.storage_dtype, "reference": summary,
                           "rows": rows}, f, indent=1)
    return rows


def bench_pipeline(args) -> dict:
    from data_pipeline.job import run

    work = tempfile.mkdtemp(prefix="bench-pipeline-")
    try:
        source = args.input
        if source is None:
            source = os.path.join(work, "images")
            make_jpeg_folder(source, args.images)
        cfg = PipelineConfig(input=source, output=os.path.join(work, "latents"), resolution=args.resolution,
                             vae=args.vae, shard_size=args.shard_size, precision=args.precision,
                             device=args.device, encode_batch_size=args.batch, num_encoders=args.num_encoders,
                             decode_cpus=args.decode_cpus, memory_format=args.memory_format,
                             compile_encoder=args.compile, compile_mode=args.compile_mode,
                             storage_dtype=args.storage_dtype)
        summary = run(cfg)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"mode": "pipeline", "images": summary["images_in"], "seconds": summary["seconds"],
            "images_per_s": summary["images_per_s"], "total_seconds": summary["total_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", default="config:sd")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="images per forward (each also mirrored)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--memory-format", default="auto", choices=["auto", "channels_last", "contiguous"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder step")
    parser.add_argument("--compile-mode", default="default", choices=["default", "max-autotune-no-cudagraphs"])
    parser.add_argument("--storage-dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--num-encoders", type=int, default=None)
    parser.add_argument("--decode-cpus", type=float, default=1.0)
    parser.add_argument("--input", default=None, help="an ImageFolder to use instead of synthetic JPEGs")
    parser.add_argument("--only", choices=["encoder", "pipeline"], default=None)
    parser.add_argument("--settings", default=None,
                        help="encoder: comma-separated settings PRECISION[+cl][+compile|+autotune][@BATCH]")
    parser.add_argument("--sweep", action="store_true", help="encoder: the issue-12 table: " + ", ".join(SWEEP))
    parser.add_argument("--repeat", type=int, default=3, help="encoder: timed calls per setting (median)")
    parser.add_argument("--no-reference", action="store_true", help="encoder: skip the fp32 reference encode")
    parser.add_argument("--profile", action="store_true",
                        help="encoder, on a GPU: where one call's kernel time goes, per setting (kinds, busiest kernels)")
    parser.add_argument("--out", default=None, help="encoder: write encoder_bench.json (updated after each row)")
    parser.add_argument("--gn-options", default="default",
                        help="encoder: launch options of the fused GroupNorm kernels for every row, "
                             "NAME=VALUE[;NAME=VALUE] over TILE, STATS_PROGRAMS, NUM_WARPS (bench.bench_group_norm)")
    args = parser.parse_args()
    if args.images < 1 or args.repeat < 1 or args.batch < 1:
        parser.error("--images, --repeat and --batch must be at least 1")
    if (args.sweep or args.settings) and args.only != "encoder":
        parser.error("--sweep/--settings measure the bare encoder only: add --only encoder")
    if args.only != "pipeline":
        try:
            encoder_settings(args)  # a bad setting fails here, before any work
            from bench.bench_group_norm import parse_options

            gn_options = parse_options(args.gn_options)
        except ValueError as exc:
            parser.error(str(exc))
        if gn_options:
            import dig.ops.group_norm_triton as group_norm_module

            for name, value in gn_options.items():
                setattr(group_norm_module, name, value)

    import torch

    if args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()):
        torch.set_num_threads(os.cpu_count())
    encoder_rows, pipeline_row = [], None
    if args.only in (None, "encoder"):
        encoder_rows = bench_encoder(args)
        columns = ["setting", "batch", "source_img_per_s", "encodes_per_s", "warmup_s"]
        columns += ["mean_max_abs_diff", "std_max_abs_diff"] if not args.no_reference else []
        print(f"\n[bench_pipeline] bare encoder, {args.vae} at {args.resolution} px, {args.images} images, "
              f"{encoder_rows[0]['device']}, {args.storage_dtype} storage:\n" + fmt_table(encoder_rows, columns),
              flush=True)
    if args.only in (None, "pipeline"):
        pipeline_row = bench_pipeline(args)
        setup = {k: getattr(args, k) for k in ("vae", "resolution", "batch", "precision", "device", "shard_size",
                                               "memory_format", "compile", "compile_mode")}
        print("[bench_pipeline] " + json.dumps({**setup, **pipeline_row}), flush=True)
    if pipeline_row and len(encoder_rows) == 1:
        print(f"[bench_pipeline] pipeline / bare encoder = "
              f"{pipeline_row['images_per_s'] / encoder_rows[0]['source_img_per_s']:.2f}", flush=True)


if __name__ == "__main__":
    main()
