"""A fault-injecting HTTP proxy on 127.0.0.1 in front of an S3-protocol server, for tests.

Requests whose method is in --methods and whose path starts with --path-prefix go through a fixed cycle of
outcomes (deterministic, so a test can count on faults happening): the connection reset in the middle of the
request body (RST, nothing answered), 503 SlowDown, 500 InternalError, or passed on after --delay seconds.
Requests whose path contains --deny get 403 AccessDenied every time (a permanent failure). Everything else is
passed through. Each injected fault is printed as one line `FAULT <kind> <method> <path>` (flushed), so the
test can read the log.

    python tests/fault_proxy.py --upstream http://127.0.0.1:PORT --port N [--methods PUT,POST] ...
"""
from __future__ import annotations

import argparse
import http.client
import itertools
import socket
import struct
import sys
import threading
import time
import urllib.parse
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CYCLE = ("reset", "pass", "503", "pass", "500", "pass", "pass")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
ERROR_XML = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{msg}</Message>'
             '<RequestId>fault-proxy</RequestId></Error>')


def make_handler(args):
    upstream = urllib.parse.urlsplit(args.upstream)
    counter = itertools.count()
    lock = threading.Lock()
    methods = set(args.methods.split(","))

    def report(kind: str, method: str, path: str) -> None:
        with lock:
            print(f"FAULT {kind} {method} {path}", flush=True)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def _body(self, limit: int | None = None) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length if limit is None else min(length, limit))

        def _answer(self, status: int, code: str, msg: str) -> None:
            body = ERROR_XML.format(code=code, msg=msg).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _handle(self) -> None:
            method, path = self.command, self.path
            if args.deny and args.deny in path:
                self._body()
                report("403", method, path)
                return self._answer(403, "AccessDenied", "Access Denied (fault proxy)")
            outcome = "pass"
            if method in methods and path.startswith(args.path_prefix):
                with lock:
                    outcome = CYCLE[next(counter) % len(CYCLE)]
            if outcome == "reset":
                length = int(self.headers.get("Content-Length") or 0)
                self._body(limit=length // 2)  # mid-body
                report("reset", method, path)
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()
                return
            body = self._body()
            if outcome in ("503", "500"):
                report(outcome, method, path)
                code = "SlowDown" if outcome == "503" else "InternalError"
                return self._answer(int(outcome), code, "injected by the fault proxy")
            if method in methods and args.delay:
                time.sleep(args.delay)
            conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP and k.lower() != "expect"}
            conn.request(method, path, body=body if body else None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(data)
            conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--upstream", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--methods", default="PUT,POST,DELETE")
    p.add_argument("--path-prefix", default="/")
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--deny", default="")
    args = p.parse_args(argv)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(args))
    server.daemon_threads = True
    print(f"listening on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()
    return 0


@contextmanager
def fault_proxy(upstream: str, log_path: str, **options):
    """Run the proxy as a child process (own session, stopped by PID); yields its http:// URL."""
    import os
    import subprocess

    from servers import LOOPBACK, free_port, stop_process, wait_http

    port = free_port()
    cmd = [sys.executable, os.path.abspath(__file__), "--upstream", upstream, "--port", str(port)]
    for k, v in options.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://{LOOPBACK}:{port}"
        wait_http(url + "/moto-api/", proc=proc)
        yield url
    finally:
        stop_process(proc)
        log.close()


if __name__ == "__main__":
    sys.exit(main())
