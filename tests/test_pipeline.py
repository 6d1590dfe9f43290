"""The latent pipeline end to end on a real local Ray cluster (loopback only) and moto's S3 server over HTTP.

Every check compares against an independent reference: the file list of the generated tree, the RGB content
each file was built from, DiT's centre crop restated in the tests, and a direct fp32 encoding with the same
(config-built) VAE."""
from __future__ import annotations

import glob
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest

from dig.data import shard_format, storage
from ray_cluster import local_ray_cluster, processes_in_group, tcp_listeners
from test_pipeline_inputs import MIN_SIDE, RESOLUTION, make_image_tree, read_shard, reference_encoding

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD_SIZE = 4


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    log = tmp_path_factory.mktemp("ray") / "head.log"
    with local_ray_cluster(num_cpus=2, log_path=str(log)) as cluster:
        yield cluster
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = [p for p in processes_in_group(cluster.pid) if "<defunct>" not in p]
        if not left:
            break
        time.sleep(0.5)
    assert not left, f"Ray processes survived the head's stop: {left}"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_image_tree(str(tmp_path_factory.mktemp("images")))


@pytest.fixture(scope="module")
def vae():
    from dig.vae import load_vae

    with pytest.warns(UserWarning, match="RANDOM"):
        return load_vae("config:tiny")


def pipeline_args(input_uri, output_uri, *extra):
    return ["--input", input_uri, "--output", output_uri, "--resolution", str(RESOLUTION), "--vae", "config:tiny",
            "--shard-size", str(SHARD_SIZE), "--min-side", str(MIN_SIDE), "--encode-batch-size", "3", *extra]


def start_job(args, env_extra, log_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(env_extra)
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "data_pipeline", *args], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path = log_path
    log.close()
    return proc


def finish_job(proc, timeout=240) -> dict:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError("job timed out: " + open(proc.log_path).read()[-4000:])
    text = open(proc.log_path).read()
    assert rc == 0, text[-4000:]
    summary = json.loads(text.split("[data_pipeline] summary ", 1)[1].splitlines()[0])
    # Progress in a log: plain lines with images done/total and the rate, ending at the total; not Ray's own
    n = summary["images_in"]
    if n:
        assert re.search(rf"\[data_pipeline\] encoded: 100% {n}/{n} \[[\d:]+<00:00, +[\d.]+(img/s|s/img)", text), \
            text[-3000:]
    assert "Total Progress" not in text
    return summary


def read_dataset(root: str, all_tars: bool = False):
    """(manifest, {source: (shard name, LatentSample)}) read back through dig.data.storage; every source must
    occur once. With all_tars, every tar under `root` is read, not only those the manifest lists."""
    manifest = shard_format.Manifest.from_json(storage.read_bytes(storage.join(root, shard_format.MANIFEST_NAME)))
    names = ([n for n in storage.list_names(root) if n.endswith(".tar")] if all_tars
             else [s.name for s in manifest.shards])
    samples = {}
    for name in names:
        for sample in read_shard(storage.read_bytes(storage.join(root, name))):
            assert sample.source not in samples, f"{sample.source} appears twice ({name}, {samples[sample.source][0]})"
            samples[sample.source] = (name, sample)
    return manifest, samples


