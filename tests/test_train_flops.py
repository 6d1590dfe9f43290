"""The FLOP count behind MFU, against the DiT paper's published forward cost (Table 4 of arXiv 2212.09748)."""
from __future__ import annotations

import pytest
import torch

from dig.models import create_model
from dig.train.trainer import training_flops_per_image


@pytest.mark.parametrize("name, gflops", [("DiT-XL/2", 118.64), ("DiT-S/2", 6.06), ("DiT-B/4", 5.56),
                                          ("DiT-B/2", 23.01), ("DiT-L/2", 80.71)])
def test_dit_forward_flops_match_the_paper(name, gflops):
    with torch.device("meta"):
        model = create_model(name)
    # the paper counts multiply-adds ("Gflops"); training = forward + backward = 3 forwards, 2 FLOPs per MAC
    assert training_flops_per_image(model) / 6 / 1e9 == pytest.approx(gflops, rel=0.01)


def test_dig_costs_less_than_dit_and_scales_linearly_in_tokens():
    with torch.device("meta"):
        dig, dit = create_model("DiG-XL/2"), create_model("DiT-XL/2")
        dig_big, dit_big = create_model("DiG-XL/2", input_size=128), create_model("DiT-XL/2", input_size=128)
    assert training_flops_per_image(dig) < training_flops_per_image(dit)
    # 16x the tokens: GLA stays linear (just under 16x: per-image layers), attention grows faster
    assert 15 < training_flops_per_image(dig_big) / training_flops_per_image(dig) < 16
    assert training_flops_per_image(dit_big) / training_flops_per_image(dit) > 20
