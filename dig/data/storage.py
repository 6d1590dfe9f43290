"""Storage URIs: a local path or `s3://bucket/prefix`, with the few operations the pipeline and trainer need.

S3 goes through boto3, configured by the standard AWS environment/config files (credentials, region, and
`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` for S3-compatible servers). Writes are atomic from a reader's
point of view: a local file is written to a temporary name and renamed; an S3 object appears only when its
PUT or multipart upload completes.

S3 under faults: every request has explicit connect/read timeouts and botocore's "standard" retries (connection
errors and resets, 500/502/503/504, throttling such as SlowDown, read timeouts), with exponential backoff; each
retry is logged as a warning. A body that breaks off while it is streamed (reset, truncation, read timeout) is not
covered by botocore: the read resumes with a ranged GET from the last byte received, pinned to the object's
ETag (so a replaced object is an error, never a mix). Settings, from the environment:
  DIG_S3_MAX_ATTEMPTS      attempts per request and per body (default 8)
  DIG_S3_CONNECT_TIMEOUT   seconds to connect (default 10)
  DIG_S3_READ_TIMEOUT      seconds without a byte from the server (default 60)
  DIG_S3_RETRY_MODE        botocore retry mode: standard (default) or adaptive (adds client-side rate limiting)
"""
from __future__ import annotations

import functools
import io
import logging
import os
import shutil
import tempfile
import time
from typing import BinaryIO, Callable

from dig.errors import UserError

log = logging.getLogger(__name__)

S3_PREFIX = "s3://"


class StorageError(RuntimeError, UserError):
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


def _setting(name: str, default: float, cast=float):
    raw = os.environ.get(name, "").strip()
    try:
        value = cast(raw) if raw else default
    except ValueError:
        raise StorageError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise StorageError(f"{name} must be > 0, got {raw}")
    return value


def max_attempts() -> int:
    return _setting("DIG_S3_MAX_ATTEMPTS", 8, int)


def _log_retry(event_name: str = "", attempts: int = 0, response=None, caught_exception=None, **_) -> None:
    """botocore's needs-retry hook, only to log: botocore decides (and returns None here, so it still does)."""
    if caught_exception is not None:
        why = f"{type(caught_exception).__name__}: {caught_exception}"
    elif response is not None:
        status = response[0].status_code
        code = (response[1] or {}).get("Error", {}).get("Code", "")
        if status < 500 and code not in ("SlowDown", "Throttling", "ThrottlingException", "RequestTimeout"):
            return
        why = f"HTTP {status} {code}".strip()
    else:
        return
    limit = max_attempts()
    if attempts < limit:
        log.warning("S3 %s: attempt %d of %d failed (%s); retrying", event_name.rsplit(".", 1)[-1], attempts, limit,
                    why)


@functools.lru_cache(maxsize=None)
def _client_for_process(pid: int):
    import boto3
    from botocore.config import Config

    # boto3 clients are not fork-safe, hence one per pid.
    config = Config(retries={"max_attempts": max_attempts(),
                             "mode": os.environ.get("DIG_S3_RETRY_MODE", "standard").strip() or "standard"},
                    connect_timeout=_setting("DIG_S3_CONNECT_TIMEOUT", 10.0),
                    read_timeout=_setting("DIG_S3_READ_TIMEOUT", 60.0), max_pool_connections=32)
    client = boto3.session.Session().client("s3", config=config)
    client.meta.events.register("needs-retry.s3", _log_retry)
    return client


def s3_client():
    return _client_for_process(os.getpid())


