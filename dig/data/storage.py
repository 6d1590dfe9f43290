"""Storage URIs: a local path or `s3://bucket/prefix`, with the few operations the pipeline and trainer need.

S3 goes through boto3, configured by the standard AWS environment/config files (credentials, region, and
`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` for S3-compatible servers). Writes are atomic from a reader's
point of view: a local file is written to a temporary name and renamed; an S3 object appears only when its
PUT or multipart upload completes.
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
from typing import BinaryIO, Callable

S3_PREFIX = "s3://"


class StorageError(RuntimeError):
    """A storage location that cannot be used, with a message that says why and what to check."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_PREFIX)


def parse_s3(uri: str) -> tuple[str, str]:
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len(S3_PREFIX):].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def join(base: str, *names: str) -> str:
    if is_s3(base):
        out = base.rstrip("/")
        for n in names:
            out = f"{out}/{n.strip('/')}"
        return out
    return os.path.join(base, *names)


@functools.lru_cache(maxsize=None)
def _client_for_process(pid: int):
    import boto3
    from botocore.config import Config

    # Adaptive retries cover throttling and dropped connections; boto3 clients are not fork-safe, hence per-pid.
    config = Config(retries={"max_attempts": 10, "mode": "adaptive"}, max_pool_connections=32)
    return boto3.session.Session().client("s3", config=config)


def s3_client():
    return _client_for_process(os.getpid())


def _explain(uri: str, exc: Exception) -> StorageError:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return StorageError(f"{uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                            "AWS_PROFILE, or an instance role)")
    if isinstance(exc, EndpointConnectionError):
        return StorageError(f"{uri}: cannot reach the S3 endpoint ({exc}); check AWS_ENDPOINT_URL")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket" or (code in ("404", "NotFound") and exc.operation_name == "HeadBucket"):
            return StorageError(f"{uri}: bucket {parse_s3(uri)[0]!r} does not exist")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"{uri}: access denied ({code}); check the credentials and bucket policy")
        return StorageError(f"{uri}: S3 error {code}: {exc}")
    return StorageError(f"{uri}: {exc}")


def check_access(uri: str, write: bool = False) -> None:
    """Fail early, with a clear message, when `uri` cannot be read (or written). Creates a local folder."""
    if is_s3(uri):
        bucket, _ = parse_s3(uri)
        try:
            s3_client().head_bucket(Bucket=bucket)
        except Exception as exc:  # noqa: BLE001 - every failure is turned into a StorageError
            raise _explain(uri, exc) from exc
        return
    if write:
        os.makedirs(uri, exist_ok=True)
        if not os.access(uri, os.W_OK):
            raise StorageError(f"{uri}: folder is not writable")
    elif not os.path.exists(uri):
        raise StorageError(f"{uri}: no such file or folder")


def exists(uri: str) -> bool:
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = parse_s3(uri)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise _explain(uri, exc) from exc
    return os.path.exists(uri)


def list_names(uri: str) -> list[str]:
    """Names (relative to `uri`, recursively, sorted) of every object/file below the folder `uri`."""
    if is_s3(uri):
        bucket, prefix = parse_s3(uri)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        names = []
        try:
            for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                names.extend(obj["Key"][len(prefix):] for obj in page.get("Contents", []))
        except Exception as exc:  # noqa: BLE001
            raise _explain(uri, exc) from exc
        return sorted(names)
    if not os.path.isdir(uri):
        raise StorageError(f"{uri}: not a folder")
    out = []
    for root, _, files in os.walk(uri):
        for f in files:
            out.append(os.path.relpath(os.path.join(root, f), uri).replace(os.sep, "/"))
    return sorted(out)


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        bucket, key = parse_s3(uri)
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:  # noqa: BLE001
            raise _explain(uri, exc) from exc
    with open(uri, "rb") as f:
        return f.read()


