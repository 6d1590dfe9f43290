"""Test inputs for the latent pipeline (an ImageFolder tree whose expected RGB content is known from how each
file was made, plus unreadable files), the reference encoding, and the decode-stage tests that need no Ray."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

RESOLUTION = 64
MIN_SIDE = 32


@dataclass
class ImageTree:
    root: str
    classes: list[str]
    expected_rgb: dict[str, np.ndarray] = field(default_factory=dict)  # source -> RGB the decoder must produce
    bad: dict[str, str] = field(default_factory=dict)                  # source -> what is wrong with it
    ignored: list[str] = field(default_factory=list)                   # files that are not images

    @property
    def listing(self) -> list[str]:
        """Every image-named file, sorted: the global sample index is the position in this list."""
        return sorted([*self.expected_rgb, *self.bad])


def _smooth_rgb(rng, h, w) -> np.ndarray:
    """A left-right asymmetric colour image (so the flip is distinguishable), smooth enough for JPEG."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    phase = rng.uniform(0, 2 * np.pi, 3)
    chans = [np.sin(3 * x * (c + 1) + phase[c]) * 0.4 + 0.4 * x + 0.2 * y for c in range(3)]
    return np.clip(np.stack(chans, -1) * 200 + 20, 0, 255).astype(np.uint8)


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_image_tree(root: str, seed: int = 0) -> ImageTree:
    rng = np.random.default_rng(seed)
    tree = ImageTree(root=root, classes=["n01_cat", "n02_dog"])
    files: dict[str, bytes] = {}

    def rgb_file(name, h, w):
        arr = _smooth_rgb(rng, h, w)
        files[name] = _encode(Image.fromarray(arr), "PNG")
        tree.expected_rgb[name] = arr

    rgb_file("n01_cat/a.png", 64, 80)
    rgb_file("n01_cat/b.png", 100, 70)
    rgb_file("n01_cat/big.png", 140, 150)         # short side >= 2*64: one BOX halving first
    grey = _smooth_rgb(rng, 72, 72)[..., 0]
    files["n01_cat/grey.png"] = _encode(Image.fromarray(grey, mode="L"), "PNG")
    tree.expected_rgb["n01_cat/grey.png"] = np.repeat(grey[..., None], 3, -1)
    # 16-bit greyscale: g * 257 maps 0..255 onto 0..65535; keeping the top 8 bits must give back g.
    g16 = _smooth_rgb(rng, 66, 90)[..., 1]
    files["n02_dog/deep.png"] = _encode(Image.fromarray(g16.astype(np.uint16) * 257), "PNG")
    tree.expected_rgb["n02_dog/deep.png"] = np.repeat(g16[..., None], 3, -1)
    # RGBA: transparent left half -> white, opaque right half -> the colours.
    rgba = _smooth_rgb(rng, 64, 64)
    alpha = np.full((64, 64), 255, np.uint8)
    alpha[:, :32] = 0
    files["n02_dog/alpha.png"] = _encode(Image.fromarray(np.dstack([rgba, alpha]), mode="RGBA"), "PNG")
    expected = rgba.copy()
    expected[:, :32] = 255
    tree.expected_rgb["n02_dog/alpha.png"] = expected
    # CMYK JPEG: the expected RGB is PIL's own CMYK->RGB of the decoded file.
    cmyk = Image.fromarray(_smooth_rgb(rng, 80, 64)).convert("CMYK")
    files["n02_dog/cmyk.jpg"] = _encode(cmyk, "JPEG", quality=95)
    tree.expected_rgb["n02_dog/cmyk.jpg"] = np.asarray(Image.open(io.BytesIO(files["n02_dog/cmyk.jpg"])).convert("RGB"))
    rgb_file("n02_dog/a_z.png", 96, 64)  # sorts first: the dog shard of garbage + truncated is all rejects

    jpeg = _encode(Image.fromarray(_smooth_rgb(rng, 96, 96)), "JPEG", quality=90)
    files["n01_cat/empty.jpg"] = b""
    tree.bad["n01_cat/empty.jpg"] = "empty"
    files["n02_dog/truncated.jpg"] = jpeg[: len(jpeg) // 2]
    tree.bad["n02_dog/truncated.jpg"] = "decode"
    files["n02_dog/garbage.png"] = rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()
    tree.bad["n02_dog/garbage.png"] = "decode"
    files["n01_cat/tiny.png"] = _encode(Image.fromarray(_smooth_rgb(rng, 16, 40)), "PNG")
    tree.bad["n01_cat/tiny.png"] = "too small"
    files["n01_cat/notes.txt"] = b"not an image"
    tree.ignored.append("n01_cat/notes.txt")

    for name, data in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return tree


def dit_center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """Reference: the centre crop of DiT's train.py (from ADM), restated independently for the tests."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def reference_encoding(vae, rgb: np.ndarray, resolution: int = RESOLUTION):
    """Direct fp32 encoding of one image and its mirror image: (mean, std), each float64 [2, C, h, w]."""
    import torch

    from dig.vae import encode

    crop = dit_center_crop_arr(Image.fromarray(rgb), resolution)
    x = torch.from_numpy(crop.astype(np.float64) / 255.0 * 2.0 - 1.0).permute(2, 0, 1)[None].float()
    mirrored = torch.from_numpy(np.ascontiguousarray(crop[:, ::-1]).astype(np.float64) / 255.0 * 2.0 - 1.0)
    x = torch.cat([x, mirrored.permute(2, 0, 1)[None].float()])
    mean, std = encode(vae, x)
    return mean.double().numpy(), std.double().numpy()


def read_shard(data: bytes) -> list:
    """All samples of one shard tar, decoded with the shard format's reader (grouped by webdataset key)."""
    import tarfile

    from dig.data.shard_format import decode_sample

    samples: dict[str, dict] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(member).read()
    return [decode_sample(s) for s in samples.values()]


# ---- decode stage, listing and early failures (no Ray) ----

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402

import pytest  # noqa: E402

from data_pipeline.images import RejectedImage, load_image  # noqa: E402
from data_pipeline.listing import InputItem, ShardSpec, assign_shards, list_inputs, scan_tar  # noqa: E402
from data_pipeline.shards import decode_shard  # noqa: E402


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_image_tree(str(tmp_path_factory.mktemp("images")))


def _bytes(tree, name):
    with open(os.path.join(tree.root, name), "rb") as f:
        return f.read()


def test_decode_gives_rgb_then_adm_crop(tree):
    for name, rgb in tree.expected_rgb.items():
        got = load_image(_bytes(tree, name), RESOLUTION, MIN_SIDE)
        assert got.shape == (RESOLUTION, RESOLUTION, 3) and got.dtype == np.uint8, name
        np.testing.assert_array_equal(got, dit_center_crop_arr(Image.fromarray(rgb), RESOLUTION), err_msg=name)


@pytest.mark.parametrize("reason,pattern", [("empty", "0 bytes"), ("decode", "cannot decode"),
                                            ("too small", "too small")])
def test_bad_images_are_rejected_with_reason(tree, reason, pattern):
    names = [n for n, why in tree.bad.items() if why == reason]
    assert names
    for name in names:
        with pytest.raises(RejectedImage, match=pattern):
            load_image(_bytes(tree, name), RESOLUTION, MIN_SIDE)


def expected_shards(n: int, shard_size: int, seed: int | None) -> list[list[int]]:
    """Reference assignment: shard k = positions k*shard_size... of numpy's seeded permutation (None: unshuffled),
    each shard's global indices ascending."""
    order = list(range(n)) if seed is None else np.random.default_rng(seed).permutation(n).tolist()
    return [sorted(order[k:k + shard_size]) for k in range(0, n, shard_size)]


def test_folder_listing_and_shard_assignment(tree):
    listing = list_inputs(tree.root)
    assert listing.layout == "folder" and listing.classes == tree.classes
    assert [it.source for it in listing.items] == tree.listing
    assert [it.label for it in listing.items] == [tree.classes.index(s.split("/")[0]) for s in tree.listing]
    assert listing.ignored == tree.ignored
    shards = assign_shards(listing.items, 5)  # default: shuffled with seed 0
    assert [s.index for s in shards] == [0, 1, 2]
    assert [s.indices for s in shards] == expected_shards(len(tree.listing), 5, seed=0)
    for s in shards:
        assert [it.source for it in s.items] == [tree.listing[i] for i in s.indices]
    assert ShardSpec.from_row(shards[1].to_row()) == shards[1]
    unshuffled = assign_shards(listing.items, 5, shuffle=False)
    assert [it for s in unshuffled for it in s.items] == listing.items
    assert [s.indices for s in unshuffled] == [list(range(0, 5)), list(range(5, 10)), list(range(10, 12))]


def _class_sorted_items(num_classes: int, per_class: int) -> list[InputItem]:
    """What an ImageFolder listing looks like: sorted by class folder, so consecutive items share a class."""
    return [InputItem(source=f"c{c:02d}/img{j:03d}.png", label=c, class_name=f"c{c:02d}", uri=f"/in/c{c:02d}/{j}")
            for c in range(num_classes) for j in range(per_class)]


def test_shuffled_shards_mix_classes_and_partition_the_listing():
    items = _class_sorted_items(4, 12)
    shards = assign_shards(items, 8, shuffle=True, seed=0)
    assert len(shards) == 6 and [s.index for s in shards] == list(range(6))
    # A partition: every global index in exactly one shard, shard sizes as with consecutive dealing.
    all_indices = [i for s in shards for i in s.indices]
    assert sorted(all_indices) == list(range(48)) and [len(s.indices) for s in shards] == [8] * 6
    for s in shards:
        assert s.indices == sorted(s.indices)                      # read in listing order inside a shard
        assert s.items == [items[i] for i in s.indices]            # the item is the one its index names
        assert len({it.label for it in s.items}) > 1, f"shard {s.index} holds one class: {s.items}"
    assert [s.indices for s in shards] == expected_shards(48, 8, seed=0)
    # Deterministic: the same call again (a re-run) deals every input to the same shard.
    assert [s.indices for s in assign_shards(items, 8, shuffle=True, seed=0)] == [s.indices for s in shards]
    # Another seed deals differently; shuffle off keeps the old single-class consecutive shards.
    assert [s.indices for s in assign_shards(items, 8, seed=1)] == expected_shards(48, 8, seed=1)
    assert [s.indices for s in assign_shards(items, 8, seed=1)] != [s.indices for s in shards]
    unshuffled = assign_shards(items, 8, shuffle=False, seed=0)
    assert [s.indices for s in unshuffled] == [list(range(k, k + 8)) for k in range(0, 48, 8)]
    assert [len({it.label for it in s.items}) for s in unshuffled] == [1, 2, 1, 1, 2, 1]  # 12 per class, 8 per shard
    # A ragged last shard keeps the partition.
    ragged = assign_shards(items[:45], 8, seed=3)
    assert sorted(i for s in ragged for i in s.indices) == list(range(45))
    assert [len(s.items) for s in ragged] == [8] * 5 + [5]


def test_shuffle_settings_from_flags():
    from data_pipeline.__main__ import parse_args

    cfg = parse_args(["--input", "in", "--output", "out"])
    assert cfg.shuffle is True and cfg.shuffle_seed == 0
    cfg = parse_args(["--input", "in", "--output", "out", "--shuffle", "false", "shuffle_seed=7"])
    assert cfg.shuffle is False and cfg.shuffle_seed == 7


def test_webdataset_tar_input_reads_members_by_byte_range(tree, tmp_path):
    good = sorted(tree.expected_rgb)[:4]
    tar_path = tmp_path / "part-000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i, name in enumerate(good):
            for member, data in ((f"s{i}.{name.rsplit('.', 1)[1]}", _bytes(tree, name)),
                                 (f"s{i}.cls", str(10 + i).encode())):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("orphan.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"3"))
    samples, ignored = scan_tar(str(tar_path))
    assert [s["key"] for s in samples] == [f"s{i}" for i in range(4)]
    assert [s["label"] for s in samples] == [10, 11, 12, 13]
    assert ignored == ["orphan (no image)"]
    items = [InputItem(source=f"part-000.tar/{s['key']}", label=s["label"], class_name=str(s["label"]),
                       uri=str(tar_path), offset=s["offset"], size=s["size"]) for s in samples]
    out = decode_shard(ShardSpec(0, [0, 1, 2, 3], items).to_row(), RESOLUTION, MIN_SIDE, io_threads=2)
    assert json.loads(out["rejects"]) == [] and json.loads(out["kept"]) == [0, 1, 2, 3]
    for image, name in zip(out["images"], good):
        np.testing.assert_array_equal(image, dit_center_crop_arr(Image.fromarray(tree.expected_rgb[name]),
                                                                 RESOLUTION))


def test_decode_stage_counts_rejects_and_keeps_the_rest(tree):
    listing = list_inputs(tree.root)
    rejects, kept = [], []
    for spec in assign_shards(listing.items, 5, seed=0):  # shuffled: a shard's global indices are not contiguous
        out = decode_shard(spec.to_row(), RESOLUTION, MIN_SIDE, io_threads=4)
        rejects += json.loads(out["rejects"])
        kept += [spec.items[pos].source for pos in json.loads(out["kept"])]
        assert out["images"].shape == (len(json.loads(out["kept"])), RESOLUTION, RESOLUTION, 3)
    assert sorted(r["source"] for r in rejects) == sorted(tree.bad)
    assert [r["index"] for r in rejects] == [tree.listing.index(r["source"]) for r in rejects]
    assert sorted(kept) == sorted(tree.expected_rgb)


def _run_cli(args, env):
    return subprocess.run([sys.executable, "-m", "data_pipeline", *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_missing_bucket_or_credentials_fail_before_any_work(tree, s3_server, tmp_path):
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = ["--input", tree.root, "--resolution", "64", "--vae", "config:tiny"]
    missing_bucket = _run_cli([*args, "--output", "s3://no-such-bucket-anywhere/latents"], {**base, **s3_server.env()})
    assert missing_bucket.returncode == 2
    assert "bucket 'no-such-bucket-anywhere' does not exist" in missing_bucket.stderr

    no_creds = {k: v for k, v in {**base, **s3_server.env()}.items()
                if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE")}
    no_creds.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
                    AWS_EC2_METADATA_DISABLED="true")
    result = _run_cli([*args, "--output", "s3://some-bucket/latents"], no_creds)
    assert result.returncode == 2 and "no AWS credentials" in result.stderr
    # "Before any work": no Ray was started and nothing was listed or written.
    for r in (missing_bucket, result):
        assert "Ray" not in r.stdout + r.stderr and "inputs" not in r.stdout


def test_partial_writes_are_removed_and_finished_ones_kept(s3_server, tmp_path):
    import boto3

    from dig.data import storage

    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    client.create_bucket(Bucket="partial-writes")
    client.put_object(Bucket="partial-writes", Key="out/train-000000.tar", Body=b"done")
    client.create_multipart_upload(Bucket="partial-writes", Key="out/train-000001.tar")
    client.create_multipart_upload(Bucket="partial-writes", Key="elsewhere/x.tar")
    assert storage.remove_partial_writes("s3://partial-writes/out") == 1
    left = client.list_multipart_uploads(Bucket="partial-writes").get("Uploads", [])
    assert [u["Key"] for u in left] == ["elsewhere/x.tar"]
    assert storage.read_bytes("s3://partial-writes/out/train-000000.tar") == b"done"

    (tmp_path / "train-000000.tar").write_bytes(b"done")
    (tmp_path / ".tmp-abc-train-000001.tar").write_bytes(b"half")
    assert storage.remove_partial_writes(str(tmp_path)) == 1
    assert sorted(os.listdir(tmp_path)) == ["train-000000.tar"]


def test_output_of_a_different_job_is_refused(tmp_path):
    from data_pipeline.config import PipelineConfig
    from data_pipeline.job import PipelineError, _claim_output

    cfg = PipelineConfig(input="in", output=str(tmp_path))
    record = {"input": "in", "listing_sha256": "abc", "resolution": 256, "shard_size": 1000}
    _claim_output(cfg, record)
    _claim_output(cfg, dict(record))  # the same job again: a resume
    with pytest.raises(PipelineError, match=r"different job \(differs in \['listing_sha256', 'resolution'\]\)"):
        _claim_output(cfg, {**record, "listing_sha256": "def", "resolution": 512})


def test_output_dealt_with_other_shuffle_settings_is_refused(tree, tmp_path):
    from data_pipeline.config import PipelineConfig
    from data_pipeline.job import PipelineError, _claim_output, _job_record
    from data_pipeline.listing import assignment_fingerprint, shard_order

    listing = list_inputs(tree.root)

    def claim(**settings):
        cfg = PipelineConfig(input=tree.root, output=str(tmp_path), **settings)
        order = shard_order(len(listing.items), cfg.shuffle, cfg.shuffle_seed)
        _claim_output(cfg, _job_record(cfg, listing, assignment_fingerprint(order)))

    claim(shuffle_seed=5)
    claim(shuffle_seed=5)  # a resume
    with pytest.raises(PipelineError, match=r"differs in \['assignment_sha256', 'shuffle_seed'\]"):
        claim(shuffle_seed=6)
    with pytest.raises(PipelineError, match=r"differs in \['assignment_sha256', 'shuffle', 'shuffle_seed'\]"):
        claim(shuffle=False)
    record = json.loads((tmp_path / "job.json").read_text())
    assert record["shuffle"] is True and record["shuffle_seed"] == 5


@pytest.mark.gpu
@pytest.mark.parametrize("precision,tol", [("fp32", 2e-3), ("bf16", 5e-2)])
def test_gpu_encoder_actor_matches_cpu_reference(tree, precision, tol):
    from data_pipeline.encoder import LatentEncoder
    from dig.vae import load_vae

    with pytest.warns(UserWarning, match="RANDOM"):
        cpu_vae = load_vae("config:tiny")
        encoder = LatentEncoder("config:tiny", precision=precision, device="cuda", batch_size=3)
    names = sorted(tree.expected_rgb)
    crops = np.stack([dit_center_crop_arr(Image.fromarray(tree.expected_rgb[n]), RESOLUTION) for n in names])
    mean, std = encoder.encode_images(crops)
    for i, name in enumerate(names):
        ref_mean, ref_std = reference_encoding(cpu_vae, tree.expected_rgb[name])
        np.testing.assert_allclose(mean[i].astype(np.float64), ref_mean, rtol=tol, atol=tol, err_msg=name)
        np.testing.assert_allclose(std[i].astype(np.float64), ref_std, rtol=tol, atol=tol, err_msg=name)


def test_unreadable_input_fails_the_shard_instead_of_becoming_a_reject(tree):
    listing = list_inputs(tree.root)
    vanished = InputItem(source="n01_cat/gone.png", label=0, class_name="n01_cat",
                         uri=os.path.join(tree.root, "n01_cat/gone.png"))
    with pytest.raises(FileNotFoundError, match="gone.png"):
        decode_shard(ShardSpec(0, [0, 99], [listing.items[0], vanished]).to_row(), RESOLUTION, MIN_SIDE,
                     io_threads=2)
