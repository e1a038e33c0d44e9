"""Tests for gateway_queue.py, in the module's order: configuration, parsing, responses, queue, coordination, Discord,
Redis, connections, lifecycle, command line, then fuzzing and the client recipes. Standard library only; run with
`python3 -m unittest -v`.

Some tests use real programs where users would: a real `redis-server` for the replica tests and the real discord.py
and @discordjs/ws for the recipe tests. Without them those tests skip with the reason; under CI=true a missing tool is
a failure, never a skip (.ci/run installs them)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import gc
import hashlib
import heapq
import http.server
import io
import itertools
import json
import logging
import math
import os
import random
import re
import secrets
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import unittest.mock
import urllib.parse
import weakref
import zlib
from typing import Any, Awaitable, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import gateway_queue as gq

TOKEN = "MTIzNDU2Nzg5.secret-token.abcdef"  # its first part is base64 for the application id 123456789
logging.getLogger("gateway_queue").addHandler(logging.NullHandler())  # quiet runs; assertLogs still sees records
HERE = os.path.dirname(os.path.abspath(__file__))
IN_CI = os.environ.get("CI") == "true"


def need(condition: bool, reason: str) -> None:
    """Skips the test for a missing tool on a developer machine; under CI=true, fails it instead."""
    if condition:
        return
    if IN_CI:
        raise AssertionError(f"CI=true but {reason}")
    raise unittest.SkipTest(reason)


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


async def settle(rounds: int = 20) -> None:
    """Lets every ready task run until nothing moves (a fixed number of loop turns)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Polls until predicate() holds; fails after timeout (a bound for a slow machine, not a wait for luck)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


class FakeHandle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Virtual time: clock() reads it; call_later() and sleep() fire only when advance() passes their time, in order."""

    def __init__(self, now: float = 0.0):
        self.now = now
        self.delays: List[float] = []
        self._timers: List[Tuple[float, int, FakeHandle, Callable[[], None]]] = []
        self._seq = itertools.count()

    def __call__(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeHandle:
        self.delays.append(delay)
        handle = FakeHandle()
        heapq.heappush(self._timers, (self.now + max(0.0, delay), next(self._seq), handle, callback))
        return handle

    async def sleep(self, delay: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self.call_later(delay, lambda: future.done() or future.set_result(None))
        await future

    @property
    def pending(self) -> int:
        return sum(1 for _, _, handle, _ in self._timers if not handle.cancelled)

    async def advance(self, seconds: float) -> None:
        """Moves time forward, firing each timer at its own time, in order."""
        target = self.now + seconds
        await settle()
        while self._timers and self._timers[0][0] <= target:
            when, _, handle, callback = heapq.heappop(self._timers)
            if handle.cancelled:
                continue
            self.now = max(self.now, when)
            callback()
            await settle()
        self.now = target
        await settle()


class Response:
    def __init__(self, status: int, headers: dict, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


async def read_response(reader: asyncio.StreamReader, head: bool = False) -> Response:
    """Reads one HTTP response (Content-Length framing, as the service always sends)."""
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    length = 0 if head else int(headers.get("content-length", "0"))
    body = await reader.readexactly(length)
    return Response(status, headers, body)


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 2.0) -> bool:
    """True when the server closes the connection (EOF or reset) within timeout."""
    try:
        return await asyncio.wait_for(reader.read(1), timeout) == b""
    except ConnectionError:
        return True


def get(target: str = "/", *extra: str, method: str = "GET") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: queue", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class FakeDiscord:
    """A stand-in for Discord's REST API on loopback. `script` is a list of (status, headers, body, delay) answers
    served in turn (the last one repeats); a delay that is a list drips the body: one byte per listed pause. Every
    request's path and headers are recorded."""

    def __init__(self, script: List[Tuple[int, dict, bytes, Any]]):
        self.script = list(script)
        self.requests: List[Tuple[str, dict]] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.requests.append((self.path, dict(self.headers)))
                status, headers, body, delay = fake.script.pop(0) if len(fake.script) > 1 else fake.script[0]
                try:
                    if not isinstance(delay, list):
                        time.sleep(delay)
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if isinstance(delay, list):
                        for byte, pause in zip(body, delay):
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(pause)
                    else:
                        self.wfile.write(body)
                except OSError:
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/api/v10"
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def gateway_body(max_concurrency: int = 1, total: int = 1000, remaining: int = 999, reset_after: int = 14_400_000) -> bytes:
    limit = {"total": total, "remaining": remaining, "reset_after": reset_after, "max_concurrency": max_concurrency}
    return json.dumps({"url": "wss://gateway.discord.gg", "shards": 1, "session_start_limit": limit}).encode()


class ErrorLogCatcher(logging.Handler):
    """Collects every record at or above a level from the service and from asyncio (unhandled exceptions land there)."""

    def __init__(self, level: int = logging.ERROR) -> None:
        super().__init__(level)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @contextlib.contextmanager
    def watching(self, *names: str) -> Any:
        for name in names:
            logging.getLogger(name).addHandler(self)
        try:
            yield self
        finally:
            for name in names:
                logging.getLogger(name).removeHandler(self)