def open_read(uri: str) -> BinaryIO:
    """A streaming, readable binary file object (S3: the GET body; bytes arrive as they are read)."""
    if is_s3(uri):
        bucket, key = parse_s3(uri)
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as exc:  # noqa: BLE001
            raise _explain(uri, exc) from exc
    return open(uri, "rb")


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once: os.umask can only be read by setting it, which would race with threads creating files.
_UMASK = _read_umask()


def _atomic_local_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write through `write(file)` to a temporary sibling, fsync, then rename over `path`: readers see the old
    file or the whole new one. The file gets the permissions a plain open() would give (mkstemp's are 0600)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes(uri: str, data: bytes) -> None:
    if is_s3(uri):
        bucket, key = parse_s3(uri)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as exc:  # noqa: BLE001
            raise _explain(uri, exc) from exc
        return
    _atomic_local_write(uri, lambda f: f.write(data))


def upload_file(local_path: str, uri: str) -> None:
    """Copy a finished local file to `uri` atomically (S3: managed multipart upload, visible on completion)."""
    if is_s3(uri):
        bucket, key = parse_s3(uri)
        try:
            s3_client().upload_file(local_path, bucket, key)
        except Exception as exc:  # noqa: BLE001
            raise _explain(uri, exc) from exc
        return

    def copy(dst: BinaryIO) -> None:
        with open(local_path, "rb") as src:
            shutil.copyfileobj(src, dst, 1 << 20)

    _atomic_local_write(uri, copy)


def read_range(uri: str, offset: int, size: int) -> bytes:
    """`size` bytes of `uri` starting at `offset` (S3: one ranged GET), e.g. one member of a tar."""
    if size == 0:
        return b""
    if is_s3(uri):
        bucket, key = parse_s3(uri)
        try:
            body = s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + size - 1}")["Body"]
            return body.read()
        except Exception as exc:  # noqa: BLE001
            raise _explain(uri, exc) from exc
    with open(uri, "rb") as f:
        f.seek(offset)
        return f.read(size)


def remove_partial_writes(folder: str) -> int:
    """Drop what interrupted writers left directly under `folder`: local `.tmp-*` files (see write_bytes and
    upload_file) or, on S3, multipart uploads that were never completed (invisible, but stored and billed).
    Only for a folder no other writer is using right now. Returns how many were removed."""
    if is_s3(folder):
        bucket, prefix = parse_s3(folder)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        removed = 0
        try:
            for page in s3_client().get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
                for upload in page.get("Uploads", []):
                    s3_client().abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                    removed += 1
        except Exception as exc:  # noqa: BLE001
            raise _explain(folder, exc) from exc
        return removed
    if not os.path.isdir(folder):
        return 0
    stale = [n for n in os.listdir(folder) if n.startswith(".tmp-")]
    for name in stale:
        os.unlink(os.path.join(folder, name))
    return len(stale)


def download_file(uri: str, local_path: str) -> None:
    """Copy `uri` to the local file `local_path` (S3: managed, possibly ranged, download)."""
    if is_s3(uri):
        bucket, key = parse_s3(uri)
        try:
            s3_client().download_file(bucket, key, local_path)
        except Exception as exc:  # noqa: BLE001
            raise _explain(uri, exc) from exc
        return
    shutil.copyfile(uri, local_path)


def delete_tree(uri: str) -> int:
    """Delete the folder `uri` and everything below it (S3: every object under the prefix `uri/`). Returns how many
    files/objects were removed."""
    if is_s3(uri):
        bucket, prefix = parse_s3(uri)
        prefix = prefix.rstrip("/") + "/"
        removed = 0
        try:
            for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
                if keys:
                    s3_client().delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
                    removed += len(keys)
        except Exception as exc:  # noqa: BLE001
            raise _explain(uri, exc) from exc
        return removed
    if not os.path.exists(uri):
        return 0
    count = sum(len(files) for _, _, files in os.walk(uri))
    shutil.rmtree(uri)
    return count