def expected_shard_of(n: int, shard_size: int, seed: int) -> dict[int, int]:
    """Reference: global index -> shard, dealing numpy's default_rng(seed).permutation(n) shard_size at a time."""
    return {int(i): pos // shard_size for pos, i in enumerate(np.random.default_rng(seed).permutation(n))}


def check_exactly_once(tree, manifest, samples, shard_size=SHARD_SIZE, seed=0):
    assert sorted(samples) == sorted(tree.expected_rgb)
    shard_of = expected_shard_of(len(tree.listing), shard_size, seed)
    # Shards whose inputs were all rejected are complete but empty, and not listed.
    with_samples = {shard_format.shard_name("train", shard_of[tree.listing.index(s)]) for s in tree.expected_rgb}
    assert [e.name for e in manifest.shards] == sorted(with_samples)
    for entry in manifest.shards:
        in_tar = [src for src, (name, _) in samples.items() if name == entry.name]
        assert sorted(entry.keys) == sorted(in_tar) and entry.count == len(in_tar), entry.name
        keys_in_tar_order = [sample.key for name, sample in samples.values() if name == entry.name]
        assert keys_in_tar_order == sorted(keys_in_tar_order), entry.name
    for source, (name, sample) in samples.items():
        index = tree.listing.index(source)
        assert sample.key == shard_format.SAMPLE_KEY_FORMAT.format(index)
        assert name == shard_format.shard_name("train", shard_of[index])
    assert manifest.extra["shuffle"] is True and manifest.extra["shuffle_seed"] == seed


@pytest.fixture(scope="module")
def s3_run(ray_head, tree, s3_server, pipeline_bucket, tmp_path_factory):
    """Input tree uploaded to S3, shards written to S3: one job run shared by the checks below."""
    for source in [*tree.listing, *tree.ignored]:
        storage.upload_file(os.path.join(tree.root, source), f"s3://{pipeline_bucket}/images/{source}")
    output = f"s3://{pipeline_bucket}/latents"
    log = tmp_path_factory.mktemp("s3run") / "job.log"
    summary = finish_job(start_job(pipeline_args(f"s3://{pipeline_bucket}/images", output),
                                   {**s3_server.env(), **ray_head.env()}, str(log)))
    return output, summary


@pytest.fixture(scope="module")
def pipeline_bucket(s3_server):
    import boto3

    name = f"pipeline-{os.getpid()}"
    boto3.client("s3", endpoint_url=s3_server.endpoint_url).create_bucket(Bucket=name)
    return name


def test_s3_shards_match_direct_encoding(s3_run, tree, vae):
    output, summary = s3_run
    manifest, samples = read_dataset(output)
    check_exactly_once(tree, manifest, samples)
    assert manifest.classes == tree.classes and manifest.latent_size == RESOLUTION // 8
    assert manifest.num_samples == len(tree.expected_rgb) and manifest.dtype == "float16"
    for source, (_, sample) in samples.items():
        assert sample.label == tree.classes.index(source.split("/")[0]) and sample.class_name == source.split("/")[0]
        mean, std = reference_encoding(vae, tree.expected_rgb[source])
        assert sample.mean.shape == (2, 4, RESOLUTION // 8, RESOLUTION // 8) and sample.mean.dtype == np.float16
        # fp16 storage: ~3 significant digits.
        np.testing.assert_allclose(sample.mean, mean, rtol=2e-3, atol=2e-3, err_msg=source)
        np.testing.assert_allclose(sample.std, std, rtol=2e-3, atol=2e-4, err_msg=source)
        # The second entry is the mirror image's encoding, not a copy of the first.
        assert np.abs(mean[0] - mean[1]).max() > 10 * 2e-3
    # latent_stats.json = float64 statistics of every stored posterior mean (both flips).
    stats = shard_format.LatentStats.from_json(storage.read_bytes(storage.join(output, shard_format.STATS_NAME)))
    values = np.stack([s.mean.astype(np.float64) for _, s in samples.values()])  # [N, 2, C, h, w]
    per_channel = values.transpose(2, 0, 1, 3, 4).reshape(4, -1)
    np.testing.assert_allclose(stats.mean, per_channel.mean(1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats.std, per_channel.std(1), rtol=1e-7)
    assert stats.count == per_channel.shape[1]
    assert summary["images_in"] == len(tree.listing) and summary["samples_out"] == len(tree.expected_rgb)
    assert summary["images_per_s"] > 0


def test_corrupt_inputs_counted_listed_and_skipped(s3_run, tree):
    output, summary = s3_run
    lines = storage.read_bytes(storage.join(output, shard_format.REJECTS_NAME)).decode().splitlines()
    rejects = {r["source"]: r for r in map(json.loads, lines)}
    assert set(rejects) == set(tree.bad)
    for source, why in tree.bad.items():
        assert rejects[source]["index"] == tree.listing.index(source)
        expected = {"empty": "0 bytes", "decode": "cannot decode", "too small": "too small"}[why]
        assert expected in rejects[source]["reason"]
    assert summary["rejects"] == len(tree.bad)
    manifest = shard_format.Manifest.from_json(storage.read_bytes(storage.join(output, shard_format.MANIFEST_NAME)))
    assert manifest.extra["num_rejects"] == len(tree.bad) and manifest.extra["num_inputs"] == len(tree.listing)
    assert manifest.extra["num_ignored"] == len(tree.ignored) == summary["ignored_names"]


def test_kill_mid_run_then_rerun_is_exactly_once(ray_head, tree, tmp_path):
    output = str(tmp_path / "latents")
    num_shards = -(-len(tree.listing) // 2)
    # Each shard waits 4 s between its tar upload and its done record: a kill can land in that window.
    args = pipeline_args(tree.root, output, "--shard-size", "2", "--shuffle-seed", "7")
    job = start_job(args, {**ray_head.env(), "DIG_PIPELINE_PAUSE_BEFORE_DONE": "4"}, str(tmp_path / "killed.log"))

    def state():
        return (sorted(glob.glob(os.path.join(output, "*.done.json"))),
                sorted(glob.glob(os.path.join(output, "*.tar"))))

    deadline = time.monotonic() + 180
    while not state()[1]:  # kill as soon as the first tar is uploaded
        assert job.poll() is None, open(job.log_path).read()[-3000:]
        assert time.monotonic() < deadline, "no shard uploaded in time"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    # Tasks already running on the cluster may still finish (atomically) until Ray reaps the dead driver's
    # workers: wait until the output stops changing for longer than one shard's pause.
    last, stable_since = state(), time.monotonic()
    while time.monotonic() - stable_since < 6:
        time.sleep(0.5)
        if state() != last:
            last, stable_since = state(), time.monotonic()
    done_before, tars_before = last
    assert 1 <= len(tars_before) and len(done_before) < num_shards, "the kill must leave the job unfinished"
    assert not os.path.exists(os.path.join(output, shard_format.MANIFEST_NAME))
    if len(tars_before) == len(done_before):
        # The kill did not land between a tar and its done record this time: make that state explicitly.
        os.unlink(done_before.pop())

    # What a writer killed mid-copy leaves behind (storage.upload_file's temporary name): the re-run removes it.
    with open(os.path.join(output, ".tmp-killed-train-000003.tar"), "wb") as f:
        f.write(b"half a tar")
    summary = finish_job(start_job(args, ray_head.env(), str(tmp_path / "rerun.log")))
    assert summary["shards_skipped"] == len(done_before)
    assert summary["shards_written"] == num_shards - len(done_before)
    manifest, samples = read_dataset(output, all_tars=True)
    check_exactly_once(tree, manifest, samples, shard_size=2, seed=7)
    assert not [n for n in os.listdir(output) if n.startswith(".tmp-")]


def make_webdataset_tars(tree, folder) -> dict[str, str]:
    """The tree's images (bad ones included) as two webdataset tars of `<key>.<ext>` + `<key>.cls`; returns
    {pipeline source key: original file name}."""
    os.makedirs(folder)
    sources = {}
    half = len(tree.listing) // 2
    for part, names in enumerate((tree.listing[:half], tree.listing[half:])):
        tar_name = f"part-{part:03d}.tar"
        with tarfile.open(os.path.join(folder, tar_name), "w") as tar:
            for name in names:
                key = f"s{tree.listing.index(name):03d}"
                with open(os.path.join(tree.root, name), "rb") as f:
                    members = {f"{key}.{name.rsplit('.', 1)[1]}": f.read(),
                               f"{key}.cls": str(tree.classes.index(name.split("/")[0])).encode()}
                for member, data in members.items():
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                sources[f"{tar_name}/{key}"] = name
    return sources


def test_ray_job_submit_runs_end_to_end_on_webdataset_input(ray_head, tree, vae, tmp_path):
    sources = make_webdataset_tars(tree, str(tmp_path / "tars"))
    output = str(tmp_path / "latents")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(ray_head.auth_env)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit", "--address", ray_head.dashboard_url,
         "--working-dir", ".", "--", "python", "-m", "data_pipeline", *pipeline_args(str(tmp_path / "tars"), output)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "succeeded" in result.stdout + result.stderr

    manifest = shard_format.Manifest.from_json(storage.read_bytes(os.path.join(output, shard_format.MANIFEST_NAME)))
    assert manifest.classes == ["0", "1"] and manifest.extra["layout"] == "webdataset"
    samples = {}
    for entry in manifest.shards:
        for sample in read_shard(storage.read_bytes(os.path.join(output, entry.name))):
            assert sample.source not in samples
            samples[sample.source] = sample
    assert sorted(sources[s] for s in samples) == sorted(tree.expected_rgb)
    for source, sample in samples.items():
        name = sources[source]
        assert sample.key == shard_format.SAMPLE_KEY_FORMAT.format(tree.listing.index(name))
        assert sample.label == tree.classes.index(name.split("/")[0])
        mean, std = reference_encoding(vae, tree.expected_rgb[name])
        np.testing.assert_allclose(sample.mean, mean, rtol=2e-3, atol=2e-3, err_msg=name)
    rejects = [json.loads(line) for line in open(os.path.join(output, shard_format.REJECTS_NAME))]
    assert sorted(sources[r["source"]] for r in rejects) == sorted(tree.bad)

    # Every listener of the cluster (head, job supervisor, workers) is on loopback.
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,args="], capture_output=True, text=True).stdout
    pids = {int(line.split()[0]) for line in out.splitlines()
            if line.split()[1] == str(ray_head.pid) or ray_head.temp_dir in line}
    listeners = tcp_listeners(pids)
    assert listeners and all(addr.replace("[::ffff:", "").startswith("127.0.0.1") for addr, _ in listeners), listeners


def test_s3_job_through_resets_errors_and_slow_answers_gives_the_same_shards(s3_run, ray_head, s3_server,
                                                                              pipeline_bucket, tmp_path):
    """The same job, its S3 traffic (input listing and images, shards, manifest) through a proxy that resets
    connections (also mid-body), answers 503/500 and delays: the same shards, samples and manifest."""
    from faulty_proxy import FaultyProxy

    clean_output, _ = s3_run
    output = f"s3://{pipeline_bucket}/latents-faulty"
    with FaultyProxy(s3_server.endpoint_url, seed=11, reset=0.08, reset_mid_body=0.12, error=0.08, delay=0.03,
                     delay_s=1.5) as proxy:
        env = {**s3_server.env(), **ray_head.env(), "AWS_ENDPOINT_URL": proxy.url, "DIG_S3_READ_TIMEOUT": "1"}
        finish_job(start_job(pipeline_args(f"s3://{pipeline_bucket}/images", output), env, str(tmp_path / "job.log")))
    assert all(proxy.counts[k] > 0 for k in ("reset", "reset_mid_body", "error", "delay")), proxy.counts
    clean_manifest, clean_samples = read_dataset(clean_output, all_tars=True)
    manifest, samples = read_dataset(output, all_tars=True)
    assert [(e.name, e.keys, e.count) for e in manifest.shards] == \
        [(e.name, e.keys, e.count) for e in clean_manifest.shards]
    assert sorted(samples) == sorted(clean_samples)   # nothing lost, nothing twice (read_dataset checks)
    for source, (name, sample) in samples.items():
        clean_name, clean = clean_samples[source]
        assert name == clean_name and sample.key == clean.key and sample.label == clean.label
        np.testing.assert_array_equal(sample.mean, clean.mean, err_msg=source)
        np.testing.assert_array_equal(sample.std, clean.std, err_msg=source)

    def rejects(root):  # (index, source, kind of reason): a decoder's message may hold an object's address
        lines = storage.read_bytes(storage.join(root, shard_format.REJECTS_NAME)).decode().splitlines()
        return sorted((r["index"], r["source"], r["reason"].split(":")[0]) for r in map(json.loads, lines))

    assert rejects(output) == rejects(clean_output)
