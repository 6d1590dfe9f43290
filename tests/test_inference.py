"""dig.inference: per-index sampling that does not depend on batching, the three-line Python API, `dig sample`
into a folder, loading a run directory's EMA without writing a temporary export."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

MODEL = dict(input_size=4, num_classes=10, depth=2, hidden_size=64, num_heads=2)


def make_export(folder: str, seed: int = 0) -> str:
    """What `dig export` writes (weights + config.json), for a tiny random DiG: no training needed."""
    from safetensors.torch import save_file

    from dig.models import create_model

    torch.manual_seed(seed)
    model = create_model("DiG-S/2", **MODEL)
    for p in model.parameters():  # adaLN-Zero starts at zero: perturb so the samples depend on the weights
        p.data.add_(0.02 * torch.randn_like(p))
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model": "DiG-S/2", "model_kwargs": MODEL, "latent_shape": [4, 4, 4],
                   "normalizer": {"kind": "scaling_factor", "scale": [0.18215] * 4, "shift": [0.0] * 4},
                   "vae": "config:tiny", "classes": [f"c{i}" for i in range(10)], "step": 7}, f)
    return folder


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return make_export(str(tmp_path_factory.mktemp("export")))


@pytest.fixture(scope="module")
def loaded(export_dir):
    from dig.inference.loading import load_model
    from dig.inference.normalizer import LatentNormalizer
    from dig.vae import load_vae

    model, info = load_model(export_dir)
    return model, load_vae("config:tiny"), LatentNormalizer.from_dict(info["normalizer"]), info["latent_shape"]


@pytest.mark.parametrize("cfg_scale, method", [(1.0, "ddpm"), (1.5, "ddpm"), (1.0, "ddim")])
def test_samples_depend_on_their_index_only(loaded, cfg_scale, method):
    from dig.inference.sample_npz import sample_images

    model, vae, norm, latent_shape = loaded

    def draw(indices, seed=3):
        return sample_images(model, vae, norm, latent_shape, indices, seed, 10, 3, method, cfg_scale, "cpu")

    whole_images, whole_labels = draw([0, 1, 2, 3])
    parts = [draw([0]), draw([1, 2, 3])]
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), whole_labels)
    diff = np.abs(np.concatenate([p[0] for p in parts]).astype(int) - whole_images.astype(int))
    assert diff.max() <= 1  # the same noise; only float summation order may differ between batch shapes
    assert whole_images.shape == (4, 32, 32, 3) and whole_images.dtype == np.uint8
    assert len({im.tobytes() for im in whole_images}) == 4  # different indices, different samples
    other_seed, _ = draw([0], seed=4)
    assert np.abs(other_seed.astype(int) - whole_images[:1]).max() > 10


def test_labels_are_uniform_over_the_classes():
    from scipy.stats import chisquare

    from dig.inference.sample_npz import sample_label

    labels = np.array([sample_label(0, i, 10) for i in range(5000)])
    counts = np.bincount(labels, minlength=10)
    assert counts.min() > 0 and chisquare(counts).pvalue > 1e-4


def test_python_api_in_three_lines(export_dir):
    from dig.inference import load_pipeline

    pipe = load_pipeline(export_dir, device="cpu")
    images = pipe.sample([1, 7], num_steps=3, cfg_scale=4.0, seed=0)
    assert [im.size for im in images] == [(32, 32), (32, 32)] and images[0].mode == "RGB"
    assert pipe.classes[7] == "c7"
    again = pipe.sample([1], num_steps=3, cfg_scale=4.0, seed=0)  # image 0 depends on (seed, 0, label) only
    assert np.abs(np.asarray(again[0]).astype(int) - np.asarray(images[0])).max() <= 1


def test_sample_grid_into_a_folder(export_dir, tmp_path):
    from PIL import Image

    from dig.cli import main

    out = tmp_path / "grids"
    out.mkdir()
    assert main(["sample", export_dir, "--out", str(out), "--num-images", "4", "--sampling-steps", "2"]) == 0
    grid = np.asarray(Image.open(out / "samples.png"))
    assert grid.shape == (64, 64, 3)
    # cell i is image i of the Python API with the same labels and seed (the grid rounds, the API truncates)
    from dig.inference import load_pipeline

    images = load_pipeline(export_dir, device="cpu").sample([0, 2, 5, 7], num_steps=2, cfg_scale=4.0, seed=0)
    cells = [grid[:32, :32], grid[:32, 32:], grid[32:, :32], grid[32:, 32:]]
    for cell, image in zip(cells, images):
        assert np.abs(cell.astype(int) - np.asarray(image)).max() <= 1
    assert main(["sample", export_dir, "--out", str(tmp_path / "grid.txt"), "--sampling-steps", "2"]) == 2


def test_run_directory_loads_its_ema_without_a_temporary_export(export_dir, tmp_path, monkeypatch):
    """A run directory's latest checkpoint (trainer.json + ema.safetensors) is read in place."""
    import tempfile

    from safetensors.torch import load_file, save_file

    from dig.inference.loading import load_exported, load_model

    ckpt = tmp_path / "run" / "checkpoints" / "step_000000007"
    ckpt.mkdir(parents=True)
    save_file(load_file(os.path.join(export_dir, "model.safetensors")), str(ckpt / "ema.safetensors"))
    info = json.load(open(os.path.join(export_dir, "config.json")))
    (ckpt / "trainer.json").write_text(json.dumps({**info, "model_name": "DiG-S/2"}))
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_000000007")
    (tmp_path / "run" / "config.json").write_text("{}")  # the training config: not an export
    made = []
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: made.append(1))
    model, got = load_model(str(tmp_path / "run"))
    reference, _ = load_exported(export_dir)
    assert got["step"] == 7 and got["weights"] == "ema" and not made
    for (k, v), (k2, v2) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
