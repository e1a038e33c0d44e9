"""Tests for gateway_queue.py, in the module's order: configuration, parsing, responses, queue, coordination, Discord,
Redis, connections, lifecycle, command line, then fuzzing and the client recipes. Standard library only; run with
`python3 -m unittest -v`.

Some tests use real programs where users would: a real `redis-server` for the replica tests and the real discord.py
and @discordjs/ws for the recipe tests. Without them those tests skip with the reason; under CI=true a missing tool is
a failure, never a skip (.ci/run installs them)."""

from __future__ import annotations

import asyncio
import contextlib
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
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import unittest.mock
from typing import Any, Callable, Dict, List, Optional, Tuple

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
        for line in proc.stderr:
            lines.append(line)

    threading.Thread(target=drain, daemon=True).start()
    return lines


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
        self.assertEqual([status for status, _ in cases], [409, 409, 409, 409])
        self.assertEqual([message for _, message in cases], [
            "no lease is open in bucket 0: shard 0 was not granted",
            "bucket 0's lease belongs to shard 0, not shard 2",
            "bucket 0's lease belongs to shard 0, not shard 4",
            "shard 1 already released its lease",
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
        self.assertEqual((await self.ask(server, get("/healthz?shard=1"))).status, 200)  # still the health check
        self.assertEqual(server.queue.waiting, 1)

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
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
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
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
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
if __name__ == "__main__":
    unittest.main()
