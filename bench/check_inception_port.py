"""Our FID Inception-v3 (dig/eval/inception.py) against torch-fidelity's port of the same TensorFlow graph, with
the same (random) weights: pool features, bias-free logits and the TF1 bilinear resize.

torch-fidelity needs torchvision at import, and PyPI's torchvision does not load beside the CPU torch wheel here,
so this is a check to run by hand, not a test: `pip install --no-deps torch-fidelity`, then
`python -m bench.check_inception_port` (only the two modules it uses are imported, not the package's __init__).
Measured 2026-11-28 with torch-fidelity 0.4.0 on CPU: pool 4.5e-8, logits 3.0e-8 max abs difference (features of
size ~0.3), resize 7.4e-4 on a 0..255 scale.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import types

import torch


def import_torch_fidelity_parts():
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("torch-fidelity is not installed: pip install --no-deps torch-fidelity")
    package = types.ModuleType("torch_fidelity")  # skip its __init__ (it imports torchvision)
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = package
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    return FeatureExtractorInceptionV3, interpolate_bilinear_2d_like_tensorflow1x


def main() -> None:
    from dig.eval.inception import InceptionV3Features, resize_bilinear_tf1

    FeatureExtractorInceptionV3, tf1_resize = import_torch_fidelity_parts()
    torch.manual_seed(0)
    ours = InceptionV3Features().eval()
    for m in ours.modules():  # random BatchNorm statistics too, so no layer is an identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "inception.pth")
        torch.save(ours.state_dict(), path)
        theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                             feature_extractor_weights_path=path).eval()
    x = torch.randint(0, 256, (3, 3, 256, 256), dtype=torch.uint8)
    with torch.no_grad():
        got = ours(x)
        pool, logits = theirs(x)
    print(f"pool   max |diff| {(got['pool'] - pool).abs().max().item():.2e}  (max |value| {pool.abs().max():.3f})")
    print(f"logits max |diff| {(got['logits'] - logits).abs().max().item():.2e}  (max |value| {logits.abs().max():.3f})")
    y = torch.rand(2, 3, 37, 53) * 255
    diff = (resize_bilinear_tf1(y, 299, 299) - tf1_resize(y, size=(299, 299), align_corners=False)).abs().max()
    print(f"resize max |diff| {diff.item():.2e} (0..255 scale)")


if __name__ == "__main__":
    main()
