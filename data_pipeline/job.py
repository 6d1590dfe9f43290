"""The preprocessing job: check access, list inputs, run the Ray Data pipeline over the shards that are not done
yet, then write rejects.jsonl, latent_stats.json and (last) manifest.json from every shard's done record."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from dig.data import shard_format, storage
from dig.progress import Progress

from .config import PipelineConfig
from .encoder import LatentEncoder
from .listing import Listing, assign_shards, assignment_fingerprint, list_inputs, shard_order
from .shards import decode_shard, write_shard

log = logging.getLogger("data_pipeline")

JOB_RECORD_NAME = "job.json"  # what this output folder is being filled with; a re-run must match it
LOOPBACK = "127.0.0.1"


class PipelineError(RuntimeError):
    """The job cannot start or finish; the message says why."""


def connect_ray(address: str | None):
    """Join the cluster at `address` / RAY_ADDRESS (what `ray job submit` sets), or start a local Ray that
    listens on loopback only."""
    address = address or os.environ.get("RAY_ADDRESS")
    host = (address or "").rpartition(":")[0].removeprefix("ray://").strip("[]")
    if not address or host in (LOOPBACK, "localhost", "::1"):
        # Single-machine cluster: without this Ray swaps a loopback address for the machine's routable IP
        # (and a local Ray binds it). Ray reads it when first imported.
        if "ray" in sys.modules and os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
            log.warning("ray was imported before connect_ray; it may not stay on loopback")
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    if address:
        return ray.init(address=address, log_to_driver=True)
    return ray.init(_node_ip_address=LOOPBACK, include_dashboard=False, configure_logging=True)


def vae_geometry(spec: str) -> dict:
    """Load the VAE once on the driver (CPU) so a bad spec fails before any work; returns its geometry."""
    import warnings

    from dig.vae import downsample_factor, load_vae, scaling_factor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the encoder actors repeat any random-weights warning
        vae = load_vae(spec)
    return {"latent_channels": int(vae.config.latent_channels), "downsample": downsample_factor(vae),
            "scaling_factor": scaling_factor(vae)}


def _job_record(cfg: PipelineConfig, listing: Listing, assignment_sha256: str) -> dict:
    # The shuffle settings and the deal order's fingerprint decide which shard each input is in.
    return {"input": cfg.input.rstrip("/"), "layout": listing.layout, "num_inputs": len(listing.items),
            "listing_sha256": listing.fingerprint(), "resolution": cfg.resolution, "vae": cfg.vae,
            "precision": cfg.precision, "name": cfg.name, "shard_size": cfg.shard_size,
            "shuffle": cfg.shuffle, "shuffle_seed": cfg.shuffle_seed if cfg.shuffle else None,
            "assignment_sha256": assignment_sha256, "storage_dtype": cfg.storage_dtype, "min_side": cfg.min_side}


def _claim_output(cfg: PipelineConfig, record: dict) -> None:
    """Refuse to mix two different jobs in one output folder (the shard assignment would not hold)."""
    uri = storage.join(cfg.output, JOB_RECORD_NAME)
    if storage.exists(uri):
        previous = json.loads(storage.read_bytes(uri))
        changed = sorted(k for k in set(previous) | set(record) if previous.get(k) != record.get(k))
        if changed:
            raise PipelineError(f"{cfg.output} already holds shards of a different job (differs in {changed}); "
                                "use a new --output, or delete the old one")
        return
    storage.write_bytes(uri, json.dumps(record, indent=1).encode())


def storage_runtime_env() -> dict:
    """The driver's AWS settings (credentials, region, endpoint) and S3 retry/timeout settings (DIG_S3_*), for the
    tasks that read and write storage: what works on the driver then works on every worker, whatever environment
    their nodes started with."""
    env_vars = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "DIG_S3_"))}
    return {"env_vars": env_vars} if env_vars else {}


def quiet_ray_data_progress() -> None:
    """Our own progress line (images done/total, img/s, ETA from the listing's count) replaces Ray Data's
    per-operator progress, which logs a block of lines every few seconds and starts at "Total Progress: 0/?"."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # the execution plan banner; warnings still show
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled. To ..."


def build_dataset(cfg: PipelineConfig, rows: list[dict], use_gpu: bool, num_encoders: int):
    import ray.data
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    runtime_env = storage_runtime_env() or None

    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    decode_compute = TaskPoolStrategy(size=cfg.max_decode_tasks) if cfg.max_decode_tasks else None
    ds = ds.map(decode_shard, fn_kwargs=dict(resolution=cfg.resolution, min_side=cfg.min_side,
                                             io_threads=cfg.io_threads),
                compute=decode_compute, runtime_env=runtime_env, num_cpus=cfg.decode_cpus,
                # A decode task holds a shard of decoded and cropped images. Declaring that memory also keeps
                # Ray from fusing decoding into the encoder actors (it fuses stages with equal resources).
                memory=cfg.shard_size * cfg.resolution ** 2 * 3 * 2)
    ds = ds.map_batches(
        LatentEncoder, batch_size=1, batch_format="numpy",
        fn_constructor_kwargs=dict(vae=cfg.vae, precision=cfg.precision, device="cuda" if use_gpu else "cpu",
                                   batch_size=cfg.encode_batch_size, storage_dtype=cfg.storage_dtype,
                                   memory_format=cfg.memory_format, compile=cfg.compile_encoder,
                                   compile_mode=cfg.compile_mode, fused_group_norm=cfg.fused_group_norm),
        compute=ActorPoolStrategy(size=num_encoders), num_gpus=1 if use_gpu else 0, num_cpus=cfg.encoder_cpus)
    return ds.map(write_shard, fn_kwargs=dict(output=cfg.output, name=cfg.name, storage_dtype=cfg.storage_dtype),
                  num_cpus=0.5, runtime_env=runtime_env)


def _read_done(cfg: PipelineConfig, indices: list[int]) -> dict[int, dict]:
    def read(i):
        return i, json.loads(storage.read_bytes(storage.join(cfg.output, shard_format.shard_done_name(cfg.name, i))))

    with ThreadPoolExecutor(max_workers=16) as pool:
        return dict(pool.map(read, indices))


def finalize(cfg: PipelineConfig, listing: Listing, num_shards: int, records: dict[int, dict], geometry: dict,
             summary: dict) -> shard_format.Manifest:
    """Write rejects.jsonl, latent_stats.json and manifest.json (last) from every shard's done record."""
    missing = [i for i in range(num_shards) if i not in records]
    if missing:
        raise PipelineError(f"shards {missing[:10]}... are not done; run the job again to finish them")
    rejects, channels = [], geometry["latent_channels"]
    count, total, total_sq = 0, [0.0] * channels, [0.0] * channels
    shards = []
    for i in range(num_shards):
        rec = records[i]
        rejects.extend(rec["rejects"])
        if rec["count"]:
            shards.append(shard_format.ShardEntry(name=rec["shard"], count=rec["count"], keys=rec["keys"]))
            count += rec["stats"]["count"]
            total = [a + b for a, b in zip(total, rec["stats"]["sum"])]
            total_sq = [a + b for a, b in zip(total_sq, rec["stats"]["sumsq"])]
    rejects.sort(key=lambda r: r["index"])
    storage.write_bytes(storage.join(cfg.output, shard_format.REJECTS_NAME),
                        "".join(json.dumps(r) + "\n" for r in rejects).encode())
    mean = [s / max(count, 1) for s in total]
    std = [math.sqrt(max(sq / max(count, 1) - m * m, 0.0)) for sq, m in zip(total_sq, mean)]
    stats = shard_format.LatentStats(mean=mean, std=std, count=count)
    storage.write_bytes(storage.join(cfg.output, shard_format.STATS_NAME), stats.to_json().encode())
    manifest = shard_format.Manifest(
        resolution=cfg.resolution, latent_channels=channels, latent_size=cfg.resolution // geometry["downsample"],
        vae=cfg.vae, scaling_factor=geometry["scaling_factor"], dtype=cfg.storage_dtype, classes=listing.classes,
        shards=shards, name=cfg.name,
        extra={"input": cfg.input, "layout": listing.layout, "num_inputs": len(listing.items),
               "num_rejects": len(rejects), "num_ignored": len(listing.ignored), "shard_size": cfg.shard_size,
               "shuffle": cfg.shuffle, "shuffle_seed": cfg.shuffle_seed if cfg.shuffle else None,
               "precision": cfg.precision, "listing_sha256": listing.fingerprint(),
               "flips": ["none", "horizontal"]})
    storage.write_bytes(storage.join(cfg.output, shard_format.MANIFEST_NAME), manifest.to_json().encode())
    summary.update(samples_total=manifest.num_samples, rejects_total=len(rejects),
                   ignored_names=len(listing.ignored))
    return manifest


def run(cfg: PipelineConfig) -> dict:
    """Run (or resume) the job described by `cfg`; returns the summary that is also printed."""
    start = time.monotonic()
    # Everything that can fail cheaply fails here, before any Ray work: storage access, the VAE spec.
    storage.check_access(cfg.input)
    storage.check_access(cfg.output, write=True)
    geometry = vae_geometry(cfg.vae)
    if cfg.resolution % geometry["downsample"]:
        raise PipelineError(f"resolution {cfg.resolution} is not a multiple of the VAE's {geometry['downsample']}x "
                            "downsampling")

    connect_ray(cfg.ray_address)
    import ray
    listing = list_inputs(cfg.input, cfg.input_layout, storage_runtime_env() or None)
    if not listing.items:
        raise PipelineError(f"{cfg.input}: no input images found")
    if listing.ignored:
        log.warning("%d names under %s are not inputs and were ignored, e.g. %s", len(listing.ignored),
                    cfg.input, listing.ignored[:3])
    order = shard_order(len(listing.items), cfg.shuffle, cfg.shuffle_seed)
    _claim_output(cfg, _job_record(cfg, listing, assignment_fingerprint(order)))
    partial = storage.remove_partial_writes(cfg.output)
    if partial:
        log.info("removed %d partial writes an interrupted run left in %s", partial, cfg.output)
    shards = assign_shards(listing.items, cfg.shard_size, order=order)
    present = set(storage.list_names(cfg.output))
    done = [s.index for s in shards if shard_format.shard_done_name(cfg.name, s.index) in present]
    todo = [s for s in shards if shard_format.shard_done_name(cfg.name, s.index) not in present]
    todo_inputs = sum(len(s.items) for s in todo)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)
    if use_gpu and gpus == 0:
        raise PipelineError("device 'cuda' requested but the Ray cluster has no GPUs")
    num_encoders = cfg.num_encoders or (gpus if use_gpu else 1)
    dealt = f"shuffled, seed {cfg.shuffle_seed}" if cfg.shuffle else "unshuffled"
    print(f"[data_pipeline] {len(listing.items)} inputs ({listing.layout}, {len(listing.classes)} classes) -> "
          f"{len(shards)} shards of {cfg.shard_size} ({dealt}); {len(done)} already done, {len(todo)} to do; "
          f"encoder on {'GPU' if use_gpu else 'CPU'} x{num_encoders} ({cfg.precision}, batch "
          f"{cfg.encode_batch_size}, memory format {cfg.memory_format}"
          f"{f', compiled ({cfg.compile_mode})' if cfg.compile_encoder else ''}"
          f"{', fused GroupNorm' if cfg.fused_group_norm and use_gpu else ''})", flush=True)

    records = _read_done(cfg, done)
    encode_start = time.monotonic()
    samples_out = rejects = 0
    if todo:
        quiet_ray_data_progress()
        sizes = {s.index: len(s.items) for s in todo}
        with Progress(total=todo_inputs, desc="[data_pipeline] encoded", unit="img") as progress:
            for row in build_dataset(cfg, [s.to_row() for s in todo], use_gpu, num_encoders).iter_rows():
                record = json.loads(row["record"])
                records[record["index"]] = record
                samples_out += record["count"]
                rejects += len(record["rejects"])
                progress.set_postfix(shards=f"{len(records) - len(done)}/{len(todo)}", rejects=rejects)
                progress.update(sizes[record["index"]])
    seconds = time.monotonic() - encode_start
    summary = {"images_in": todo_inputs, "samples_out": samples_out, "rejects": rejects,
               "shards_written": len(todo), "shards_skipped": len(done), "seconds": round(seconds, 2),
               "images_per_s": round(todo_inputs / seconds, 2) if todo and seconds > 0 else 0.0}
    finalize(cfg, listing, len(shards), records, geometry, summary)
    summary["total_seconds"] = round(time.monotonic() - start, 2)
    print("[data_pipeline] summary " + json.dumps(summary), flush=True)
    return summary