def _body_errors() -> tuple[type[BaseException], ...]:
    """What a GET body can fail with while it streams: botocore wraps most, urllib3/socket errors leak through."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError, IncompleteReadError
    from urllib3.exceptions import HTTPError as Urllib3Error

    return (HTTPClientError, BotoConnectionError, IncompleteReadError, Urllib3Error, ConnectionError, TimeoutError)


class S3ObjectReader(io.RawIOBase):
    """Bytes [start, stop) of an S3 object, read as a stream that survives a body breaking off: it resumes with a
    ranged GET from the next byte, pinned to the ETag of the first answer, at most DIG_S3_MAX_ATTEMPTS times."""

    def __init__(self, uri: str, start: int = 0, stop: int | None = None):
        super().__init__()
        self.uri = uri
        self.bucket, self.key = parse_s3(uri)
        self._pos, self._stop = start, stop
        self._etag: str | None = None
        self._body = None
        self._retries = 0
        self._open()

    def _open(self) -> None:
        kwargs = {}
        if self._pos > 0 or self._stop is not None:
            kwargs["Range"] = f"bytes={self._pos}-{'' if self._stop is None else self._stop - 1}"
        if self._etag is not None:
            kwargs["IfMatch"] = self._etag
        try:
            response = s3_client().get_object(Bucket=self.bucket, Key=self.key, **kwargs)
        except Exception as exc:  # noqa: BLE001
            from botocore.exceptions import ClientError

            if (self._etag is not None and isinstance(exc, ClientError)
                    and exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412")):
                raise StorageError(f"{self.uri}: the object was replaced while it was being read") from exc
            raise _explain(self.uri, exc) from exc
        if self._etag is None:  # the first answer: what exists of the requested range (S3 clamps it to the object)
            self._stop = self._pos + response["ContentLength"]
        self._etag = response.get("ETag")
        self._body = response["Body"]

    def readable(self) -> bool:
        return True

    def _read(self, n: int) -> bytes:
        """Up to n bytes (n > 0) from the current position; resumes the body after a failure."""
        while True:
            try:
                data = self._body.read(n)
                if not data:
                    raise ConnectionError(f"body ended at byte {self._pos}, expected {self._stop}")
                self._pos += len(data)
                return data
            except _body_errors() as exc:
                self._retries += 1
                limit = max_attempts()
                if self._retries >= limit:
                    raise StorageError(f"{self.uri}: reading failed {self._retries} times, last at byte "
                                       f"{self._pos} ({type(exc).__name__}: {exc})") from exc
                log.warning("S3 read of %s broke off at byte %d (%s: %s); resuming (retry %d of %d)", self.uri,
                            self._pos, type(exc).__name__, exc, self._retries, limit - 1)
                try:
                    self._body.close()
                except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped anyway
                    pass
                time.sleep(min(0.1 * 2 ** self._retries, 5.0))
                self._open()

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._stop - self._pos)
        if n <= 0:
            return 0
        data = self._read(n)
        buffer[:len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        parts = []
        while self._pos < self._stop:
            parts.append(self._read(min(8 << 20, self._stop - self._pos)))
        return b"".join(parts)

    def close(self) -> None:
        if self._body is not None:
            self._body.close()
        super().close()


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
        except Exception as exc:  # noqa: BLE001 - credentials, endpoint, retries exhausted
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
        with S3ObjectReader(uri) as reader:
            return reader.readall()
    with open(uri, "rb") as f:
        return f.read()


def open_read(uri: str) -> BinaryIO:
    """A streaming, readable binary file object (S3: the GET body; bytes arrive as they are read)."""
    if is_s3(uri):
        return io.BufferedReader(S3ObjectReader(uri), buffer_size=1 << 20)
    return open(uri, "rb")


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once: os.umask can only be read by setting it, which would race with threads creating files.
# the mode a plain open() gives a new file under the user's umask (mkstemp's is 0600)
FILE_MODE = 0o666 & ~_read_umask()


def _atomic_local_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write through `write(file)` to a temporary sibling, fsync, then rename over `path`: readers see the old
    file or the whole new one. The file gets the permissions a plain open() would give (mkstemp's are 0600)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.fchmod(fd, FILE_MODE)
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
        with S3ObjectReader(uri, offset, offset + size) as reader:
            data = reader.readall()
        if len(data) != size:
            raise StorageError(f"{uri}: {size} bytes at offset {offset} requested, {len(data)} exist")
        return data
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
