"""The encoder stage's speed options (channels-last, the padded last chunk, torch.compile) give the latents of a
plain fp32 encode through diffusers' own AutoencoderKL.encode (CPU, the random-weight tiny VAE)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

N_IMAGES, SIDE, BATCH = 7, 32, 3  # 7 = two full chunks of 3 and a last chunk of 1
TOL = 1e-5


@pytest.fixture(scope="module")
def vae():
    from dig.vae import load_vae

    with pytest.warns(UserWarning, match="RANDOM"):
        return load_vae("config:tiny")


@pytest.fixture(scope="module")
def crops():
    return np.random.default_rng(0).integers(0, 256, (N_IMAGES, SIDE, SIDE, 3), dtype=np.uint8)


def reference(vae, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scaling in float64, the mirror image taken in numpy, then diffusers' AutoencoderKL.encode in fp32 (NCHW):
    (mean, std), each float64 [N, 2, C, h, w] with [:, 1] the mirror image."""
    from dig.vae import encode

    x = crops.astype(np.float64) / 127.5 - 1.0
    both = np.concatenate([x, x[:, :, ::-1]]).transpose(0, 3, 1, 2)  # NHWC: axis 2 is the width
    mean, std = encode(vae, torch.from_numpy(np.ascontiguousarray(both)).float())
    n = len(crops)
    return (np.stack([mean[:n].double().numpy(), mean[n:].double().numpy()], 1),
            np.stack([std[:n].double().numpy(), std[n:].double().numpy()], 1))


def make_encoder(**options):
    from data_pipeline.encoder import LatentEncoder

    with pytest.warns(UserWarning, match="RANDOM"):
        return LatentEncoder("config:tiny", device="cpu", batch_size=BATCH, storage_dtype="float32", **options)


