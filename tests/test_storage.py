"""dig.data.storage against a real S3-protocol server on loopback (moto standalone) and the local disk."""
import pytest

from dig.data import storage


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_roundtrip_list_and_atomic_upload(kind, tmp_path, request):
    if kind == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        root = f"s3://{bucket}/data"
    else:
        root = str(tmp_path / "data")
    storage.check_access(root, write=True)
    storage.write_bytes(storage.join(root, "a/x.bin"), b"hello")
    src = tmp_path / "big.bin"
    payload = bytes(range(256)) * 40000  # 10 MB: multipart on S3
    src.write_bytes(payload)
    storage.upload_file(str(src), storage.join(root, "b.tar"))
    assert storage.list_names(root) == ["a/x.bin", "b.tar"]
    assert storage.read_bytes(storage.join(root, "a/x.bin")) == b"hello"
    with storage.open_read(storage.join(root, "b.tar")) as f:
        assert f.read() == payload
    assert storage.exists(storage.join(root, "b.tar")) and not storage.exists(storage.join(root, "nope"))


def test_missing_bucket_fails_clearly(s3_server):
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.check_access("s3://no-such-bucket-here/x", write=True)


def test_missing_credentials_fail_clearly(s3_server, monkeypatch, tmp_path):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage._client_for_process.cache_clear()
    try:
        with pytest.raises(storage.StorageError, match="credentials"):
            storage.check_access("s3://any-bucket/x")
    finally:
        storage._client_for_process.cache_clear()


def test_local_writes_follow_the_umask(tmp_path):
    import os
    import stat

    storage.write_bytes(str(tmp_path / "a.json"), b"{}")
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 10)
    storage.upload_file(str(src), str(tmp_path / "out" / "b.tar"))
    expected = stat.S_IMODE(src.stat().st_mode)  # what a plain open() gives in this process
    for p in (tmp_path / "a.json", tmp_path / "out" / "b.tar"):
        assert stat.S_IMODE(p.stat().st_mode) == expected != 0o600, p
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith(".tmp-")]
