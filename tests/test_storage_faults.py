"""dig.data.storage through a fault-injecting proxy (tests/faulty_proxy.py) in front of the moto S3 server:
resets before an answer, in the middle of a request body and in the middle of a response body, 503 SlowDown /
500 InternalError answers and slow answers. Every operation must give what it gives without faults."""
from __future__ import annotations

import logging
import os

import pytest

from dig.data import storage
from faulty_proxy import FaultyProxy

FAULTS = dict(reset=0.1, reset_mid_body=0.12, error=0.08, delay=0.04, stall_mid_body=0.08)


@pytest.fixture
def faulty_s3(s3_server, monkeypatch):
    """The AWS environment pointed at a fault-injecting proxy in front of the session's S3 server."""
    with FaultyProxy(s3_server.endpoint_url, seed=1234, delay_s=1.5, **FAULTS) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("DIG_S3_READ_TIMEOUT", "1")   # the delayed answers also exercise read timeouts
        storage._client_for_process.cache_clear()
        yield proxy
    storage._client_for_process.cache_clear()


def test_every_operation_survives_resets_errors_and_slow_answers(faulty_s3, s3_bucket, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="dig.data.storage")
    root = f"s3://{s3_bucket}/data"
    payload = os.urandom(7 << 20)   # 7 MiB: a multipart upload (boto3's threshold is 8 MiB: 2 parts of 4 MiB below)
    src = tmp_path / "big.bin"
    src.write_bytes(payload)
    small = {f"f{i:02d}.bin": os.urandom(1000 + 997 * i) for i in range(10)}
    storage.check_access(root, write=True)
    for name, data in small.items():
        storage.write_bytes(storage.join(root, name), data)
    storage.upload_file(str(src), storage.join(root, "big.bin"))
    assert storage.list_names(root) == sorted([*small, "big.bin"])
    for name, data in small.items():
        assert storage.read_bytes(storage.join(root, name)) == data
        assert storage.read_range(storage.join(root, name), 17, 300) == data[17:317]
        assert storage.exists(storage.join(root, name))
    assert not storage.exists(storage.join(root, "nope"))
    assert storage.read_bytes(storage.join(root, "big.bin")) == payload
    with storage.open_read(storage.join(root, "big.bin")) as f:
        got = b"".join(iter(lambda: f.read(1 << 16), b""))
    assert got == payload
    assert storage.remove_partial_writes(root) == 0
    counts = faulty_s3.counts
    assert all(counts[k] > 0 for k in FAULTS), counts   # every kind of fault really happened
    retries = [r.getMessage() for r in caplog.records]
    assert any("resuming" in m for m in retries) and any("retrying" in m for m in retries), retries[:5]


def test_a_body_that_keeps_breaking_fails_with_a_storage_error(s3_server, s3_bucket, monkeypatch):
    storage.write_bytes(f"s3://{s3_bucket}/x.bin", os.urandom(50000))
    with FaultyProxy(s3_server.endpoint_url, seed=0, reset_mid_body=1.0, max_faults_in_a_row=10 ** 9) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("DIG_S3_MAX_ATTEMPTS", "3")
        storage._client_for_process.cache_clear()
        try:
            with pytest.raises(storage.StorageError, match=r"x\.bin: reading failed 3 times"):
                storage.read_bytes(f"s3://{s3_bucket}/x.bin")
        finally:
            storage._client_for_process.cache_clear()


def test_reader_gives_the_same_batches_through_faults(s3_server, s3_bucket, monkeypatch):
    """The trainer's reader (windows loaded by its loading process) through the faulty proxy: the same batches,
    bit for bit, as straight from the server, and every sample exactly once per epoch."""
    import numpy as np

    from dig.data.reader import LatentShardReader, load_manifest
    from dig.data.shard_format import SAMPLE_KEY_FORMAT
    from dig.data.synthetic import write_synthetic_dataset

    root = f"s3://{s3_bucket}/latents"
    write_synthetic_dataset(root, num_shards=6, samples_per_shard=5, latent_size=8, channels=4)

    def batches(epochs: int = 2):
        reader = LatentShardReader(root, rank=0, world_size=1, micro_batch_size=5, seed=3, window_shards=2,
                                   read_retries=0, on_bad_shard="fail")  # a shard failure must not be papered over
        try:
            return [reader.next_batch() for _ in range(6 * epochs)]
        finally:
            reader.close()

    clean = batches()
    all_keys = sorted(SAMPLE_KEY_FORMAT.format(i) for i in range(30))   # synthetic samples are numbered 0..29
    with FaultyProxy(s3_server.endpoint_url, seed=7, delay_s=1.5, **FAULTS) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("DIG_S3_READ_TIMEOUT", "1")
        storage._client_for_process.cache_clear()
        try:
            faulty = batches()
            manifests = [load_manifest(root)[1] for _ in range(10)]
        finally:
            storage._client_for_process.cache_clear()
    assert proxy.counts["reset_mid_body"] > 0 and proxy.counts["reset"] > 0 and proxy.counts["error"] > 0, \
        proxy.counts
    for a, b in zip(clean, faulty):
        assert a.keys == b.keys and np.array_equal(a.latents.numpy(), b.latents.numpy())
        assert np.array_equal(a.labels.numpy(), b.labels.numpy())
    for epoch in range(2):
        keys = [k for b in faulty[6 * epoch:6 * (epoch + 1)] for k in b.keys]
        assert sorted(keys) == all_keys   # nothing lost, nothing repeated
    assert all(m == manifests[0] for m in manifests)


@pytest.mark.parametrize("content, message", [(b"", "is empty"), (b'{"format": ', "is not a valid manifest")])
def test_an_empty_or_invalid_manifest_is_named(s3_bucket, content, message):
    from dig.data.reader import DatasetError, load_manifest
    from dig.data.synthetic import write_synthetic_dataset

    root = f"s3://{s3_bucket}/latents"
    write_synthetic_dataset(root, num_shards=2, samples_per_shard=2)
    storage.write_bytes(f"{root}/manifest.json", content)
    with pytest.raises(DatasetError, match=rf"{root}/manifest.json {message}") as info:
        load_manifest(root)
    assert "\n" not in str(info.value)


def test_unreadable_manifest_is_not_called_an_unfinished_dataset(s3_server, s3_bucket, monkeypatch):
    from dig.data.reader import DatasetNotFound, load_manifest
    from dig.data.synthetic import write_synthetic_dataset

    root = f"s3://{s3_bucket}/latents"
    write_synthetic_dataset(root, num_shards=2, samples_per_shard=2)
    with pytest.raises(DatasetNotFound, match="finished dataset"):
        load_manifest(f"s3://{s3_bucket}/nothing-here")
    # every GET body breaks off: after the retries the error says so, and does not blame the dataset
    with FaultyProxy(s3_server.endpoint_url, seed=0, reset_mid_body=1.0, max_faults_in_a_row=10 ** 9) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("DIG_S3_MAX_ATTEMPTS", "2")
        storage._client_for_process.cache_clear()
        try:
            with pytest.raises(storage.StorageError, match="manifest.json: reading failed 2 times") as info:
                load_manifest(root)
        finally:
            storage._client_for_process.cache_clear()
    assert "finished dataset" not in str(info.value)