def assert_matches(encoder, vae, crops):
    mean, std = encoder.encode_images(crops)
    ref_mean, ref_std = reference(vae, crops)
    assert mean.shape == ref_mean.shape and mean.dtype == np.float32
    np.testing.assert_allclose(mean, ref_mean, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(std, ref_std, rtol=TOL, atol=TOL)


def test_posterior_encoder_is_diffusers_encode_without_the_decoder(vae):
    from diffusers import AutoencoderKL

    from dig.vae import CONFIGS, PosteriorEncoder, encode

    x = torch.rand(4, 3, SIDE, SIDE) * 2 - 1
    mean, std = PosteriorEncoder(vae)(x)
    ref_mean, ref_std = encode(vae, x)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(std, ref_std, rtol=1e-6, atol=1e-6)
    assert not any(name.startswith("decoder") for name, _ in PosteriorEncoder(vae).named_parameters())

    torch.manual_seed(1)
    no_quant = AutoencoderKL(**CONFIGS["tiny"], use_quant_conv=False).eval()  # the quant_conv=None branch
    mean, std = PosteriorEncoder(no_quant)(x)
    ref_mean, ref_std = encode(no_quant, x)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(std, ref_std, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
@pytest.mark.parametrize("pad_final_batch", [False, True])
def test_layout_and_padding_give_the_fp32_latents(vae, crops, memory_format, pad_final_batch):
    encoder = make_encoder(memory_format=memory_format, pad_final_batch=pad_final_batch)
    layout = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    assert encoder.step.posterior.encoder.conv_in.weight.is_contiguous(memory_format=layout)
    assert_matches(encoder, vae, crops)          # last chunk of 1 (padded to 3, or run as 1)
    assert_matches(encoder, vae, crops[:2])      # a shard smaller than one batch
    assert_matches(encoder, vae, crops[:BATCH])  # exactly one batch


def test_compiled_encoder_gives_the_fp32_latents_and_never_recompiles(vae, crops):
    torch._dynamo.reset()
    encoder = make_encoder(memory_format="channels_last", compile=True)
    assert encoder.pad_final_batch
    assert_matches(encoder, vae, crops)
    with torch._dynamo.config.patch(error_on_recompile=True):  # other shard sizes, other last chunks
        assert_matches(encoder, vae, crops[:5])
        assert_matches(encoder, vae, crops[:1])
    torch._dynamo.reset()


def test_encode_step_is_one_graph_for_the_compiler():
    encoder = make_encoder(memory_format="channels_last")
    explained = torch._dynamo.explain(encoder.step)(torch.zeros(BATCH, SIDE, SIDE, 3, dtype=torch.uint8))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()


def test_memory_format_auto_is_channels_last_only_when_compiled_or_fused_on_gpu():
    from data_pipeline.encoder import resolve_memory_format

    assert resolve_memory_format("auto", "cuda", compiled=True) == "channels_last"
    assert resolve_memory_format("auto", "cuda", fused_group_norm=True) == "channels_last"
    assert resolve_memory_format("auto", "cuda") == "contiguous"
    assert resolve_memory_format("auto", "cpu", compiled=True, fused_group_norm=True) == "contiguous"
    assert resolve_memory_format("auto", "cpu") == "contiguous"
    assert resolve_memory_format("channels_last", "cpu") == "channels_last"
    with pytest.raises(ValueError, match="unknown memory format 'nhwc'"):
        resolve_memory_format("nhwc", "cuda")


def test_bad_inputs_and_options_are_clear_errors(crops):
    encoder = make_encoder()
    with pytest.raises(ValueError, match=r"expected uint8 crops \[N, H, W, 3\], got float32"):
        encoder.encode_images(crops.astype(np.float32))
    with pytest.raises(ValueError, match=r"got uint8 \[7, 32, 32, 1\]"):
        encoder.encode_images(crops[..., :1])
    mean, std = encoder.encode_images(crops[:0])
    assert mean.shape[:2] == std.shape[:2] == (0, 2)
    from data_pipeline.encoder import LatentEncoder

    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        LatentEncoder("config:tiny", precision="fp8", device="cpu")
    with pytest.raises(ValueError, match="unknown compile mode 'reduce-overhead'"):
        LatentEncoder("config:tiny", device="cpu", compile=True, compile_mode="reduce-overhead")


def test_pipeline_config_types_the_encoder_options():
    from pydantic import ValidationError

    from data_pipeline.__main__ import parse_args
    from data_pipeline.config import PipelineConfig

    cfg = PipelineConfig(input="in", output="out")
    assert (cfg.memory_format, cfg.compile_encoder, cfg.compile_mode) == ("auto", False, "default")
    cfg = parse_args(["--input", "in", "--output", "out", "--memory-format", "contiguous", "compile_encoder=true",
                      "--compile-mode", "max-autotune-no-cudagraphs"])
    assert (cfg.memory_format, cfg.compile_encoder, cfg.compile_mode) == (
        "contiguous", True, "max-autotune-no-cudagraphs")
    with pytest.raises(ValidationError, match="memory_format"):
        PipelineConfig(input="in", output="out", memory_format="nhwc")
    with pytest.raises(ValidationError, match="compile_encoder"):
        PipelineConfig(input="in", output="out", compile_encoder="sometimes")
    with pytest.raises(ValidationError, match="compile_mode"):
        PipelineConfig(input="in", output="out", compile_mode="reduce-overhead")


@pytest.mark.gpu
@pytest.mark.parametrize("precision,memory_format,compile,tol", [
    ("fp32", "channels_last", False, 2e-3), ("bf16", "channels_last", False, 5e-2),
    ("bf16", "channels_last", True, 5e-2), ("bf16", "contiguous", False, 5e-2)])
def test_gpu_encoder_options_match_the_cpu_fp32_latents(vae, crops, precision, memory_format, compile, tol):
    from data_pipeline.encoder import LatentEncoder

    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="RANDOM"):
        encoder = LatentEncoder("config:tiny", precision=precision, device="cuda", batch_size=BATCH,
                                storage_dtype="float32", memory_format=memory_format, compile=compile)
    for shard in (crops, crops[:5], crops[:1]):
        mean, std = encoder.encode_images(shard)
        ref_mean, ref_std = reference(vae, shard)
        np.testing.assert_allclose(mean, ref_mean, rtol=tol, atol=tol)
        np.testing.assert_allclose(std, ref_std, rtol=tol, atol=tol)
    torch._dynamo.reset()
