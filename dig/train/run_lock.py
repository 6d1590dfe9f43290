"""One trainer per run directory: a lease-based lock file, on a (shared) filesystem and on S3.

`<run dir>/trainer.lock` (and `<checkpoint.uri>/trainer.lock` when checkpoints live on S3) holds JSON naming the
holder (host, pid, start time, a random token) and a heartbeat time that a thread of the holder refreshes every
lease/4 seconds. A second trainer is refused with a message naming the holder. A lock is stale, and is taken
over, when its holder ran on this host and that process is gone, or when its heartbeat is older than the lease:
a run killed with SIGKILL resumes at once on the same host, and after one lease elsewhere (a trainer that finds a
lock from another host whose heartbeat has stopped waits for the lease to run out, logging why).

Atomicity: a local lock is created with link(2) (fails if the name exists; also on NFS), a stale one is taken
over by whoever first creates `trainer.lock.takeover-<token>` for that holder's token; on S3 by conditional
PUTs (If-None-Match: * to create, If-Match: <etag> to refresh or take over).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from dig.data import storage

log = logging.getLogger("dig.train")

LOCK_FILE = "trainer.lock"


class RunLockError(RuntimeError):
    """The run directory is in use by another live trainer (the message names it)."""


def _now() -> float:
    return time.time()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Backend:
    """read() → (record or None, version); create(record) → version or None if it exists; replace(record,
    version) → new version or None if the lock changed meanwhile; delete(version)."""


class _LocalBackend(_Backend):
    def __init__(self, path: str):
        self.path = path

    def read(self):
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None
        try:
            record = json.loads(data)
        except ValueError:
            record = {"token": "unreadable", "heartbeat": os.path.getmtime(self.path)}
        return record, record.get("token")

    def _write_tmp(self, record: dict) -> str:
        tmp = f"{self.path}.{record['token']}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create(self, record: dict):
        tmp = self._write_tmp(record)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)
        return record["token"]

    def replace(self, record: dict, version):
        guard = f"{self.path}.takeover-{version}"
        if record["token"] != version:  # taking over someone else's: only one of several contenders may
            try:
                os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                return None
        try:
            _, current = self.read()
            if current != version:
                return None
            os.replace(self._write_tmp(record), self.path)
            return record["token"]
        finally:
            if record["token"] != version and os.path.exists(guard):
                os.unlink(guard)

    def delete(self, version) -> None:
        _, current = self.read()
        if current == version:
            os.unlink(self.path)


class _S3Backend(_Backend):
    def __init__(self, uri: str):
        self.uri = uri
        self.bucket, self.key = storage.parse_s3(uri)

    def read(self):
        from botocore.exceptions import ClientError

        try:
            obj = storage.s3_client().get_object(Bucket=self.bucket, Key=self.key)
            data = obj["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None, None
            raise storage._explain(self.uri, exc) from exc
        try:
            record = json.loads(data)
        except ValueError:
            record = {"token": "unreadable", "heartbeat": obj["LastModified"].timestamp()}
        return record, obj["ETag"]

    def _put(self, record: dict, **condition):
        from botocore.exceptions import ClientError

        try:
            return storage.s3_client().put_object(Bucket=self.bucket, Key=self.key, Body=json.dumps(record).encode(),
                                                  **condition)["ETag"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict",
                                                             "412", "409"):
                return None
            raise storage._explain(self.uri, exc) from exc

    def create(self, record: dict):
        return self._put(record, IfNoneMatch="*")

    def replace(self, record: dict, version):
        return self._put(record, IfMatch=version)

    def delete(self, version) -> None:
        _, current = self.read()
        if current == version:
            storage.s3_client().delete_object(Bucket=self.bucket, Key=self.key)


class RunLock:
    """A held lock; a daemon thread refreshes its heartbeat until release()."""

    def __init__(self, backends: list[tuple[str, _Backend]], lease_s: float):
        self.lease_s = lease_s
        self.token = uuid.uuid4().hex
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                       "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "heartbeat": _now()}
        self.backends = backends
        self.versions: dict[str, object] = {}
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        taken = []
        try:
            for where, backend in self.backends:
                self.versions[where] = self._acquire_one(where, backend)
                taken.append(where)
        except BaseException:
            for where in taken:
                self._release_one(where)
            raise
        self._thread = threading.Thread(target=self._heartbeat, name="dig-run-lock", daemon=True)
        self._thread.start()

    def _acquire_one(self, where: str, backend: _Backend):
        waited_for = None
        while True:
            self.record["heartbeat"] = _now()
            version = backend.create(self.record)
            if version is not None:
                return version
            holder, version = backend.read()
            if holder is None:
                continue  # released meanwhile
            if holder.get("token") == self.token:
                return version  # our own create, retried after a lost answer
            age = _now() - float(holder.get("heartbeat", 0))
            same_host = holder.get("host") == socket.gethostname()
            dead = same_host and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"])
            if dead or age > self.lease_s:
                why = "its process is gone" if dead else f"no heartbeat for {age:.0f}s"
                new_version = backend.replace(self.record, version)
                if new_version is not None:
                    log.warning("took over the lock %s of %s (%s)", where, _describe(holder), why)
                    return new_version
                continue  # someone else changed it: look again
            if same_host or (waited_for is not None and holder.get("heartbeat") != waited_for):
                raise RunLockError(f"{where} is locked by a live trainer: {_describe(holder)}, last heartbeat "
                                   f"{age:.0f}s ago. One trainer per run directory: stop that one first (if it "
                                   f"is dead on another host, its lock expires {self.lease_s - age:.0f}s after "
                                   f"its last heartbeat)")
            if waited_for is None:  # another host: alive if its heartbeat moves within a refresh interval
                log.warning("%s is locked by %s (heartbeat %.0fs ago); waiting up to %.0fs to see whether it is "
                            "alive", where, _describe(holder), age, self.lease_s - age)
                waited_for = holder.get("heartbeat")
            time.sleep(min(self.lease_s / 8, 5.0))

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            self.record["heartbeat"] = _now()
            for where, backend in self.backends:
                try:
                    version = backend.replace(self.record, self.versions[where])
                except Exception as exc:  # noqa: BLE001 - a blip; the lease tolerates missed beats
                    log.warning("run lock %s: heartbeat failed: %s", where, exc)
                    continue
                if version is None:
                    holder, _ = backend.read()
                    self.lost = (f"the lock {where} was taken over by another trainer"
                                 f" ({_describe(holder or {})})")
                    log.error("%s", self.lost)
                    return
                else:
                    self.versions[where] = version

    def _release_one(self, where: str) -> None:
        backend = dict(self.backends)[where]
        try:
            backend.delete(self.versions.get(where))
        except Exception as exc:  # noqa: BLE001 - it expires anyway
            log.warning("run lock %s: release failed (%s); it expires after %.0fs", where, exc, self.lease_s)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for where in list(self.versions):
            self._release_one(where)
        self.versions.clear()


def _describe(holder: dict) -> str:
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}")


def acquire_run_lock(run_dir: str, checkpoint_uri: str | None, lease_s: float) -> RunLock:
    """Lock the run directory (created if missing) and, when checkpoints go to S3, the checkpoint prefix too."""
    os.makedirs(run_dir, exist_ok=True)
    backends: list[tuple[str, _Backend]] = [(os.path.join(run_dir, LOCK_FILE),
                                             _LocalBackend(os.path.join(run_dir, LOCK_FILE)))]
    if checkpoint_uri and storage.is_s3(checkpoint_uri):
        uri = storage.join(checkpoint_uri, LOCK_FILE)
        backends.append((uri, _S3Backend(uri)))
    lock = RunLock(backends, lease_s)
    lock.acquire()
    return lock