def service_process(environ: Dict[str, str], *, code: Optional[str] = None, limit_fds: Optional[int] = None) -> Tuple[subprocess.Popen, int]:
    """Starts gateway_queue.py (or `code` run with python -c, which may build a Config directly to get intervals
    below the environment's 5 s floor) as a process; returns it and the port from its startup line."""
    env = {"PATH": os.environ.get("PATH", ""), "PORT": "0", "PYTHONUNBUFFERED": "1", **environ}
    argv = [sys.executable, "-c", code] if code else [sys.executable, os.path.join(HERE, "gateway_queue.py")]
    preexec = None
    if limit_fds:
        import resource

        preexec = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit_fds, limit_fds))  # noqa: E731
    proc = subprocess.Popen(argv, env=env, cwd=HERE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        match = re.search(r"listening on (?:127\.0\.0\.1|\[::\]|0\.0\.0\.0):(\d+)", line)
        if match:
            return proc, int(match.group(1))
    proc.wait(5)
    raise AssertionError(f"the service did not start: {''.join(lines)}")


def collect_stderr(proc: subprocess.Popen) -> List[str]:
    """Reads the rest of a process's stderr in a thread; the list fills as lines come."""
    lines: List[str] = []

    def drain() -> None:
        with proc.stderr:
            for line in proc.stderr:
                lines.append(line)

    threading.Thread(target=drain, daemon=True).start()
    return lines


def stop_process(proc: subprocess.Popen) -> None:
    """Kills a process the test started, if it still runs, and reaps it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def raw_request(port: int, data: bytes, timeout: float = 5.0, host: str = "127.0.0.1") -> bytes:
    """Sends data on a fresh blocking connection and returns everything until the server closes (or timeout)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except socket.timeout:
            pass
        return received


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


class ConfigTests(unittest.TestCase):
    def test_defaults(self) -> None:
        config = gq.Config.from_env({})
        self.assertEqual((config.host, config.port, config.token, config.max_concurrency), ("127.0.0.1", 5000, None, 1))
        self.assertEqual((config.interval, config.log_level, config.auth_token), (5.1, "INFO", None))
        self.assertEqual((config.startup_hold, config.lease_timeout, config.redis_url, config.redis_prefix), (5.1, 0.0, None, None))
        self.assertEqual(config.api_url, "https://discord.com/api/v10")
        self.assertEqual(config.hold, 5.1)

    def test_good_values(self) -> None:
        config = gq.Config.from_env({
            "HOST": "::", "PORT": "0", "DISCORD_TOKEN": "Bot abc.def", "DISCORD_API_URL": "http://127.0.0.1:9/api/",
            "MAX_CONCURRENCY": "16", "IDENTIFY_INTERVAL": "5.25", "LOG_LEVEL": "debug", "AUTH_TOKEN": "s3cret!",
            "STARTUP_HOLD": "0", "LEASE_TIMEOUT": "30", "REDIS_URL": "redis://:pw@redis:6380/2", "REDIS_PREFIX": "bot-a",
        })
        self.assertEqual((config.host, config.port, config.token), ("::", 0, "abc.def"))
        self.assertEqual((config.api_url, config.max_concurrency, config.interval), ("http://127.0.0.1:9/api", 16, 5.25))
        self.assertEqual((config.log_level, config.auth_token), ("DEBUG", "s3cret!"))
        self.assertEqual((config.startup_hold, config.lease_timeout, config.redis_prefix), (0.0, 30.0, "bot-a"))
        self.assertEqual(config.redis_url, "redis://:pw@redis:6380/2")
        for host in ("0.0.0.0", "gateway-queue", "queue.internal.example", "[::1]", "fe80::1"):
            self.assertEqual(gq.Config.from_env({"HOST": host}).host, host.strip("[]"))
        self.assertEqual(gq.Config.from_env({"DISCORD_TOKEN": "plain"}).token, "plain")
        self.assertEqual(gq.Config.from_env({"IDENTIFY_INTERVAL": "5"}).interval, 5.0)
        self.assertEqual(gq.Config.from_env({"IDENTIFY_INTERVAL": "6"}).startup_hold, 6.0)  # follows the interval

    def test_restart_hold_covers_an_open_lease_without_redis(self) -> None:
        self.assertEqual(gq.Config.from_env({"LEASE_TIMEOUT": "30"}).hold, 30 + 5.1)
        self.assertEqual(gq.Config.from_env({"LEASE_TIMEOUT": "2", "STARTUP_HOLD": "60"}).hold, 60.0)
        self.assertEqual(gq.Config.from_env({"LEASE_TIMEOUT": "30", "REDIS_URL": "redis://r"}).hold, 5.1)  # Redis keeps leases
        self.assertEqual(gq.Config.from_env({"STARTUP_HOLD": "0"}).hold, 0.0)

    def test_bad_values_name_the_variable(self) -> None:
        cases = [
            ("HOST", ""), ("HOST", "bad host"), ("HOST", "a..b"), ("HOST", "-x"),
            ("PORT", "65536"), ("PORT", "-1"), ("PORT", "+80"), ("PORT", " 80"), ("PORT", "8_0"), ("PORT", "٨٠"), ("PORT", ""),
            ("PORT", "1" * 5000), ("MAX_CONCURRENCY", "9" * 4301),
            ("MAX_CONCURRENCY", "0"), ("MAX_CONCURRENCY", "1025"), ("MAX_CONCURRENCY", "1.5"),
            ("IDENTIFY_INTERVAL", "4.99"), ("IDENTIFY_INTERVAL", "nan"), ("IDENTIFY_INTERVAL", "inf"),
            ("IDENTIFY_INTERVAL", "1e3"), ("IDENTIFY_INTERVAL", "5,1"), ("IDENTIFY_INTERVAL", "3601"),
            ("IDENTIFY_INTERVAL", "5" + "0" * 400), ("IDENTIFY_INTERVAL", "5." + "1" * 400),
            ("STARTUP_HOLD", "-1"), ("STARTUP_HOLD", "3601"), ("LEASE_TIMEOUT", "x"), ("LEASE_TIMEOUT", "1e9"),
            ("LOG_LEVEL", "TRACE"), ("DISCORD_API_URL", "ftp://x"), ("DISCORD_API_URL", "discord.com"),
            ("DISCORD_API_URL", "http://[::1"), ("DISCORD_API_URL", "http://x:99999999/"),
            ("DISCORD_TOKEN", ""), ("DISCORD_TOKEN", "Bot "), ("DISCORD_TOKEN", "has space"), ("AUTH_TOKEN", ""),
            ("AUTH_TOKEN", "tab\tinside"), ("REDIS_URL", "http://redis"), ("REDIS_URL", "redis://"),
            ("REDIS_URL", "redis://h:99999"), ("REDIS_URL", "redis://h/" + "1" * 5000), ("REDIS_PREFIX", ""),
            ("REDIS_PREFIX", "has space"),
        ]
        for name, value in cases:
            with self.subTest(name=name, value=value[:20]):
                with self.assertRaises(gq.ConfigError) as caught:
                    gq.Config.from_env({name: value})
                self.assertIn(name, str(caught.exception))
                self.assertLess(len(str(caught.exception)), 400)

    def test_secrets_never_echoed(self) -> None:
        for name in ("DISCORD_TOKEN", "AUTH_TOKEN"):
            with self.assertRaises(gq.ConfigError) as caught:
                gq.Config.from_env({name: "my secret value"})
            self.assertNotIn("secret", str(caught.exception))
        for url in ("redis://:hunter2hunter2@h:99999", "redis://u:hunter2hunter2@/", "ftp://:hunter2hunter2@h",
                    "redis://:hunter2hunter2@h?db=1"):
            with self.assertRaises(gq.ConfigError) as caught:
                gq.Config.from_env({"REDIS_URL": url})
            self.assertNotIn("hunter2", str(caught.exception))
        config = gq.Config.from_env({"DISCORD_TOKEN": TOKEN, "AUTH_TOKEN": "hunter2hunter2",
                                     "REDIS_URL": "redis://:hunter3hunter3@h"})
        self.assertNotIn(TOKEN, repr(config))
        self.assertNotIn("hunter2", repr(config))
        self.assertNotIn("hunter3", repr(config))

    def test_floor_applies_to_environment_only(self) -> None:
        self.assertEqual(gq.Config(interval=0.05).interval, 0.05)  # tests use short intervals through the class

    def test_redis_prefix_is_the_bots(self) -> None:
        self.assertEqual(gq.redis_prefix(gq.Config(token=TOKEN)), "gateway-queue:123456789")
        self.assertEqual(gq.redis_prefix(gq.Config()), "gateway-queue:default")
        self.assertEqual(gq.redis_prefix(gq.Config(token=TOKEN, redis_prefix="mine")), "mine")
        odd = gq.redis_prefix(gq.Config(token="not-base64-digits.x.y"))
        self.assertRegex(odd, r"^gateway-queue:[0-9a-f]{16}$")
        self.assertNotIn("not-base64", odd)


# ----------------------------------------------------------------------------------------------------------------
# HTTP/1.1 parsing
# ----------------------------------------------------------------------------------------------------------------

H = b"Host: q\r\n"
PARSER_CASES: List[Tuple[str, bytes, Optional[int]]] = [
    # well-formed: expected status None
    ("simple", b"GET /?shard=1 HTTP/1.1\r\n" + H + b"\r\n", None),
    ("http/1.0 without host", b"GET / HTTP/1.0\r\n\r\n", None),
    ("leading empty lines", b"\r\n\r\nGET / HTTP/1.1\r\n" + H + b"\r\n", None),
    ("the most leading empty lines", b"\r\n" * gq.MAX_EMPTY_LINES + b"GET / HTTP/1.1\r\n" + H + b"\r\n", None),
    ("content-length head", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\n", None),
    ("repeated equal lengths", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\nContent-Length: 3\r\n\r\n", None),
    ("obs-text and tab in value", b"GET / HTTP/1.1\r\n" + H + b"X-A: caf\xc3\xa9\tok\r\n\r\n", None),
    ("absolute form", b"GET http://q/x?shard=3 HTTP/1.1\r\n" + H + b"\r\n", None),
    ("asterisk form", b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", None),
    ("empty header value", b"GET / HTTP/1.1\r\n" + H + b"X-Empty:\r\n\r\n", None),
    ("host with port", b"GET / HTTP/1.1\r\nHost: gateway-queue:80\r\n\r\n", None),
    ("ipv6 host", b"GET / HTTP/1.1\r\nHost: [::1]:5000\r\n\r\n", None),
    ("empty host", b"GET / HTTP/1.1\r\nHost:\r\n\r\n", None),
    ("expect continue", b"POST / HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n", None),
    # malformed
    ("bare LF", b"GET / HTTP/1.1\nHost: q\n\n", 400),
    ("bare LF in headers", b"GET / HTTP/1.1\r\nHost: q\n\r\n", 400),
    ("bare CR", b"GET / HTTP/1.1\rHost: q\r\n\r\n", 400),
    ("bare CR in a value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n", 400),
    ("too many leading empty lines", b"\r\n" * (gq.MAX_EMPTY_LINES + 1) + b"GET / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("a megabyte of empty lines", b"\r\n" * 500_000, 400),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n", 400),
    ("space before colon", b"GET / HTTP/1.1\r\nHost : q\r\n\r\n", 400),
    ("no colon", b"GET / HTTP/1.1\r\n" + H + b"X-A\r\n\r\n", 400),
    ("empty header name", b"GET / HTTP/1.1\r\n" + H + b": v\r\n\r\n", 400),
    ("control byte in value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x01b\r\n\r\n", 400),
    ("DEL in value", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x7fb\r\n\r\n", 400),
    ("NUL in target", b"GET /\x00 HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("non-ASCII target", b"GET /\xc3\xa9 HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("method not a token", b"G(T / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("header name not a token", b"GET / HTTP/1.1\r\n" + H + b"X@Y: 1\r\n\r\n", 400),
    ("non-ASCII header name", b"GET / HTTP/1.1\r\n" + H + b"X-\xc3\xa9: 1\r\n\r\n", 400),
    ("double space", b"GET  / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("missing version", b"GET /\r\n" + H + b"\r\n", 400),
    ("bad version", b"GET / HTTX/1.1\r\n" + H + b"\r\n", 400),
    ("lower-case version", b"GET / http/1.1\r\n" + H + b"\r\n", 400),
    ("relative target", b"GET foo HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("absolute target with a broken IPv6 host", b"GET http://[/?shard=1 HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("HTTP/2.0", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    ("HTTP/1.2", b"GET / HTTP/1.2\r\n" + H + b"\r\n", 505),
    ("HTTP/0.9", b"GET / HTTP/0.9\r\n" + H + b"\r\n", 505),
    ("missing host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("duplicate host", b"GET / HTTP/1.1\r\n" + H + H + b"\r\n", 400),
    ("host with a space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    ("host with a slash", b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
    ("host with junk after the port", b"GET / HTTP/1.1\r\nHost: a:80x\r\n\r\n", 400),
    ("host with an unclosed bracket", b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", 400),
    ("length not a number", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: abc\r\n\r\n", 400),
    ("length with sign", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\n", 400),
    ("empty length", b"POST / HTTP/1.1\r\n" + H + b"Content-Length:\r\n\r\n", 400),
    ("4,301-digit length", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: " + b"9" * 4301 + b"\r\n\r\n", 400),
    ("19-digit length", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: " + b"1" * 19 + b"\r\n\r\n", 400),
    ("conflicting lengths", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5, 6\r\n\r\n", 400),
    ("conflicting length headers", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
    ("length and chunked", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    ("chunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n", 411),
    ("unknown coding", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n", 501),
    ("coding in HTTP/1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    ("body too large", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 65537\r\n\r\n", 413),
    ("18-digit length, too large", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: " + b"9" * 18 + b"\r\n\r\n", 413),
    ("request line too long", b"GET /" + b"a" * gq.MAX_REQUEST_LINE + b" HTTP/1.1\r\n" + H + b"\r\n", 414),
    ("request line longer than the head limit", b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n" + H + b"\r\n", 414),
    ("head too large", b"GET / HTTP/1.1\r\n" + H + b"X-A: " + b"a" * 8000 + b"\r\nX-B: " + b"b" * 9000 + b"\r\n\r\n", 431),
    ("too many headers", b"GET / HTTP/1.1\r\n" + H + b"X-A: 1\r\n" * gq.MAX_HEADERS + b"\r\n", 431),
]


class ParserTests(unittest.TestCase):
    """Each case is fed whole, one byte at a time (fresh calls, and one PartialHead as a connection does), and
    followed by bytes that must survive (h11's approach)."""

    def outcome(self, data: bytes, partial: Optional[gq.PartialHead] = None) -> Any:
        try:
            return gq.parse_request_head(data, partial)
        except gq.HTTPError as exc:
            return exc.status

    def check(self, status: Optional[int], result: Any, complete_at: int, length: int) -> None:
        if status is None:
            self.assertIsInstance(result, tuple, result)
            self.assertEqual((complete_at, result[1]), (length, length), "complete before the last byte")
        else:
            self.assertEqual(result, status)

    def test_whole(self) -> None:
        for name, raw, status in PARSER_CASES:
            with self.subTest(name):
                self.check(status, self.outcome(raw), len(raw), len(raw))

    def test_byte_by_byte(self) -> None:
        for name, raw, status in PARSER_CASES:
            if len(raw) > 30_000:
                continue  # fresh calls on every prefix of a megabyte: quadratic in the test, not in the service
            with self.subTest(name):
                for end in range(1, len(raw) + 1):
                    result = self.outcome(raw[:end])
                    if result is not None:
                        break
                self.check(status, result, end, len(raw))

    def test_byte_by_byte_with_one_partial_head(self) -> None:
        for name, raw, status in PARSER_CASES:
            with self.subTest(name):
                partial = gq.PartialHead()
                for end in range(1, len(raw) + 1):
                    result = self.outcome(raw[:end], partial)
                    if result is not None:
                        break
                self.check(status, result, end, len(raw))

    def test_trailing_bytes_survive(self) -> None:
        trailing = b"GET /next HTTP/1.1\r\n"
        for name, raw, status in PARSER_CASES:
            with self.subTest(name):
                result = self.outcome(raw + trailing)
                if status is None:
                    self.assertEqual(result[1], len(raw))
                    self.assertEqual((raw + trailing)[result[1]:], trailing)
                else:
                    self.assertEqual(result, status)

    def test_a_trickled_head_is_scanned_once(self) -> None:
        """With one PartialHead, the work per call follows the new bytes: a 16 KiB head fed a byte at a time costs
        about what it costs whole. Counted in bytes the parser's scans look at, not in seconds."""
        head = b"GET /?shard=1 HTTP/1.1\r\n" + H + b"X-Long: " + b"a" * 12000 + b"\r\n\r\n"
        partial = gq.PartialHead()
        with unittest.mock.patch.object(gq, "_check_line_ends", wraps=gq._check_line_ends) as line_ends:
            for end in range(1, len(head) + 1):
                result = gq.parse_request_head(head[:end], partial)
            scanned = [args[2] - args[1] for args, _ in line_ends.call_args_list]
        self.assertIsInstance(result, tuple)
        self.assertLess(sum(scanned), 3 * len(head))  # not len(head) ** 2 / 2

    def test_request_fields(self) -> None:
        request, _ = gq.parse_request_head(b"GET /x?shard=7&a=b HTTP/1.1\r\nHost: q\r\nX-Mixed: Value \r\n\r\n")
        self.assertEqual((request.method, request.path, request.query, request.version), ("GET", "/x", "shard=7&a=b", "1.1"))
        self.assertEqual(request.header(b"x-mixed"), b"Value")
        self.assertIsNone(request.header(b"absent"))
        request, _ = gq.parse_request_head(b"GET http://q/p?shard=3 HTTP/1.1\r\nHost: q\r\n\r\n")
        self.assertEqual((request.path, request.query), ("/p", "shard=3"))
        request, _ = gq.parse_request_head(b"POST / HTTP/1.1\r\nHost: q\r\nContent-Length: 12\r\n\r\n")
        self.assertEqual((request.content_length, request.expect_continue), (12, False))
        request, _ = gq.parse_request_head(b"POST / HTTP/1.1\r\nHost: q\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n")
        self.assertTrue(request.expect_continue)
        request, _ = gq.parse_request_head(b"GET / HTTP/1.1\r\nHost: q\r\nExpect: 100-continue\r\n\r\n")
        self.assertFalse(request.expect_continue)  # no body: nothing to continue

    def test_keep_alive_rules(self) -> None:
        cases = [
            (b"GET / HTTP/1.1\r\nHost: q\r\n\r\n", True),
            (b"GET / HTTP/1.1\r\nHost: q\r\nConnection: close\r\n\r\n", False),
            (b"GET / HTTP/1.1\r\nHost: q\r\nConnection: Keep-Alive, CLOSE\r\n\r\n", False),
            (b"GET / HTTP/1.1\r\nHost: q\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n", False),
            (b"GET / HTTP/1.0\r\n\r\n", False),
            (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
        ]
        for raw, keep_alive in cases:
            with self.subTest(raw=raw):
                self.assertEqual(gq.parse_request_head(raw)[0].keep_alive, keep_alive)

    def test_shard_parameter(self) -> None:
        good = [("", None), ("other=1", None), ("shard=0", 0), ("shard=42&x=y", 42), ("x=1&shard=007", 7),
                ("shard=4294967295", 4294967295), ("shard=%34%32", 42), ("shards=3", None)]
        for query, shard in good:
            with self.subTest(query=query):
                self.assertEqual(gq.parse_shard(query), shard)
        bad = ["shard=", "shard=-1", "shard=+1", "shard=1.0", "shard=abc", "shard=%EF%BC%91", "shard=1_0",
               "shard=%201", "shard=4294967296", "shard=99999999999999999999", "shard=1&shard=2",
               "shard=0x10", "shard=" + "9" * 5000, "&".join(["a=1"] * 200) + "&shard=1"]
        for query in bad:
            with self.subTest(query=query[:30]):
                with self.assertRaises(gq.HTTPError) as caught:
                    gq.parse_shard(query)
                self.assertEqual(caught.exception.status, 400)
                self.assertFalse(caught.exception.close)


# ----------------------------------------------------------------------------------------------------------------
# Responses
# ----------------------------------------------------------------------------------------------------------------


class ResponseTests(unittest.TestCase):
    def test_grant_is_twilights_body(self) -> None:
        request, _ = gq.parse_request_head(b"GET / HTTP/1.1\r\nHost: q\r\n\r\n")
        raw = gq.grant_for(request).response
        head, body = raw.split(b"\r\n\r\n", 1)
        self.assertEqual(body, b'{"message": "You\'re free to connect now! :)"}')
        self.assertEqual(len(body), 45)
        self.assertIn(b"Content-Type: application/json", head)
        self.assertIn(b"Content-Length: 45", head)
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"))

    def test_head_and_connection_variants(self) -> None:
        head_request, _ = gq.parse_request_head(b"HEAD / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        raw = gq.grant_for(head_request).response
        self.assertTrue(raw.endswith(b"\r\n\r\n"))
        self.assertIn(b"Content-Length: 45", raw)
        self.assertIn(b"Connection: keep-alive", raw)
        close_request, _ = gq.parse_request_head(b"GET / HTTP/1.1\r\nHost: q\r\nConnection: close\r\n\r\n")
        self.assertIn(b"Connection: close", gq.grant_for(close_request).response)

    def test_error_rendering(self) -> None:
        raw = gq.render_error(gq.HTTPError(431, "too big"))
        self.assertTrue(raw.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"))
        self.assertIn(b"Connection: close", raw)
        body = raw.split(b"\r\n\r\n", 1)[1]
        self.assertEqual(json.loads(body), {"message": "too big"})
        self.assertTrue(body.endswith(b"}\n"))  # curl's prompt starts on a line of its own
        request, _ = gq.parse_request_head(b"GET / HTTP/1.1\r\nHost: q\r\n\r\n")
        raw = gq.render_error(gq.HTTPError(400, "bad shard", close=False), request)
        self.assertNotIn(b"Connection:", raw)


# ----------------------------------------------------------------------------------------------------------------
# Queue and coordination in memory (a fake clock: no time passes)
# ----------------------------------------------------------------------------------------------------------------


class QueueTestCase(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self) -> None:
        self.clock = FakeClock(100.0)
        self.grants: List[Tuple[float, int]] = []

    async def make(self, interval: float = 5.0, max_concurrency: int = 1, *, hold: float = 0.0, lease: float = 0.0,
                   budget: Optional[gq.Budget] = None) -> gq.IdentifyQueue:
        coordinator = gq.MemoryCoordinator(interval, max_concurrency, lease_timeout=lease, clock=self.clock,
                                           call_later=self.clock.call_later)
        queue = gq.IdentifyQueue(coordinator, clock=self.clock, call_later=self.clock.call_later, stats=coordinator.stats)
        await coordinator.start(hold)
        coordinator.budget = budget
        queue.start()
        self.addCleanup(queue.stop)
        return queue

    def put(self, queue: gq.IdentifyQueue, shard: int, *, present: bool = True, write_time: float = 0.0) -> gq.Waiter:
        test = self

        class Client:
            def release(self) -> bool:
                if present:
                    test.clock.now += write_time  # the write itself takes time
                    test.grants.append((test.clock.now, shard))
                return present

        return queue.put(shard, Client())

    def times(self) -> List[float]:
        return [round(t - 100.0, 6) for t, _ in self.grants]

    async def apply(self, queue: gq.IdentifyQueue, max_concurrency: int = 1, total: int = 1000, remaining: int = 1000,
                    reset_after: float = 3600.0) -> None:
        await queue.coordinator.apply(gq.GatewayLimits(max_concurrency, total, remaining, reset_after, 1))
        await self.clock.advance(0)

    async def release(self, queue: gq.IdentifyQueue, shard: int, outcome: str = "ready") -> Tuple[int, str]:
        status, body = await queue.coordinator.release(shard, outcome)
        await self.clock.advance(0)
        return status, body["message"]


class QueueTests(QueueTestCase):
    async def test_idle_bucket_grants_at_once_then_spaces(self) -> None:
        queue = await self.make()
        for shard in range(3):
            self.put(queue, shard)
        await self.clock.advance(0)
        self.assertEqual(self.times(), [0.0])
        await self.clock.advance(4.99)
        self.assertEqual(self.times(), [0.0])
        await self.clock.advance(20)
        self.assertEqual(self.times(), [0.0, 5.0, 10.0])
        self.assertEqual(queue.stats.requests["granted"], 3)
        self.assertEqual(queue.waiting, 0)

    async def test_buckets_start_in_parallel(self) -> None:
        queue = await self.make(max_concurrency=4)
        for shard in range(8):
            self.put(queue, shard)
        await self.clock.advance(0)
        self.assertEqual(sorted(s for _, s in self.grants), [0, 1, 2, 3])
        await self.clock.advance(5)
        self.assertEqual(sorted(s for t, s in self.grants if t == 105.0), [4, 5, 6, 7])

    async def test_first_come_first_served_within_a_bucket(self) -> None:
        queue = await self.make(max_concurrency=4)
        for shard in (8, 0, 12, 4):
            self.put(queue, shard)
        await self.clock.advance(20)
        self.assertEqual([s for _, s in self.grants], [8, 0, 12, 4])

    async def test_cancelled_waiter_costs_no_slot(self) -> None:
        queue = await self.make(budget=gq.Budget(10, 10, 1e9))
        self.put(queue, 0)
        gone = self.put(queue, 1)
        self.put(queue, 2)
        await self.clock.advance(1)
        self.assertEqual(queue.waiting, 2)
        self.assertTrue(queue.cancel(gone))
        self.assertFalse(queue.cancel(gone))
        self.assertEqual(queue.waiting, 1)
        await self.clock.advance(10)
        self.assertEqual(self.grants, [(100.0, 0), (105.0, 2)])
        self.assertEqual(queue.coordinator.budget.remaining, 8)

    async def test_client_gone_at_release_costs_no_slot(self) -> None:
        queue = await self.make(budget=gq.Budget(10, 10, 1e9))
        self.put(queue, 0, present=False)
        self.put(queue, 1)
        await self.clock.advance(0)
        self.assertEqual(self.grants, [(100.0, 1)])
        self.assertEqual(queue.stats.requests["cancelled"], 1)
        self.assertEqual(queue.coordinator.budget.remaining, 9)

    async def test_interval_starts_when_the_grant_is_written(self) -> None:
        queue = await self.make()
        self.put(queue, 0, write_time=0.25)
        self.put(queue, 1)
        await self.clock.advance(10)
        self.assertEqual(self.times(), [0.25, 5.25])

    async def test_long_wait_wakes_early_and_finishes_short(self) -> None:
        queue = await self.make(interval=5.1)
        self.put(queue, 0)
        self.put(queue, 1)
        await self.clock.advance(10)
        self.assertEqual(self.times(), [0.0, 5.1])
        first, second = self.clock.delays[:2]
        self.assertLess(first, 5.1 - 0.005)  # 0.1% kernel slack on 5 s is 5 ms: wake before that
        self.assertAlmostEqual(first + second, 5.1)
        self.assertLess(second, 0.05)

    async def test_budget_exhaustion_waits_for_reset_and_for_discords_word(self) -> None:
        queue = await self.make(max_concurrency=2, budget=gq.Budget(total=3, remaining=2, reset_at=160.0))
        for shard in range(5):
            self.put(queue, shard)
        await self.clock.advance(59)
        self.assertEqual(self.times(), [0.0, 0.0])
        self.assertEqual((queue.coordinator.budget.remaining, queue.waiting), (0, 3))
        self.assertEqual(queue.buckets[0].reason, gq.BUDGET)
        await self.clock.advance(600)  # long past the reset: still nothing, the local clock is not Discord's word
        self.assertEqual(self.times(), [0.0, 0.0])
        self.assertEqual(queue.buckets[0].reason, gq.CONFIRM)
        await self.apply(queue, 2, total=3, remaining=0, reset_after=100)  # Discord: still none left
        await self.clock.advance(50)
        self.assertEqual(len(self.grants), 2)
        await self.apply(queue, 2, total=3, remaining=3, reset_after=86400)  # now it says so
        self.assertEqual(self.times(), [0.0, 0.0, 709.0, 709.0])
        await self.clock.advance(10)
        self.assertEqual(self.times(), [0.0, 0.0, 709.0, 709.0, 714.0])
        self.assertEqual(queue.coordinator.budget.remaining, 0)

    async def test_no_budget_means_no_cap(self) -> None:
        queue = await self.make(interval=5, max_concurrency=16)
        for shard in range(320):
            self.put(queue, shard)
        await self.clock.advance(19 * 5)
        self.assertEqual(len(self.grants), 320)

    async def test_startup_hold(self) -> None:
        queue = await self.make(interval=5.1, max_concurrency=2, hold=5.1)
        self.put(queue, 0)
        self.put(queue, 1)
        await self.clock.advance(5.09)
        self.assertEqual(self.grants, [])
        self.assertEqual(queue.buckets[0].reason, gq.HOLD)
        await self.clock.advance(0.02)
        self.assertEqual(sorted(self.grants), [(105.1, 0), (105.1, 1)])

    async def test_rebucketing_keeps_order_and_spacing(self) -> None:
        queue = await self.make()
        for shard in (0, 1, 2, 3, 4, 5):
            self.put(queue, shard)
        await self.clock.advance(1)
        self.assertEqual(self.grants, [(100.0, 0)])
        await self.apply(queue, 2)
        self.assertEqual([w.shard for w in queue.buckets[0].waiters], [2, 4])
        self.assertEqual([w.shard for w in queue.buckets[1].waiters], [3, 5])
        self.assertEqual(self.grants[-1], (101.0, 1))  # bucket 1 never granted: free at once
        await self.clock.advance(15)
        self.assertEqual(
            self.grants,
            [(100.0, 0), (101.0, 1), (105.0, 2), (106.0, 3), (110.0, 4), (111.0, 5)],
        )

    async def test_rebucketing_down_waits_for_every_recent_grant(self) -> None:
        queue = await self.make(max_concurrency=2)
        self.put(queue, 0)
        await self.clock.advance(2)
        self.put(queue, 1)
        await self.clock.advance(0)
        self.put(queue, 2)
        await self.apply(queue, 1)  # shard 0 at 100 and shard 1 at 102 now share bucket 0
        await self.clock.advance(10)
        self.assertEqual(self.grants, [(100.0, 0), (102.0, 1), (107.0, 2)])

    async def test_take_all_returns_arrival_order(self) -> None:
        queue = await self.make(max_concurrency=2, budget=gq.Budget(1, 0, 1e9))
        for shard in (3, 2, 1, 0):
            self.put(queue, shard)
        self.assertEqual([w.shard for w in queue.take_all()], [3, 2, 1, 0])
        self.assertEqual(queue.waiting, 0)

    async def test_applied_budget_subtracts_grants_in_flight(self) -> None:
        queue = await self.make(max_concurrency=4)
        for shard in range(4):
            self.put(queue, shard)
        await self.clock.advance(0)
        self.assertEqual(queue.coordinator.in_flight(self.clock()), 4)
        self.assertEqual(queue.coordinator.in_flight(self.clock() + gq.IN_FLIGHT_WINDOW + 1), 0)
        await self.apply(queue, 4, total=1000, remaining=100, reset_after=10)
        self.assertEqual(queue.coordinator.budget.remaining, 96)
        self.assertEqual(queue.coordinator.budget.reset_at, 100.0 + 10 + gq.RESET_MARGIN)

    async def test_thousands_parked_cost_no_timer_each(self) -> None:
        queue = await self.make(max_concurrency=2)
        for shard in range(2000):
            self.put(queue, shard)
        await self.clock.advance(1)
        self.assertLessEqual(self.clock.pending, 2)  # one sleeping worker per bucket, whatever the crowd


class LeaseTests(QueueTestCase):
    """Lease mode: a grant holds its bucket until the shard reports, or LEASE_TIMEOUT; then the interval runs."""

    async def test_release_ends_the_lease_and_the_interval_runs_from_it(self) -> None:
        queue = await self.make(interval=5.0, lease=30.0)
        for shard in (0, 1):
            self.put(queue, shard)
        await self.clock.advance(20)
        self.assertEqual(self.times(), [0.0])  # held by shard 0: not at 5 s
        self.assertEqual(queue.buckets[0].reason, gq.LEASE)
        self.assertEqual((await self.release(queue, 0))[0], 200)
        await self.clock.advance(4.99)
        self.assertEqual(self.times(), [0.0])
        await self.clock.advance(0.02)
        self.assertEqual(self.times(), [0.0, 25.0])
        self.assertEqual(queue.stats.leases["ready"], 1)
        self.assertEqual(queue.stats.lease_held.counts[gq.Stats.LEASE_BUCKETS.index(30)], 1)  # held 20 s

    async def test_release_never_brings_a_grant_within_the_interval(self) -> None:
        queue = await self.make(interval=5.0, lease=30.0)
        for shard in (0, 1):
            self.put(queue, shard)
        await self.clock.advance(0.5)
        self.assertEqual((await self.release(queue, 0))[0], 200)  # READY after half a second
        await self.clock.advance(10)
        self.assertEqual(self.times(), [0.0, 5.5])  # the interval from the release, never sooner than from the grant

    async def test_timeout_ends_the_lease_with_a_warning(self) -> None:
        queue = await self.make(interval=5.0, lease=30.0, max_concurrency=2)
        for shard in (1, 3):
            self.put(queue, shard)
        with self.assertLogs("gateway_queue", logging.WARNING) as logs:
            await self.clock.advance(34.99)
            self.assertEqual(self.times(), [0.0])
        self.assertIn("shard 1 (bucket 1)", logs.output[0])
        self.assertIn("LEASE_TIMEOUT", logs.output[0])
        self.assertEqual(await self.release(queue, 1), (409, "shard 1's lease timed out (LEASE_TIMEOUT); its bucket has moved on"))
        await self.clock.advance(0.02)
        self.assertEqual(self.times(), [0.0, 35.0])  # timeout + interval: the late release changed nothing
        self.assertEqual(queue.stats.leases["timeout"], 1)

    async def test_wrong_releases_are_refused_and_change_nothing(self) -> None:
        queue = await self.make(interval=5.0, lease=30.0, max_concurrency=2)
        cases = []
        cases.append(await self.release(queue, 0))  # nothing granted yet
        for shard in (0, 2, 1):
            self.put(queue, shard)
        await self.clock.advance(1)
        cases.append(await self.release(queue, 2))  # bucket 0's lease is shard 0's
        cases.append(await self.release(queue, 4))  # likewise, never granted
        self.assertEqual((await self.release(queue, 1))[0], 200)
        cases.append(await self.release(queue, 1))  # a second release
        cases.append(await self.release(queue, 3))  # bucket 1's last lease was shard 1's, and it has ended
        self.assertEqual([status for status, _ in cases], [409, 409, 409, 409, 409])
        self.assertEqual([message for _, message in cases], [
            "no lease is open in bucket 0: shard 0 was not granted",
            "bucket 0's lease belongs to shard 0, not shard 2",
            "bucket 0's lease belongs to shard 0, not shard 4",
            "shard 1 already released its lease",
            "no lease is open in bucket 1: its last was shard 1's, now released",
        ])
        await self.clock.advance(28.99)
        self.assertEqual(sorted(self.times()), [0.0, 0.0])  # shard 2 still waits for shard 0's lease
        await self.clock.advance(10)
        self.assertEqual(sorted(self.times()), [0.0, 0.0, 35.0])
        self.assertEqual(sum(queue.stats.leases.values()), 2)  # the one release and the one timeout

    async def test_release_without_lease_mode_is_404(self) -> None:
        queue = await self.make(interval=5.0)
        self.put(queue, 0)
        await self.clock.advance(0)
        status, message = await self.release(queue, 0)
        self.assertEqual(status, 404)
        self.assertIn("LEASE_TIMEOUT", message)

    async def test_undelivered_grant_ends_its_lease_at_once(self) -> None:
        queue = await self.make(interval=5.0, lease=30.0, budget=gq.Budget(10, 10, 1e9))
        self.put(queue, 0, present=False)
        self.put(queue, 1)
        await self.clock.advance(0)
        self.assertEqual(self.grants, [(100.0, 1)])  # the next shard went at once: no lease, no interval, no start
        self.assertEqual(queue.stats.leases["undelivered"], 1)
        self.assertEqual(queue.coordinator.budget.remaining, 9)
        self.assertEqual((await self.release(queue, 0))[0], 409)

    async def test_invalid_session_is_a_warning_with_the_spacing(self) -> None:
        queue = await self.make(interval=5.0, lease=30.0)
        for shard in (0, 1):
            self.put(queue, shard)
        await self.clock.advance(1)
        await self.release(queue, 0)
        await self.clock.advance(5)
        with self.assertLogs("gateway_queue", logging.WARNING) as logs:
            self.assertEqual((await self.release(queue, 1, "invalid_session"))[0], 200)
        self.assertIn("bucket 0", logs.output[0])
        self.assertIn("6.000 s after the bucket's previous grant", logs.output[0])
        self.assertEqual(queue.stats.leases["invalid_session"], 1)

    async def test_restart_hold_covers_an_open_lease(self) -> None:
        config = gq.Config(interval=5.0, lease_timeout=30.0, startup_hold=5.0)
        queue = await self.make(interval=5.0, lease=30.0, hold=config.hold)
        self.put(queue, 0)
        await self.clock.advance(34.99)
        self.assertEqual(self.grants, [])  # a lease the previous process granted just before stopping may still run
        await self.clock.advance(0.02)
        self.assertEqual(self.times(), [35.0])

    async def test_rebucketing_moves_an_open_lease(self) -> None:
        queue = await self.make(interval=5.0, lease=30.0)
        self.put(queue, 5)
        await self.clock.advance(1)
        await self.apply(queue, 16)
        self.put(queue, 21)  # bucket 5 again, under 16 buckets
        self.put(queue, 6)
        await self.clock.advance(0)
        self.assertEqual(self.grants, [(100.0, 5), (101.0, 6)])
        self.assertEqual((await self.release(queue, 5))[0], 200)  # found in its new bucket
        await self.clock.advance(5)
        self.assertEqual(self.grants[-1], (106.0, 21))


# ----------------------------------------------------------------------------------------------------------------
# The /status estimate
# ----------------------------------------------------------------------------------------------------------------


def simulated_drain(lines: List[Tuple[float, int]], interval: float, now: float, budget: Optional[gq.Budget],
                    window: float = gq.BUDGET_WINDOW) -> float:
    """The reference: every grant played forward one at a time (what the estimate must equal, at any size)."""
    heap = [(start, index, count) for index, (start, count) in enumerate(lines) if count]
    heapq.heapify(heap)
    if not heap:
        return 0.0
    remaining = budget.remaining if budget else math.inf
    reset_at = budget.reset_at if budget else math.inf
    floor = last = now
    while heap:
        at, index, count = heapq.heappop(heap)
        if remaining <= 0:
            floor, remaining = max(floor, reset_at), budget.total
            reset_at = floor + window
        last = max(at, floor)
        remaining -= 1
        if count > 1:
            heapq.heappush(heap, (last + interval, index, count - 1))
    return last - now


class DrainEstimateTests(unittest.TestCase):
    def test_empty(self) -> None:
        self.assertEqual(gq.estimate_drain([], 5.0, 100.0, None), 0.0)

    def test_slowest_bucket_decides(self) -> None:
        self.assertEqual(gq.estimate_drain([(100, 3), (100, 1), (100, 5)], 5.0, 100.0, None), 20.0)
        self.assertEqual(gq.estimate_drain([(100, 3), (130, 1), (100, 5)], 5.0, 100.0, None), 30.0)

    def test_budget_that_runs_out_adds_the_reset(self) -> None:
        budget = gq.Budget(total=10, remaining=2, reset_at=1000.0)
        # two grants now (one per bucket), the budget is gone, the other two go at the reset, together
        self.assertEqual(gq.estimate_drain([(100, 2), (100, 2)], 5.0, 100.0, budget), 900.0)
        self.assertEqual(gq.estimate_drain([(100, 2), (100, 2)], 5.0, 100.0, gq.Budget(10, 4, 1000.0)), 5.0)

    def test_several_resets(self) -> None:
        # 2 at the first reset (200, 205), 2 at the next (86600, 86605), the last at the third reset
        budget = gq.Budget(total=2, remaining=0, reset_at=200.0)
        self.assertEqual(gq.estimate_drain([(100, 5)], 5.0, 100.0, budget), 200.0 + 2 * gq.BUDGET_WINDOW - 100.0)

    def test_equals_playing_every_grant_forward(self) -> None:
        rng = random.Random(7)
        for case in range(1000):
            lines = [(100 + rng.choice([0, 0, rng.random() * 5, rng.randint(0, 3) * 5.0]), rng.randint(0, 12))
                     for _ in range(rng.randint(1, 6))]
            total = rng.randint(2, 8)  # at most 36 resets: within MAX_ESTIMATE_WINDOWS
            budget = None if case % 5 == 0 else gq.Budget(total, rng.randint(0, total), 100 + rng.random() * 60)
            with self.subTest(case=case, lines=lines, budget=budget):
                expected = simulated_drain(lines, 5.0, 100.0, budget, window=50.0)
                self.assertAlmostEqual(gq.estimate_drain(lines, 5.0, 100.0, budget, window=50.0), expected, places=6)

    def test_beyond_the_windows_played_it_says_so(self) -> None:
        budget = gq.Budget(total=1, remaining=0, reset_at=101.0)
        self.assertEqual(gq.estimate_drain([(100, gq.MAX_ESTIMATE_WINDOWS + 5)], 5.0, 100.0, budget), math.inf)
        # known at once, without playing 64 windows over 1,024 lines (that took 1.3 s of the loop per /status)
        with unittest.mock.patch.object(gq, "_time_of_grant", side_effect=AssertionError("played")):
            self.assertEqual(gq.estimate_drain([(100, 4)] * 1024, 5.0, 100.0, budget), math.inf)

    def test_cost_does_not_grow_with_the_crowd(self) -> None:
        """15,000 parked in 16 buckets with a binding budget: the bisection's steps depend on buckets and resets,
        not on requests (counted, not timed)."""
        calls = []
        real = gq._time_of_grant

        def counting(*args: Any) -> float:
            calls.append(1)
            return real(*args)

        with unittest.mock.patch.object(gq, "_time_of_grant", counting):
            for waiting in (1_000, 15_000):
                calls.clear()
                lines = [(100.0 + b * 0.1, waiting // 16) for b in range(16)]
                estimate = gq.estimate_drain(lines, 5.1, 100.0, gq.Budget(1000, 300, 400.0))
                self.assertGreater(estimate, 0)
                self.assertLessEqual(len(calls), waiting // 1000 + 2)  # one bisection per budget window


# ----------------------------------------------------------------------------------------------------------------
# Discord
# ----------------------------------------------------------------------------------------------------------------


class GatewayBotParsingTests(unittest.TestCase):
    def test_good_answer(self) -> None:
        limits = gq.parse_gateway_bot(gateway_body(16, 2000, 1500, 3_600_000))
        self.assertEqual(limits, gq.GatewayLimits(16, 2000, 1500, 3600.0, 1))

    def test_bad_answers(self) -> None:
        limit = '{"total": 1000, "remaining": 999, "reset_after": %s, "max_concurrency": 1}'
        bodies = [b"", b"<html>", b"[]", b"{}", b'{"session_start_limit": {}}', b'{"session_start_limit": []}',
                  b'{"session_start_limit": 5}', b'"string"', b"null",
                  gateway_body(0), gateway_body(total=0), gateway_body(remaining=-1), gateway_body(2048),
                  gateway_body().replace(b'"max_concurrency": 1', b'"max_concurrency": true'),
                  gateway_body().replace(b'"total": 1000', b'"total": "1000"'),
                  gateway_body().replace(b'"reset_after": 14400000', b'"reset_after": 1.5'),
                  ('{"session_start_limit": %s}' % (limit % ("9" * 400))).encode(),  # OverflowError as a float
                  ('{"session_start_limit": %s}' % (limit % ("9" * 5000))).encode(),  # int() refuses
                  ('{"session_start_limit": %s}' % (limit % "100000000000000000000")).encode(),  # 10^20 ms
                  ('{"session_start_limit": %s}' % (limit % "1e308")).encode(),
                  gateway_body(reset_after=4 * 86_400_000),  # a reset days away: no real Discord says that
                  gateway_body(total=10**12, remaining=10**12),
                  b"[" * 30_000 + b"]" * 30_000, b'{"a": ' * 5000 + b"1" + b"}" * 5000,
                  b" " * (gq.DISCORD_MAX_BODY + 1)]
        for body in bodies:
            with self.subTest(body=body[:60]):
                with self.assertRaises(gq.DiscordError) as caught:
                    gq.parse_gateway_bot(body)
                self.assertFalse(caught.exception.fatal)

    def test_retry_after_is_bounded(self) -> None:
        self.assertEqual(gq._retry_after("3", b'{"retry_after": 4.25}'), 4.25)
        self.assertEqual(gq._retry_after("7", b"not json"), 7.0)
        self.assertIsNone(gq._retry_after("9" * 401, b"[" * 30_000))  # neither is believable
        self.assertEqual(gq._retry_after(" 2 ", b'{"retry_after": 1e999}'), 2.0)  # json's inf is not a wait

    def test_backoff(self) -> None:
        self.assertEqual(gq.backoff_delay(1, rand=lambda: 0.0), 0.5)
        self.assertEqual(gq.backoff_delay(1, rand=lambda: 1.0), 1.0)
        self.assertEqual(gq.backoff_delay(4, rand=lambda: 1.0), 8.0)
        self.assertEqual(gq.backoff_delay(100, rand=lambda: 1.0), gq.BACKOFF_CAP)
        self.assertEqual(gq.backoff_delay(100, rand=lambda: 0.0), gq.BACKOFF_CAP / 2)
        self.assertEqual(gq.backoff_delay(1, retry_after=42.5, rand=lambda: 1.0), 42.5)


class FetchTests(unittest.TestCase):
    def fake(self, *answers: Tuple[int, dict, bytes, Any]) -> FakeDiscord:
        fake = FakeDiscord(list(answers))
        self.addCleanup(fake.close)
        return fake

    def fetch(self, *answers: Tuple[int, dict, bytes, Any], timeout: float = 2.0) -> Tuple[Any, FakeDiscord]:
        fake = self.fake(*answers)
        try:
            return gq.fetch_gateway_bot(fake.url, TOKEN, timeout), fake
        except gq.DiscordError as exc:
            self.assertNotIn(TOKEN, str(exc))
            return exc, fake

    def test_success_sends_documented_headers(self) -> None:
        limits, fake = self.fetch((200, {"Content-Type": "application/json"}, gateway_body(16), 0))
        self.assertEqual(limits.max_concurrency, 16)
        path, headers = fake.requests[0]
        self.assertEqual(path, "/api/v10/gateway/bot")
        self.assertEqual(headers["Authorization"], f"Bot {TOKEN}")
        self.assertRegex(headers["User-Agent"], r"^DiscordBot \(https?://[^,]+, [0-9.]+\)$")

    def test_unauthorized_is_fatal(self) -> None:
        for status in (401, 403):
            with self.subTest(status=status):
                error, _ = self.fetch((status, {}, b'{"message": "401: Unauthorized", "code": 0}', 0))
                self.assertTrue(error.fatal)
                self.assertIn("DISCORD_TOKEN", str(error))

    def test_rate_limited_takes_the_longer_wait(self) -> None:
        error, _ = self.fetch((429, {"Retry-After": "3"}, b'{"retry_after": 4.25, "global": false}', 0))
        self.assertEqual((error.status, error.retry_after, error.fatal), (429, 4.25, False))

    def test_the_token_never_follows_a_redirect(self) -> None:
        elsewhere = self.fake((200, {}, gateway_body(64), 0))
        for status in (301, 302, 303, 307, 308):
            with self.subTest(status=status):
                error, _ = self.fetch((status, {"Location": f"http://127.0.0.1:{elsewhere.port}/api/v10/gateway/bot"}, b"", 0))
                self.assertIsInstance(error, gq.DiscordError)
                self.assertEqual((error.status, error.fatal), (status, False))  # retried with backoff, like a 5xx
                self.assertIn("127.0.0.1", str(error))  # the Location's host, to see where it pointed
        self.assertEqual(elsewhere.requests, [])  # the other host never saw the token, nor any request

    def test_a_redirect_that_echoes_the_token_does_not_put_it_in_the_error(self) -> None:
        """A Location that quotes the token in its host (lower-cased, whole or a part of it), or that does not
        parse at all ("http://[...]/" makes urlsplit raise): the error says a redirect came, never the token, and
        is a DiscordError like any other (not an exception that escapes the fetch)."""
        for location in (f"http://{TOKEN}.example/", f"http://{TOKEN.lower()}.example/",
                         f"http://{TOKEN.split('.')[2]}.example/", f"http://[{TOKEN}]/", "http://[/"):
            with self.subTest(location=location):
                error, _ = self.fetch((302, {"Location": location}, b"", 0))
                self.assertIsInstance(error, gq.DiscordError)
                self.assertIn("redirect", str(error))
                for part in (TOKEN, *TOKEN.split(".")):
                    self.assertNotIn(part.lower(), str(error).lower())

    def test_no_proxy_sees_the_token(self) -> None:
        proxy = self.fake((200, {}, gateway_body(64), 0))
        fake = self.fake((200, {}, gateway_body(2), 0))
        with unittest.mock.patch.dict(os.environ, {"http_proxy": f"http://127.0.0.1:{proxy.port}",
                                                   "HTTP_PROXY": f"http://127.0.0.1:{proxy.port}", "no_proxy": ""}):
            limits = gq.fetch_gateway_bot(fake.url, TOKEN, 2.0)
        self.assertEqual(limits.max_concurrency, 2)
        self.assertEqual(proxy.requests, [])

    def test_retryable_failures(self) -> None:
        for answer in [(500, {}, b"oops", 0), (502, {}, b"", 0), (200, {}, b"garbage", 0), (200, {}, b"x" * 70000, 0)]:
            with self.subTest(status=answer[0], body=answer[2][:10]):
                error, _ = self.fetch(answer)
                self.assertIsInstance(error, gq.DiscordError)
                self.assertFalse(error.fatal)

    def test_hang_times_out(self) -> None:
        started = time.monotonic()
        error, _ = self.fetch((200, {}, gateway_body(), 3.0), timeout=0.3)
        self.assertIsInstance(error, gq.DiscordError)
        self.assertLess(time.monotonic() - started, 2.0)

    def test_a_cut_fetch_ends_at_once(self) -> None:
        """A body dripped a byte every 0.1 s never trips the per-operation timeout; the cutter ends it."""
        fake = self.fake((200, {}, gateway_body(), [0.1] * 500))
        cutter = gq.Cutter()
        threading.Timer(0.5, cutter.cut).start()
        started = time.monotonic()
        with self.assertRaises(gq.DiscordError):
            gq.fetch_gateway_bot(fake.url, TOKEN, 2.0, cutter)
        self.assertLess(time.monotonic() - started, 1.5)

    def test_unreachable(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with self.assertRaises(gq.DiscordError) as caught:
            gq.fetch_gateway_bot(f"http://127.0.0.1:{port}/api", TOKEN, 1.0)
        self.assertNotIn(TOKEN, str(caught.exception))


class DiscordLimitsTests(unittest.IsolatedAsyncioTestCase):
    """The refresh loop with a scripted fetch and a recording sleep (no time passes)."""

    async def run_script(self, script: List[Any], sleeps_allowed: int = 10, clock: Optional[FakeClock] = None,
                         coordinator: Optional[gq.Coordinator] = None) -> Tuple[gq.DiscordLimits, List[float], List[Any]]:
        clock = clock or FakeClock(1000.0)
        coordinator = coordinator or gq.MemoryCoordinator(5.0, 1, clock=clock, call_later=clock.call_later)
        fatal: List[Any] = []
        sleeps: List[float] = []
        answers = iter(script)

        def fetch(cutter: gq.Cutter) -> gq.GatewayLimits:
            answer = next(answers)
            if isinstance(answer, BaseException):
                raise answer
            return answer

        class Done(Exception):
            pass

        async def sleep(delay: float) -> None:
            sleeps.append(delay)
            if len(sleeps) >= sleeps_allowed or len(sleeps) >= len(script):
                raise Done

        limits = gq.DiscordLimits(coordinator, fetch, on_fatal=fatal.append, refresh_interval=600, sleep=sleep)
        try:
            await limits.run()
        except Done:
            pass
        return limits, sleeps, fatal

    async def test_refused_token_at_startup_is_fatal_and_not_retried(self) -> None:
        limits, sleeps, fatal = await self.run_script([gq.DiscordError("HTTP 401", status=401), gq.GatewayLimits(1, 1, 1, 1, 1)])
        self.assertEqual(len(fatal), 1)
        self.assertEqual(sleeps, [])
        self.assertEqual(limits.stats.discord["401"], 1)

    async def test_refused_token_later_keeps_last_limits(self) -> None:
        limits, sleeps, fatal = await self.run_script([gq.GatewayLimits(4, 1000, 900, 3600, 1), gq.DiscordError("x", status=401)])
        self.assertEqual(fatal, [])
        self.assertEqual(limits.coordinator.max_concurrency, 4)
        self.assertEqual(limits.coordinator.budget.remaining, 900)
        self.assertEqual(sleeps, [600])
        self.assertTrue(limits.stopped_asking)

    async def test_rate_limit_is_honoured_within_reason(self) -> None:
        _, sleeps, _ = await self.run_script([gq.DiscordError("429", status=429, retry_after=42.0), gq.GatewayLimits(1, 1000, 1000, 60, 1)])
        self.assertGreaterEqual(sleeps[0], 42.0)
        self.assertEqual(sleeps[1], 60 + gq.RESET_MARGIN)  # next refresh: at the budget's reset, before 600 s
        for absurd in (86_400.0, 1e308, math.inf):
            with self.assertLogs("gateway_queue", logging.WARNING) as logs:
                _, sleeps, _ = await self.run_script([gq.DiscordError("429", status=429, retry_after=absurd),
                                                      gq.GatewayLimits(1, 1000, 1000, 60, 1)])
            self.assertEqual(sleeps[0], gq.MAX_RETRY_AFTER)  # clamped, and said so
            self.assertTrue(any("instead" in line for line in logs.output))

    async def test_failures_back_off_and_limits_stay_unknown(self) -> None:
        errors = [gq.DiscordError(f"e{i}", status=s) for i, s in enumerate([500, None, 502, None])]
        limits, sleeps, _ = await self.run_script(errors + [gq.GatewayLimits(16, 1000, 999, 3600, 1)])
        self.assertEqual(len(sleeps), 5)
        for failures, delay in enumerate(sleeps[:4], start=1):
            step = min(gq.BACKOFF_CAP, gq.BACKOFF_BASE * 2 ** (failures - 1))
            self.assertTrue(step / 2 <= delay <= step, (failures, delay))
        self.assertEqual(limits.coordinator.max_concurrency, 16)
        self.assertTrue(limits.known)
        self.assertEqual(limits.stats.discord["500"], 1)
        self.assertEqual(limits.stats.discord["error"], 2)

    async def test_no_exception_ends_the_loop(self) -> None:
        """Answers that once killed the task (an OverflowError from a huge reset_after, a RecursionError from deep
        JSON) are logged, counted and retried, like any failure; the loop then takes Discord's next good answer."""
        script = [OverflowError("int too large"), RecursionError("too deep"), ValueError("odd"),
                  gq.GatewayLimits(2, 1000, 999, 3600, 1)]
        with self.assertLogs("gateway_queue", logging.ERROR) as logs:
            limits, sleeps, fatal = await self.run_script(script)
        self.assertEqual(len(sleeps), 4)
        self.assertEqual(limits.stats.discord["error"], 3)
        self.assertEqual(limits.coordinator.max_concurrency, 2)
        self.assertIsNone(limits.last_error)
        self.assertEqual(len([line for line in logs.output if "unexpectedly" in line]), 3)

    async def test_last_error_is_shown_until_an_answer(self) -> None:
        limits, _, _ = await self.run_script([RecursionError("deep")], sleeps_allowed=1)
        self.assertEqual(limits.last_error, "unexpected RecursionError")

    async def test_one_fetch_thread_at_a_time_and_a_deadline(self) -> None:
        """A fetch stuck in its thread is cut at the deadline; the next fetch waits for that thread to end."""
        clock = FakeClock(1000.0)
        coordinator = gq.MemoryCoordinator(5.0, 1, clock=clock, call_later=clock.call_later)
        release = threading.Event()
        alive: List[int] = []

        def fetch(cutter: gq.Cutter) -> gq.GatewayLimits:
            alive.append(1)
            try:
                release.wait(5)
                return gq.GatewayLimits(1, 1000, 999, 3600, 1)
            finally:
                alive.pop()

        limits = gq.DiscordLimits(coordinator, fetch, on_fatal=lambda error: None, deadline=0.2)
        with self.assertRaises(gq.DiscordError):
            await limits._fetch()
        self.assertEqual(len(alive), 1)  # still stuck in its thread
        second = asyncio.ensure_future(limits._fetch())
        await asyncio.sleep(0.3)
        self.assertLessEqual(len(alive), 1)  # the second waits: never two threads
        self.assertFalse(second.done())
        release.set()
        self.assertEqual((await asyncio.wait_for(second, 5)).max_concurrency, 1)



REDIS_SECRET = "Sup3r-S3cret"  # must never appear in an error message

# ----------------------------------------------------------------------------------------------------------------
# Redis client: helpers (a real redis-server per test class)
# ----------------------------------------------------------------------------------------------------------------


async def until(predicate: Callable[[], Awaitable[bool]], what: str, timeout: float = 5.0) -> None:
    """Polls `predicate` until it holds; fails after `timeout` seconds (a deadline, not a guess at a delay)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.002)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server_binary() -> str:
    binary = os.environ.get("REDIS_SERVER") or shutil.which("redis-server")
    if binary:
        return binary
    if os.environ.get("CI") == "true":
        raise AssertionError("redis-server is not installed, and under CI=true that fails: "
                             "apt-get install -y redis-server")
    raise unittest.SkipTest("redis-server is not installed (apt-get install -y redis-server; under CI=true this fails)")


def redis_version(binary: str) -> Tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in match.groups()) if match else (0, 0, 0)


class RedisServer:
    """A throwaway redis-server on loopback, started in the foreground and stopped by the test that started it.
    Readiness is its own "Ready to accept connections" line, not a delay."""

    def __init__(self, *options: str, tls_files: Optional[Tuple[str, str, str]] = None):
        self.options = options
        self.tls_files = tls_files  # (cert, key, CA): the port is then a TLS port and the plain port is off
        self.port = 0
        self.process: Optional[subprocess.Popen] = None
        self.log: List[str] = []

    def start(self, port: int = 0) -> None:
        binary = redis_server_binary()
        extra = ["--enable-debug-command", "local"] if redis_version(binary) >= (7,) else []
        for _ in range(5):
            self.port = port or free_port()
            if self.tls_files:
                cert, key, ca = self.tls_files
                ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", cert, "--tls-key-file", key,
                         "--tls-ca-cert-file", ca, "--tls-auth-clients", "no"]
            else:
                ports = ["--port", str(self.port)]
            args = [binary, *ports, "--bind", "127.0.0.1", "-::1", "--save", "", "--appendonly", "no",
                    "--daemonize", "no", "--logfile", "", *extra, *self.options]
            if self._run(args):
                return
            if port or not any("Address already in use" in line for line in self.log):
                break
        raise AssertionError("redis-server did not start:\n" + "".join(self.log[-20:]))

    def _run(self, args: List[str]) -> bool:
        self.log = []
        ready = threading.Event()
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def drain() -> None:  # also keeps the pipe from filling for as long as the server lives
            assert process.stdout is not None
            with process.stdout:
                for raw in process.stdout:
                    line = raw.decode("utf-8", "replace")
                    self.log.append(line)
                    if "Ready to accept connections" in line:
                        ready.set()
            ready.set()

        self._drainer = threading.Thread(target=drain, daemon=True)
        self._drainer.start()

        ready.wait(10)
        if process.poll() is None and any("Ready to accept" in line for line in self.log):
            self.process = process
            return True
        process.kill()
        process.wait()
        self._drainer.join(5)
        return False

    def url(self, credentials: str = "", db: int = 0, host: str = "127.0.0.1") -> str:
        scheme = "rediss" if self.tls_files else "redis"
        return f"{scheme}://{credentials}{host}:{self.port}/{db}"

    def address(self, credentials: str = "", db: int = 0, host: str = "127.0.0.1") -> gq.RedisAddress:
        return gq.parse_redis_url(self.url(credentials, db, host))

    def kill(self) -> None:
        """SIGKILL: no goodbye to its clients beyond what the kernel does."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
            self.process = None
            self._drainer.join(5)  # the pipe is at EOF now; the thread closes it

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
            self._drainer.join(5)


class Err(NamedTuple):
    """An expected gq.RedisReplyError in a parser table."""

    kind: str
    message: str


PROTOCOL = object()  # a parser table's expectation: gq.RedisProtocolError


def normal(value: Any) -> Any:
    """A parsed reply with gq.RedisReplyError values turned into comparable Err tuples."""
    if isinstance(value, gq.RedisReplyError):
        return Err(value.kind, value.message)
    if isinstance(value, list):
        return [normal(item) for item in value]
    return value


def parse_all(chunks: Sequence[bytes]) -> Tuple[List[Any], bool]:
    """Feeds `chunks` one by one, taking every reply; returns the replies and whether a protocol error ended it.
    Anything but a reply, gq.RESP_NEED_MORE or gq.RedisProtocolError is a bug in the parser and propagates."""
    parser = gq.RespParser()
    values: List[Any] = []
    for chunk in chunks:
        parser.feed(chunk)
        while True:
            try:
                value = parser.get()
            except gq.RedisProtocolError:
                return values, True
            if value is gq.RESP_NEED_MORE:
                break
            values.append(normal(value))
    return values, False


def check_reply_types(testcase: unittest.TestCase, value: Any, depth: int = 0) -> None:
    testcase.assertLessEqual(depth, gq.RESP_MAX_DEPTH)
    if isinstance(value, list):
        for item in value:
            check_reply_types(testcase, item, depth + 1)
    else:
        testcase.assertIsInstance(value, (bytes, int, type(None), Err))


# ----------------------------------------------------------------------------------------------------------------
# REDIS_URL
# ----------------------------------------------------------------------------------------------------------------


class RedisUrlTests(unittest.TestCase):
    ACCEPTED = [
        ("redis://localhost", gq.RedisAddress("localhost")),
        ("redis://localhost:6380/2", gq.RedisAddress("localhost", 6380, 2)),
        ("redis://127.0.0.1", gq.RedisAddress("127.0.0.1")),
        ("redis://[::1]:7000/1", gq.RedisAddress("::1", 7000, 1)),
        ("redis://[2001:DB8:0::1]", gq.RedisAddress("2001:db8::1")),
        ("rediss://redis.example.com", gq.RedisAddress("redis.example.com", tls=True)),
        ("rediss://redis.example.com.:6390/15", gq.RedisAddress("redis.example.com.", 6390, 15, tls=True)),
        ("redis://my_redis:6379", gq.RedisAddress("my_redis")),
        ("redis://h/", gq.RedisAddress("h")),
        ("redis://h:65535/9999", gq.RedisAddress("h", 65535, 9999)),
        ("redis://h:1/0", gq.RedisAddress("h", 1, 0)),
        ("redis://:pw@h", gq.RedisAddress("h", password="pw")),
        ("redis://bot:pw@h", gq.RedisAddress("h", username="bot", password="pw")),
        ("redis://b%40t:p%40ss%3Aw%2Fo%25rd%3F%23@h", gq.RedisAddress("h", username="b@t", password="p@ss:w/o%rd?#")),
        ("redis://:a:b@h", gq.RedisAddress("h", password="a:b")),  # the first ':' splits, as RFC 3986 readers do
        ("redis://:%C3%A9t%C3%A9@h", gq.RedisAddress("h", password="\u00e9t\u00e9")),
        ("redis://:p%20w@h", gq.RedisAddress("h", password="p w")),
        ("redis://:!$&'()*+,;=-._~@h", gq.RedisAddress("h", password="!$&'()*+,;=-._~")),
        ("rediss://bot:pw@[::1]:6380/3", gq.RedisAddress("::1", 6380, 3, tls=True, username="bot", password="pw")),
    ]

    REFUSED = [
        "", "localhost", "http://h", "redis:/h", "redis:h", "REDIS://h", "unix:///tmp/redis.sock", "redis://",
        "redis://h:", "redis://h:0", "redis://h:65536", "redis://h:123456", "redis://h:+1", "redis://h:0x10",
        "redis://h:6379x", "redis://h:06379", "redis://h:\uff16\uff13\uff17\uff19", "redis://h/10000", "redis://h/01",
        "redis://h/-1", "redis://h/+1", "redis://h/1/2", "redis://h/a", "redis://h/1_0", "redis://h?db=1",
        "redis://h#x", "redis://h/0?x", " redis://h", "redis://h ", "redis://h\n", "redis://h\t", "redis://::1",
        "redis://[::1", "redis://[::1]x", "redis://[::1]:", "redis://[fe80::1%25eth0]", "redis://[127.0.0.1]",
        "redis://[h]", "redis://999.1.1.1", "redis://1.2.3", "redis://01.2.3.4", "redis://-h", "redis://h-",
        "redis://a..b", "redis://" + "a" * 64, "redis://" + "a." * 127 + "b", "redis://\u00e9", "redis://h:1:2",
        "redis://h" + "/" * 3000, "redis://h:" + "9" * 30, "redis://h/" + "9" * 30,
        "redis://user@h", "redis://:@h", "redis://u:@h", "redis://:p@ss@h", "redis://:p%zz@h", "redis://:p%4@h",
        "redis://:p%@h", "redis://:%FF@h", "redis://:p[w@h", "redis://:p\"w@h", "redis://u%20x:pw@h",
        "redis://u%00:pw@h", "redis://@h",
    ]

    # every refusal again, with the password in it somewhere: none of them may echo it
    REFUSED_WITH_SECRET = [
        f"redis://:{REDIS_SECRET}@h:0", f"redis://:{REDIS_SECRET}@h/x", f"redis://:{REDIS_SECRET}@h?db=1", f"redis://{REDIS_SECRET}@h",
        f"redis://:{REDIS_SECRET}@@h", f"redis://:{REDIS_SECRET}%zz@h", f"http://:{REDIS_SECRET}@h", f"redis://:{REDIS_SECRET}@h x",
        f"redis://:{REDIS_SECRET[:5]}/{REDIS_SECRET[5:]}@h", f"redis://:{REDIS_SECRET}#@h", f"redis://:{REDIS_SECRET}?@h",
        f"redis://u:{REDIS_SECRET}@", f"redis://u:{REDIS_SECRET}@[::1", f"redis://u:{REDIS_SECRET}@999.9.9.9", f"redis://u:{REDIS_SECRET}\n@h",
        f"redis://:{REDIS_SECRET}@h:{'1' * 40}", f"redis://:{REDIS_SECRET}@h/{'1' * 40}", f"rediss://:{REDIS_SECRET}@h:65536",
        f"redis://:{REDIS_SECRET}@h" + "x" * 3000, f"redis://{REDIS_SECRET}:{REDIS_SECRET}@-h", f"redis://:{REDIS_SECRET}\u00e9@h",
    ]

    def test_accepted_forms(self) -> None:
        for url, expected in self.ACCEPTED:
            with self.subTest(url=url):
                self.assertEqual(gq.parse_redis_url(url), expected)

    def test_refused_forms_name_the_variable(self) -> None:
        for url in self.REFUSED + self.REFUSED_WITH_SECRET:
            with self.subTest(url=url):
                with self.assertRaises(ValueError) as caught:
                    gq.parse_redis_url(url)
                self.assertTrue(str(caught.exception).startswith("REDIS_URL "), str(caught.exception))

    def test_refusals_never_echo_the_password(self) -> None:
        for url in self.REFUSED_WITH_SECRET:
            with self.subTest(url=url):
                with self.assertRaises(ValueError) as caught:
                    gq.parse_redis_url(url)
                for text in (str(caught.exception), repr(caught.exception)):
                    for piece in (REDIS_SECRET, REDIS_SECRET[:5], REDIS_SECRET[5:], "S3cret"):
                        self.assertNotIn(piece, text)

    def test_variable_name_is_configurable(self) -> None:
        with self.assertRaises(ValueError) as caught:
            gq.parse_redis_url("http://h", name="REDIS_REPLICA_URL")
        self.assertTrue(str(caught.exception).startswith("REDIS_REPLICA_URL "))

    def test_repr_and_str_hide_the_password(self) -> None:
        address = gq.parse_redis_url(f"rediss://bot:{REDIS_SECRET}@[::1]:6380/3")
        self.assertNotIn(REDIS_SECRET, repr(address))
        self.assertNotIn(REDIS_SECRET, str(address))
        self.assertEqual(str(address), "rediss://bot:***@[::1]:6380/3")
        self.assertEqual(str(gq.parse_redis_url("redis://h")), "redis://h:6379/0")
        self.assertEqual(gq.parse_redis_url("rediss://h").scheme, "rediss")

    def test_address_is_frozen(self) -> None:
        address = gq.parse_redis_url("redis://h")
        with self.assertRaises(AttributeError):
            address.port = 1  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------------------------
# RESP2 parsing
# ----------------------------------------------------------------------------------------------------------------

D = gq.RESP_MAX_DEPTH
L = gq.RESP_MAX_LINE_BYTES

RESP_CASES: List[Tuple[str, bytes, Any]] = [
    # simple strings
    ("simple", b"+OK\r\n", b"OK"),
    ("simple empty", b"+\r\n", b""),
    ("simple with spaces and high bytes", b"+a b\xff\r\n", b"a b\xff"),
    ("simple at the line limit", b"+" + b"a" * (L - 1) + b"\r\n", b"a" * (L - 1)),
    ("simple over the line limit", b"+" + b"a" * L + b"\r\n", PROTOCOL),
    # errors
    ("error ERR", b"-ERR unknown command 'FOO'\r\n", Err("ERR", "ERR unknown command 'FOO'")),
    ("error NOSCRIPT", b"-NOSCRIPT No matching script. Please use EVAL.\r\n",
     Err("NOSCRIPT", "NOSCRIPT No matching script. Please use EVAL.")),
    ("error WRONGPASS", b"-WRONGPASS invalid username-password pair or user is disabled.\r\n",
     Err("WRONGPASS", "WRONGPASS invalid username-password pair or user is disabled.")),
    ("error code alone", b"-BUSY\r\n", Err("BUSY", "BUSY")),
    ("error without a code", b"-my error\r\n", Err("", "my error")),
    ("error empty", b"-\r\n", Err("", "")),
    ("error not UTF-8", b"-ERR \xff\r\n", Err("ERR", "ERR \ufffd")),
    # integers
    ("integer 0", b":0\r\n", 0),
    ("integer 42", b":42\r\n", 42),
    ("integer -1", b":-1\r\n", -1),
    ("integer max", b":9223372036854775807\r\n", 2**63 - 1),
    ("integer min", b":-9223372036854775808\r\n", -(2**63)),
    ("integer past max", b":9223372036854775808\r\n", PROTOCOL),
    ("integer past min", b":-9223372036854775809\r\n", PROTOCOL),
    ("integer 20 digits", b":12345678901234567890\r\n", PROTOCOL),
    ("integer plus", b":+1\r\n", PROTOCOL),
    ("integer space", b": 1\r\n", PROTOCOL),
    ("integer trailing space", b":1 \r\n", PROTOCOL),
    ("integer underscore", b":1_0\r\n", PROTOCOL),
    ("integer leading zero", b":01\r\n", PROTOCOL),
    ("integer minus zero", b":-0\r\n", PROTOCOL),
    ("integer empty", b":\r\n", PROTOCOL),
    ("integer minus alone", b":-\r\n", PROTOCOL),
    ("integer fullwidth digit", ":\uff11\r\n".encode(), PROTOCOL),
    ("integer decimal", b":1.5\r\n", PROTOCOL),
    ("integer hex", b":0x1\r\n", PROTOCOL),
    # bulk strings
    ("bulk", b"$5\r\nhello\r\n", b"hello"),
    ("bulk empty", b"$0\r\n\r\n", b""),
    ("bulk null", b"$-1\r\n", None),
    ("bulk holding CRLF", b"$4\r\na\r\nb\r\n", b"a\r\nb"),
    ("bulk binary", b"$3\r\n\x00\xff\n\r\n", b"\x00\xff\n"),
    ("bulk too short for its length", b"$3\r\nfoob\r\n", PROTOCOL),
    ("bulk not ended by CRLF", b"$3\r\nfooXY", PROTOCOL),
    ("bulk ended by LF only", b"$3\r\nfoo\n\r", PROTOCOL),
    ("bulk length -2", b"$-2\r\n", PROTOCOL),
    ("bulk length -0", b"$-0\r\n", PROTOCOL),
    ("bulk length plus", b"$+1\r\nx\r\n", PROTOCOL),
    ("bulk length leading zero", b"$01\r\nx\r\n", PROTOCOL),
    ("bulk length empty", b"$\r\n", PROTOCOL),
    ("bulk length space", b"$ 1\r\nx\r\n", PROTOCOL),
    ("bulk length over the limit", b"$%d\r\n" % (gq.RESP_MAX_BULK_BYTES + 1), PROTOCOL),
    ("bulk length 11 digits", b"$99999999999\r\n", PROTOCOL),
    # arrays
    ("array empty", b"*0\r\n", []),
    ("array null", b"*-1\r\n", None),
    ("array", b"*3\r\n$3\r\nfoo\r\n:1\r\n$-1\r\n", [b"foo", 1, None]),
    ("array nested", b"*3\r\n*1\r\n:1\r\n*0\r\n*2\r\n+a\r\n*-1\r\n", [[1], [], [b"a", None]]),
    ("array holding an error", b"*2\r\n-ERR x\r\n:1\r\n", [Err("ERR", "ERR x"), 1]),
    ("array at the depth limit", b"*1\r\n" * D + b":1\r\n", eval("[" * D + "1" + "]" * D)),
    ("array past the depth limit", b"*1\r\n" * (D + 1) + b":1\r\n", PROTOCOL),
    ("empty array past the depth limit", b"*1\r\n" * D + b"*0\r\n", PROTOCOL),
    ("array of the most items", b"*%d\r\n" % gq.RESP_MAX_ARRAY_ITEMS + b":1\r\n" * gq.RESP_MAX_ARRAY_ITEMS,
     [1] * gq.RESP_MAX_ARRAY_ITEMS),
    ("array of too many items", b"*%d\r\n" % (gq.RESP_MAX_ARRAY_ITEMS + 1), PROTOCOL),
    ("reply of too many items", b"*4096\r\n" * 5, PROTOCOL),
    ("array length -2", b"*-2\r\n", PROTOCOL),
    ("array length leading zero", b"*01\r\n:1\r\n", PROTOCOL),
    ("array length junk", b"*1x\r\n", PROTOCOL),
    # framing
    ("unknown type byte", b"?x\r\n", PROTOCOL),
    ("inline reply", b"OK\r\n", PROTOCOL),
    ("empty line", b"\r\n", PROTOCOL),
    ("bare LF", b"+OK\n", PROTOCOL),
    ("bare LF alone", b"\n", PROTOCOL),
    ("bare LF in an array", b"*1\r\n:1\n", PROTOCOL),
    ("bare CR", b"+O\rK\r\n", PROTOCOL),
    # RESP3 types, which RESP2 never sends
    ("RESP3 null", b"_\r\n", PROTOCOL),
    ("RESP3 double", b",1.5\r\n", PROTOCOL),
    ("RESP3 boolean", b"#t\r\n", PROTOCOL),
    ("RESP3 big number", b"(123\r\n", PROTOCOL),
    ("RESP3 blob error", b"!3\r\nerr\r\n", PROTOCOL),
    ("RESP3 verbatim", b"=7\r\ntxt:abc\r\n", PROTOCOL),
    ("RESP3 map", b"%1\r\n+a\r\n:1\r\n", PROTOCOL),
    ("RESP3 set", b"~1\r\n:1\r\n", PROTOCOL),
    ("RESP3 attribute", b"|1\r\n+a\r\n:1\r\n", PROTOCOL),
    ("RESP3 push", b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\np\r\n", PROTOCOL),
    ("RESP3 inside an array", b"*2\r\n:1\r\n_\r\n", PROTOCOL),
]

TRAILER = b":7\r\n+tail\r\n"  # bytes that follow a reply and must come out intact


class RespParserTests(unittest.TestCase):
    def test_cases_fed_whole(self) -> None:
        for name, raw, expected in RESP_CASES:
            with self.subTest(name):
                parser = gq.RespParser()
                parser.feed(raw)
                if expected is PROTOCOL:
                    self.assertRaises(gq.RedisProtocolError, parser.get)
                else:
                    self.assertEqual(normal(parser.get()), expected)
                    self.assertIs(parser.get(), gq.RESP_NEED_MORE)
                    self.assertEqual(parser.buffered, 0)

    def test_cases_fed_byte_by_byte(self) -> None:
        for name, raw, expected in RESP_CASES:
            with self.subTest(name):
                parser = gq.RespParser()
                outcome: Any = gq.RESP_NEED_MORE
                for i in range(len(raw)):
                    parser.feed(raw[i : i + 1])
                    try:
                        outcome = parser.get()
                    except gq.RedisProtocolError:
                        outcome = PROTOCOL
                        break
                    if outcome is not gq.RESP_NEED_MORE:
                        self.assertEqual(i, len(raw) - 1, "a reply came out before its last byte")
                if expected is PROTOCOL:
                    self.assertIs(outcome, PROTOCOL)
                else:
                    self.assertEqual(normal(outcome), expected)

    def test_cases_followed_by_trailing_bytes(self) -> None:
        for name, raw, expected in RESP_CASES:
            with self.subTest(name):
                parser = gq.RespParser()
                parser.feed(raw + TRAILER)
                if expected is PROTOCOL:
                    self.assertRaises(gq.RedisProtocolError, parser.get)
                    continue
                self.assertEqual(normal(parser.get()), expected)
                self.assertEqual(parser.get(), 7)
                self.assertEqual(parser.get(), b"tail")
                self.assertIs(parser.get(), gq.RESP_NEED_MORE)

    def test_incomplete_replies_ask_for_more(self) -> None:
        for raw in (b"", b"+OK", b"+OK\r", b"$5\r\nhel", b"$5\r\nhello", b"$5\r\nhello\r", b"*2\r\n:1\r\n",
                    b"*1\r\n*1\r\n", b"$-1\r", b":12"):
            with self.subTest(raw=raw):
                parser = gq.RespParser()
                parser.feed(raw)
                self.assertIs(parser.get(), gq.RESP_NEED_MORE)
                self.assertIs(parser.get(), gq.RESP_NEED_MORE)

    def test_a_long_line_fails_before_its_end_arrives(self) -> None:
        parser = gq.RespParser()
        parser.feed(b"+" + b"a" * (L + 1))  # one byte past content + CR: no LF can make this legal
        self.assertRaises(gq.RedisProtocolError, parser.get)
        parser = gq.RespParser()
        parser.feed(b"+" + b"a" * (L - 1) + b"\r")  # still legal if LF comes next
        self.assertIs(parser.get(), gq.RESP_NEED_MORE)

    def test_a_huge_length_fails_before_its_payload(self) -> None:
        for header in (b"$%d\r\n" % (gq.RESP_MAX_BULK_BYTES + 1), b"*%d\r\n" % (gq.RESP_MAX_ARRAY_ITEMS + 1)):
            with self.subTest(header=header):
                parser = gq.RespParser()
                parser.feed(header)
                self.assertRaises(gq.RedisProtocolError, parser.get)

    def test_bulk_at_the_limit_and_reply_past_the_byte_limit(self) -> None:
        size = gq.RESP_MAX_BULK_BYTES
        bulk = b"$%d\r\n" % size + b"x" * size + b"\r\n"
        parser = gq.RespParser()
        for i in range(0, len(bulk), 65536):
            parser.feed(bulk[i : i + 65536])
            value = parser.get()
        self.assertEqual(value, b"x" * size)
        count = gq.RESP_MAX_REPLY_BYTES // size + 1
        parser = gq.RespParser()
        parser.feed(b"*%d\r\n" % count + bulk * (count - 1) + b"$%d\r\n" % size)
        self.assertRaises(gq.RedisProtocolError, parser.get)  # refused at the header, before the last payload

    def test_a_broken_parser_stays_broken(self) -> None:
        parser = gq.RespParser()
        parser.feed(b"?\r\n")
        self.assertRaises(gq.RedisProtocolError, parser.get)
        parser.feed(b"+OK\r\n")
        self.assertRaises(gq.RedisProtocolError, parser.get)

    def test_many_replies_in_one_chunk(self) -> None:
        parser = gq.RespParser()
        parser.feed(b":1\r\n" * 1000 + b"$1\r\n")
        self.assertEqual([parser.get() for _ in range(1000)], [1] * 1000)
        self.assertIs(parser.get(), gq.RESP_NEED_MORE)
        parser.feed(b"z\r\n")
        self.assertEqual(parser.get(), b"z")

    def test_byte_at_a_time_is_linear(self) -> None:
        raw = b"*4096\r\n" + b"$3\r\nabc\r\n" * 4096
        parser = gq.RespParser()
        started = time.perf_counter()
        for i in range(len(raw)):
            parser.feed(raw[i : i + 1])
            value = parser.get()
        self.assertEqual(value, [b"abc"] * 4096)
        self.assertLess(time.perf_counter() - started, 5.0)  # quadratic rescanning would take minutes


class RespFuzzTests(unittest.TestCase):
    """Seeded random mutations of valid replies: the parser only ever returns a value, asks for more, or raises
    gq.RedisProtocolError, and its answer never depends on how the bytes were chunked."""

    SEED = 20240611
    ROUNDS = 4000
    INTERESTING = b"\r\n$*:+-_>%0123456789"

    def test_mutations(self) -> None:
        rng = random.Random(self.SEED)
        seeds = [raw for _, raw, expected in RESP_CASES if expected is not PROTOCOL and len(raw) < 200]
        seeds += [b"*2\r\n$3\r\nfoo\r\n*2\r\n:-5\r\n$0\r\n\r\n", b"+OK\r\n:1\r\n$-1\r\n"]
        for round_ in range(self.ROUNDS):
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 4)):
                op = rng.randrange(6)
                at = rng.randrange(len(data) + 1)
                if op == 0 and data:
                    data[min(at, len(data) - 1)] = rng.randrange(256)
                elif op == 1:
                    data[at:at] = bytes([rng.choice(self.INTERESTING)])
                elif op == 2 and data:
                    del data[min(at, len(data) - 1)]
                elif op == 3:
                    data[at:at] = data[at : at + rng.randint(1, 8)]
                elif op == 4:
                    del data[at:]
                else:
                    data += rng.choice(seeds)
            raw = bytes(data)
            cuts = sorted(rng.sample(range(1, len(raw)), min(len(raw) - 1, rng.randint(0, 6)))) if len(raw) > 1 else []
            chunks = [raw[a:b] for a, b in zip([0] + cuts, cuts + [len(raw)])]
            try:
                whole = parse_all([raw])
                chunked = parse_all(chunks)
            except Exception as exc:  # anything but gq.RedisProtocolError is a parser bug
                self.fail(f"round {round_}: {raw!r} raised {exc!r}")
            self.assertEqual(whole, chunked, f"round {round_}: {raw!r} depends on chunking {chunks!r}")
            for value in whole[0]:
                check_reply_types(self, value)


# ----------------------------------------------------------------------------------------------------------------
# Command encoding
# ----------------------------------------------------------------------------------------------------------------


class EncodeCommandTests(unittest.TestCase):
    def test_encoding(self) -> None:
        self.assertEqual(gq.encode_redis_command([b"SET", "k\u00e9", 5, -1, bytearray(b"")]),
                         b"*5\r\n$3\r\nSET\r\n$3\r\nk\xc3\xa9\r\n$1\r\n5\r\n$2\r\n-1\r\n$0\r\n\r\n")

    def test_round_trip_through_the_parser(self) -> None:
        args = [b"EVAL", b"return 1\r\n", 0, "\u2603", b"\x00" * 300]
        parser = gq.RespParser()
        parser.feed(gq.encode_redis_command(args))
        self.assertEqual(parser.get(), [b"EVAL", b"return 1\r\n", b"0", "\u2603".encode(), b"\x00" * 300])

    def test_refusals(self) -> None:
        for bad in (True, 1.5, None, [b"x"], object()):
            with self.subTest(bad=bad):
                self.assertRaises(TypeError, gq.encode_redis_command, [b"SET", bad])
        self.assertRaises(ValueError, gq.encode_redis_command, [])
        self.assertRaises(ValueError, gq.encode_redis_command, [b"SET", b"k", b"x" * gq.REDIS_MAX_COMMAND_BYTES])


# ----------------------------------------------------------------------------------------------------------------
# Backoff
# ----------------------------------------------------------------------------------------------------------------


class RedisBackoffTests(unittest.IsolatedAsyncioTestCase):
    def test_delays_double_to_the_cap_half_fixed_half_random(self) -> None:
        base, cap = gq.REDIS_BACKOFF_BASE, gq.REDIS_BACKOFF_CAP
        for failures in (1, 2, 3, 4, 5, 6, 30, 10_000):
            step = min(cap, base * 2 ** min(failures - 1, 30))
            with self.subTest(failures=failures):
                self.assertAlmostEqual(gq.redis_backoff_delay(failures, rand=lambda: 0.0), step / 2)
                self.assertAlmostEqual(gq.redis_backoff_delay(failures, rand=lambda: 1.0), step)
        self.assertAlmostEqual(gq.redis_backoff_delay(1, rand=lambda: 0.0), 0.05)
        self.assertAlmostEqual(gq.redis_backoff_delay(10_000, rand=lambda: 1.0), 2.0)
        delays = [gq.redis_backoff_delay(20) for _ in range(200)]
        self.assertTrue(all(1.0 <= d <= 2.0 for d in delays))
        self.assertGreater(len(set(delays)), 100)  # jittered, not in step

    async def test_open_with_backoff_retries_connection_errors_and_logs_sparingly(self) -> None:
        attempts: List[int] = []
        slept: List[float] = []

        async def opener() -> str:
            attempts.append(1)
            if len(attempts) <= 4:
                raise gq.RedisConnectionError("refused" if len(attempts) < 4 else "reset")
            return "connection"

        async def sleep(delay: float) -> None:
            slept.append(delay)

        with self.assertLogs("gateway_queue", logging.DEBUG) as logs:
            result = await gq.open_redis_with_backoff(opener, sleep=sleep, rand=lambda: 0.5)
        self.assertEqual(result, "connection")
        self.assertEqual(len(slept), 4)
        self.assertEqual(slept, [gq.redis_backoff_delay(n, rand=lambda: 0.5) for n in (1, 2, 3, 4)])
        levels = [record.levelname for record in logs.records]
        self.assertEqual(levels, ["WARNING", "DEBUG", "DEBUG", "WARNING", "INFO"])  # a new message is news

    async def test_open_with_backoff_lets_other_errors_through(self) -> None:
        async def opener() -> None:
            raise ValueError("bad configuration")

        with self.assertRaises(ValueError):
            await gq.open_redis_with_backoff(opener)


# ----------------------------------------------------------------------------------------------------------------
# Connection, against a fake server (no redis-server needed)
# ----------------------------------------------------------------------------------------------------------------

Responder = Callable[[list], Awaitable[Optional[bytes]]]


class FakeRedis:
    """A loopback server that parses commands with gq.RespParser and sends whatever `respond` returns for each (None:
    close the connection). PING gets +PONG unless `respond` says otherwise."""

    def __init__(self, respond: Optional[Responder] = None):
        self.respond = respond
        self.commands: List[list] = []
        self.disconnected = asyncio.Event()
        self.stall_reading = False
        self._release = asyncio.Event()
        self._writers: List[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def url(self, rest: str = "") -> str:
        return f"redis://{rest}127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        parser = gq.RespParser()
        try:
            while True:
                if self.stall_reading:
                    await self._release.wait()
                    return
                data = await reader.read(65536)
                if not data:
                    return
                parser.feed(data)
                while True:
                    command = parser.get()
                    if command is gq.RESP_NEED_MORE:
                        break
                    self.commands.append(command)  # type: ignore[arg-type]
                    answer = await self.respond(command) if self.respond else None  # type: ignore[arg-type]
                    if answer is None and command == [b"PING"]:
                        answer = b"+PONG\r\n"
                    if answer is None:
                        return
                    writer.write(answer)
        except (OSError, gq.RedisProtocolError):
            return
        finally:
            self.disconnected.set()
            writer.transport.abort()

    async def stop(self) -> None:
        self._release.set()
        for writer in self._writers:
            writer.transport.abort()
        self.server.close()
        await self.server.wait_closed()


class FakeRedisServerTests(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self) -> None:
        self.fake = FakeRedis()
        await self.fake.start()
        self.addAsyncCleanup(self.fake.stop)

    async def connect(self, rest: str = "", **kwargs: Any) -> gq.RedisConnection:
        connection = await gq.RedisConnection.open(gq.parse_redis_url(self.fake.url(rest)), **kwargs)
        self.addAsyncCleanup(connection.aclose)
        return connection

    def answer(self, table: dict) -> None:
        async def respond(command: list) -> Optional[bytes]:
            return table.get(command[0])

        self.fake.respond = respond

    async def test_login_sends_auth_select_then_ping(self) -> None:
        self.answer({b"AUTH": b"+OK\r\n", b"SELECT": b"+OK\r\n", b"PING": b"+PONG\r\n"})
        await self.connect(f"bot:{REDIS_SECRET}@", )
        self.fake.commands.clear()
        await self.connect(f"b%40t:{REDIS_SECRET}%2F@")
        self.assertEqual(self.fake.commands, [[b"AUTH", b"b@t", REDIS_SECRET.encode() + b"/"], [b"PING"]])
        self.fake.commands.clear()
        connection = await gq.RedisConnection.open(gq.parse_redis_url(self.fake.url(f":{REDIS_SECRET}@") + "/7"))
        self.addAsyncCleanup(connection.aclose)
        self.assertEqual(self.fake.commands, [[b"AUTH", REDIS_SECRET.encode()], [b"SELECT", b"7"], [b"PING"]])

    async def test_an_auth_error_that_quotes_the_password_is_not_repeated(self) -> None:
        """A server without AUTH (renamed away, or a proxy) answers "ERR unknown command 'AUTH', with args beginning
        with: '<password>'": the error the service logs and shows says which kind, never those words."""
        echo = f"-ERR unknown command 'AUTH', with args beginning with: '{REDIS_SECRET}' \r\n".encode()
        self.answer({b"AUTH": echo})
        for rest in (f":{REDIS_SECRET}@", f"bot:{REDIS_SECRET}@"):
            with self.assertRaises(gq.RedisAuthError) as caught:
                await self.connect(rest)
            self.assertIn("ERR", str(caught.exception))
            self.assertNotIn(REDIS_SECRET, str(caught.exception))

    async def test_a_wrong_ping_answer_fails_the_open(self) -> None:
        self.answer({b"PING": b"+NOPE\r\n"})
        with self.assertRaises(gq.RedisProtocolError):
            await self.connect()

    async def test_a_silent_server_times_the_open_out(self) -> None:
        self.answer({b"PING": b""})  # swallowed: no reply at all
        started = time.monotonic()
        with self.assertRaises(gq.RedisTimeoutError):
            await self.connect(timeout=0.1)
        self.assertLess(time.monotonic() - started, 2.0)

    async def test_connection_refused(self) -> None:
        with self.assertRaises(gq.RedisConnectionError) as caught:
            await gq.RedisConnection.open(gq.parse_redis_url(f"redis://:{REDIS_SECRET}@127.0.0.1:{free_port()}"), timeout=2)
        self.assertIn("could not connect", str(caught.exception))
        self.assertNotIn(REDIS_SECRET, str(caught.exception))

    async def test_garbage_drops_the_connection_and_fails_every_pending_command(self) -> None:
        self.answer({b"GET": b"?garbage\r\n", b"HANG": b""})
        connection = await self.connect()
        hang = asyncio.ensure_future(connection.execute("HANG", timeout=10))
        await until(lambda: _true(len(self.fake.commands) >= 2), "HANG to reach the server")
        get = asyncio.ensure_future(connection.execute("GET", "k", timeout=10))
        results = await asyncio.gather(hang, get, return_exceptions=True)
        self.assertTrue(all(isinstance(r, gq.RedisConnectionError) for r in results), results)
        self.assertIn("malformed", str(results[0]))
        self.assertTrue(connection.closed)
        self.assertIsInstance(connection.error, gq.RedisProtocolError)
        with self.assertRaises(gq.RedisConnectionError):
            await connection.execute("PING")
        await asyncio.wait_for(self.fake.disconnected.wait(), 5)

    async def test_resp3_push_is_a_protocol_error(self) -> None:
        self.answer({b"GET": b">2\r\n+a\r\n+b\r\n"})
        connection = await self.connect()
        with self.assertRaises(gq.RedisProtocolError) as caught:
            await connection.execute("GET", "k")
        self.assertIn("RESP3", str(caught.exception))

    async def test_a_reply_to_no_command_drops_the_connection(self) -> None:
        self.answer({b"PING": b"+PONG\r\n", b"ECHO": b"$1\r\na\r\n:1\r\n"})
        connection = await self.connect()
        self.assertEqual(await connection.execute("ECHO", "a"), b"a")
        error = await asyncio.wait_for(connection.wait_closed(), 5)
        self.assertIsInstance(error, gq.RedisProtocolError)
        self.assertIn("no command", str(error))

    async def test_eof_mid_reply(self) -> None:
        async def respond(command: list) -> Optional[bytes]:
            if command[0] == b"GET":
                self.fake._writers[-1].write(b"$10\r\nabc")
                return None
            return None

        self.fake.respond = respond
        connection = await self.connect()
        with self.assertRaises(gq.RedisConnectionError) as caught:
            await connection.execute("GET", "k", timeout=10)
        self.assertIn("middle of a reply", str(caught.exception))

    async def test_eof_fails_pending_commands_promptly(self) -> None:
        self.answer({})  # anything but PING: the fake closes the connection
        connection = await self.connect()
        started = time.monotonic()
        results = await asyncio.gather(*(connection.execute("GET", str(i), timeout=10) for i in range(5)),
                                       return_exceptions=True)
        self.assertTrue(all(isinstance(r, gq.RedisConnectionError) for r in results), results)
        self.assertLess(time.monotonic() - started, 2.0)

    async def test_a_timeout_drops_the_connection_and_fails_what_follows(self) -> None:
        self.answer({b"GET": b""})  # never answered
        connection = await self.connect()
        first = asyncio.ensure_future(connection.execute("GET", "a", timeout=0.05))
        second = asyncio.ensure_future(connection.execute("GET", "b", timeout=30))
        started = time.monotonic()
        with self.assertLogs("gateway_queue", logging.WARNING):
            results = await asyncio.gather(first, second, return_exceptions=True)
        self.assertIsInstance(results[0], gq.RedisTimeoutError)
        self.assertIn("GET within 0.05 s", str(results[0]))
        self.assertIsInstance(results[1], gq.RedisConnectionError)
        self.assertNotIsInstance(results[1], gq.RedisTimeoutError)
        self.assertLess(time.monotonic() - started, 2.0)  # the second did not wait out its own 30 s
        self.assertTrue(connection.closed)
        await asyncio.wait_for(self.fake.disconnected.wait(), 5)  # and the server saw the connection go

    async def test_a_cancelled_command_leaves_its_reply_to_be_discarded(self) -> None:
        got_a, release = asyncio.Event(), asyncio.Event()

        async def respond(command: list) -> Optional[bytes]:
            if command == [b"GET", b"a"]:
                got_a.set()
                await release.wait()
                return b"$1\r\na\r\n"
            if command == [b"GET", b"b"]:
                return b"$1\r\nb\r\n"
            return None

        self.fake.respond = respond
        connection = await self.connect()
        first = asyncio.ensure_future(connection.execute("GET", "a", timeout=10))
        await asyncio.wait_for(got_a.wait(), 5)
        second = asyncio.ensure_future(connection.execute("GET", "b", timeout=10))
        first.cancel()
        with self.assertRaises(asyncio.CancelledError):
            await first
        release.set()
        self.assertEqual(await second, b"b")
        self.assertFalse(connection.closed)

    async def test_close_fails_pending_commands(self) -> None:
        self.answer({b"GET": b""})
        connection = await self.connect()
        pending = asyncio.ensure_future(connection.execute("GET", "a", timeout=10))
        await until(lambda: _true(len(self.fake.commands) >= 2), "GET to reach the server")
        await connection.aclose()
        with self.assertRaises(gq.RedisConnectionError) as caught:
            await pending
        self.assertIn("closed by the client", str(caught.exception))
        self.assertTrue(connection.closed)
        connection.close()  # twice is fine
        await connection.aclose()

    async def test_a_server_that_stops_reading_times_commands_out(self) -> None:
        connection = await self.connect()
        self.fake.stall_reading = True
        value = b"x" * 900_000
        results = await asyncio.gather(*(connection.execute("SET", "k", value, timeout=0.3) for _ in range(30)),
                                       return_exceptions=True)
        self.assertTrue(all(isinstance(r, gq.RedisConnectionError) for r in results), results[:3])
        self.assertTrue(any(isinstance(r, gq.RedisTimeoutError) for r in results))
        self.assertTrue(connection.closed)

    @unittest.mock.patch.object(gq, "REDIS_MAX_PENDING", 50)
    async def test_too_many_pending_commands(self) -> None:
        self.answer({b"GET": b""})
        connection = await self.connect()
        tasks = [asyncio.ensure_future(connection.execute("GET", "k", timeout=10)) for _ in range(50)]
        await until(lambda: _true(len(connection._pending) == 50), "the commands to be sent")
        with self.assertRaises(gq.RedisError) as caught:
            await connection.execute("GET", "k")
        self.assertNotIsInstance(caught.exception, gq.RedisConnectionError)
        connection.close()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def test_bad_arguments_send_nothing(self) -> None:
        connection = await self.connect()
        self.fake.commands.clear()
        with self.assertRaises(TypeError):
            await connection.execute("SET", "k", 1.5)
        for timeout in (0, -1, float("nan"), float("inf"), True):
            with self.assertRaises(ValueError):
                await connection.execute("GET", "k", timeout=timeout)
        self.assertEqual(await connection.execute("PING"), b"PONG")
        self.assertEqual(self.fake.commands, [[b"PING"]])

    async def test_ssl_context_for_a_plain_address_is_refused(self) -> None:
        with self.assertRaises(ValueError):
            await gq.RedisConnection.open(gq.parse_redis_url(self.fake.url()), ssl_context=ssl.create_default_context())

    async def test_subscriber_refuses_a_message_for_another_channel(self) -> None:
        async def respond(command: list) -> Optional[bytes]:
            if command[0] == b"SUBSCRIBE":
                return (b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n"
                        b"*3\r\n$7\r\nmessage\r\n$5\r\nother\r\n$1\r\np\r\n")
            return None

        self.fake.respond = respond
        subscriber = await gq.RedisSubscriber.open(gq.parse_redis_url(self.fake.url()), "c")
        self.addAsyncCleanup(subscriber.aclose)
        error = await asyncio.wait_for(subscriber.wait_closed(), 5)
        self.assertIsInstance(error, gq.RedisProtocolError)
        with self.assertRaises(gq.RedisConnectionError):
            await subscriber.__anext__()


async def _true(value: bool) -> bool:
    return value


# ----------------------------------------------------------------------------------------------------------------
# Connection, against a real redis-server
# ----------------------------------------------------------------------------------------------------------------

SCRIPT = b"redis.call('SET', KEYS[1], ARGV[1]); return {redis.call('GET', KEYS[1]), tonumber(ARGV[2]) + 1}"


class RedisServerCase(unittest.IsolatedAsyncioTestCase):
    """A redis-server shared by the tests of a class, emptied before each test."""

    OPTIONS: Tuple[str, ...] = ()
    server: RedisServer

    @classmethod
    def setUpClass(cls) -> None:
        cls.server = RedisServer(*cls.OPTIONS)
        cls.server.start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.stop()

    async def asyncSetUp(self) -> None:
        asyncio.get_running_loop().slow_callback_duration = 1.0  # debug mode; bursts of 1000 commands take ~0.1 s
        self.admin = await self.connect()
        await self.admin.execute("FLUSHALL")

    async def connect(self, url: Optional[str] = None, **kwargs: Any) -> gq.RedisConnection:
        connection = await gq.RedisConnection.open(gq.parse_redis_url(url or self.server.url()), **kwargs)
        self.addAsyncCleanup(connection.aclose)
        return connection

    async def subscribe(self, channel: str, **kwargs: Any) -> gq.RedisSubscriber:
        subscriber = await gq.RedisSubscriber.open(self.server.address(), channel, **kwargs)
        self.addAsyncCleanup(subscriber.aclose)
        return subscriber


class RedisServerTests(RedisServerCase):
    async def test_ping_set_get_incr(self) -> None:
        connection = await self.connect()
        self.assertEqual(await connection.execute("PING"), b"PONG")
        self.assertEqual(await connection.execute("SET", "k", b"v\x00\xff"), b"OK")
        self.assertEqual(await connection.execute("GET", "k"), b"v\x00\xff")
        self.assertIsNone(await connection.execute("GET", "missing"))
        self.assertEqual(await connection.execute("INCR", "n"), 1)
        self.assertEqual(await connection.execute("INCRBY", "n", -5), -4)
        self.assertEqual(await connection.execute("RPUSH", "l", "a", "b"), 2)
        self.assertEqual(await connection.execute("LRANGE", "l", 0, -1), [b"a", b"b"])
        self.assertEqual(await connection.execute("LRANGE", "nothing", 0, -1), [])

    async def test_error_replies_keep_the_connection(self) -> None:
        connection = await self.connect()
        await connection.execute("SET", "k", "v")
        with self.assertRaises(gq.RedisReplyError) as caught:
            await connection.execute("INCR", "k")
        self.assertEqual(caught.exception.kind, "ERR")
        with self.assertRaises(gq.RedisReplyError) as caught:
            await connection.execute("LPUSH", "k", "x")
        self.assertEqual(caught.exception.kind, "WRONGTYPE")
        with self.assertRaises(gq.RedisReplyError):
            await connection.execute("NOSUCHCOMMAND")
        self.assertFalse(connection.closed)
        self.assertEqual(await connection.execute("PING"), b"PONG")

    async def test_eval_types(self) -> None:
        connection = await self.connect()
        self.assertEqual(await connection.execute("EVAL", "return {1, 'two', {3, {false}}, -4}", 0),
                         [1, b"two", [3, [None]], -4])
        self.assertEqual(await connection.execute("EVAL", "return 1.9", 0), 1)  # Lua numbers are truncated
        self.assertEqual(await connection.execute("EVAL", "return {ok='fine'}", 0), b"fine")
        with self.assertRaises(gq.RedisReplyError) as caught:
            await connection.execute("EVAL", "return redis.error_reply('my error')", 0)
        self.assertEqual((caught.exception.kind, caught.exception.message), ("", "my error"))
        time_reply = await connection.execute("EVAL", "return redis.call('TIME')", 0)
        self.assertTrue(isinstance(time_reply, list) and all(isinstance(part, bytes) for part in time_reply))

    async def test_evalsha_falls_back_to_eval_once(self) -> None:
        connection = await self.connect()
        await self.admin.execute("SCRIPT", "FLUSH")
        await self.admin.execute("CONFIG", "RESETSTAT")
        self.assertEqual(await connection.evalsha(SCRIPT, ["k"], ["v", 41]), [b"v", 42])
        self.assertEqual(await connection.evalsha(SCRIPT, ["k"], ["w", 1]), [b"w", 2])
        stats = await self.admin.execute("INFO", "commandstats")
        assert isinstance(stats, bytes)
        self.assertRegex(stats, rb"cmdstat_evalsha:calls=2,.*failed_calls=1")  # a NOSCRIPT, then a hit
        self.assertRegex(stats, rb"cmdstat_eval:calls=1,")
        with self.assertRaises(gq.RedisReplyError) as caught:  # a script error is not retried
            await connection.evalsha(b"return redis.call('NOSUCHCOMMAND')")
        self.assertEqual(caught.exception.kind, "ERR")

    async def test_pipelined_replies_come_back_in_order(self) -> None:
        connection = await self.connect()
        results = await asyncio.gather(*(connection.execute("INCR", "n") for _ in range(1000)))
        self.assertEqual(results, list(range(1, 1001)))
        await asyncio.gather(*(connection.execute("SET", f"k{i}", i) for i in range(500)))
        got = await asyncio.gather(*(connection.execute("GET", f"k{i}") for i in range(500)))
        self.assertEqual(got, [str(i).encode() for i in range(500)])

    async def test_select(self) -> None:
        db3 = await self.connect(self.server.url(db=3))
        await db3.execute("SET", "where", "three")
        self.assertIsNone(await self.admin.execute("GET", "where"))
        other = await self.connect(self.server.url(db=3))
        self.assertEqual(await other.execute("GET", "where"), b"three")
        with self.assertRaises(gq.RedisConnectionError) as caught:
            await self.connect(self.server.url(db=9999))
        self.assertIn("refused", str(caught.exception))

    async def test_auth_against_a_server_without_a_password(self) -> None:
        with self.assertRaises(gq.RedisAuthError) as caught:
            await self.connect(self.server.url(f":{REDIS_SECRET}@"))
        self.assertIn("authentication failed", str(caught.exception))
        self.assertNotIn(REDIS_SECRET, str(caught.exception))

    async def test_a_blocked_command_times_out_and_drops_the_connection(self) -> None:
        connection = await self.connect()
        blocked = asyncio.ensure_future(connection.execute("BLPOP", "queue", 10, timeout=0.1))
        behind = asyncio.ensure_future(connection.execute("GET", "k", timeout=30))
        started = time.monotonic()
        results = await asyncio.gather(blocked, behind, return_exceptions=True)
        self.assertIsInstance(results[0], gq.RedisTimeoutError)
        self.assertIsInstance(results[1], gq.RedisConnectionError)
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertTrue(connection.closed)

        async def unblocked() -> bool:
            info = await self.admin.execute("INFO", "clients")
            return isinstance(info, bytes) and b"blocked_clients:0" in info

        await until(unblocked, "Redis to notice the dropped client")

    async def test_debug_sleep_times_out(self) -> None:
        connection = await self.connect()
        with self.assertRaises(gq.RedisTimeoutError):
            await connection.execute("DEBUG", "SLEEP", "0.3", timeout=0.05)
        self.assertTrue(connection.closed)
        fresh = await self.connect()
        self.assertEqual(await fresh.execute("PING", timeout=5), b"PONG")

    async def test_a_cancelled_command_on_a_real_server(self) -> None:
        connection = await self.connect()
        blocked = asyncio.ensure_future(connection.execute("BLPOP", "queue", 10, timeout=10))
        ping = asyncio.ensure_future(connection.execute("PING", timeout=10))

        async def is_blocked() -> bool:
            info = await self.admin.execute("INFO", "clients")
            return isinstance(info, bytes) and b"blocked_clients:1" in info

        await until(is_blocked, "BLPOP to block")
        blocked.cancel()
        await self.admin.execute("RPUSH", "queue", "item")
        self.assertEqual(await ping, b"PONG")  # the BLPOP's reply was read and dropped
        self.assertIsNone(await self.admin.execute("LPOP", "queue"))  # ...but it ran: the item is gone

    async def test_subscriber_callback_and_publish(self) -> None:
        received: "asyncio.Queue[Tuple[bytes, bytes]]" = asyncio.Queue()
        await self.subscribe("grants", on_message=lambda c, p: received.put_nowait((c, p)))
        self.assertEqual(await self.admin.execute("PUBLISH", "grants", b"\x00one"), 1)
        self.assertEqual(await self.admin.execute("PUBLISH", "other", b"x"), 0)
        self.assertEqual(await self.admin.execute("PUBLISH", "grants", b"two"), 1)
        self.assertEqual(await asyncio.wait_for(received.get(), 5), (b"grants", b"\x00one"))
        self.assertEqual(await asyncio.wait_for(received.get(), 5), (b"grants", b"two"))

    async def test_subscriber_callback_errors_are_logged_not_fatal(self) -> None:
        got = asyncio.Event()

        def on_message(channel: bytes, payload: bytes) -> None:
            if payload == b"boom":
                raise RuntimeError("callback bug")
            got.set()

        subscriber = await self.subscribe("c", on_message=on_message)
        with self.assertLogs("gateway_queue", logging.ERROR):
            await self.admin.execute("PUBLISH", "c", "boom")
            await self.admin.execute("PUBLISH", "c", "fine")
            await asyncio.wait_for(got.wait(), 5)
        self.assertFalse(subscriber.closed)

    async def test_subscriber_iterator_and_disconnect(self) -> None:
        subscriber = await self.subscribe("grants")
        for i in range(3):
            await self.admin.execute("PUBLISH", "grants", str(i))
        got = []
        async for channel, payload in subscriber:
            got.append(payload)
            if len(got) == 3:
                break
        self.assertEqual(got, [b"0", b"1", b"2"])
        await self.admin.execute("PUBLISH", "grants", "last")
        await self.admin.execute("CLIENT", "KILL", "TYPE", "pubsub")
        error = await asyncio.wait_for(subscriber.wait_closed(), 5)
        self.assertIsInstance(error, gq.RedisConnectionError)
        self.assertTrue(subscriber.closed)
        rest = []
        with self.assertRaises(gq.RedisConnectionError):
            async for _, payload in subscriber:  # what arrived before the drop is still handed out
                rest.append(payload)
        self.assertIn(rest, ([b"last"], []))  # "last" may or may not have beaten the kill to the socket

    async def test_subscriber_ends_quietly_when_closed_by_its_owner(self) -> None:
        subscriber = await self.subscribe("c")
        consumer = asyncio.ensure_future(_collect(subscriber))
        await self.admin.execute("PUBLISH", "c", "x")
        subscriber.close()
        self.assertIn(await asyncio.wait_for(consumer, 5), ([b"x"], []))
        await subscriber.aclose()

    async def test_subscriber_notices_a_silent_redis(self) -> None:
        subscriber = await self.subscribe("c", ping_interval=0.02, ping_timeout=0.1)
        sleeper = asyncio.ensure_future(self.admin.execute("DEBUG", "SLEEP", "0.5", timeout=5))
        error = await asyncio.wait_for(subscriber.wait_closed(), 5)
        self.assertIsInstance(error, gq.RedisTimeoutError)
        self.assertIn("PING", str(error))
        await sleeper

    async def test_subscriber_that_falls_behind_is_dropped(self) -> None:
        subscriber = await self.subscribe("c")
        total = gq.REDIS_SUBSCRIBER_BACKLOG + 10
        await asyncio.gather(*(self.admin.execute("PUBLISH", "c", str(i)) for i in range(total)))
        error = await asyncio.wait_for(subscriber.wait_closed(), 5)
        self.assertNotIsInstance(error, gq.RedisProtocolError)
        self.assertIn("fell behind", str(error))
        got = []
        with self.assertRaises(gq.RedisConnectionError):
            async for _, payload in subscriber:
                got.append(payload)
        self.assertEqual(got, [str(i).encode() for i in range(gq.REDIS_SUBSCRIBER_BACKLOG)])


async def _collect(subscriber: gq.RedisSubscriber) -> List[bytes]:
    return [payload async for _, payload in subscriber]


class RedisAuthTests(RedisServerCase):
    PASSWORD = "s3cret-P@ss:/%"  # needs percent-encoding in a URL
    ENCODED = "s3cret-P%40ss%3A%2F%25"
    OPTIONS = ("--requirepass", PASSWORD)

    async def asyncSetUp(self) -> None:
        self.admin = await self.connect(self.server.url(f":{self.ENCODED}@"))
        await self.admin.execute("FLUSHALL")
        await self.admin.execute("ACL", "SETUSER", "bot", "reset", "on", ">b0t:pass/%", "~*", "&*", "+@all")
        await self.admin.execute("ACL", "SETUSER", "limited", "reset", "on", ">limited", "~*", "+get")

    async def test_default_user_with_password(self) -> None:
        connection = await self.connect(self.server.url(f":{self.ENCODED}@"))
        self.assertEqual(await connection.execute("ACL", "WHOAMI"), b"default")

    async def test_acl_user(self) -> None:
        connection = await self.connect(self.server.url("bot:b0t%3Apass%2F%25@", db=2))
        self.assertEqual(await connection.execute("ACL", "WHOAMI"), b"bot")

    async def test_wrong_passwords(self) -> None:
        for credentials in (f":{REDIS_SECRET}@", f"bot:{REDIS_SECRET}@", f"nobody:{REDIS_SECRET}@", f"default:{REDIS_SECRET}@"):
            with self.subTest(credentials=credentials):
                with self.assertRaises(gq.RedisAuthError) as caught:
                    await self.connect(self.server.url(credentials))
                message = str(caught.exception)
                self.assertIn("authentication failed", message)
                self.assertIn("WRONGPASS", message)
                self.assertNotIn(REDIS_SECRET, message)
                self.assertNotIn(self.PASSWORD, message)

    async def test_missing_password(self) -> None:
        with self.assertRaises(gq.RedisAuthError) as caught:
            await self.connect()
        self.assertIn("requires a password", str(caught.exception))

    async def test_user_without_the_rights_it_needs(self) -> None:
        with self.assertRaises(gq.RedisAuthError) as caught:
            await self.connect(self.server.url("limited:limited@"))  # may GET, not PING
        self.assertIn("refused user 'limited'", str(caught.exception))


class RedisRestartTests(unittest.IsolatedAsyncioTestCase):
    """A server of its own per test, killed and brought back."""

    async def asyncSetUp(self) -> None:
        self.server = RedisServer()
        self.server.start()
        self.addCleanup(self.server.stop)
        self.admin = await self.connect()

    async def connect(self) -> gq.RedisConnection:
        connection = await gq.RedisConnection.open(self.server.address())
        self.addAsyncCleanup(connection.aclose)
        return connection

    async def blocked_clients(self, count: int) -> bool:
        info = await self.admin.execute("INFO", "clients")
        return isinstance(info, bytes) and b"blocked_clients:%d" % count in info

    async def test_server_killed_mid_command(self) -> None:
        connection = await self.connect()
        blocked = asyncio.ensure_future(connection.execute("BLPOP", "queue", 30, timeout=30))
        behind = asyncio.ensure_future(connection.execute("GET", "k", timeout=30))
        await until(lambda: self.blocked_clients(1), "BLPOP to block")
        started = time.monotonic()
        self.server.kill()
        results = await asyncio.gather(blocked, behind, return_exceptions=True)
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertTrue(all(isinstance(r, gq.RedisConnectionError) for r in results), results)
        self.assertTrue(connection.closed)
        self.assertTrue(self.admin.closed or isinstance(await _error_of(self.admin.execute("PING")), gq.RedisError))

    async def test_reconnect_after_restart(self) -> None:
        port = self.server.port
        subscriber = await gq.RedisSubscriber.open(self.server.address(), "c")
        self.addAsyncCleanup(subscriber.aclose)
        self.server.kill()
        self.assertIsInstance(await asyncio.wait_for(subscriber.wait_closed(), 5), gq.RedisConnectionError)
        slept: List[float] = []

        async def sleep(delay: float) -> None:
            slept.append(delay)
            if len(slept) == 3:
                self.server.start(port)  # Redis comes back during the third wait

        address = self.server.address()
        started = time.monotonic()
        connection = await gq.open_redis_with_backoff(lambda: gq.RedisConnection.open(address, timeout=2), sleep=sleep)
        self.addAsyncCleanup(connection.aclose)
        self.assertLess(time.monotonic() - started, 5.0)
        self.assertEqual(len(slept), 3)
        self.assertTrue(0.05 <= slept[0] <= 0.1 and 0.1 <= slept[1] <= 0.2 and 0.2 <= slept[2] <= 0.4, slept)
        self.assertEqual(await connection.execute("PING"), b"PONG")
        resubscribed = await gq.RedisSubscriber.open(address, "c")
        self.addAsyncCleanup(resubscribed.aclose)
        self.assertEqual(await connection.execute("PUBLISH", "c", "back"), 1)


async def _error_of(awaitable: Awaitable[Any]) -> Optional[BaseException]:
    try:
        await awaitable
    except BaseException as exc:  # noqa: B902 - the test inspects it
        return exc
    return None


# ----------------------------------------------------------------------------------------------------------------
# TLS
# ----------------------------------------------------------------------------------------------------------------


def make_certificates(directory: str) -> Tuple[str, str, str]:
    """A throwaway CA and a server certificate for DNS:localhost only, made with the openssl CLI. The extensions are
    the ones Python 3.13's VERIFY_X509_STRICT insists on."""
    openssl = shutil.which("openssl")
    if not openssl:
        raise unittest.SkipTest("the openssl command is not installed, so no test certificate can be made")
    ca_key, ca, key, csr, cert, ext = (os.path.join(directory, name) for name in
                                       ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt", "server.ext"))
    with open(ext, "w") as f:
        f.write("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                "subjectAltName=DNS:localhost\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for args in (
        ["req", "-x509", "-new", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=gateway-queue test CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["req", "-new", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=localhost"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "2",
         "-extfile", ext],
    ):
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=30)
    return cert, key, ca


class RedisTlsTests(unittest.IsolatedAsyncioTestCase):
    @classmethod
    def setUpClass(cls) -> None:
        redis_server_binary()
        cls.directory = tempfile.TemporaryDirectory()
        cls.cert, cls.key, cls.ca = make_certificates(cls.directory.name)
        cls.server = RedisServer(tls_files=(cls.cert, cls.key, cls.ca))
        try:
            cls.server.start()
        except AssertionError:
            log = "".join(cls.server.log)
            cls.directory.cleanup()
            if "TLS" in log and ("not built" in log or "not supported" in log or "Unrecognized" in log
                                 or "Bad directive" in log):
                raise unittest.SkipTest("this redis-server was built without TLS") from None
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.stop()
        cls.directory.cleanup()

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca)

    async def test_tls_with_our_ca(self) -> None:
        address = self.server.address(host="localhost")
        self.assertTrue(address.tls)
        connection = await gq.RedisConnection.open(address, ssl_context=self.context())
        self.addAsyncCleanup(connection.aclose)
        self.assertEqual(await connection.execute("SET", "k", "v"), b"OK")
        results = await asyncio.gather(*(connection.execute("INCR", "tls-n") for _ in range(200)))
        self.assertEqual(results[-1] - results[0], 199)
        subscriber = await gq.RedisSubscriber.open(address, "c", ssl_context=self.context())
        self.addAsyncCleanup(subscriber.aclose)
        self.assertEqual(await connection.execute("PUBLISH", "c", "hi"), 1)
        self.assertEqual(await asyncio.wait_for(subscriber.__anext__(), 5), (b"c", b"hi"))

    async def test_system_cas_do_not_trust_our_certificate(self) -> None:
        with self.assertRaises(gq.RedisConnectionError) as caught:
            await gq.RedisConnection.open(self.server.address(host="localhost"))
        self.assertIn("certificate", str(caught.exception).lower())

    async def test_host_name_is_checked(self) -> None:
        with self.assertRaises(gq.RedisConnectionError) as caught:  # the certificate names localhost, not 127.0.0.1
            await gq.RedisConnection.open(self.server.address(host="127.0.0.1"), ssl_context=self.context())
        self.assertIn("127.0.0.1", str(caught.exception))

    async def test_plain_client_on_a_tls_port_fails(self) -> None:
        with self.assertRaises(gq.RedisConnectionError):
            await gq.RedisConnection.open(gq.parse_redis_url(f"redis://127.0.0.1:{self.server.port}"), timeout=2)


# ----------------------------------------------------------------------------------------------------------------
# Coordination on Redis: replicas in one process, then as real processes
# ----------------------------------------------------------------------------------------------------------------


class RedisCoordinatorTests(unittest.IsolatedAsyncioTestCase):
    """Several RedisCoordinators on one real redis-server play replicas. Redis keeps the time: intervals are short
    and real, and every wait below is one Redis named, not a guess."""

    INTERVAL = 0.2

    async def asyncSetUp(self) -> None:
        self.redis = RedisServer()
        self.redis.start()
        self.addCleanup(self.redis.stop)
        self.admin = await gq.RedisConnection.open(self.redis.address())
        self.addAsyncCleanup(self.admin.aclose)

    async def replica(self, **settings: Any) -> gq.RedisCoordinator:
        config = gq.Config(**{"interval": self.INTERVAL, "redis_url": self.redis.url(), "redis_prefix": "t", **settings})
        coordinator = gq.RedisCoordinator(config)
        await coordinator.start(0)
        self.addAsyncCleanup(coordinator.stop)
        await eventually(lambda: coordinator.problem() is None, what="connected")
        return coordinator

    async def claim_when_free(self, coordinator: gq.RedisCoordinator, shard: int, limit: int = 20) -> gq.Verdict:
        for _ in range(limit):
            verdict = await coordinator.claim(shard)
            if verdict.granted:
                return verdict
            self.assertLess(verdict.wait, 10)
            await asyncio.sleep(verdict.wait)
        raise AssertionError(f"shard {shard} never granted: {verdict.reason}")

    async def grant_log(self, prefix: str = "t") -> List[Tuple[int, int]]:
        """(Redis ms, shard) of every claim that stood, from the group's own record."""
        items = await self.admin.execute("ZRANGE", f"{prefix}:grants", 0, -1, "WITHSCORES")
        pairs = list(zip(items[::2], items[1::2]))
        return [(int(float(score)), int(member.split(b":")[1])) for member, score in pairs]

    async def test_the_first_claim_of_a_new_group_holds_every_bucket(self) -> None:
        a = await self.replica()
        verdict = await a.claim(0)
        self.assertEqual((verdict.granted, verdict.reason), (False, gq.HOLD))
        self.assertAlmostEqual(verdict.wait, self.INTERVAL, delta=0.05)
        await self.claim_when_free(a, 0)

    async def test_a_redis_that_may_evict_keys_is_refused_until_it_may_not(self) -> None:
        """An evicted slot would let its bucket grant early: with maxmemory set and an evicting policy, no grant, and
        the problem names the setting; with noeviction (or no maxmemory), it serves."""
        await self.admin.execute("CONFIG", "SET", "maxmemory", "100mb")
        await self.admin.execute("CONFIG", "SET", "maxmemory-policy", "volatile-ttl")
        config = gq.Config(interval=self.INTERVAL, redis_url=self.redis.url(), redis_prefix="t")
        coordinator = gq.RedisCoordinator(config)
        await coordinator.start(0)
        self.addAsyncCleanup(coordinator.stop)
        await eventually(lambda: "maxmemory-policy" in (coordinator.problem() or ""), what="refused")
        self.assertIn("volatile-ttl", coordinator.problem())
        self.assertEqual((await coordinator.claim(0)).reason, gq.UNAVAILABLE)
        await self.admin.execute("CONFIG", "SET", "maxmemory-policy", "noeviction")
        await eventually(lambda: coordinator.problem() is None, timeout=10, what="accepted")
        await self.admin.execute("CONFIG", "SET", "maxmemory", "0")

    async def test_late_answers_back_off_are_told_and_spend_nothing(self) -> None:
        """Every claim answered too late (here: any answer at all is too late) is given back; the bucket asks again
        after a growing pause instead of at once, one warning stands for many, and after LATE_STREAK in a row
        /healthz's problem says so. Once answers are timely again, the next claim is granted."""
        a = await self.replica()
        await self.claim_when_free(a, 0)  # past the new group's hold
        await asyncio.sleep(self.INTERVAL + 0.05)
        with unittest.mock.patch.object(gq, "MAX_CLAIM_RTT", -1.0), self.assertLogs("gateway_queue", "WARNING") as logs:
            waits = []
            for _ in range(gq.LATE_STREAK + 2):
                verdict = await a.claim(0)
                self.assertEqual((verdict.granted, verdict.reason), (False, gq.LATE))
                waits.append(verdict.wait)
        self.assertEqual(waits, sorted(waits))
        self.assertGreater(waits[-1], waits[0])
        self.assertLessEqual(waits[-1], gq.LATE_BACKOFF[1])
        self.assertEqual(len(logs.records), 1)
        self.assertIn("too slowly", a.problem())
        self.assertIsNone(await self.admin.execute("GET", "t:slot:0"))  # each claim was given back
        await self.admin.execute("SET", "t:slot:0", "9:0:plain:0:0:0", "PX", 5000)  # held: a timely refusal
        self.assertEqual((await a.claim(0)).reason, gq.INTERVAL)
        self.assertIsNone(a.problem())  # any timely answer ends the streak, not only a grant
        await self.admin.execute("DEL", "t:slot:0")
        self.assertTrue((await self.claim_when_free(a, 0)).granted)
        self.assertIsNone(a.problem())

    async def test_a_slot_is_spaced_across_replicas_on_redis_clock(self) -> None:
        a, b = await self.replica(), await self.replica()
        await self.claim_when_free(a, 0)
        late = await b.claim(1)
        self.assertEqual((late.granted, late.reason), (False, gq.INTERVAL))
        self.assertAlmostEqual(late.wait, self.INTERVAL, delta=0.05)
        await self.claim_when_free(b, 1)
        (first, _), (second, _) = await self.grant_log()
        self.assertGreaterEqual(second - first, self.INTERVAL * 1000)

    async def test_the_budget_is_shared_and_never_overdrawn(self) -> None:
        a, b = await self.replica(token=TOKEN), await self.replica(token=TOKEN)
        await a.apply(gq.GatewayLimits(4, 1000, 3, 3600, 1))
        await b.load()
        self.assertEqual((b.max_concurrency, b.budget.remaining), (4, 3))
        verdicts = [await self.claim_when_free(b, 0)]  # after the new group's hold
        verdicts += [await (a if shard % 2 else b).claim(shard) for shard in range(1, 4)]
        self.assertEqual([v.granted for v in verdicts], [True, True, True, False])
        self.assertEqual(verdicts[3].reason, gq.BUDGET)
        self.assertEqual(int(await self.admin.execute("HGET", "t:limits", "remaining")), 0)
        await a.apply(gq.GatewayLimits(4, 1000, 10, 3600, 1))  # Discord may not have counted the 3 yet
        self.assertEqual(int(await self.admin.execute("HGET", "t:limits", "remaining")), 7)

    async def test_an_undelivered_grant_gives_back_its_slot_and_start(self) -> None:
        a = await self.replica(token=TOKEN)
        await a.apply(gq.GatewayLimits(1, 1000, 5, 3600, 1))
        verdict = await self.claim_when_free(a, 0)
        await a.settle(verdict, False)
        self.assertEqual(int(await self.admin.execute("HGET", "t:limits", "remaining")), 5)
        self.assertTrue((await a.claim(1)).granted)  # at once: the slot was never used
        self.assertEqual([shard for _, shard in await self.grant_log()], [1])

    async def test_a_late_reply_is_given_back_not_acted_on(self) -> None:
        a = await self.replica(token=TOKEN)
        await a.apply(gq.GatewayLimits(2, 1000, 5, 3600, 1))
        await self.claim_when_free(a, 1)  # past the new group's hold
        real_clock = a.clock
        calls = [0]

        def slow_clock() -> float:  # the reply appears to arrive 100 ms after the claim was sent
            calls[0] += 1
            return real_clock() + (0.1 if calls[0] % 2 == 0 else 0.0)

        a.clock = slow_clock
        with self.assertLogs("gateway_queue", logging.WARNING):
            verdict = await a.claim(0)
        a.clock = real_clock
        self.assertEqual((verdict.granted, verdict.reason), (False, gq.LATE))
        self.assertEqual(int(await self.admin.execute("HGET", "t:limits", "remaining")), 4)  # given back
        self.assertTrue((await a.claim(0)).granted)

    async def test_a_freed_slot_goes_to_the_replica_that_waited_longest(self) -> None:
        a, b = await self.replica(), await self.replica()
        await self.claim_when_free(a, 0)
        first = await b.claim(1)  # b waits from now
        await asyncio.sleep(first.wait)
        turn = await a.claim(2)  # a asks first, but b's line has waited longer
        self.assertEqual((turn.granted, turn.reason), (False, gq.FAIR))
        self.assertLessEqual(turn.wait, gq.FAIR_GRACE)
        self.assertTrue((await b.claim(1)).granted)

    async def test_a_waiting_replica_that_died_delays_others_by_the_grace_at_most(self) -> None:
        a, b = await self.replica(), await self.replica()
        await self.claim_when_free(a, 0)
        first = await b.claim(1)
        await b.stop()  # b waits, then dies without claiming
        await asyncio.sleep(first.wait)
        started = time.monotonic()
        await self.claim_when_free(a, 2)
        self.assertLess(time.monotonic() - started, gq.FAIR_GRACE + 0.1)

    async def test_leases_are_kept_and_released_through_any_replica(self) -> None:
        a, b = await self.replica(lease_timeout=5.0), await self.replica(lease_timeout=5.0)
        verdict = await self.claim_when_free(a, 0)
        await a.settle(verdict, True)
        held = await b.claim(1)
        self.assertEqual((held.granted, held.reason), (False, gq.LEASE))
        self.assertGreater(held.wait, 5.0)
        woken: List[Optional[int]] = []
        a.on_change = woken.append
        status, body = await b.release(0, "ready")  # the release reaches another replica
        self.assertEqual(status, 200, body)
        self.assertEqual(b.stats.leases["ready"], 1)
        await eventually(lambda: 0 in woken, what="the release published")  # a's waiting buckets ask again
        after = await b.claim(1)
        self.assertEqual(after.reason, gq.INTERVAL)
        self.assertAlmostEqual(after.wait, self.INTERVAL, delta=0.05)

    async def test_wrong_releases_are_refused_and_change_nothing(self) -> None:
        a = await self.replica(lease_timeout=0.3)
        self.assertEqual((await a.release(0, "ready"))[0], 409)  # nothing granted
        verdict = await self.claim_when_free(a, 0)
        await a.settle(verdict, True)
        ttl = await self.admin.execute("PTTL", "t:slot:0")
        status, body = await a.release(3, "ready")
        self.assertEqual((status, body["message"]), (409, "bucket 0's lease belongs to shard 0, not shard 3"))
        self.assertLessEqual(await self.admin.execute("PTTL", "t:slot:0"), ttl)  # untouched
        with self.assertLogs("gateway_queue", logging.WARNING) as logs:
            await asyncio.sleep(0.4)  # past LEASE_TIMEOUT: the granting replica logs it
            await eventually(lambda: a.stats.leases["timeout"] == 1, what="the timeout noticed")
        self.assertIn("shard 0 (bucket 0)", logs.output[0])
        status, body = await a.release(0, "ready")
        self.assertEqual(status, 409)
        self.assertIn("timed out", body["message"])
        status, body = await a.release(3, "ready")  # the lease that was there has ended: none is open
        self.assertEqual((status, body["message"]), (409, "no lease is open in bucket 0: its last was shard 0's, now ended"))

    async def test_only_one_replica_fetches_per_period(self) -> None:
        a, b, c = await self.replica(token=TOKEN), await self.replica(token=TOKEN), await self.replica(token=TOKEN)
        turns = [await r.refresh_turn(600) for r in (a, b, c)]
        self.assertEqual(turns, [True, False, False])
        await a.apply(gq.GatewayLimits(16, 1000, 900, 3600, 1))
        self.assertEqual([await r.refresh_turn(600) for r in (a, b, c)], [False, False, False])  # fresh for 10 min
        self.assertEqual(await b.refresh_turn(0.001) or await c.refresh_turn(0.001), True)  # stale: one of them

    async def test_two_bots_on_one_redis_share_nothing(self) -> None:
        ours = await self.replica(redis_prefix="bot-a")
        theirs = await self.replica(redis_prefix="bot-b")
        await self.claim_when_free(ours, 0)
        self.assertTrue((await self.claim_when_free(theirs, 0)).granted)
        self.assertEqual(len(await self.grant_log("bot-a")), 1)
        self.assertEqual(len(await self.grant_log("bot-b")), 1)

    async def test_a_change_of_max_concurrency_keeps_every_recent_grant(self) -> None:
        a = await self.replica(token=TOKEN, lease_timeout=5.0)
        await a.apply(gq.GatewayLimits(1, 1000, 1000, 3600, 1))
        verdict = await self.claim_when_free(a, 5)
        await a.settle(verdict, True)
        await a.apply(gq.GatewayLimits(16, 1000, 1000, 3600, 1))
        self.assertEqual((await a.claim(21)).reason, gq.LEASE)  # shard 5's lease moved to bucket 5 with it
        self.assertTrue((await a.claim(0)).granted)  # bucket 0 is free now
        self.assertEqual((await a.release(5, "ready"))[0], 200)

    async def test_lost_data_holds_every_bucket_one_interval(self) -> None:
        a = await self.replica()
        await self.claim_when_free(a, 0)
        await asyncio.sleep(self.INTERVAL)
        await self.admin.execute("FLUSHALL")
        with self.assertLogs("gateway_queue", logging.WARNING) as logs:
            verdict = await a.claim(0)
        self.assertEqual((verdict.granted, verdict.reason), (False, gq.HOLD))
        self.assertIn("lost", logs.output[0])

    async def test_no_grant_without_redis(self) -> None:
        a = await self.replica()
        port = self.redis.port
        self.redis.kill()
        verdict = await a.claim(0)
        self.assertEqual((verdict.granted, verdict.reason, verdict.wait), (False, gq.UNAVAILABLE, math.inf))
        await eventually(lambda: a.problem() is not None, what="the loss noticed")
        self.assertIn("Redis unreachable", a.problem())
        woken: List[Optional[int]] = []
        a.on_change = woken.append
        self.redis.start(port)
        await eventually(lambda: a.problem() is None, timeout=10, what="reconnected")
        await eventually(lambda: None in woken, what="every bucket poked")
        self.assertEqual((await a.claim(0)).reason, gq.HOLD)  # it came back empty

    async def test_the_password_never_shows(self) -> None:
        self.redis.stop()
        self.redis = RedisServer("--requirepass", REDIS_SECRET)
        self.redis.start()
        self.addCleanup(self.redis.stop)
        wrong = gq.RedisCoordinator(gq.Config(interval=self.INTERVAL, redis_url=self.redis.url(":wrong-" + REDIS_SECRET + "@")))
        with self.assertLogs("gateway_queue", logging.WARNING) as logs:
            await wrong.start(0)
            self.addAsyncCleanup(wrong.stop)
            await eventually(lambda: "authentication" in (wrong.problem() or ""), what="refused")
        self.assertNotIn(REDIS_SECRET, wrong.problem() + "\n".join(logs.output))
        right = gq.RedisCoordinator(gq.Config(interval=self.INTERVAL, redis_url=self.redis.url(f":{REDIS_SECRET}@")))
        await right.start(0)
        self.addAsyncCleanup(right.stop)
        await eventually(lambda: right.problem() is None, what="logged in")
        self.assertNotIn(REDIS_SECRET, repr(right.address) + str(right.address))


REPLICA_CODE = """
import asyncio, json, logging, os, sys
import gateway_queue as gq
settings = json.loads(os.environ["GQ_TEST_CONFIG"])
logging.basicConfig(level=settings.pop("log_level", "INFO"), format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
server = gq.Server(gq.Config(**settings))
gq.install_signal_handlers(server)
sys.exit(asyncio.run(server.run()))
"""


class Replica:
    """gateway-queue in a process of its own, configured through the class (so its interval may be short)."""

    def __init__(self, **settings: Any):
        self.proc, self.port = service_process({"GQ_TEST_CONFIG": json.dumps({"host": "127.0.0.1", "port": 0, **settings})},
                                               code=REPLICA_CODE)
        self.log = collect_stderr(self.proc)

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(5)


class ReplicaProcessTests(unittest.IsolatedAsyncioTestCase):
    """Real replicas on one real Redis, measured at the clients' sockets and in Redis's own record of grants."""

    INTERVAL = 0.2
    TOLERANCE = 0.03  # what a busy client adds between a grant's write and its read of it

    async def asyncSetUp(self) -> None:
        self.redis = RedisServer()
        self.redis.start()
        self.addCleanup(self.redis.stop)
        self.admin = await gq.RedisConnection.open(self.redis.address())
        self.addAsyncCleanup(self.admin.aclose)
        self.received: List[Tuple[float, int, int]] = []  # (time the client read its grant, shard, replica index)

    def replicas(self, count: int, **settings: Any) -> List[Replica]:
        started = []
        for _ in range(count):
            replica = Replica(**{"interval": self.INTERVAL, "redis_url": self.redis.url(), "redis_prefix": "r", **settings})
            self.addCleanup(replica.stop)
            started.append(replica)
        return started

    async def ask(self, replicas: List[Replica], index: int, shard: int, retry: bool = True) -> Optional[int]:
        """A shard's client: asks replica `index`; on a refused connection or a 503 (a replica gone or stopping),
        asks the next one, as a load balancer would. Returns the index of the replica that granted."""
        for attempt in range(len(replicas) * 3):
            replica = replicas[(index + attempt) % len(replicas)]
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", replica.port)
                writer.write(get(f"/?shard={shard}"))
                response = await asyncio.wait_for(read_response(reader), 60)
                writer.close()
            except (OSError, asyncio.IncompleteReadError):
                if not retry:
                    return None
                await asyncio.sleep(0.05)
                continue
            if response.status == 200:
                self.received.append((time.monotonic(), shard, replicas.index(replica)))
                return replicas.index(replica)
            self.assertEqual(response.status, 503)
            await asyncio.sleep(0.05)
        return None

    async def grant_log(self) -> List[Tuple[int, int]]:
        items = await self.admin.execute("ZRANGE", "r:grants", 0, -1, "WITHSCORES")
        return [(int(float(score)), int(member.split(b":")[1])) for member, score in zip(items[::2], items[1::2])]

    def assert_spaced(self, times: Sequence[Tuple[float, int]], max_concurrency: int, interval: float,
                      slack: float) -> None:
        by_bucket: Dict[int, List[float]] = {}
        for at, shard in times:
            by_bucket.setdefault(shard % max_concurrency, []).append(at)
        for bucket, moments in by_bucket.items():
            moments.sort()
            gaps = [later - earlier for earlier, later in zip(moments, moments[1:])]
            self.assertTrue(all(gap >= interval - slack for gap in gaps), (bucket, [round(g, 4) for g in gaps]))

    async def check_spacing(self, max_concurrency: int) -> None:
        """No two grants in a bucket closer than the interval: exactly, on Redis's clock; within what a client's
        scheduling adds, at the clients' sockets."""
        log = await self.grant_log()  # whole milliseconds, compared as integers: no float rounding below the interval
        self.assert_spaced(log, max_concurrency, round(self.INTERVAL * 1000), 0)
        self.assert_spaced([(at, shard) for at, shard, _ in self.received], max_concurrency, self.INTERVAL, self.TOLERANCE)

    async def test_three_replicas_share_the_buckets(self) -> None:
        for max_concurrency, shards in ((1, 9), (4, 16)):
            with self.subTest(max_concurrency=max_concurrency):
                await self.admin.execute("FLUSHALL")
                self.received.clear()
                replicas = self.replicas(3, max_concurrency=max_concurrency)
                granted = await asyncio.gather(*(self.ask(replicas, shard % 3, shard) for shard in range(shards)))
                self.assertEqual(sorted(granted), sorted(shard % 3 for shard in range(shards)))
                self.assertEqual(len(await self.grant_log()), shards)
                await self.check_spacing(max_concurrency)
                for replica in replicas:
                    replica.stop()

    async def test_the_shared_budget_is_never_overdrawn_and_fetched_once(self) -> None:
        fake = FakeDiscord([(200, {}, gateway_body(max_concurrency=2, total=1000, remaining=5), 0)])
        self.addCleanup(fake.close)
        replicas = self.replicas(3, token=TOKEN, api_url=fake.url)
        asks = [asyncio.ensure_future(self.ask(replicas, shard % 3, shard)) for shard in range(8)]
        await eventually(lambda: sum(task.done() for task in asks) == 5, timeout=10, what="five grants")
        await asyncio.sleep(gq.VIEW_REFRESH + 0.5)  # long enough for every replica's view of the budget to catch up
        self.assertEqual(sum(task.done() for task in asks), 5)  # the other three wait for Discord's reset
        self.assertEqual(int(await self.admin.execute("HGET", "r:limits", "remaining")), 0)
        self.assertEqual(len(fake.requests), 1)  # one replica fetched for the group
        status = json.loads(raw_request(replicas[2].port, get("/status", "Connection: close")).split(b"\r\n\r\n", 1)[1])
        self.assertEqual((status["session_starts"]["remaining"], status["limits"]["max_concurrency"]), (0, 2))
        for task in asks:
            task.cancel()
        await self.check_spacing(2)

    async def test_killed_and_stopped_replicas_never_cause_an_early_grant(self) -> None:
        replicas = self.replicas(3)
        asks = [asyncio.ensure_future(self.ask(replicas, shard % 3, shard)) for shard in range(15)]
        await eventually(lambda: len(self.received) >= 2, timeout=10, what="grants flowing")
        replicas[0].signal(signal.SIGKILL)  # its parked clients go to the others
        await eventually(lambda: len(self.received) >= 4, timeout=10, what="grants after the kill")
        replicas[1].signal(signal.SIGSTOP)  # longer than the interval: its claims' replies come late
        await asyncio.sleep(self.INTERVAL * 3)
        replicas[1].signal(signal.SIGCONT)
        done, _ = await asyncio.wait(asks, timeout=30)
        self.assertEqual(len(done), 15)
        self.assertTrue(all(task.result() is not None for task in done))
        await self.check_spacing(1)

    async def test_redis_lost_and_back_empty(self) -> None:
        replicas = self.replicas(2)
        first = await self.ask(replicas, 0, 0)
        self.assertIsNotNone(first)
        port = self.redis.port
        self.redis.kill()
        lost_at = time.monotonic()
        asks = [asyncio.ensure_future(self.ask(replicas, shard % 2, shard, retry=False)) for shard in range(1, 5)]
        for replica in replicas:
            deadline = time.monotonic() + 10
            while True:
                answer = raw_request(replica.port, get("/healthz", "Connection: close"))
                if b"503 Service Unavailable" in answer:
                    break
                self.assertLess(time.monotonic(), deadline, answer)
                await asyncio.sleep(0.05)
            self.assertIn(b"Redis unreachable", answer)
            metrics = raw_request(replica.port, get("/metrics", "Connection: close"))
            self.assertIn(b'gateway_queue_backend_up{backend="redis"} 0', metrics)
        await asyncio.sleep(self.INTERVAL * 2)
        self.assertFalse(any(task.done() for task in asks))  # parked, not failed, not granted
        self.redis.start(port)  # empty: no persistence
        back_at = time.monotonic()
        self.admin = await gq.RedisConnection.open(self.redis.address())
        self.addAsyncCleanup(self.admin.aclose)
        done, _ = await asyncio.wait(asks, timeout=20)
        self.assertEqual(len(done), 4)
        after = sorted(at for at, shard, _ in self.received if shard)
        self.assertGreaterEqual(after[0] - back_at, self.INTERVAL - self.TOLERANCE)  # every bucket held once
        self.assertGreater(after[0] - lost_at, self.INTERVAL)
        await self.check_spacing(1)

    async def test_a_rolling_restart(self) -> None:
        """The new replica is up before the old one stops (Kubernetes' rolling update): the old one's parked
        clients get 503 and ask the new one; no bucket grants twice within the interval."""
        old, new = self.replicas(2)
        pool = [old, new]
        asks = [asyncio.ensure_future(self.ask(pool, 0 if shard < 3 else 1, shard)) for shard in range(6)]
        await eventually(lambda: len(self.received) >= 2, timeout=10, what="grants flowing")
        old.signal(signal.SIGTERM)
        self.assertEqual(old.proc.wait(5), 0)
        done, _ = await asyncio.wait(asks, timeout=20)
        self.assertEqual(len(done), 6)
        self.assertEqual(sorted(shard for _, shard, _ in self.received), list(range(6)))
        await self.check_spacing(1)

    async def test_no_replica_is_starved(self) -> None:
        """Two replicas, twelve shards each, one bucket: whoever asks first gets a freed slot, but the replica whose
        line waited longer goes first, so the grants alternate instead of one replica taking them all."""
        replicas = self.replicas(2, interval=0.15)
        asks = [asyncio.ensure_future(self.ask(replicas, shard % 2, shard, retry=False)) for shard in range(24)]
        await eventually(lambda: len(self.received) >= 12, timeout=20, what="twelve grants")
        first = [index for _, _, index in sorted(self.received)[:12]]
        self.assertGreaterEqual(min(first.count(0), first.count(1)), 4, first)
        for task in asks:
            task.cancel()


class RestartHoldTests(unittest.TestCase):
    """Without Redis: a new process never grants within one interval of its start, so a restart cannot
    double-grant a bucket."""

    def test_a_restarted_process_waits_one_interval(self) -> None:
        settings = json.dumps({"host": "127.0.0.1", "port": 0, "interval": 0.5})
        grants = []
        for _ in range(2):
            started = time.monotonic()  # before the process can listen: the hold runs from a later moment
            proc, port = service_process({"GQ_TEST_CONFIG": settings}, code=REPLICA_CODE)
            self.addCleanup(stop_process, proc)
            answer = raw_request(port, get("/?shard=0", "Connection: close"))
            self.assertIn(b"200 OK", answer)
            grants.append(time.monotonic())
            self.assertGreaterEqual(grants[-1] - started, 0.5)
            proc.send_signal(signal.SIGTERM)  # and the next one starts at once
            self.assertEqual(proc.wait(5), 0)
            proc.stderr.close()
        self.assertGreaterEqual(grants[1] - grants[0], 0.5)

# ----------------------------------------------------------------------------------------------------------------
# Connections (end to end over loopback)
# ----------------------------------------------------------------------------------------------------------------

SERVER_OPTIONS = ("head_timeout", "keepalive_timeout", "send_timeout", "max_connections", "refresh_interval",
                  "discord_timeout", "discord_deadline", "clock", "coordinator")


class ServerTestCase(unittest.IsolatedAsyncioTestCase):
    async def start(self, **kwargs: Any) -> gq.Server:
        server_options = {k: kwargs.pop(k) for k in list(kwargs) if k in SERVER_OPTIONS}
        config = gq.Config(**{"host": "127.0.0.1", "port": 0, "interval": 0.3, "startup_hold": 0.0, **kwargs})
        server = gq.Server(config, **server_options)
        await server.start()
        self.addAsyncCleanup(server.stop)
        return server

    async def connect(self, server: gq.Server, host: str = "127.0.0.1") -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(host, server.port)
        self.addCleanup(writer.close)
        return reader, writer

    async def ask(self, server: gq.Server, raw: bytes, head: bool = False) -> Response:
        reader, writer = await self.connect(server)
        writer.write(raw)
        return await asyncio.wait_for(read_response(reader, head), 5)

    def only_connection(self, server: gq.Server) -> gq.Connection:
        self.assertEqual(len(server.connections), 1)
        return next(iter(server.connections))


class ConnectionTests(ServerTestCase):
    async def test_grant(self) -> None:
        server = await self.start()
        response = await self.ask(server, get("/?shard=3"))
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, gq.GRANT_BODY)
        self.assertEqual(response.headers["content-type"], "application/json")
        self.assertEqual(server.stats.requests["granted"], 1)

    async def test_root_any_method_and_any_path_with_a_shard_are_queued(self) -> None:
        server = await self.start(max_concurrency=4)
        for raw in [get("/anything?shard=0"), get("/?shard=1", method="POST"), get("/x/y?shard=2", method="DELETE"),
                    get("/?shard=3", method="PUT")]:
            self.assertEqual((await self.ask(server, raw)).status, 200)
        self.assertEqual(server.stats.requests["granted"], 4)

    async def test_stray_requests_queue_nothing(self) -> None:
        """A favicon, a trailing slash, a case or percent-encoding variant of a reserved path, OPTIONS *: each is a
        404, and no slot or session start is spent (before, each was shard 0's identify)."""
        server = await self.start(interval=5.0)
        server.coordinator.budget = gq.Budget(1000, 1000, time.monotonic() + 3600)
        strays = [get("/favicon.ico"), get("/healthz/"), get("/HEALTHZ"), get("/%68ealthz"), get("/status/x"),
                  get("*", method="OPTIONS"), get("/robots.txt"), get("/metrics/", method="HEAD")]
        for raw in strays:
            with self.subTest(raw=raw.split(b"\r\n")[0]):
                response = await self.ask(server, raw, head=raw.startswith(b"HEAD"))
                self.assertEqual(response.status, 404)
                if response.body:
                    self.assertIn("?shard=", response.json()["message"])
        self.assertEqual((server.queue.waiting, server.stats.requests["granted"]), (0, 0))
        self.assertEqual(server.coordinator.budget.remaining, 1000)
        self.assertEqual((await self.ask(server, get("/?shard=0"))).status, 200)  # the slot is still free

    async def test_head_gets_headers_only(self) -> None:
        server = await self.start()
        reader, writer = await self.connect(server)
        writer.write(get("/?shard=0", method="HEAD") + get("/healthz"))
        response = await asyncio.wait_for(read_response(reader, head=True), 5)
        self.assertEqual((response.status, response.headers["content-length"]), (200, "45"))
        following = await asyncio.wait_for(read_response(reader), 5)  # no stray body in between
        self.assertEqual(following.json()["status"], "ok")

    async def test_same_bucket_is_spaced_by_the_interval(self) -> None:
        server = await self.start(max_concurrency=2, interval=0.3)
        started = time.monotonic()
        results = await asyncio.gather(*(self.ask(server, get(f"/?shard={s}")) for s in (0, 2, 4)))
        elapsed = time.monotonic() - started
        self.assertEqual([r.status for r in results], [200, 200, 200])
        self.assertGreaterEqual(elapsed, 0.6)

    async def test_different_buckets_go_together(self) -> None:
        server = await self.start(max_concurrency=4, interval=5.0)
        results = await asyncio.gather(*(self.ask(server, get(f"/?shard={s}")) for s in range(4)))
        self.assertEqual([r.status for r in results], [200] * 4)
        self.assertEqual(server.queue.waiting, 0)

    async def test_startup_hold_from_listening(self) -> None:
        server = await self.start(interval=0.3, startup_hold=0.4)
        started = time.monotonic()
        self.assertEqual((await self.ask(server, get("/?shard=0"))).status, 200)
        self.assertGreaterEqual(time.monotonic() - started, 0.39)

    async def test_keep_alive_serves_many_requests(self) -> None:
        server = await self.start(interval=0.05)
        reader, writer = await self.connect(server)
        for _ in range(3):
            writer.write(get("/?shard=0"))
            response = await asyncio.wait_for(read_response(reader), 5)
            self.assertEqual(response.status, 200)
            self.assertNotIn("connection", response.headers)
        self.assertEqual(server.stats.requests["granted"], 3)

    async def test_http10_closes_unless_asked(self) -> None:
        server = await self.start(interval=0.05)
        reader, writer = await self.connect(server)
        writer.write(b"GET /?shard=0 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        response = await asyncio.wait_for(read_response(reader), 5)
        self.assertEqual(response.headers["connection"], "keep-alive")
        writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
        response = await asyncio.wait_for(read_response(reader), 5)
        self.assertEqual(response.headers["connection"], "close")
        self.assertTrue(await closed_by_peer(reader))

    async def test_connection_close_is_honoured(self) -> None:
        server = await self.start()
        reader, writer = await self.connect(server)
        writer.write(get("/?shard=0", "Connection: close"))
        response = await asyncio.wait_for(read_response(reader), 5)
        self.assertEqual((response.status, response.headers["connection"]), (200, "close"))
        self.assertTrue(await closed_by_peer(reader))

    async def test_pipelined_requests_are_answered_in_order(self) -> None:
        server = await self.start(interval=0.2)
        reader, writer = await self.connect(server)
        writer.write(get("/?shard=0") + get("/healthz") + get("/?shard=0") + get("/nope", method="HEAD") + get("/healthz"))
        statuses = []
        for head in (False, False, False, True, False):
            response = await asyncio.wait_for(read_response(reader, head), 5)
            statuses.append((response.status, response.body[:12]))
        self.assertEqual([s for s, _ in statuses], [200, 200, 200, 404, 200])
        self.assertEqual(statuses[0][1], gq.GRANT_BODY[:12])
        self.assertEqual(statuses[1][1], b'{"status": "')
        self.assertEqual(server.stats.requests["granted"], 2)

    async def test_body_is_read_and_discarded(self) -> None:
        server = await self.start()
        reader, writer = await self.connect(server)
        writer.write(b"POST /?shard=0 HTTP/1.1\r\nHost: q\r\nContent-Length: 11\r\n\r\nhello")
        await eventually(lambda: server.connections and self.only_connection(server).body_left == 6, what="half a body")
        writer.write(b" world" + get("/healthz"))
        self.assertEqual((await asyncio.wait_for(read_response(reader), 5)).status, 200)
        self.assertEqual((await asyncio.wait_for(read_response(reader), 5)).json()["status"], "ok")

    async def test_expect_100_continue_is_answered(self) -> None:
        server = await self.start()
        reader, writer = await self.connect(server)
        writer.write(b"POST /?shard=0 HTTP/1.1\r\nHost: q\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # before any byte of the body
        self.assertEqual(interim, b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.write(b"body")
        self.assertEqual((await asyncio.wait_for(read_response(reader), 5)).status, 200)

    async def test_disconnect_while_parked_costs_nothing(self) -> None:
        server = await self.start(interval=0.4)
        self.assertEqual((await self.ask(server, get("/?shard=0"))).status, 200)
        granted_at = time.monotonic()
        reader, writer = await self.connect(server)
        writer.write(get("/?shard=0"))
        await eventually(lambda: server.queue.waiting == 1, what="parked")
        writer.close()
        await eventually(lambda: server.queue.waiting == 0, what="the line left")  # at once, not at its turn
        self.assertEqual(server.stats.requests["cancelled"], 1)
        third = await self.ask(server, get("/?shard=0"))
        self.assertEqual(third.status, 200)
        self.assertLess(time.monotonic() - granted_at, 0.7)  # on schedule: the cancelled one did not take the slot
        self.assertEqual(server.stats.requests["granted"], 2)

    async def test_a_closed_connection_is_freed_without_the_cycle_collector(self) -> None:
        """asyncio's transport keeps bound methods of itself after it lost its socket; the server drops them, so a
        parked, granted, aborted or idle connection's transport is freed by reference counting at once (a storm of
        thousands of closes must not wait for a full collection)."""
        server = await self.start(interval=3600.0, max_concurrency=2)
        self.assertEqual((await self.ask(server, get("/?shard=0"))).status, 200)
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        gone = []
        for request, leave in ((get("/?shard=0"), "close"), (get("/?shard=0"), "abort"), (get("/?shard=1"), "close"),
                               (get("/healthz"), "close")):
            before = set(server.connections)
            reader, writer = await self.connect(server)
            writer.write(request)
            await eventually(lambda: len(server.connections) > len(before), what="accepted")
            if request != get("/?shard=0"):
                await read_response(reader)  # granted or answered, then the client leaves
            else:
                await eventually(lambda: server.queue.waiting >= 1, what="parked")
            (conn,) = set(server.connections) - before
            gone.append(weakref.ref(conn.writer.transport))
            del conn
            writer.transport.abort() if leave == "abort" else writer.close()
            await eventually(lambda: len(server.connections) == len(before), what="forgotten")
        await asyncio.sleep(0)
        self.assertEqual([ref() for ref in gone], [None] * len(gone))

    async def test_a_client_that_leaves_while_parked_leaves_in_every_state(self) -> None:
        """Parked with nothing behind it; with a partial head behind it; with complete requests behind it; with
        more pipelined than PARKED_BUFFER_LIMIT (dropped at once); with earlier answers unread. In each, the client
        closing takes its request out of the line at once, and no slot or session start is spent."""
        server = await self.start(interval=5.0, max_concurrency=8)
        server.coordinator.budget = gq.Budget(1000, 1000, time.monotonic() + 3600)
        for shard in range(5):  # every bucket used: what follows parks
            self.assertEqual((await self.ask(server, get(f"/?shard={shard}"))).status, 200)
        states = {
            "nothing behind": get("/?shard=0"),
            "a partial head behind": get("/?shard=1") + b"GET /healthz HTTP/1.1\r\nHo",
            "complete requests behind": get("/?shard=2") + get("/healthz") * 3,
            "a big pipeline behind": get("/?shard=3") + get("/healthz", "X-Pad: " + "p" * 200) * 30,
            "answers unread before it": get("/status") * 3 + get("/?shard=4"),
        }
        for state, raw in states.items():
            with self.subTest(state=state):
                sock = socket.create_connection(("127.0.0.1", server.port))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.sendall(raw)
                if state == "a big pipeline behind":
                    await eventually(lambda: server.stats.requests["cancelled"] >= 1, what="the greedy one dropped")
                else:
                    await eventually(lambda: server.queue.waiting == 1, what=f"parked with {state}")
                sock.close()
                await eventually(lambda: server.queue.waiting == 0, what=f"left with {state}")
        self.assertEqual(server.stats.requests["cancelled"], 5)
        self.assertEqual((server.stats.requests["granted"], server.coordinator.budget.remaining), (5, 995))

    async def test_a_parked_request_holds_a_few_kib_at_most(self) -> None:
        server = await self.start(interval=5.0)
        self.assertEqual((await self.ask(server, get("/?shard=0"))).status, 200)
        reader, writer = await self.connect(server)
        writer.write(get("/?shard=0"))
        await eventually(lambda: server.queue.waiting == 1, what="parked")
        conn = self.only_connection(server) if len(server.connections) == 1 else \
            next(c for c in server.connections if c.waiter is not None)
        writer.write(b"x" * 400_000)  # bytes that would have been buffered behind it
        self.assertTrue(await closed_by_peer(reader))
        self.assertEqual(server.queue.waiting, 0)
        self.assertEqual(server.stats.requests["cancelled"], 1)
        self.assertLessEqual(len(conn.buf), gq.PARKED_BUFFER_LIMIT + gq.READ_CHUNK)

    async def test_bad_shard_is_400_and_nothing_queued(self) -> None:
        server = await self.start()
        reader, writer = await self.connect(server)
        for query in ("shard=abc", "shard=-1", "shard=4294967296", "shard=1&shard=2", "shard=", "shard=" + "9" * 5000):
            writer.write(get(f"/?{query}"))
            response = await asyncio.wait_for(read_response(reader), 5)
            self.assertEqual(response.status, 400, query[:20])
            self.assertIn("shard", response.json()["message"])
        writer.write(get("/healthz"))  # the connection is still usable
        self.assertEqual((await asyncio.wait_for(read_response(reader), 5)).status, 200)
        self.assertEqual(server.stats.requests["granted"], 0)
        self.assertEqual(server.stats.requests["rejected"], 6)

    async def test_missing_shard_on_root_is_shard_zero_with_one_warning(self) -> None:
        server = await self.start(max_concurrency=2, interval=0.05)
        with self.assertLogs("gateway_queue", logging.WARNING) as logs:
            for _ in range(2):
                self.assertEqual((await self.ask(server, get("/"))).status, 200)
        self.assertEqual(len([r for r in logs.records if "shard" in r.getMessage()]), 1)

    async def test_malformed_request_closes_and_others_are_served(self) -> None:
        server = await self.start()
        for raw, status in [(b"GET / HTTP/1.1\nHost: q\n\n", 400), (b"GET / HTTP/3.0\r\nHost: q\r\n\r\n", 505),
                            (b"POST / HTTP/1.1\r\nHost: q\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
                            (b"GET /?shard=1 HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
                            (b"POST / HTTP/1.1\r\nHost: q\r\nContent-Length: " + b"9" * 4301 + b"\r\n\r\n", 400),
                            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)), 400)]:
            reader, writer = await self.connect(server)
            writer.write(raw)
            response = await asyncio.wait_for(read_response(reader), 5)
            self.assertEqual(response.status, status)
            self.assertEqual(response.headers["connection"], "close")
            self.assertIn("message", response.json())
            self.assertTrue(await closed_by_peer(reader))
        self.assertEqual(server.stats.requests["granted"], 0)
        self.assertEqual(server.stats.errors[500], 0)
        self.assertEqual((await self.ask(server, get("/?shard=0"))).status, 200)

    async def test_size_limits(self) -> None:
        server = await self.start()
        cases = [
            (get("/" + "a" * gq.MAX_REQUEST_LINE), 414),
            (get("/" + "a" * 20_000), 414),  # one write longer than the whole head's limit: still the line's 414
            (get("/", *[f"X-{i}: {'v' * 200}" for i in range(90)]), 431),
            (get("/", *[f"X-{i}: v" for i in range(gq.MAX_HEADERS + 1)]), 431),
            (get("/", "Content-Length: 100000", method="POST"), 413),
            (b"\r\n" * 500_000, 400),  # leading empty lines count: no megabyte is accepted and re-parsed
        ]
        for raw, status in cases:
            with self.subTest(status=status, size=len(raw)):
                response = await self.ask(server, raw)
                self.assertEqual((response.status, response.headers["connection"]), (status, "close"))
        self.assertEqual(server.stats.requests["granted"], 0)

    async def test_a_slow_head_gets_408_from_its_first_byte(self) -> None:
        """Deterministic: the server's clock is fake, so bytes may trickle in at any pace; the 408 comes when
        (and only when) the fake time passes the first byte's time plus HEAD_TIMEOUT. The client keeps writing after
        the 408 and still reads it: the server lingers instead of resetting."""
        clock = FakeClock(1000.0)
        server = await self.start(clock=clock, head_timeout=10.0)
        reader, writer = await self.connect(server)
        writer.write(b"GET /?shard=0 HTTP/1.1\r\n")
        await eventually(lambda: server.connections and self.only_connection(server).started, what="a partial head")
        conn = self.only_connection(server)
        self.assertEqual(conn.started, 1000.0)
        refused_at = None
        for index, byte in enumerate(b"X-Slow: " + b"a" * 21):  # one byte every 0.45 fake seconds: 13 s in all
            clock.now += 0.45
            server.deadlines.sweep(clock.now)
            if conn.state != gq.OPEN and refused_at is None:
                refused_at = clock.now
            writer.write(bytes([byte]))  # and the client goes on writing after the 408: no reset for that
            await writer.drain()
            await eventually(lambda: conn.state != gq.OPEN or len(conn.buf) == 24 + index + 1, what="the byte read")
        self.assertIsNotNone(refused_at)
        self.assertGreaterEqual(refused_at, 1010.0)  # not before its time...
        self.assertLess(refused_at, 1010.0 + 0.45 + server.deadlines.tick)  # ...and not extended by the trickle
        response = await asyncio.wait_for(read_response(reader), 5)
        self.assertEqual(response.status, 408)
        self.assertTrue(await closed_by_peer(reader))

    async def test_a_silent_connection_is_closed_after_the_head_timeout(self) -> None:
        clock = FakeClock(1000.0)
        server = await self.start(clock=clock, head_timeout=10.0)
        reader, _ = await self.connect(server)
        await eventually(lambda: len(server.connections) == 1, what="accepted")
        clock.now += 9.9
        server.deadlines.sweep(clock.now)
        self.assertEqual(len(server.connections), 1)
        clock.now += 0.3
        server.deadlines.sweep(clock.now)
        self.assertTrue(await closed_by_peer(reader))
        await eventually(lambda: not server.connections, what="forgotten")

    async def test_idle_keep_alive_is_closed(self) -> None:
        server = await self.start(keepalive_timeout=0.2)
        reader, writer = await self.connect(server)
        writer.write(get("/healthz"))
        await read_response(reader)
        self.assertTrue(await closed_by_peer(reader, timeout=2.0))
        await eventually(lambda: not server.connections, what="forgotten")

    async def test_parked_request_has_no_timeout(self) -> None:
        clock = FakeClock(1000.0)
        server = await self.start(interval=5.0, clock=clock, head_timeout=0.1, keepalive_timeout=0.1)
        reader, writer = await self.connect(server)
        writer.write(get("/?shard=0"))
        await read_response(reader)
        writer.write(get("/?shard=0"))
        await eventually(lambda: server.queue.waiting == 1, what="parked")
        conn = self.only_connection(server)
        self.assertEqual((conn.deadline, conn.tick), (0.0, 0))  # in no slot of the wheel
        clock.now += 1000
        server.deadlines.sweep(clock.now)
        self.assertEqual(server.queue.waiting, 1)
        self.assertFalse(reader.at_eof())

    async def test_trickled_head_is_parsed_in_linear_time(self) -> None:
        server = await self.start(head_timeout=30.0)
        sizes = []
        real = gq.parse_request_head

        def counting(data: bytes, partial: Optional[gq.PartialHead] = None) -> Any:
            sizes.append(len(data) - (partial.checked if partial is not None else 0))
            return real(data, partial)

        with unittest.mock.patch.object(gq, "parse_request_head", counting):
            reader, writer = await self.connect(server)
            head = get("/?shard=0", "X-Long: " + "a" * 3000)
            for start in range(0, len(head), 7):
                writer.write(head[start:start + 7])
                await writer.drain()
                await asyncio.sleep(0)  # let the server read each piece on its own
            response = await asyncio.wait_for(read_response(reader), 5)
            self.assertEqual(response.status, 200)
        self.assertLess(sum(sizes), 3 * len(head))  # each byte looked at a bounded number of times

    async def test_trickled_overlong_lines_still_hit_their_limits(self) -> None:
        server = await self.start(head_timeout=5.0)
        for raw, status in [(b"GET /" + b"a" * (gq.MAX_REQUEST_LINE + 10), 414),
                            (b"GET / HTTP/1.1\r\nX-A: " + b"a" * (gq.MAX_HEAD_BYTES + 10), 431),
                            (b"\r\n" * (gq.MAX_EMPTY_LINES + 1), 400)]:
            reader, writer = await self.connect(server)
            for start in range(0, len(raw), 512):
                writer.write(raw[start:start + 512])
                await asyncio.sleep(0)
            response = await asyncio.wait_for(read_response(reader), 5)
            self.assertEqual(response.status, status)

    async def test_connection_cap_answers_503_and_logs_once(self) -> None:
        server = await self.start(max_connections=2)
        for _ in range(2):
            await self.connect(server)
        await eventually(lambda: len(server.connections) == 2, what="two connections")
        with self.assertLogs("gateway_queue", logging.WARNING) as logs:
            for _ in range(5):
                reader, writer = await self.connect(server)
                response = await asyncio.wait_for(read_response(reader), 5)
                self.assertEqual((response.status, response.headers["connection"]), (503, "close"))
                self.assertTrue(await closed_by_peer(reader))
        self.assertEqual(len([line for line in logs.output if "connection cap" in line]), 1)
        self.assertEqual(server.stats.connections_refused, 5)

    async def test_reserved_paths_are_never_queued(self) -> None:
        server = await self.start()
        server.coordinator.budget = gq.Budget(1, 0, time.monotonic() + 3600)  # nothing could be granted
        parked_reader, parked_writer = await self.connect(server)
        parked_writer.write(get("/?shard=0"))
        await eventually(lambda: server.queue.waiting == 1, what="parked")
        health = await self.ask(server, get("/healthz"))
        self.assertEqual((health.status, health.json()["waiting"]), (200, 1))
        self.assertTrue(health.body.endswith(b"}\n"))
        head = await self.ask(server, get("/healthz", method="HEAD"), head=True)
        self.assertEqual(head.status, 200)
        wrong = await self.ask(server, get("/healthz", method="POST"))
        self.assertEqual((wrong.status, wrong.headers["allow"]), (405, "GET, HEAD"))
        self.assertEqual(server.queue.waiting, 1)

    async def test_a_shard_sent_to_a_reserved_path_is_refused(self) -> None:
        """A QUEUE_URL that points at /healthz, /metrics or /status would get a 200 at once, which a client takes
        for a grant: every shard identifies with no spacing at all. Sent a shard, they answer 400 saying so."""
        server = await self.start(interval=3600.0)
        for path in ("/healthz", "/metrics", "/status"):
            for query in ("?shard=1", "?x=1&shard=0", "??shard=1", "?x=1?shard=1", "?x=1;shard=1", "?SHARD=1",
                          "?%73hard=1"):
                with self.subTest(path=path, query=query):
                    answer = await self.ask(server, get(path + query))
                    self.assertEqual(answer.status, 400)
                    self.assertIn("QUEUE_URL", answer.json()["message"])
        self.assertEqual((await self.ask(server, get("/healthz?verbose=1"))).status, 200)  # other queries: answered
        for query in ("??shard=1", "?x=1?shard=1", "?x=1;shard=1", "?Shard=1", "?%73hard=1"):  # not shard 0's bucket
            with self.subTest(path="/", query=query):
                self.assertEqual((await self.ask(server, get("/" + query))).status, 400)
        self.assertEqual(server.queue.waiting + server.stats.requests["granted"], 0)

    async def test_server_keeps_serving_after_resets(self) -> None:
        server = await self.start()
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.sendall(get("/?shard=0"))
            sock.close()  # RST
        self.assertEqual((await self.ask(server, get("/healthz"))).status, 200)

    async def test_accepted_sockets_keep_tcp_keepalive(self) -> None:
        """A parked shard whose host vanished without a FIN must leave within about two minutes: the kernel's
        keepalive probes are on for every accepted socket (set on the listener, inherited)."""
        server = await self.start()
        reader, writer = await self.connect(server)
        writer.write(get("/?shard=0"))
        await read_response(reader)
        accepted = self.only_connection(server).writer.get_extra_info("socket")
        self.assertEqual(accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            probes = [accepted.getsockopt(socket.IPPROTO_TCP, getattr(socket, name))
                      for name in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT")]
            self.assertEqual(tuple(probes), gq.TCP_KEEPALIVE)
            self.assertLessEqual(probes[0] + probes[1] * probes[2], 130)

    async def test_dual_stack(self) -> None:
        if not socket.has_ipv6:
            self.skipTest("no IPv6 on this machine")
        server = await self.start(host="::")
        for host in ("127.0.0.1", "::1"):
            reader, writer = await self.connect(server, host)
            writer.write(get("/healthz"))
            self.assertEqual((await asyncio.wait_for(read_response(reader), 5)).status, 200, host)


class BackpressureTests(ServerTestCase):
    """Clients that send without reading: bounded output, bounded loop time, descriptors counted until closed."""

    async def slow_reader(self, server: gq.Server) -> Tuple[socket.socket, gq.Connection]:
        """A client that will not read, on a connection whose server side has a tiny send buffer."""
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.setblocking(False)
        self.addCleanup(sock.close)
        await eventually(lambda: len(server.connections) == 1, what="accepted")
        conn = self.only_connection(server)
        conn.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return sock, conn

    async def test_unread_answers_stop_the_pipeline_and_then_the_connection(self) -> None:
        clock = FakeClock(1000.0)
        server = await self.start(clock=clock, send_timeout=10.0)
        baseline = open_fds()
        sock, conn = await self.slow_reader(server)
        answer = len(gq.render_json(200, server.status()))
        sock.send(get("/status") * 300)
        await eventually(lambda: conn.blocked_at, what="output backed up")
        self.assertLessEqual(conn.transport.get_write_buffer_size(), gq.OUTPUT_LIMIT + 2 * answer)
        self.assertGreater(len(conn.buf), 0)  # the rest of the pipeline waits, unanswered
        self.assertEqual(len(server.connections), 1)  # counted while its descriptor is open
        clock.now += 9.5
        server.deadlines.sweep(clock.now)
        self.assertEqual(conn.state, gq.OPEN)
        clock.now += 1.0
        server.deadlines.sweep(clock.now)
        self.assertEqual(conn.state, gq.CLOSED)
        await eventually(lambda: not server.connections, what="the descriptor closed")
        self.assertLessEqual(open_fds(), baseline + 1)  # the client's own socket only

    async def test_a_closing_connection_whose_output_is_not_read_is_aborted(self) -> None:
        """The connection is counted until its descriptor is gone, and a close that cannot flush ends in an abort
        after CLOSE_TIMEOUT (before, close() forgot the connection and its descriptor stayed open for good)."""
        clock = FakeClock(1000.0)
        server = await self.start(clock=clock)
        baseline = open_fds()
        sock, conn = await self.slow_reader(server)
        answer = len(gq.render_json(200, server.status()))
        count = max(1, (gq.OUTPUT_LIMIT - 8192) // answer)
        sock.send(get("/status") * count + get("/healthz", "Connection: close"))
        await eventually(lambda: conn.state == gq.CLOSED, what="closing")
        self.assertGreater(conn.transport.get_write_buffer_size(), 0)  # the client reads nothing
        self.assertEqual(len(server.connections), 1)  # still counted
        clock.now += gq.CLOSE_TIMEOUT + 0.2
        server.deadlines.sweep(clock.now)
        await eventually(lambda: not server.connections, what="aborted")
        self.assertLessEqual(open_fds(), baseline + 1)

    async def test_a_greedy_pipeline_behind_unread_answers_is_dropped(self) -> None:
        server = await self.start()
        sock, conn = await self.slow_reader(server)
        sent = 0
        with contextlib.suppress(BlockingIOError, ConnectionError):
            while sent < 4 * gq.PIPELINE_LIMIT:
                sent += sock.send(get("/status") * 64)
                await asyncio.sleep(0)
        await eventually(lambda: not server.connections, what="dropped")
        self.assertLessEqual(len(conn.buf), gq.PIPELINE_LIMIT + gq.READ_CHUNK)

    async def test_pipelined_operator_views_do_not_hold_the_loop(self) -> None:
        """One write of 300 pipelined /metrics: the connection answers for at most MAX_TURN per loop turn, and a
        scrape walks no connection, descriptor or task."""
        server = await self.start(interval=5.0, max_concurrency=16)
        loop = asyncio.get_running_loop()
        turns = [0]
        probing = [True]

        def probe() -> None:
            turns[0] += 1
            if probing[0]:
                loop.call_soon(probe)

        answered: List[int] = []
        real_metrics = server.metrics

        def metrics() -> bytes:
            answered.append(turns[0])
            return real_metrics()

        with unittest.mock.patch.object(server, "metrics", metrics), \
                unittest.mock.patch.object(os, "listdir", side_effect=AssertionError("listed descriptors")), \
                unittest.mock.patch.object(asyncio, "all_tasks", side_effect=AssertionError("walked tasks")):
            reader, writer = await self.connect(server)
            loop.call_soon(probe)
            writer.write(get("/metrics") * 300)
            for _ in range(300):
                await asyncio.wait_for(read_response(reader), 10)
        probing[0] = False
        per_turn: Dict[int, int] = {}
        for turn in answered:
            per_turn[turn] = per_turn.get(turn, 0) + 1
        self.assertGreater(len(per_turn), 3)  # spread over several turns of the loop
        self.assertLess(max(per_turn.values()), 300)


class ReleaseEndpointTests(ServerTestCase):
    """POST /release over HTTP: the memory coordinator's rules (see LeaseTests) reached through the route."""

    async def lease_server(self, **kwargs: Any) -> gq.Server:
        server = await self.start(interval=5.0, lease_timeout=30.0, **kwargs)
        self.assertEqual(server.config.hold, 35.0)  # a lease of the previous process may still run (LeaseTests)
        server.coordinator.hold_until = -math.inf  # lifted here, to test the route
        return server

    async def test_release_route(self) -> None:
        server = await self.lease_server(auth_token="s3cret-s3cret")
        auth = "Authorization: Bearer s3cret-s3cret"
        self.assertEqual((await self.ask(server, get("/?shard=0", auth))).status, 200)
        parked_reader, parked_writer = await self.connect(server)
        parked_writer.write(get("/?shard=0", auth))
        await eventually(lambda: server.queue.waiting == 1, what="parked behind the lease")
        refused = [
            (get("/release?shard=0", method="POST"), 401),  # the queue route's authentication
            (get("/release?shard=0", auth), 405),  # POST only
            (get("/release", auth, method="POST"), 400),
            (get("/release?shard=x", auth, method="POST"), 400),
            (get("/release?shard=0&outcome=maybe", auth, method="POST"), 400),
            (get("/release?shard=0&outcome=ready&outcome=closed", auth, method="POST"), 400),
            (get("/release?shard=1", auth, method="POST"), 409),
        ]
        for raw, status in refused:
            with self.subTest(raw=raw.split(b"\r\n")[0]):
                response = await self.ask(server, raw)
                self.assertEqual(response.status, status)
                self.assertTrue(response.json()["message"])
        self.assertEqual(server.queue.waiting, 1)  # nothing above moved the line, parked or spent
        ok = await self.ask(server, get("/release?shard=0&outcome=ready", auth, method="POST"))
        self.assertEqual(ok.status, 200)
        self.assertEqual(ok.json()["bucket"], 0)
        again = await self.ask(server, get("/release?shard=0", auth, method="POST"))
        self.assertEqual(again.status, 409)
        self.assertIn("already released", again.json()["message"])
        self.assertEqual(server.queue.waiting, 1)  # the interval runs from the release
        self.assertEqual(server.stats.leases["ready"], 1)

    async def test_status_shows_the_lease(self) -> None:
        server = await self.lease_server()
        self.assertEqual((await self.ask(server, get("/?shard=0"))).status, 200)
        bucket = (await self.ask(server, get("/status"))).json()["buckets"][0]
        self.assertEqual(bucket["lease"]["shard"], 0)
        self.assertAlmostEqual(bucket["lease"]["ends_by"], 30.0, delta=1)
        self.assertEqual(bucket["waiting_for"], gq.LEASE)
        self.assertAlmostEqual(bucket["next_grant_in"], 35.0, delta=1)


# ----------------------------------------------------------------------------------------------------------------
# Operator views
# ----------------------------------------------------------------------------------------------------------------


class OperatorViewHelperTests(unittest.TestCase):
    def test_prefers_html(self) -> None:
        browser = b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        self.assertTrue(gq.prefers_html(browser))
        for accept in (None, b"", b"*/*", b"application/json", b"application/json, text/html",
                       b"text/html;q=0.5, application/json", b"text/*;q=0.2, */*;q=0.5"):
            with self.subTest(accept=accept):
                self.assertFalse(gq.prefers_html(accept))
        self.assertTrue(gq.prefers_html(b"text/*, application/json;q=0.9"))
        self.assertTrue(gq.prefers_html(b"text/html;q=" + b"9" * 500 + b"," * 5000))  # junk quality: ignored, bounded

    def test_describe_seconds(self) -> None:
        cases = [(0, "now"), (0.4, "now"), (1, "about 1 second"), (59.6, "about 1 minute"),
                 (250, "about 4 minutes 10 seconds"), (3 * 3600 + 5 * 60 + 7, "about 3 hours 5 minutes"),
                 (86400 * 2 + 3600, "about 2 days 1 hour"), (math.inf, "not foreseeable"), (None, "not foreseeable"),
                 (1e30, "not foreseeable")]
        for seconds, words in cases:
            self.assertEqual(gq.describe_seconds(seconds), words)

    def test_utc_after_renders_any_time(self) -> None:
        self.assertRegex(gq.utc_after(60), r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        for seconds in (1e17, 1e20, 1e23, math.inf):
            self.assertIsNone(gq.utc_after(seconds))


def parse_exposition(text: str) -> Tuple[dict, dict]:
    """Prometheus text format 0.0.4 into ({family: (type, help)}, {sample name with labels: value}); asserts that
    every sample belongs to a family announced before it."""
    families: dict = {}
    samples: dict = {}
    helps: dict = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, help_text = line[7:].split(" ", 1)
            helps[name] = help_text
        elif line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            assert name in helps, f"TYPE before HELP for {name}"
            families[name] = (kind, helps[name])
        else:
            key, value = line.rsplit(" ", 1)
            name = key.split("{")[0]
            base = next((f for f in (name, name.rsplit("_", 1)[0]) if f in families), None)
            assert base is not None, f"sample {key} outside any family"
            samples[key] = float(value)
    return families, samples


class OperatorViewTests(ServerTestCase):
    async def metrics(self, server: gq.Server, *headers: str) -> Tuple[dict, dict]:
        response = await self.ask(server, get("/metrics", *headers))
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers["content-type"], "text/plain; version=0.0.4; charset=utf-8")
        self.assertTrue(response.body.endswith(b"\n"))
        return parse_exposition(response.body.decode())

    async def test_metric_families_follow_conventions(self) -> None:
        server = await self.start(max_concurrency=2)
        families, samples = await self.metrics(server)
        expected = {
            "gateway_queue_requests_total": "counter", "gateway_queue_waiting_requests": "gauge",
            "gateway_queue_wait_seconds": "histogram", "gateway_queue_open_connections": "gauge",
            "gateway_queue_max_concurrency": "gauge", "gateway_queue_session_starts_remaining": "gauge",
            "gateway_queue_session_start_limit": "gauge", "gateway_queue_session_start_reset_seconds": "gauge",
            "gateway_queue_discord_requests_total": "counter", "gateway_queue_leases_total": "counter",
            "gateway_queue_lease_seconds": "histogram", "gateway_queue_backend_up": "gauge",
            "gateway_queue_http_errors_total": "counter", "gateway_queue_claims_total": "counter",
            "gateway_queue_connections_refused_total": "counter",
        }
        for name, kind in expected.items():
            self.assertEqual(families[name][0], kind, name)
        for name, (kind, _) in families.items():
            self.assertRegex(name, r"^(gateway_queue|process)_[a-z_]+$")
            self.assertEqual(kind == "counter", name.endswith("_total"), name)  # _total is for counters only
        if os.path.exists("/proc/self/stat"):
            for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_start_time_seconds",
                         "process_max_fds"):
                self.assertIn(name, samples)
            self.assertGreater(samples["process_resident_memory_bytes"], 1_000_000)
            self.assertAlmostEqual(samples["process_start_time_seconds"], time.time(), delta=3600)
        self.assertEqual(samples['gateway_queue_waiting_requests{bucket="1"}'], 0)
        self.assertEqual(samples["gateway_queue_max_concurrency"], 2)
        self.assertEqual(samples["gateway_queue_open_connections"], 1)
        self.assertEqual(samples['gateway_queue_backend_up{backend="memory"}'], 1)

    async def test_counters_move_on_grant_cancel_and_reject(self) -> None:
        server = await self.start(interval=5.0)
        await self.ask(server, get("/?shard=0"))  # granted
        reader, writer = await self.connect(server)
        writer.write(get("/?shard=0"))  # parked behind the first
        await eventually(lambda: server.queue.waiting == 1, what="parked")
        _, samples = await self.metrics(server)
        self.assertEqual(samples['gateway_queue_waiting_requests{bucket="0"}'], 1)
        writer.close()  # cancelled
        await eventually(lambda: server.queue.waiting == 0, what="cancelled")
        await self.ask(server, get("/?shard=x"))  # rejected
        _, samples = await self.metrics(server)
        self.assertEqual(samples['gateway_queue_requests_total{outcome="granted"}'], 1)
        self.assertEqual(samples['gateway_queue_requests_total{outcome="cancelled"}'], 1)
        self.assertEqual(samples['gateway_queue_requests_total{outcome="rejected"}'], 1)
        self.assertEqual(samples['gateway_queue_http_errors_total{status="400"}'], 1)
        self.assertEqual(samples['gateway_queue_waiting_requests{bucket="0"}'], 0)

    async def test_wait_histogram_adds_up(self) -> None:
        server = await self.start(interval=0.12)
        await asyncio.gather(*(self.ask(server, get("/?shard=0")) for _ in range(3)))
        _, samples = await self.metrics(server)
        buckets = [(float(key.split('le="')[1].rstrip('"}')), value) for key, value in samples.items()
                   if key.startswith("gateway_queue_wait_seconds_bucket")]
        counts = [value for _, value in sorted(buckets)]
        self.assertEqual(counts, sorted(counts))  # cumulative
        self.assertEqual(samples['gateway_queue_wait_seconds_bucket{le="+Inf"}'], 3)
        self.assertEqual(samples["gateway_queue_wait_seconds_count"], 3)
        self.assertEqual(samples['gateway_queue_wait_seconds_bucket{le="0.1"}'], 1)  # the first went at once
        self.assertGreaterEqual(samples["gateway_queue_wait_seconds_sum"], 0.12 + 0.24)

    async def test_budget_metrics_and_status(self) -> None:
        server = await self.start(interval=5.0, max_concurrency=2)
        server.coordinator.budget = gq.Budget(total=1000, remaining=1, reset_at=time.monotonic() + 3600)
        await self.ask(server, get("/?shard=0"))  # spends the last session start
        parked = [await self.connect(server) for _ in range(3)]
        for shard, (_, writer) in enumerate(parked):
            writer.write(get(f"/?shard={shard + 1}"))
        await eventually(lambda: server.queue.waiting == 3, what="three parked")
        _, samples = await self.metrics(server)
        self.assertEqual(samples["gateway_queue_session_starts_remaining"], 0)
        self.assertEqual(samples["gateway_queue_session_start_limit"], 1000)
        self.assertAlmostEqual(samples["gateway_queue_session_start_reset_seconds"], 3600, delta=5)
        status = (await self.ask(server, get("/status"))).json()
        self.assertEqual(status["session_starts"]["remaining"], 0)
        self.assertEqual(status["waiting"], 3)
        self.assertEqual([b["waiting"] for b in status["buckets"]], [1, 2])
        self.assertAlmostEqual(status["buckets"][0]["next_grant_in"], 3600, delta=5)
        self.assertEqual(status["buckets"][0]["waiting_for"], gq.BUDGET)
        # after the reset: bucket 0 and 1 go together, bucket 1's second one an interval later
        self.assertAlmostEqual(status["estimated_drain_seconds"], 3605, delta=5)
        self.assertEqual(status["limits"], {"source": "environment", "max_concurrency": 2, "identify_interval": 5.0,
                                            "lease_timeout": 0.0})
        self.assertEqual(status["backend"], {"name": "memory", "problem": None})
        self.assertEqual(status["open_connections"], 6)  # 3 parked, and 3 kept alive by ask(): grant, metrics, status

    async def test_status_renders_any_state(self) -> None:
        """A reset 10^20 ms away (once an OSError from gmtime that closed the connection) or one already gone past:
        /status and /metrics answer, with null where no number makes sense."""
        server = await self.start(interval=5.0)
        for reset_in in (1e17, 1e20, -5.0, math.inf):
            with self.subTest(reset_in=reset_in):
                server.coordinator.budget = gq.Budget(total=1000, remaining=0, reset_at=time.monotonic() + reset_in)
                response = await self.ask(server, get("/status"))
                self.assertEqual(response.status, 200)
                self.assertEqual(response.json()["session_starts"]["remaining"], 0)
                html_page = await self.ask(server, get("/status", "Accept: text/html"))
                self.assertEqual(html_page.status, 200)
                self.assertEqual((await self.ask(server, get("/metrics"))).status, 200)

    async def test_status_html_for_browsers(self) -> None:
        import html.parser

        server = await self.start(interval=5.0, max_concurrency=3)
        await self.ask(server, get("/?shard=2"))
        for _ in range(4):
            _, writer = await self.connect(server)
            writer.write(get("/?shard=2"))
        await eventually(lambda: server.queue.waiting == 4, what="four parked")
        accept = "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        response = await self.ask(server, get("/status", accept))
        self.assertEqual(response.headers["content-type"], "text/html; charset=utf-8")

        class Page(html.parser.HTMLParser):
            def __init__(self) -> None:
                super().__init__()
                self.tags: List[Tuple[str, dict]] = []
                self.text: List[str] = []

            def handle_starttag(self, tag: str, attrs: list) -> None:
                self.tags.append((tag, dict(attrs)))

            def handle_data(self, data: str) -> None:
                self.text.append(data)

        page = Page()
        page.feed(response.body.decode())
        page.close()
        text = " ".join(page.text)
        names = [tag for tag, _ in page.tags]
        self.assertNotIn("script", names)
        self.assertFalse([a for _, a in page.tags if any(v and "//" in v for k, v in a.items() if k in ("src", "href"))])
        self.assertIn(("link", {"rel": "icon", "href": "data:,"}), page.tags)  # so a browser asks no /favicon.ico
        self.assertIn(("meta", {"http-equiv": "refresh", "content": str(gq.STATUS_REFRESH)}), page.tags)
        self.assertIn("All 4 waiting requests should be granted in about 20 seconds", text)
        bars = [a["style"] for tag, a in page.tags if tag == "span" and "style" in a]
        self.assertEqual(bars, ["width:0.0%", "width:0.0%", "width:100.0%"])  # one bar per bucket
        self.assertEqual((await self.ask(server, get("/status"))).headers["content-type"], "application/json")


class AuthTests(ServerTestCase):
    SECRET = "correct-horse-battery-staple"

    async def test_requests_need_the_secret(self) -> None:
        with self.assertLogs("gateway_queue", logging.DEBUG) as logs:
            server = await self.start(auth_token=self.SECRET, log_level="DEBUG")
            for target in ("/?shard=0", "/metrics", "/status", "/favicon.ico"):
                for header in ((), ("Authorization: Bearer wrong",), ("Authorization: Basic " + self.SECRET,),
                               ("Authorization: Bearer " + self.SECRET + "x",), ("Authorization: Bearer",)):
                    response = await self.ask(server, get(target, *header))
                    self.assertEqual(response.status, 401, (target, header))
                    self.assertEqual(response.headers["www-authenticate"], 'Bearer realm="gateway-queue"')
                    self.assertNotIn(self.SECRET, response.body.decode())
            self.assertEqual(server.queue.waiting + server.stats.requests["granted"], 0)  # nothing was queued
            response = await self.ask(server, get("/?shard=0", "Authorization: Bearer " + self.SECRET))
            self.assertEqual(response.status, 200)
            response = await self.ask(server, get("/metrics", "Authorization: bearer " + self.SECRET))
            self.assertEqual(response.status, 200)
            self.assertEqual((await self.ask(server, get("/healthz"))).status, 200)  # exempt, for probes
            logging.getLogger("gateway_queue").debug("end of test")
        self.assertNotIn(self.SECRET, "\n".join(logs.output))
        refusals = [line for line in logs.output if "AUTH_TOKEN" in line and "WARNING" in line]
        self.assertEqual(len(refusals), 1)  # 20 refusals, one line: rate-limited

    async def test_a_refused_request_closes_its_connection(self) -> None:
        """Without the secret a client gets one answer per connection: what it pipelined behind is not answered,
        so unauthenticated clients cannot keep connections busy or open."""
        server = await self.start(auth_token=self.SECRET)
        reader, writer = await self.connect(server)
        writer.write(get("/metrics") * 50)
        response = await read_response(reader)
        self.assertEqual((response.status, response.headers["connection"]), (401, "close"))
        self.assertTrue(await closed_by_peer(reader))
        self.assertEqual(server.stats.errors[401], 1)


class LifecycleTests(ServerTestCase):
    async def test_stop_answers_parked_requests_503(self) -> None:
        server = await self.start(interval=5.0)
        await self.ask(server, get("/?shard=0"))
        reader, writer = await self.connect(server)
        writer.write(get("/?shard=0"))
        idle_reader, _ = await self.connect(server)
        await eventually(lambda: server.queue.waiting == 1, what="parked")
        started = time.monotonic()
        await server.stop()
        response = await asyncio.wait_for(read_response(reader), 2)
        self.assertEqual((response.status, response.headers["connection"]), (503, "close"))
        self.assertIn("retry", response.json()["message"])
        self.assertTrue(await closed_by_peer(idle_reader))
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertEqual(server.stats.requests["rejected"], 1)

    async def test_limits_learned_from_discord(self) -> None:
        fake = FakeDiscord([(200, {}, gateway_body(max_concurrency=4, remaining=500), 0)])
        self.addCleanup(fake.close)
        server = await self.start(token=TOKEN, api_url=fake.url, interval=5.0)
        await eventually(lambda: server.limits_source == "discord", what="Discord's answer")
        self.assertEqual(server.queue.max_concurrency, 4)
        results = await asyncio.gather(*(self.ask(server, get(f"/?shard={s}")) for s in range(4)))
        self.assertEqual([r.status for r in results], [200] * 4)
        self.assertEqual(server.coordinator.budget.remaining, 496)

    async def test_serves_with_fallback_until_discord_answers(self) -> None:
        fake = FakeDiscord([(503, {}, b"down", 0)])
        self.addCleanup(fake.close)
        server = await self.start(token=TOKEN, api_url=fake.url, interval=5.0)
        response = await self.ask(server, get("/?shard=5"))
        self.assertEqual(response.status, 200)
        self.assertEqual((server.limits_source, server.queue.max_concurrency, server.coordinator.budget), ("fallback", 1, None))

    async def test_refused_token_stops_the_service_without_leaking_it(self) -> None:
        fake = FakeDiscord([(401, {}, b'{"message": "401: Unauthorized"}', 0)])
        self.addCleanup(fake.close)
        config = gq.Config(host="127.0.0.1", port=0, token=TOKEN, api_url=fake.url)
        with self.assertLogs("gateway_queue", logging.DEBUG) as logs:
            code = await asyncio.wait_for(gq.Server(config).run(), 5)
        self.assertEqual(code, 1)
        text = "\n".join(logs.output)
        self.assertIn("DISCORD_TOKEN", text)
        self.assertNotIn(TOKEN, text)
        self.assertEqual(len(fake.requests), 1)  # never retried

    async def test_bind_failure_is_reported(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            config = gq.Config(host="127.0.0.1", port=sock.getsockname()[1])
            with self.assertLogs("gateway_queue", logging.ERROR) as logs:
                self.assertEqual(await gq.Server(config).run(), 1)
        self.assertIn("PORT", logs.output[0])


# ----------------------------------------------------------------------------------------------------------------
# Command line and the real process
# ----------------------------------------------------------------------------------------------------------------


class CommandLineTests(unittest.TestCase):
    def run_main(self, argv: List[str], environ: dict) -> Tuple[int, str]:
        stderr = io.StringIO()
        with unittest.mock.patch.dict(os.environ, environ, clear=True), contextlib.redirect_stderr(stderr):
            try:
                code = gq.main(argv)
            except SystemExit as exit:
                code = exit.code
        return code, stderr.getvalue()

    def test_bad_environment_exits_2_naming_the_variable(self) -> None:
        for environ, name in [({"IDENTIFY_INTERVAL": "4", "DISCORD_TOKEN": TOKEN}, "IDENTIFY_INTERVAL"),
                              ({"PORT": "9" * 5000}, "PORT"), ({"REDIS_URL": "redis://:pw-pw-pw@h:0"}, "REDIS_URL"),
                              ({"HOST": "nonsense.invalid"}, "HOST")]:
            with self.subTest(name=name):
                code, err = self.run_main([], environ)
                self.assertEqual(code, 2)
                self.assertIn(name, err)
                self.assertEqual(len(err.strip().splitlines()), 1)
                self.assertNotIn(TOKEN, err)
                self.assertNotIn("pw-pw-pw", err)

    def test_flags_override_environment(self) -> None:
        code, err = self.run_main(["--port", "http"], {"PORT": "80"})
        self.assertEqual(code, 2)
        self.assertIn("PORT", err)

    def test_help_lists_every_variable_with_its_default(self) -> None:
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code, _ = self.run_main(["--help"], {})
        self.assertEqual(code, 0)
        for name, default in [("HOST", "127.0.0.1"), ("PORT", "5000"), ("IDENTIFY_INTERVAL", "5.1"),
                              ("STARTUP_HOLD", "IDENTIFY_INTERVAL"), ("LEASE_TIMEOUT", "0"), ("REDIS_URL", "unset"),
                              ("REDIS_PREFIX", "gateway-queue:"), ("MAX_CONCURRENCY", "1"), ("AUTH_TOKEN", "unset")]:
            line = next(line for line in stdout.getvalue().splitlines() if line.strip().startswith(name))
            self.assertIn(default, line)

    def test_healthcheck_fails_without_a_service(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        code, err = self.run_main(["--healthcheck"], {"PORT": str(port)})
        self.assertEqual(code, 1)

    def test_healthcheck_with_a_bad_configuration_exits_1(self) -> None:
        code, err = self.run_main(["--healthcheck"], {"PORT": "nope"})
        self.assertEqual(code, 1)  # Docker reserves 2 for health checks
        self.assertIn("PORT", err)


class ProcessTests(unittest.TestCase):
    """The real process: start, answer, signals, descriptors."""

    def start(self, **environ: str) -> Tuple[subprocess.Popen, int]:
        proc, port = service_process(environ)
        self.addCleanup(stop_process, proc)
        self.addCleanup(proc.stderr.close)
        return proc, port

    def test_sigterm_answers_parked_and_exits_0(self) -> None:
        proc, port = self.start(IDENTIFY_INTERVAL="60", STARTUP_HOLD="0")
        first = socket.create_connection(("127.0.0.1", port))
        first.sendall(get("/?shard=0"))
        self.assertIn(b"200 OK", first.recv(4096))
        parked = socket.create_connection(("127.0.0.1", port))
        parked.sendall(get("/?shard=0"))
        time.sleep(0.2)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(5), 0)
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertIn(b"503 Service Unavailable", parked.recv(4096))
        first.close()
        parked.close()
        self.assertNotIn("Traceback", proc.stderr.read())  # a shutdown with open connections is quiet

    def test_a_second_signal_during_shutdown_is_harmless(self) -> None:
        """Two SIGTERMs (or SIGINTs) 2-20 ms apart used to kill the process with -15 (-2): the second landed after
        asyncio had removed its handler. Now the exit code is 0 and the parked client still gets its 503."""
        for sig, gap in [(signal.SIGTERM, 0.002), (signal.SIGTERM, 0.01), (signal.SIGINT, 0.005), (signal.SIGTERM, 0.02),
                         (signal.SIGINT, 0.02), (signal.SIGTERM, 0.0)]:
            with self.subTest(signal=sig.name, gap=gap):
                proc, port = self.start(IDENTIFY_INTERVAL="60", STARTUP_HOLD="60")
                parked = socket.create_connection(("127.0.0.1", port))
                self.addCleanup(parked.close)
                parked.sendall(get("/?shard=0"))
                time.sleep(0.1)
                proc.send_signal(sig)
                time.sleep(gap)
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
                self.assertEqual(proc.wait(5), 0)
                self.assertIn(b"503 Service Unavailable", parked.recv(4096))
                self.assertNotIn("Traceback", proc.stderr.read())

    def test_loop_closing_with_open_connections_is_quiet(self) -> None:
        code = (
            "import asyncio, gateway_queue as gq\n"
            "async def main():\n"
            "    server = gq.Server(gq.Config(port=0, interval=60, startup_hold=0))\n"
            "    await server.start()\n"
            "    streams = [await asyncio.open_connection('127.0.0.1', server.port) for _ in range(3)]\n"
            "    for _, writer in streams: writer.write(b'GET /?shard=0 HTTP/1.1\\r\\nHost: q\\r\\n\\r\\n')\n"
            "    await asyncio.sleep(0.1)\n"
            "asyncio.run(main())\n"  # returns with connections open: asyncio.run cancels their tasks
        )
        done = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=20)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertNotIn("Traceback", done.stderr)

    def test_healthcheck_mode(self) -> None:
        proc, port = self.start()
        env = {"PATH": os.environ.get("PATH", ""), "PORT": str(port)}
        check = subprocess.run([sys.executable, os.path.join(HERE, "gateway_queue.py"), "--healthcheck"], env=env, timeout=10)
        self.assertEqual(check.returncode, 0)
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait(5), 0)

    def test_a_burst_beyond_the_descriptors_is_quiet_and_recovers(self) -> None:
        """1,000 connections at once against a limit of 300 descriptors: refused or answered 503, at most a few
        warning lines and no traceback, and the service answers again as soon as the burst is gone."""
        proc, port = service_process({"STARTUP_HOLD": "0"}, limit_fds=300)
        self.addCleanup(stop_process, proc)
        lines = collect_stderr(proc)
        sockets = []
        for _ in range(1000):
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", port))
            sockets.append(sock)
        time.sleep(2.5)
        for sock in sockets:
            sock.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                answer = raw_request(port, get("/healthz"), timeout=2)
                if b"200 OK" in answer:
                    break
            except OSError:
                pass
            self.assertLess(time.monotonic(), deadline, "the service did not answer again")
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(5), 0)
        text = "".join(lines)
        self.assertNotIn("Traceback", text)
        self.assertLessEqual(len([line for line in lines if " WARNING " in line or " ERROR " in line]), 4)

# ----------------------------------------------------------------------------------------------------------------
# The client recipes: examples/ run as real bots against a Discord stand-in
# ----------------------------------------------------------------------------------------------------------------
#
# A Discord stand-in on loopback: just enough REST and gateway for a bot library to log in and IDENTIFY.
# It judges every IDENTIFY by Discord's rule, records it, and answers a violation the way Discord does, so a test can
# run a real discord.py or @discordjs/ws bot against it and assert that no shard identified too early.
#
#     REST (any Authorization accepted, unless `token` is set)
#         GET /api/v{N}/gateway/bot                  {"url": "ws://127.0.0.1:<port>/", "shards", "session_start_limit"}
#         GET /api/v{N}/gateway                      {"url": ...}
#         GET /api/v{N}/users/@me                    the bot user
#         GET /api/v{N}/oauth2/applications/@me      the application (discord.py's login asks for it)
#         anything else                              404, recorded
#     Gateway (any path with Upgrade: websocket; `?compress=zlib-stream` turns on transport compression)
#         HELLO (op 10) at once; HEARTBEAT (op 1) -> ACK (op 11); IDENTIFY (op 2) -> READY (op 0) after `ready_delay`;
#         RESUME (op 6) of a known session -> RESUMED, of an unknown one -> INVALID_SESSION (d false)
#
# The rule, as Discord's: an IDENTIFY less than `min_gap` (5.0 s) after the previous IDENTIFY in its bucket
# (shard_id % max_concurrency) gets INVALID_SESSION (op 9, d false) and counts as a violation. With `strict`, an IDENTIFY
# less than `min_gap` after the READY that answered the bucket's previous IDENTIFY is one too: Discord never says which
# of the two it times from, and a queue that holds a bucket until READY (lease mode) passes both.
#
# Use it in a test's event loop (`await standin.start()` ... `await standin.close()`, or `async with`), or in a thread
# of its own (`with standin.running_in_thread():`). `snapshot()` is safe to call from any thread.
# Run alone: python3 standin.py --shards 8 --max-concurrency 1    (prints the REST base, logs every IDENTIFY)
#
# Known omissions: no TLS, no ETF encoding, no zstd (a client asking for another compression gets plain text frames,
# which every library reads), no dispatch events but READY and RESUMED, no session-start budget enforcement.

standin_log = logging.getLogger("standin")

# -- limits
# ----------------------------------------------------------------------------------------------------------------

STANDIN_MIN_GAP = 5.0  # Discord: one IDENTIFY per 5 s per bucket
STANDIN_HEARTBEAT_MS = 41250  # what Discord sends today
STANDIN_MAX_HEAD = 16 * 1024  # an HTTP request head; bot libraries send well under 1 KiB
STANDIN_MAX_BODY = 64 * 1024  # no call here takes a body; a bigger one is refused
STANDIN_MAX_MESSAGE = 1024 * 1024  # one gateway message from a client; IDENTIFY is under 1 KiB
STANDIN_HEAD_TIMEOUT = 10.0  # a request head slower than this is dropped
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3

STANDIN_USER = {
    "id": "100000000000000001", "username": "standin", "discriminator": "0", "global_name": None, "avatar": None,
    "bot": True, "flags": 0, "verified": True, "mfa_enabled": False,
}
STANDIN_APPLICATION = {
    "id": "100000000000000002", "name": "standin", "description": "", "icon": None, "bot_public": True,
    "bot_require_code_grant": False, "owner": STANDIN_USER, "verify_key": "00" * 32, "flags": 0, "summary": "",
}

# RFC 6455 opcodes, and the gateway's
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
GW_DISPATCH, GW_HEARTBEAT, GW_IDENTIFY, GW_RESUME, GW_INVALID_SESSION, GW_HELLO, GW_ACK = 0, 1, 2, 6, 9, 10, 11


class WebSocketError(Exception):
    """A peer broke HTTP or RFC 6455; carries the WebSocket close code to send."""

    def __init__(self, message: str, close_code: int = 1002) -> None:
        super().__init__(message)
        self.close_code = close_code


# ----------------------------------------------------------------------------------------------------------------
# Discord stand-in: records
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StandInIdentify:
    """One IDENTIFY as the stand-in judged it. `at` is time.monotonic(); `gap` is from the bucket's previous one."""

    at: float
    shard: int
    shard_count: int
    bucket: int
    accepted: bool
    gap: Optional[float]  # seconds since the bucket's previous IDENTIFY, None for its first
    gap_from_ready: Optional[float]  # seconds since the READY that answered it, None if none was sent
    reason: str  # "" when accepted


@dataclasses.dataclass(frozen=True)
class StandInSnapshot:
    """A consistent copy of everything recorded so far."""

    identifies: Tuple[StandInIdentify, ...]
    connections: int  # gateway WebSocket connections accepted
    readies: int
    resumes: int
    rest: Tuple[Tuple[str, str, int], ...]  # (method, path, status) per REST request

    @property
    def violations(self) -> Tuple[StandInIdentify, ...]:
        return tuple(i for i in self.identifies if not i.accepted)


# ----------------------------------------------------------------------------------------------------------------
# Discord stand-in: REST and the rule
# ----------------------------------------------------------------------------------------------------------------


class DiscordStandIn:
    """REST and gateway on one loopback port. Every option has Discord's value by default but `ready_delay`."""

    def __init__(
        self,
        *,
        shards: int = 1,
        max_concurrency: int = 1,
        min_gap: float = STANDIN_MIN_GAP,
        ready_delay: float = 0.0,
        strict: bool = False,
        token: Optional[str] = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.shards, self.max_concurrency, self.min_gap = shards, max_concurrency, min_gap
        self.ready_delay, self.strict, self.token = ready_delay, strict, token
        self.host, self.port = host, port
        self._server: Optional[asyncio.AbstractServer] = None
        self._tasks: set = set()
        # shared with snapshot(), which may run in another thread
        self._lock = threading.Lock()
        self._identifies: List[StandInIdentify] = []
        self._rest: List[Tuple[str, str, int]] = []
        self._connections = self._readies = self._resumes = 0
        # bucket -> time of its last IDENTIFY, and of the READY that answered it
        self._last_identify: Dict[int, float] = {}
        self._last_ready: Dict[int, float] = {}
        self._sessions: Dict[str, Tuple[int, int]] = {}  # session_id -> (shard, shard_count)

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Binds and serves; `self.port` is the bound port afterwards."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stops listening and drops every open connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> "DiscordStandIn":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    @contextlib.contextmanager
    def running_in_thread(self) -> Iterator["DiscordStandIn"]:
        """Serves from a daemon thread with its own event loop until the block ends."""
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        stop: Optional[asyncio.Future] = None

        async def main() -> None:
            nonlocal stop
            stop = loop.create_future()
            await self.start()
            ready.set()
            await stop
            await self.close()

        thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True, name="standin")
        thread.start()
        ready.wait(10)
        try:
            yield self
        finally:
            loop.call_soon_threadsafe(lambda: stop is not None and not stop.done() and stop.set_result(None))
            thread.join(10)
            loop.close()

    @property
    def api_base(self) -> str:
        """The REST base a library is pointed at, without the version: http://127.0.0.1:<port>/api"""
        return f"http://{self.host}:{self.port}/api"

    @property
    def gateway_url(self) -> str:
        return f"ws://{self.host}:{self.port}/"

    def snapshot(self) -> StandInSnapshot:
        with self._lock:
            return StandInSnapshot(tuple(self._identifies), self._connections, self._readies, self._resumes,
                            tuple(self._rest))

    # -- HTTP ----------------------------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            while True:
                head = await self._read_head(reader)
                if head is None:
                    return
                method, target, headers = head
                length = int(headers.get("content-length", "0") or "0")
                if length > STANDIN_MAX_BODY:
                    return
                if length:
                    await reader.readexactly(length)
                if headers.get("upgrade", "").lower() == "websocket":
                    await StandInGateway(self, reader, writer, target, headers).run()
                    return
                status, body = self._rest_answer(method, target, headers)
                data = json.dumps(body).encode()
                writer.write(
                    f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(data)}\r\n\r\n".encode() + data
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, WebSocketError, ValueError, asyncio.TimeoutError):
            pass
        except asyncio.CancelledError:  # close(): end quietly (3.11's start_server callback chokes on a cancelled task)
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader) -> Optional[Tuple[str, str, Dict[str, str]]]:
        """One request head as (method, target, lower-cased headers); None at a clean EOF between requests."""
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STANDIN_HEAD_TIMEOUT)
        except asyncio.IncompleteReadError as error:
            if error.partial:
                raise WebSocketError("truncated request head") from None
            return None
        except asyncio.LimitOverrunError:
            raise WebSocketError("request head too large") from None
        if len(raw) > STANDIN_MAX_HEAD:
            raise WebSocketError("request head too large")
        lines = raw.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return method, target, headers

    def _rest_answer(self, method: str, target: str, headers: Dict[str, str]) -> Tuple[int, Any]:
        path = urllib.parse.urlsplit(target).path
        parts = path.split("/")  # "", "api", "v10", ...
        route = "/" + "/".join(parts[3:]) if len(parts) > 3 and parts[1] == "api" else path
        if self.token is not None and headers.get("authorization") != f"Bot {self.token}":
            status, body = 401, {"message": "401: Unauthorized", "code": 0}
        elif method == "GET" and route == "/gateway/bot":
            status, body = 200, {
                "url": self.gateway_url, "shards": self.shards,
                "session_start_limit": {"total": 1000, "remaining": 1000, "reset_after": 86_400_000,
                                        "max_concurrency": self.max_concurrency},
            }
        elif method == "GET" and route == "/gateway":
            status, body = 200, {"url": self.gateway_url}
        elif method == "GET" and route == "/users/@me":
            status, body = 200, STANDIN_USER
        elif method == "GET" and route == "/oauth2/applications/@me":
            status, body = 200, STANDIN_APPLICATION
        else:
            status, body = 404, {"message": "404: Not Found", "code": 0}
        with self._lock:
            self._rest.append((method, path, status))
        if status != 200:
            standin_log.info("REST %s %s -> %d", method, path, status)
        return status, body

    # -- the rule ------------------------------------------------------------------------------------------------

    def judge_identify(self, shard: int, shard_count: int) -> StandInIdentify:
        """Records an IDENTIFY now and says whether Discord's rule lets it through."""
        now = time.monotonic()
        bucket = shard % self.max_concurrency
        with self._lock:
            previous, ready = self._last_identify.get(bucket), self._last_ready.get(bucket)
            gap = None if previous is None else now - previous
            gap_from_ready = None if ready is None or previous is None or ready < previous else now - ready
            reason = ""
            if gap is not None and gap < self.min_gap:
                reason = f"{gap:.3f} s after the bucket's previous IDENTIFY"
            elif self.strict and gap_from_ready is not None and gap_from_ready < self.min_gap:
                reason = f"{gap_from_ready:.3f} s after the READY of the bucket's previous IDENTIFY"
            record = StandInIdentify(now, shard, shard_count, bucket, not reason, gap, gap_from_ready, reason)
            self._identifies.append(record)
            self._last_identify[bucket] = now
        if reason:
            standin_log.warning("shard %d IDENTIFY refused: %s", shard, reason)
        else:
            standin_log.info("shard %d IDENTIFY accepted (bucket %d, gap %s)", shard, bucket,
                     "-" if gap is None else f"{gap:.3f} s")
        return record

    def note_ready(self, shard: int, session_id: str, shard_count: int) -> None:
        with self._lock:
            self._last_ready[shard % self.max_concurrency] = time.monotonic()
            self._sessions[session_id] = (shard, shard_count)
            self._readies += 1

    def note_connection(self) -> None:
        with self._lock:
            self._connections += 1

    def resume_session(self, session_id: Any) -> Optional[Tuple[int, int]]:
        with self._lock:
            self._resumes += 1
            return self._sessions.get(session_id) if isinstance(session_id, str) else None


# ----------------------------------------------------------------------------------------------------------------
# Discord stand-in: the gateway
# ----------------------------------------------------------------------------------------------------------------


class StandInGateway:
    """One gateway WebSocket: RFC 6455 framing, optional zlib-stream, and the opcodes a bot needs to get READY."""

    def __init__(self, standin: DiscordStandIn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 target: str, headers: Dict[str, str]) -> None:
        self.standin, self.reader, self.writer, self.headers = standin, reader, writer, headers
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)
        self.compressor = zlib.compressobj() if query.get("compress") == ["zlib-stream"] else None
        self.sequence = 0
        self.ready_task: Optional[asyncio.Task] = None

    async def run(self) -> None:
        key = self.headers.get("sec-websocket-key", "")
        if self.headers.get("sec-websocket-version") != "13" or len(base64.b64decode(key, validate=True)) != 16:
            self.writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nSec-WebSocket-Version: 13\r\n\r\n")
            return
        accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()
        self.writer.write(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode()
        )
        self.standin.note_connection()
        await self.send({"op": GW_HELLO, "d": {"heartbeat_interval": STANDIN_HEARTBEAT_MS}, "s": None, "t": None})
        try:
            while True:
                message = await self.receive()
                if message is None:
                    return
                await self.handle(json.loads(message))
        except WebSocketError as error:
            standin_log.info("gateway: %s", error)
            await self.close_frame(error.close_code)
        finally:
            if self.ready_task is not None:
                self.ready_task.cancel()

    async def handle(self, payload: Dict[str, Any]) -> None:
        op, data = payload.get("op"), payload.get("d")
        if op == GW_HEARTBEAT:
            await self.send({"op": GW_ACK, "d": None, "s": None, "t": None})
        elif op == GW_IDENTIFY:
            shard, count = (data.get("shard") or [0, 1])[:2]
            if not self.standin.judge_identify(shard, count).accepted:
                await self.send({"op": GW_INVALID_SESSION, "d": False, "s": None, "t": None})
            else:
                self.ready_task = asyncio.ensure_future(self.ready(shard, count))
        elif op == GW_RESUME:
            known = self.standin.resume_session((data or {}).get("session_id"))
            if known is None:
                await self.send({"op": GW_INVALID_SESSION, "d": False, "s": None, "t": None})
            else:
                await self.dispatch("RESUMED", {})

    async def ready(self, shard: int, count: int) -> None:
        await asyncio.sleep(self.standin.ready_delay)
        session_id = secrets.token_hex(16)
        self.standin.note_ready(shard, session_id, count)
        await self.dispatch("READY", {
            "v": 10, "user": STANDIN_USER, "guilds": [], "session_id": session_id,
            "resume_gateway_url": self.standin.gateway_url, "shard": [shard, count],
            "application": {"id": STANDIN_APPLICATION["id"], "flags": 0},
        })

    async def dispatch(self, event: str, data: Dict[str, Any]) -> None:
        self.sequence += 1
        await self.send({"op": GW_DISPATCH, "d": data, "s": self.sequence, "t": event})

    # -- RFC 6455 framing ------------------------------------------------------------------------------------------

    async def send(self, payload: Dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        if self.compressor is not None:  # zlib-stream: one deflate stream per connection, each message sync-flushed
            await self.frame(OP_BINARY, self.compressor.compress(data) + self.compressor.flush(zlib.Z_SYNC_FLUSH))
        else:
            await self.frame(OP_TEXT, data)

    async def frame(self, opcode: int, data: bytes) -> None:
        """Writes one unmasked final frame (servers never mask)."""
        if self.writer.is_closing():
            return
        size = len(data)
        if size < 126:
            head = struct.pack("!BB", 0x80 | opcode, size)
        elif size < 1 << 16:
            head = struct.pack("!BBH", 0x80 | opcode, 126, size)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 127, size)
        self.writer.write(head + data)
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def close_frame(self, code: int) -> None:
        await self.frame(OP_CLOSE, struct.pack("!H", code))

    async def receive(self) -> Optional[str]:
        """The next text or binary message, answering pings and closes on the way; None once closed."""
        parts: List[bytes] = []
        while True:
            first, second = await self.reader.readexactly(2)
            fin, opcode, masked, size = first & 0x80, first & 0x0F, second & 0x80, second & 0x7F
            if first & 0x70:
                raise WebSocketError("reserved bits set (no extension was negotiated)")
            if not masked:
                raise WebSocketError("client frames must be masked")  # RFC 6455 section 5.1
            if size == 126:
                (size,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif size == 127:
                (size,) = struct.unpack("!Q", await self.reader.readexactly(8))
            if opcode >= 0x8 and (size > 125 or not fin):
                raise WebSocketError("control frames are final and at most 125 bytes")
            if size + sum(map(len, parts)) > STANDIN_MAX_MESSAGE:
                raise WebSocketError("message too big", 1009)
            mask = await self.reader.readexactly(4)
            body = bytes(b ^ mask[i % 4] for i, b in enumerate(await self.reader.readexactly(size)))
            if opcode == OP_PING:
                await self.frame(OP_PONG, body)
            elif opcode == OP_PONG:
                pass
            elif opcode == OP_CLOSE:
                await self.frame(OP_CLOSE, body[:2])  # echo the code, as RFC 6455 section 5.5.1 asks
                return None
            elif (opcode in (OP_TEXT, OP_BINARY) and not parts) or (opcode == OP_CONTINUATION and parts):
                parts.append(body)
                if fin:
                    return b"".join(parts).decode("utf-8")
            else:
                raise WebSocketError(f"unexpected opcode {opcode} here")


# ----------------------------------------------------------------------------------------------------------------
# The recipes, run for real
# ----------------------------------------------------------------------------------------------------------------
#
# Each recipe in examples/ runs unchanged as a real bot (discord.py, @discordjs/ws) against the stand-in, through
# gateway_queue.py started as its own process with the environment's 5 s floor (IDENTIFY_INTERVAL 5.1, as users run
# it): no shard may identify too early, a refused request must stop the bot with an error the user sees (no reconnect
# loop), a wait longer than the HTTP client's default timeout must not be cut short, and a queue restarted mid-run
# must not double-grant. All scenarios run at once (about a minute); the assertions then read their results.
#
# The libraries come from .ci/run: GATEWAY_QUEUE_DISCORD_PY (a python with discord.py 2.x) and
# GATEWAY_QUEUE_NODE_MODULES (a directory holding node_modules/@discordjs/{ws,rest} 2.x). Without them, these tests
# skip with the reason; under CI=true they fail instead.

EXAMPLES = os.path.join(HERE, "examples")
RECIPE_TOKEN = "standin.bot.token"
RECIPE_SECRET = "queue-secret"  # the queue's AUTH_TOKEN
RECIPE_INTERVAL = 5.1  # the queue's IDENTIFY_INTERVAL: its default
LOOP_WINDOW = 15.0  # seconds a refused bot is watched: the reported loop made 56 connections in 15 s
AFTER_EXIT = 2.0  # seconds a bot that exited is still watched for stray connections
SHORT_TIMEOUT = 2.0  # the HTTP client's default timeout, shortened, in the long-wait cases
RECIPE_LEASE_TIMEOUT = 10.0  # the queue's, in the lease cases (a fresh queue then holds 10 + 5.1 s)
STAGGER = 0.7  # seconds between two scenarios' starts, so that their grant rounds (every 5.1 s) do not coincide

DPY_DRIVER = '''"""Runs a discord.py recipe unchanged against the stand-in: python driver.py RECIPE.py
STANDIN_URL: the stand-in; DRIVER_CLIENT=plain: a discord.Client with the recipe's mixin (DRIVER_SHARD and
DRIVER_SHARD_COUNT when set); DRIVER_AIOHTTP_TOTAL: aiohttp's default total timeout (300 s), shortened."""
import os, runpy, sys
import aiohttp, aiohttp.client, discord, discord.gateway, discord.http, yarl

recipe = os.path.abspath(sys.argv[1])
base = os.environ["STANDIN_URL"]
discord.http.Route.BASE = f"{base}/api/v10"
discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(base.replace("http://", "ws://", 1) + "/")
if os.environ.get("DRIVER_AIOHTTP_TOTAL"):  # ClientSession reads this module global when given no timeout
    aiohttp.client.DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=float(os.environ["DRIVER_AIOHTTP_TOTAL"]), sock_connect=30)
sys.path.insert(0, os.path.dirname(recipe))
if os.environ.get("DRIVER_CLIENT", "auto") == "auto":
    runpy.run_path(recipe, run_name="__main__")
else:
    namespace = runpy.run_path(recipe)
    mixin = namespace.get("GatewayQueueLeaseMixin") or namespace["GatewayQueueMixin"]
    options = {}
    if os.environ.get("DRIVER_SHARD"):
        options = {"shard_id": int(os.environ["DRIVER_SHARD"]), "shard_count": int(os.environ["DRIVER_SHARD_COUNT"])}
    type("PlainBot", (mixin, discord.Client), {})(intents=discord.Intents.default(), **options).run(os.environ["DISCORD_TOKEN"])
'''
JS_PRELOAD = """// node --import ./setup.mjs RECIPE.mjs: points @discordjs/rest at the stand-in; DRIVER_HEADERS_TIMEOUT_MS shortens
// undici's headersTimeout (300 s), which global fetch uses, to show which timeout a recipe depends on.
import process from 'node:process';
import { DefaultRestOptions } from '@discordjs/rest';
DefaultRestOptions.api = `${process.env.STANDIN_URL}/api`;
if (process.env.DRIVER_HEADERS_TIMEOUT_MS) {
  const { Agent, setGlobalDispatcher } = await import('undici');
  const ms = Number(process.env.DRIVER_HEADERS_TIMEOUT_MS);
  setGlobalDispatcher(new Agent({ headersTimeout: ms, bodyTimeout: ms }));
}
"""


def discord_py() -> Tuple[Optional[str], str]:
    """A python with discord.py, and why not when there is none."""
    python = os.environ.get("GATEWAY_QUEUE_DISCORD_PY")
    if not python:
        return None, "GATEWAY_QUEUE_DISCORD_PY is unset (.ci/run installs discord.py into a throwaway venv)"
    probe = subprocess.run([python, "-c", "import discord, aiohttp"], capture_output=True, text=True)
    if probe.returncode:
        return None, f"{python} cannot import discord.py: {probe.stderr.strip()[-200:]}"
    return python, ""


def node_modules() -> Tuple[Optional[str], str]:
    """A directory whose node_modules holds @discordjs/ws and @discordjs/rest, and why not when there is none."""
    folder = os.environ.get("GATEWAY_QUEUE_NODE_MODULES")
    if not shutil.which("node"):
        return None, "node is not installed"
    if not folder:
        return None, "GATEWAY_QUEUE_NODE_MODULES is unset (.ci/run installs @discordjs/ws into a throwaway place)"
    for package in ("@discordjs/ws", "@discordjs/rest", "undici"):
        if not os.path.exists(os.path.join(folder, "node_modules", package, "package.json")):
            return None, f"{folder}/node_modules has no {package}"
    return folder, ""


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    lang: str  # "py" or "js"
    recipe: str  # a file in examples/
    shards: int = 8  # what the stand-in's /gateway/bot says
    max_concurrency: int = 1
    secret: str = RECIPE_SECRET  # what the bot sends as QUEUE_AUTH_TOKEN
    expect: str = "ready"  # ready: every shard READY; exit: the bot stops by itself
    lease: bool = False  # the queue runs with LEASE_TIMEOUT
    strict: bool = False  # the stand-in times from the previous READY too
    ready_delay: float = 0.0
    restart_after: int = 0  # restart the queue (SIGTERM, then a new process on the same port) after this many READYs
    env: Tuple[Tuple[str, str], ...] = ()
    deadline: float = 90.0
    runs: Optional[int] = None  # shards the bot runs, when not all (a plain Client runs one)

    @property
    def running(self) -> int:
        return self.shards if self.runs is None else self.runs


@dataclasses.dataclass
class Outcome:
    scenario: Scenario
    snapshot: "StandInSnapshot"
    queue: Dict[str, float]  # granted, cancelled, rejected, and lease_<outcome>, summed over the queue's processes
    exit_code: Optional[int]  # None: it was still running and got stopped
    stderr: str
    elapsed: float  # bot start to the last READY, or to its exit

    def summary(self) -> str:
        gaps = [i.gap for i in self.snapshot.identifies if i.gap is not None]
        return (f"{self.scenario.name}: {self.elapsed:.1f} s, {len(self.snapshot.identifies)} IDENTIFY, "
                f"{len(self.snapshot.violations)} refused, {self.snapshot.readies} READY, "
                f"{self.snapshot.connections} connections, smallest gap {min(gaps) if gaps else None}, queue {self.queue}, "
                f"exit {self.exit_code}")


PY, PY_LEASE, JS, JS_LEASE = "discord_py_queue.py", "discord_py_queue_lease.py", "discordjs_ws_queue.mjs", \
    "discordjs_ws_queue_lease.mjs"
SCENARIOS = [  # the longest first: they set the wall time (8 shards at max_concurrency 1: 7 intervals after the first)
    Scenario("py-8-mc1", "py", PY),
    Scenario("js-8-mc1", "js", JS),
    Scenario("py-lease-strict", "py", PY_LEASE, shards=4, lease=True, strict=True, ready_delay=1.5),
    Scenario("js-lease-strict", "js", JS_LEASE, shards=4, lease=True, strict=True, ready_delay=1.5),
    Scenario("py-no-lease-strict", "py", PY, shards=4, strict=True, ready_delay=1.5),
    Scenario("py-restart", "py", PY, shards=4, restart_after=2),
    Scenario("js-restart", "js", JS, shards=4, restart_after=2),
    Scenario("py-plain-lease", "py", PY_LEASE, shards=1, lease=True, strict=True, ready_delay=1.5,
             env=(("DRIVER_CLIENT", "plain"),)),
    Scenario("py-long-wait", "py", PY, shards=3, env=(("DRIVER_AIOHTTP_TOTAL", str(SHORT_TIMEOUT)),)),
    Scenario("js-long-wait", "js", JS, shards=3, env=(("DRIVER_HEADERS_TIMEOUT_MS", str(int(SHORT_TIMEOUT * 1000))),)),
    Scenario("py-lease-recipe-without-lease-mode", "py", PY_LEASE, shards=3),
    Scenario("py-8-mc4", "py", PY, max_concurrency=4),
    Scenario("js-8-mc4", "js", JS, max_concurrency=4),
    Scenario("py-plain-no-shard-id", "py", PY, shards=1, env=(("DRIVER_CLIENT", "plain"),)),
    Scenario("py-plain-shard-3-of-8", "py", PY, env=(("DRIVER_CLIENT", "plain"), ("DRIVER_SHARD", "3"),
                                                     ("DRIVER_SHARD_COUNT", "8")), runs=1),
    Scenario("py-wrong-secret", "py", PY, shards=2, secret="wrong", expect="exit", deadline=LOOP_WINDOW),
    Scenario("js-wrong-secret", "js", JS, shards=2, secret="wrong", expect="exit", deadline=LOOP_WINDOW),
]


def _recipe_queue_counts(port: int) -> Dict[str, float]:
    """Requests granted, cancelled, rejected, and leases ended (lease_<outcome>), from the queue's /metrics."""
    metrics = raw_request(port, get("/metrics", f"Authorization: Bearer {RECIPE_SECRET}", "Connection: close")).decode()
    counts = {outcome: float(value) for outcome, value in
              re.findall(r'gateway_queue_requests_total\{outcome="(\w+)"\} ([0-9.e+]+)', metrics)}
    counts.update({f"lease_{outcome}": float(value) for outcome, value in
                   re.findall(r'gateway_queue_leases_total\{outcome="(\w+)"\} ([0-9.e+]+)', metrics)})
    return counts


class RecipeRun:
    """Everything one scenario needs, started and stopped in order: stand-in (a thread of its own), queue, bot."""

    def __init__(self, scenario: Scenario, tools: Dict[str, str], scratch: str):
        self.scenario, self.tools, self.scratch = scenario, tools, scratch
        self.counts: Dict[str, float] = {}  # summed over the queue's processes (a restart makes two)

    def start_queue(self, standin: "DiscordStandIn", port: int = 0) -> Tuple[subprocess.Popen, int]:
        environ = {"HOST": "127.0.0.1", "PORT": str(port), "AUTH_TOKEN": RECIPE_SECRET, "DISCORD_TOKEN": RECIPE_TOKEN,
                   "DISCORD_API_URL": f"{standin.api_base}/v10", "IDENTIFY_INTERVAL": str(RECIPE_INTERVAL)}
        if self.scenario.lease:
            environ["LEASE_TIMEOUT"] = str(RECIPE_LEASE_TIMEOUT)
        proc, port = service_process(environ)
        collect_stderr(proc)
        deadline = time.monotonic() + 15
        while b'"limits": "discord"' not in raw_request(port, get("/healthz", "Connection: close")):
            if time.monotonic() > deadline:
                raise AssertionError("the queue never learned its limits from the stand-in")
            time.sleep(0.05)
        return proc, port

    def stop_queue(self, proc: subprocess.Popen, port: int) -> None:
        for key, value in _recipe_queue_counts(port).items():
            self.counts[key] = self.counts.get(key, 0.0) + value
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)

    def bot_command(self) -> Tuple[List[str], str]:
        scenario = self.scenario
        if scenario.lang == "py":
            return [self.tools["python"], os.path.join(self.scratch, "dpy_driver.py"),
                    os.path.join(EXAMPLES, scenario.recipe)], self.scratch
        return ["node", "--import", "file://" + os.path.join(self.scratch, "node", "setup.mjs"),
                os.path.join(self.scratch, "node", "recipes", scenario.recipe)], os.path.join(self.scratch, "node")

    def run(self, delay: float) -> Outcome:
        time.sleep(delay)
        scenario = self.scenario
        standin = DiscordStandIn(shards=scenario.shards, max_concurrency=scenario.max_concurrency,
                                 strict=scenario.strict, ready_delay=scenario.ready_delay, token=RECIPE_TOKEN)
        with standin.running_in_thread():
            queue, port = self.start_queue(standin)
            command, cwd = self.bot_command()
            env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "PYTHONUNBUFFERED": "1",
                   "PYTHONDONTWRITEBYTECODE": "1", "DISCORD_TOKEN": RECIPE_TOKEN,
                   "QUEUE_URL": f"http://127.0.0.1:{port}/", "QUEUE_AUTH_TOKEN": scenario.secret,
                   "STANDIN_URL": f"http://127.0.0.1:{standin.port}", **dict(scenario.env)}
            started = time.monotonic()
            bot = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            stderr = collect_stderr(bot)
            restarted = False
            elapsed = None
            while time.monotonic() - started < scenario.deadline:
                snap = standin.snapshot()
                if scenario.restart_after and not restarted and snap.readies >= scenario.restart_after:
                    self.stop_queue(queue, port)  # parked shards get 503 and retry; the new process holds every bucket
                    queue, port = self.start_queue(standin, port)
                    restarted = True
                released = not scenario.lease or (self.counts.get("lease_ready", 0)
                                                  + _recipe_queue_counts(port).get("lease_ready", 0)) >= scenario.running
                if scenario.expect == "ready" and snap.readies >= scenario.running and released:
                    elapsed = time.monotonic() - started
                    break
                if bot.poll() is not None:
                    elapsed = time.monotonic() - started
                    time.sleep(AFTER_EXIT)
                    break
                time.sleep(0.1)
            exit_code = bot.poll()
            if exit_code is None:
                bot.send_signal(signal.SIGINT)
                try:
                    bot.wait(10)
                except subprocess.TimeoutExpired:
                    bot.kill()
                    bot.wait()
            self.stop_queue(queue, port)
            snapshot = standin.snapshot()
        return Outcome(scenario, snapshot, dict(self.counts), exit_code, "".join(stderr),
                       elapsed if elapsed is not None else time.monotonic() - started)


class RecipeTests(unittest.TestCase):
    """The recipes as real bots. setUpClass runs every scenario at once; each test reads one outcome."""

    outcomes: Dict[str, Outcome] = {}
    missing: Dict[str, str] = {}

    @classmethod
    def setUpClass(cls) -> None:
        python, python_missing = discord_py()
        node, node_missing = node_modules()
        cls.missing = {"py": python_missing, "js": node_missing}
        cls.scratch = tempfile.mkdtemp(prefix="gq-recipes-")
        with open(os.path.join(cls.scratch, "dpy_driver.py"), "w") as file:
            file.write(DPY_DRIVER)
        tools = {"python": python or "", "node": node or ""}
        if node:  # a recipe resolves packages from its own directory up: run copies beside node_modules
            os.makedirs(os.path.join(cls.scratch, "node", "recipes"))
            os.symlink(os.path.join(node, "node_modules"), os.path.join(cls.scratch, "node", "node_modules"))
            with open(os.path.join(cls.scratch, "node", "setup.mjs"), "w") as file:
                file.write(JS_PRELOAD)
            for name in os.listdir(EXAMPLES):
                if name.endswith(".mjs"):
                    shutil.copyfile(os.path.join(EXAMPLES, name), os.path.join(cls.scratch, "node", "recipes", name))
        runnable = [s for s in SCENARIOS if not cls.missing[s.lang]]
        results: Dict[str, Any] = {}

        def run(index: int, scenario: Scenario) -> None:
            try:
                results[scenario.name] = RecipeRun(scenario, tools, cls.scratch).run(index * STAGGER)
            except Exception as error:  # reported by the scenario's test
                results[scenario.name] = error

        threads = [threading.Thread(target=run, args=(i, s), daemon=True) for i, s in enumerate(runnable)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        cls.outcomes = results
        if os.environ.get("GATEWAY_QUEUE_RECIPE_REPORT"):
            for outcome in results.values():
                print(outcome.summary() if isinstance(outcome, Outcome) else repr(outcome), file=sys.stderr)

    @classmethod
    def tearDownClass(cls) -> None:
        shutil.rmtree(cls.scratch, ignore_errors=True)

    def outcome(self, name: str) -> Outcome:
        scenario = next(s for s in SCENARIOS if s.name == name)
        need(not self.missing[scenario.lang], self.missing[scenario.lang])
        outcome = self.outcomes.get(name)
        if not isinstance(outcome, Outcome):
            self.fail(f"{name} did not run: {outcome!r}")
        return outcome

    def assertAllReady(self, outcome: Outcome) -> None:
        snap, shards = outcome.snapshot, outcome.scenario.running
        context = f"{outcome.summary()}\n{outcome.stderr[-3000:]}"
        self.assertEqual(snap.readies, shards, context)
        self.assertEqual(len(snap.violations), 0, context)  # Discord's rule held: no INVALID_SESSION
        self.assertEqual(len(snap.identifies), shards, context)
        self.assertEqual(outcome.queue.get("granted"), shards, context)
        self.assertFalse(outcome.queue.get("rejected"), context)
        self.assertNotIn("Traceback", outcome.stderr, context)

    def assertStopsWithError(self, outcome: Outcome, message: str) -> None:
        context = f"{outcome.summary()}\n{outcome.stderr[-3000:]}"
        self.assertEqual(outcome.exit_code, 1, context)  # it stopped by itself, with an error status...
        self.assertIn(message, outcome.stderr, context)  # ...and a line that says why
        self.assertLessEqual(outcome.snapshot.connections, outcome.scenario.shards, context)  # no reconnect loop
        self.assertLessEqual(outcome.queue.get("rejected", 0), outcome.scenario.shards, context)
        self.assertEqual(len(outcome.snapshot.identifies), 0, context)

    def test_discord_py_8_shards_at_max_concurrency_1_and_4(self) -> None:
        for name, least, most in (("py-8-mc1", 7 * RECIPE_INTERVAL, math.inf), ("py-8-mc4", 0, 3 * RECIPE_INTERVAL)):
            with self.subTest(name):
                outcome = self.outcome(name)
                self.assertAllReady(outcome)
                self.assertFalse(outcome.queue.get("cancelled"), outcome.summary())
                self.assertTrue(least <= outcome.elapsed <= most, outcome.summary())

    def test_discord_py_plain_client(self) -> None:
        outcome = self.outcome("py-plain-no-shard-id")
        self.assertAllReady(outcome)
        self.assertEqual(outcome.snapshot.identifies[0].shard, 0)  # shard_id None asks for shard 0, not "None"
        outcome = self.outcome("py-plain-shard-3-of-8")
        self.assertAllReady(outcome)
        self.assertEqual([(i.shard, i.shard_count) for i in outcome.snapshot.identifies], [(3, 8)])

    def test_discord_py_queue_restarted_mid_run(self) -> None:
        outcome = self.outcome("py-restart")
        self.assertAllReady(outcome)  # no INVALID_SESSION although the new process knew nothing of the old's grants

    def test_discord_py_wrong_secret_stops_the_bot_with_one_line(self) -> None:
        outcome = self.outcome("py-wrong-secret")
        self.assertStopsWithError(outcome, "gateway-queue refused shard 0: 401")
        self.assertNotIn("Traceback", outcome.stderr)
        self.assertNotIn("Retrying", outcome.stderr)

    def test_discord_py_wait_longer_than_aiohttp_default(self) -> None:
        outcome = self.outcome("py-long-wait")
        self.assertAllReady(outcome)
        self.assertFalse(outcome.queue.get("cancelled"), outcome.summary())  # no request was cut and asked again
        self.assertGreater(max(i.gap or 0 for i in outcome.snapshot.identifies), 2 * SHORT_TIMEOUT)

    def test_discord_py_lease_passes_the_stricter_rule_and_plain_spacing_does_not(self) -> None:
        outcome = self.outcome("py-lease-strict")
        self.assertAllReady(outcome)
        self.assertEqual(outcome.queue.get("lease_ready"), outcome.scenario.shards, outcome.summary())
        self.assertFalse(outcome.queue.get("lease_timeout"), outcome.summary())
        control = self.outcome("py-no-lease-strict")
        self.assertGreater(len(control.snapshot.violations), 0, control.summary())  # what lease mode buys
        plain = self.outcome("py-plain-lease")
        self.assertAllReady(plain)
        self.assertEqual(plain.queue.get("lease_ready"), 1, plain.summary())

    def test_discord_py_lease_recipe_on_a_queue_without_lease_mode(self) -> None:
        outcome = self.outcome("py-lease-recipe-without-lease-mode")
        self.assertEqual(outcome.queue.get("rejected"), 1, outcome.summary())  # the one release answered 404...
        outcome.queue["rejected"] = 0
        self.assertAllReady(outcome)
        self.assertEqual(outcome.stderr.count("is not in lease mode"), 1, outcome.stderr)  # ...then no more asked

    def test_discordjs_8_shards_at_max_concurrency_1_and_4(self) -> None:
        for name, least, most in (("js-8-mc1", 7 * RECIPE_INTERVAL, math.inf), ("js-8-mc4", 0, 3 * RECIPE_INTERVAL)):
            with self.subTest(name):
                outcome = self.outcome(name)
                self.assertAllReady(outcome)
                self.assertFalse(outcome.queue.get("cancelled"), outcome.summary())
                self.assertTrue(least <= outcome.elapsed <= most, outcome.summary())

    def test_discordjs_queue_restarted_mid_run(self) -> None:
        self.assertAllReady(self.outcome("js-restart"))

    def test_discordjs_wrong_secret_stops_the_manager(self) -> None:
        self.assertStopsWithError(self.outcome("js-wrong-secret"), "QueueRefusedError: gateway-queue refused shard")

    def test_discordjs_wait_longer_than_undici_headers_timeout(self) -> None:
        outcome = self.outcome("js-long-wait")
        self.assertAllReady(outcome)
        self.assertFalse(outcome.queue.get("cancelled"), outcome.summary())
        self.assertGreater(max(i.gap or 0 for i in outcome.snapshot.identifies), 2 * SHORT_TIMEOUT)

    def test_discordjs_lease_passes_the_stricter_rule(self) -> None:
        outcome = self.outcome("js-lease-strict")
        self.assertAllReady(outcome)
        self.assertEqual(outcome.queue.get("lease_ready"), outcome.scenario.shards, outcome.summary())


class WaitForQueueShTests(unittest.TestCase):
    """examples/wait-for-queue.sh (curl) against the service."""

    script = os.path.join(EXAMPLES, "wait-for-queue.sh")

    def setUp(self) -> None:
        need(shutil.which("curl") is not None, "curl is not installed")

    def sh(self, shard: str, port: int, secret: Optional[str] = RECIPE_SECRET) -> Tuple[int, str, float]:
        env = {"PATH": os.environ.get("PATH", ""), "QUEUE_URL": f"http://127.0.0.1:{port}/"}
        if secret is not None:
            env["QUEUE_AUTH_TOKEN"] = secret
        started = time.monotonic()
        done = subprocess.run(["sh", self.script, shard], env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(done.stdout, "")
        return done.returncode, done.stderr, time.monotonic() - started

    def test_grant_wait_and_refusal(self) -> None:
        proc, port = service_process({"AUTH_TOKEN": RECIPE_SECRET, "STARTUP_HOLD": "0", "IDENTIFY_INTERVAL": "5"})
        self.addCleanup(stop_process, proc)
        collect_stderr(proc)
        code, err, _ = self.sh("0", port)
        self.assertEqual(code, 0, err)
        self.assertIn("free to connect", err)
        code, err, took = self.sh("0", port)  # parked for one interval
        self.assertEqual(code, 0, err)
        self.assertGreater(took, 4.5)
        for secret in ("wrong", None):
            code, err, took = self.sh("0", port, secret)
            self.assertEqual(code, 22, err)
            self.assertIn("401", err)
            self.assertLess(took, 2.0)

    def test_a_refused_connection_is_retried_until_the_queue_is_up(self) -> None:
        with socket.socket() as probe:  # a port nobody listens on, for now
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        result: Dict[str, Any] = {}
        waiting = threading.Thread(target=lambda: result.update(answer=self.sh("0", port)))
        waiting.start()
        time.sleep(3.0)
        proc, _ = service_process({"PORT": str(port), "AUTH_TOKEN": RECIPE_SECRET, "STARTUP_HOLD": "0"})
        self.addCleanup(stop_process, proc)
        collect_stderr(proc)
        waiting.join(60)
        code, err, took = result["answer"]
        self.assertEqual(code, 0, err)
        self.assertGreater(took, 3.0)

# ----------------------------------------------------------------------------------------------------------------
# Fuzzing: mutated requests against the parser and a live server
# ----------------------------------------------------------------------------------------------------------------

FUZZ_SECONDS = float(os.environ.get("GATEWAY_QUEUE_FUZZ_SECONDS", "10"))  # the long run: GATEWAY_QUEUE_FUZZ_SECONDS=600
FUZZ_SEED = int(os.environ.get("GATEWAY_QUEUE_FUZZ_SEED", "20261126"))
FUZZ_CORPUS = [raw for _, raw, _ in PARSER_CASES if len(raw) < 30_000] + [
    b"\r\n" * 7 + get("/?shard=9"), b"\r\n" * 40, b"POST / HTTP/1.1\r\nHost: q\r\nContent-Length: " + b"7" * 60 + b"\r\n\r\n",
    get("/?shard=" + "1" * 300), get("/release?shard=1&outcome=ready", method="POST"), get("/favicon.ico"),
    b"POST / HTTP/1.1\r\nHost: q\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    get("/?shard=1") + get("/healthz") + get("/?shard=2", method="HEAD"),
    b"POST /?shard=3 HTTP/1.1\r\nHost: q\r\nContent-Length: 4\r\n\r\nbody" + get("/status", "Accept: text/html"),
    b"GET /metrics HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    get("/?shard=7&x=%ff&shard", "Authorization: Bearer x", "Connection: close"),
]
FUZZ_TOKENS = [b"\r\n", b"\n", b"\r", b"\r\n\r\n", b" ", b"\t", b":", b"\x00", b"\x7f", b"\xff", b"?shard=", b"%",
               b"Content-Length: 3\r\n", b"Content-Length: 99999999999999999999\r\n", b"Transfer-Encoding: chunked\r\n",
               b"Host: q\r\n", b"Connection: close\r\n", b"HTTP/1.0", b"HTTP/9.9", b"HEAD", b"/healthz", b"a" * 9000,
               b"\r\n" * 9, b"9" * 4301, b"Host: a b\r\n", b"Expect: 100-continue\r\n", b"/release", b"?outcome="]


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One to four random edits: flip, insert, delete, duplicate, splice another corpus entry, insert a token."""
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        where = rng.randint(0, len(data))
        choice = rng.randrange(6)
        if choice == 0 and data:
            data[min(where, len(data) - 1)] = rng.randrange(256)
        elif choice == 1:
            data[where:where] = bytes([rng.randrange(256)])
        elif choice == 2:
            del data[where:where + rng.randint(1, 16)]
        elif choice == 3:
            data[where:where] = data[where:where + rng.randint(1, 32)]
        elif choice == 4:
            other = rng.choice(FUZZ_CORPUS)
            cut = rng.randint(0, len(other))
            data[where:] = other[cut:]
        else:
            data[where:where] = rng.choice(FUZZ_TOKENS)
    return bytes(data)


def split_responses(stream: bytes) -> List[Tuple[int, dict]]:
    """Cuts a byte stream into HTTP responses, asserting each is well-formed. A body is absent when the next bytes
    start another response (the answer to HEAD), else exactly Content-Length bytes."""
    import re as _re

    responses = []
    while stream:
        head, sep, rest = stream.partition(b"\r\n\r\n")
        assert sep, f"truncated response head {stream[:80]!r}"
        lines = head.decode("latin-1").split("\r\n")
        match = _re.fullmatch(r"HTTP/1\.1 (\d{3}) [A-Za-z ]+", lines[0])
        assert match, f"bad status line {lines[0]!r}"
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(": ")
            assert colon and name, f"bad header line {line!r}"
            headers[name.lower()] = value
        length = int(headers["content-length"])
        if rest.startswith(b"HTTP/1.1 ") or not rest:
            stream = rest
        else:
            assert len(rest) >= length, f"short body: {len(rest)} of {length}"
            if headers["content-type"] == "application/json":
                json.loads(rest[:length])
            stream = rest[length:]
        responses.append((int(match.group(1)), headers))
    return responses


class FuzzTests(unittest.IsolatedAsyncioTestCase):
    """A seeded mutation fuzzer. The suite runs it for about FUZZ_SECONDS (10 s); set GATEWAY_QUEUE_FUZZ_SECONDS for
    a long run and GATEWAY_QUEUE_FUZZ_SEED for another sequence. It reports how many inputs it ran on stderr."""

    def test_parser_never_fails_otherwise(self) -> None:
        rng = random.Random(FUZZ_SEED)
        deadline = time.monotonic() + FUZZ_SECONDS * 0.3
        runs = outcomes = 0
        seen: dict = {}
        while time.monotonic() < deadline:
            data = mutate(rng, rng.choice(FUZZ_CORPUS))
            runs += 1
            try:
                result = gq.parse_request_head(data)
            except gq.HTTPError as exc:
                self.assertIn(exc.status, gq.REASONS, data)
                self.assertTrue(exc.message)
                result = exc.status
            if isinstance(result, tuple):
                request, used = result
                self.assertTrue(0 < used <= len(data), data)
                self.assertLessEqual(request.content_length, gq.MAX_BODY_BYTES)
            key = result if not isinstance(result, tuple) else "request"
            seen[key] = seen.get(key, 0) + 1
            if runs % 8 == 0:  # a prefix is refused only if the whole is: a byte-at-a-time sender is never refused
                cut = rng.randint(0, len(data))  # early (which error wins may differ: they sit at different bytes)
                try:
                    prefix = gq.parse_request_head(data[:cut])
                except gq.HTTPError:
                    self.assertIsInstance(result, int, data[:cut])
                else:
                    if prefix is not None:
                        self.assertIsInstance(result, tuple)
                        self.assertEqual(prefix[1], result[1])
                outcomes += 1
        print(f"\nparser fuzz: {runs} inputs, {outcomes} prefix checks, outcomes {sorted(seen.items(), key=str)}",
              file=sys.stderr)
        self.assertGreater(runs, 1000)

    async def test_server_answers_or_closes_cleanly(self) -> None:
        rng = random.Random(FUZZ_SEED + 1)
        catcher = ErrorLogCatcher()
        for name in ("gateway_queue", "asyncio"):
            logging.getLogger(name).addHandler(catcher)
            self.addCleanup(logging.getLogger(name).removeHandler, catcher)
        config = gq.Config(host="127.0.0.1", port=0, interval=0.001, max_concurrency=64, startup_hold=0, lease_timeout=0.01)
        server = gq.Server(config, head_timeout=0.3, keepalive_timeout=0.3)
        await server.start()
        self.addAsyncCleanup(server.stop)
        loop = asyncio.get_running_loop()
        loop_errors: List[dict] = []
        loop.set_exception_handler(lambda _, context: loop_errors.append(context))
        statuses: dict = {}

        async def exchange(data: bytes) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 4)))) if len(data) > 1 else []
            for start, end in zip([0] + cuts, cuts + [len(data)]):
                writer.write(data[start:end])
                if rng.random() < 0.3:
                    await asyncio.sleep(0.002)
            received = b""
            try:
                while True:  # until the server closes, or stays quiet (keep-alive idle) for a while
                    chunk = await asyncio.wait_for(reader.read(65536), 1.5)
                    if not chunk:
                        break
                    received += chunk
            except asyncio.TimeoutError:
                pass
            except ConnectionError:
                pass
            writer.close()
            for status, _ in split_responses(received):
                statuses[status] = statuses.get(status, 0) + 1

        deadline = time.monotonic() + FUZZ_SECONDS * 0.7
        runs = 0
        while time.monotonic() < deadline:
            batch = [mutate(rng, rng.choice(FUZZ_CORPUS)) for _ in range(40)]
            await asyncio.wait_for(asyncio.gather(*(exchange(data) for data in batch)), 10)
            runs += len(batch)
        print(f"\nconnection fuzz: {runs} inputs over real sockets, statuses {sorted(statuses.items())}", file=sys.stderr)
        self.assertEqual([r.getMessage() for r in catcher.records], [])
        self.assertEqual(loop_errors, [])
        self.assertEqual((await asyncio.wait_for(read_response(*(await self._ask_health(server))), 5)).status, 200)
        for _ in range(100):
            if len(server.connections) <= 1:
                break
            await asyncio.sleep(0.02)
        self.assertLessEqual(len(server.connections), 1)  # nothing left behind but the health check's
        self.assertEqual(server.queue.waiting, 0)
        self.assertGreater(runs, 100)

    async def _ask_health(self, server: gq.Server) -> Tuple[asyncio.StreamReader]:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        self.addCleanup(writer.close)
        writer.write(get("/healthz"))
        return (reader,)




class DiscordFuzzTests(unittest.TestCase):
    """Mutated /gateway/bot answers (nested JSON, long digit runs, odd types): parse_gateway_bot returns limits
    within bounds or raises DiscordError, never anything else."""

    def test_answers_never_fail_otherwise(self) -> None:
        rng = random.Random(FUZZ_SEED + 2)
        corpus = [gateway_body(), gateway_body(16, 2000, 5, 1), b"[" * 100 + b"]" * 100,
                  b'{"session_start_limit": {"total": 1e308, "remaining": -0, "reset_after": 9999999999999999999999}}']
        tokens = [b"[", b"{", b"]", b"}", b'"', b"9" * 400, b"1e308", b"-", b".5", b"null", b"true", b"[" * 2000,
                  b'"max_concurrency": ', b'"reset_after": ', b"\\u0000"]
        runs = 0
        deadline = time.monotonic() + FUZZ_SECONDS * 0.1
        while time.monotonic() < deadline:
            data = bytearray(rng.choice(corpus))
            for _ in range(rng.randint(1, 4)):
                where = rng.randint(0, len(data))
                if rng.random() < 0.5:
                    data[where:where] = rng.choice(tokens)
                else:
                    del data[where:where + rng.randint(1, 8)]
            runs += 1
            try:
                limits = gq.parse_gateway_bot(bytes(data))
            except gq.DiscordError:
                continue
            self.assertTrue(1 <= limits.max_concurrency <= gq.MAX_CONCURRENCY)
            self.assertTrue(0 <= limits.reset_after <= gq.MAX_RESET_AFTER)
            self.assertTrue(0 <= limits.remaining <= limits.total <= gq.MAX_SESSION_TOTAL)
        self.assertGreater(runs, 500)


# ----------------------------------------------------------------------------------------------------------------
# The README
# ----------------------------------------------------------------------------------------------------------------


class ReadmeTests(unittest.TestCase):
    """What the README shows is what ships: each recipe verbatim, and every named limit."""

    @classmethod
    def setUpClass(cls) -> None:
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as file:
            cls.readme = file.read()

    def test_every_recipe_is_shown_verbatim(self) -> None:
        shown = dict(re.findall(r"<!-- example: (examples/[^ ]+) -->\n````[a-z]*\n(.*?)````\n", self.readme, re.S))
        self.assertEqual(sorted(shown), sorted(f"examples/{name}" for name in os.listdir(EXAMPLES)))
        for path, text in shown.items():
            with self.subTest(path=path), open(os.path.join(HERE, path), encoding="utf-8") as file:
                self.assertEqual(text, file.read(), f"README's block for {path} differs from the file")

    def test_every_limit_is_listed(self) -> None:
        with open(gq.__file__, encoding="utf-8") as file:
            source = file.read()
        section = source[source.index("# Limits\n"):source.index("# Configuration\n")]
        redis = source[source.index("\nMAX_CLAIM_RTT = "):]
        names = re.findall(r"^([A-Z][A-Z0-9_]+) = ", section, re.M)
        names += re.findall(r"^([A-Z][A-Z0-9_]+) = ", redis[:redis.index("\n\n", 1)], re.M)
        self.assertGreater(len(names), 50)
        for name in names:
            with self.subTest(name=name):
                self.assertTrue(f"| `{name}` |" in self.readme, f"{name} is not in the README's limits tables")
        listed = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \| `", self.readme, re.M))
        settings = set(re.findall(r"^    ([A-Z][A-Z_]+) ", gq.__doc__, re.M))  # the environment table's rows
        self.assertEqual(listed - set(names) - settings, set())  # nothing listed that the module no longer has


if __name__ == "__main__":
    unittest.main()
