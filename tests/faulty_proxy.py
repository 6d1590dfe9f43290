"""A fault-injecting HTTP proxy on 127.0.0.1 for S3 tests: sits in front of the moto server and, per request,
forwards it, resets the connection (before answering, in the middle of the request body or in the middle of the
response body), answers 503 SlowDown / 500 InternalError, delays the answer, or stalls in the middle of the
response body (for `delay_s`, then resets).

Which request gets which fault comes from `random.Random(seed)` drawn once per request in arrival order, so a
run is reproducible up to the order in which concurrent requests arrive. `counts` says what was injected (a test
should check that faults really happened). Every answer closes its connection (`Connection: close`), so the
client's next request is a new connection and a fault never leaves a half-read stream behind.

    with FaultyProxy(upstream_url, seed=0, reset=0.1, reset_mid_body=0.1, error=0.1, delay=0.05) as proxy:
        env = {"AWS_ENDPOINT_URL": proxy.url, ...}
"""
from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections import Counter
from urllib.parse import urlparse

LOOPBACK = "127.0.0.1"
_ERRORS = [(503, "Service Unavailable", "SlowDown", "Please reduce your request rate."),
           (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again.")]


def _read_head(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """(header bytes up to and including the blank line, bytes read past it), or None on EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def _headers(head: bytes) -> dict[str, str]:
    out = {}
    for line in head.split(b"\r\n")[1:]:
        if b":" in line:
            k, _, v = line.partition(b":")
            out[k.decode().strip().lower()] = v.decode().strip()
    return out


def _read_exact(sock: socket.socket, have: bytes, n: int) -> bytes:
    while len(have) < n:
        chunk = sock.recv(min(1 << 20, n - len(have)))
        if not chunk:
            raise ConnectionError("client closed mid-body")
        have += chunk
    return have


def _read_chunked(sock: socket.socket, have: bytes) -> bytes:
    """The raw bytes of a chunked body including the final chunk and trailers (forwarded as they are)."""
    data = have
    pos = 0
    while True:
        while b"\r\n" not in data[pos:]:
            more = sock.recv(65536)
            if not more:
                raise ConnectionError("client closed mid-body")
            data += more
        line_end = data.index(b"\r\n", pos)
        size = int(data[pos:line_end].split(b";")[0], 16)
        pos = line_end + 2
        if size == 0:
            while b"\r\n\r\n" not in data[pos - 2:]:
                more = sock.recv(65536)
                if not more:
                    raise ConnectionError("client closed in trailers")
                data += more
            return data[:data.index(b"\r\n\r\n", pos - 2) + 4]
        data = _read_exact(sock, data, pos + size + 2)
        pos += size + 2


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0): the peer sees 'Connection reset by peer'."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


class FaultyProxy:
    def __init__(self, upstream_url: str, seed: int = 0, reset: float = 0.0, reset_mid_body: float = 0.0,
                 error: float = 0.0, delay: float = 0.0, stall_mid_body: float = 0.0, delay_s: float = 0.5,
                 max_faults_in_a_row: int = 3):
        up = urlparse(upstream_url)
        self.upstream = (up.hostname, up.port)
        self.rates = {"reset": reset, "reset_mid_body": reset_mid_body, "error": error, "delay": delay,
                      "stall_mid_body": stall_mid_body}
        self.delay_s = delay_s
        # Never more than this many failing answers in a row: a test's client with enough retries must get through.
        self.max_faults_in_a_row = max_faults_in_a_row
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._in_a_row = 0
        self.counts: Counter = Counter()
        self._server = socket.create_server((LOOPBACK, 0))
        self._server.settimeout(0.2)   # accept() wakes up to notice the stop
        self.url = f"http://{LOOPBACK}:{self._server.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="faulty-proxy", daemon=True)

    def __enter__(self) -> "FaultyProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._server.close()
        self._thread.join(timeout=5)

    def _choose(self) -> str:
        with self._lock:
            draw = self._rng.random()
            fault = "pass"
            edge = 0.0
            for name, rate in self.rates.items():
                edge += rate
                if draw < edge:
                    fault = name
                    break
            if fault not in ("pass", "delay"):
                if self._in_a_row >= self.max_faults_in_a_row:
                    fault = "pass"
                self._in_a_row = self._in_a_row + 1 if fault != "pass" else 0
            else:
                self._in_a_row = 0
            self.counts[fault] += 1
            self.counts["requests"] += 1
            return fault

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            got = _read_head(client)
            if got is None:
                client.close()
                return
            head, rest = got
            headers = _headers(head)
            fault = self._choose()
            length = int(headers.get("content-length", "0") or 0)
            if headers.get("expect", "").lower() == "100-continue":
                client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")   # botocore waits for it before a PUT body
                head = b"\r\n".join(ln for ln in head.split(b"\r\n") if not ln.lower().startswith(b"expect:"))
            if fault == "reset" and length > 1:
                _read_exact(client, rest, length // 2)   # reset while the client is still sending its body
                _reset(client)
                return
            if headers.get("transfer-encoding", "").lower() == "chunked":
                body = _read_chunked(client, rest)
            else:
                body = _read_exact(client, rest, length)
            if fault == "reset":
                _reset(client)
                return
            if fault == "error":
                status, reason, code, message = _ERRORS[self.counts["error"] % 2]
                xml = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
                       f'</Message></Error>').encode()
                client.sendall(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
                               f"Content-Length: {len(xml)}\r\nConnection: close\r\n\r\n".encode() + xml)
                client.close()
                return
            if fault == "delay":
                time.sleep(self.delay_s)
            response = self._forward(head, body)
            resp_head, _, resp_body = response.partition(b"\r\n\r\n")
            lines = [ln for ln in resp_head.split(b"\r\n") if not ln.lower().startswith(b"connection:")]
            resp_head = b"\r\n".join(lines + [b"Connection: close"]) + b"\r\n\r\n"
            if fault in ("reset_mid_body", "stall_mid_body") and len(resp_body) <= 1:
                with self._lock:   # no body to break (HEAD, empty object): it passed, count it so
                    self.counts[fault] -= 1
                    self.counts["pass"] += 1
            elif fault in ("reset_mid_body", "stall_mid_body"):
                client.sendall(resp_head + resp_body[:len(resp_body) // 2])
                time.sleep(0.01 if fault == "reset_mid_body" else self.delay_s)   # a stall: the reader times out
                _reset(client)
                return
            client.sendall(resp_head + resp_body)
            client.close()
        except OSError:
            client.close()

    def _forward(self, head: bytes, body: bytes) -> bytes:
        """Send the request to the upstream server on a connection of its own and return its whole answer."""
        lines = [ln for ln in head[:-4].split(b"\r\n") if not ln.lower().startswith(b"connection:")]
        request = b"\r\n".join(lines + [b"Connection: close"]) + b"\r\n\r\n" + body
        with socket.create_connection(self.upstream, timeout=60) as up:
            up.sendall(request)
            chunks = []
            while True:
                chunk = up.recv(1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks)
