"""FID during training (`tracking.eval_every`): every rank samples its share of a small set from the EMA weights,
takes Inception features, and rank 0 computes the ADM numbers against a reference batch and logs them.

The samples are the same as `dig sample … --out X.npz` would draw with the same seed (per-index labels and
noise), whatever the number of ranks. The reference's features (and statistics, unless the reference batch
carries ADM's precomputed ones) are computed once, also spread over the ranks. Everything runs inside
`torch.random.fork_rng`, so evaluating does not move the training RNG streams (a resumed run stays exact).
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class TrainingEvaluator:
    def __init__(self, eval_cfg, model_name: str, model_kwargs: dict, latent_shape, normalizer, vae_spec: str,
                 device: torch.device, rank: int = 0, world_size: int = 1):
        """Checks the files at once (a wrong path fails at the start of training, not at the first evaluation);
        the networks are built at the first evaluation."""
        from dig.train.config import ConfigError

        from .inception import default_weights

        self.cfg = eval_cfg
        self.model_name, self.model_kwargs = model_name, dict(model_kwargs)
        self.latent_shape, self.normalizer, self.vae_spec = list(latent_shape), normalizer, vae_spec
        self.device, self.rank, self.world_size = device, rank, world_size
        self.weights = None if eval_cfg.random_inception else (eval_cfg.inception or default_weights())
        if not eval_cfg.ref or not os.path.isfile(eval_cfg.ref):
            raise ConfigError(f"tracking.eval.ref={eval_cfg.ref!r}: no such reference batch (.npz); set it to e.g. "
                              "ADM's VIRTUAL_imagenet256_labeled.npz, or tracking.eval_every=0")
        if self.weights is None and not eval_cfg.random_inception:
            raise ConfigError("tracking.eval_every > 0 needs Inception weights: set tracking.eval.inception (or "
                              "$DIG_INCEPTION) to pt_inception-2015-12-05-6726825d.pth (README: Evaluation)")
        if self.weights is not None and not os.path.isfile(self.weights):
            raise ConfigError(f"Inception weights {self.weights!r} not found (tracking.eval.inception / "
                              "$DIG_INCEPTION)")
        self._model = self._vae = self._inception = None
        self._ref: dict | None = None

    # --- collective pieces ------------------------------------------------------------------------------------

    def _gather(self, local: dict[str, np.ndarray], order: list[int]) -> dict[str, np.ndarray] | None:
        """Rank 0 gets every rank's feature rows, put back in index order; others get None."""
        if self.world_size == 1:
            parts = [(order, local)]
        else:
            parts = [None] * self.world_size if self.rank == 0 else None
            dist.gather_object((order, local), parts, dst=0)
        if self.rank != 0:
            return None
        indices = np.concatenate([np.asarray(o, dtype=np.int64) for o, _ in parts])
        perm = np.argsort(indices, kind="stable")
        return {k: np.concatenate([f[k] for _, f in parts])[perm] for k in local}

    def _my_chunks(self, count: int) -> list[range]:
        bs = self.cfg.batch_size
        chunks = [range(s, min(s + bs, count)) for s in range(0, count, bs)]
        return chunks[self.rank::self.world_size]

    def _features_of(self, batches) -> tuple[dict[str, np.ndarray], list[int]]:
        from .evaluator import image_features

        feats: dict[str, list] = {"pool": [], "spatial": [], "logits": []}
        order: list[int] = []
        for indices, images in batches:
            for k, v in image_features(self._inception, images, self.device).items():
                feats[k].append(v)
            order += list(indices)
        dims = {"pool": 2048, "spatial": 2023, "logits": 1008}
        return {k: (np.concatenate(v) if v else np.zeros((0, dims[k]), np.float32)) for k, v in feats.items()}, order

    def _reference(self) -> dict:
        from .evaluator import open_image_batch, stored_stats
        from .metrics import GaussianStats

        with open_image_batch(self.cfg.ref) as (count, _):
            pass
        mine = self._my_chunks(count)

        def batches():
            wanted = {c.start: c for c in mine}
            with open_image_batch(self.cfg.ref) as (_, read):
                start = 0
                for batch in read(self.cfg.batch_size):
                    if start in wanted:
                        yield wanted[start], batch
                    start += len(batch)

        feats = self._gather(*self._features_of(batches()))
        if self.rank != 0:
            return {}
        stats = stored_stats(self.cfg.ref) if self.cfg.use_ref_stats else None
        if stats is None:
            stats = (GaussianStats.of(feats["pool"]), GaussianStats.of(feats["spatial"]))
        return {"pool": feats["pool"], "stats": stats}

    # --- one evaluation ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, ema_state: dict[str, torch.Tensor]) -> dict[str, float] | None:
        """Collective: every rank calls it with the full EMA weights; rank 0 gets the metrics, others None."""
        from dig.inference.sample_npz import sample_images

        t0 = time.perf_counter()
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            self._build()
            if self._ref is None:
                self._ref = self._reference()
            self._model.load_state_dict(ema_state, strict=True)
            c = self.cfg
            batches = ((idx, sample_images(self._model, self._vae, self.normalizer, self.latent_shape, list(idx),
                                           c.seed, self._model.num_classes, c.num_steps, c.method, c.cfg_scale,
                                           self.device)[0])
                       for idx in self._my_chunks(c.num_samples))
            feats = self._gather(*self._features_of(batches))
        if self.rank != 0:
            return None
        from .evaluator import compute_metrics

        ref = self._ref
        metrics = compute_metrics(feats, {"pool": ref["pool"]}, ref["stats"], self.device)
        out = {f"eval/{k}": v for k, v in metrics.items()}
        out["eval/seconds"] = time.perf_counter() - t0
        return out

    def _build(self) -> None:
        if self._model is not None:
            return
        from dig.models import create_model
        from dig.vae import load_vae

        from .inception import load_inception

        self._model = create_model(self.model_name, **self.model_kwargs).to(self.device).eval().requires_grad_(False)
        self._vae = load_vae(self.vae_spec, device=self.device)
        self._inception = load_inception(self.weights, self.device)
