"""Tests for gateway_queue.py, in the module's order: configuration, parsing, responses, queue, Discord, connections,
lifecycle, command line. Standard library only; run with `python3 -m unittest -v`."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import http.server
import io
import itertools
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest
import unittest.mock
from typing import Any, List, Optional, Tuple

import gateway_queue as gq

TOKEN = "MTIzNDU2Nzg5.secret-token.abcdef"
logging.getLogger("gateway_queue").addHandler(logging.NullHandler())  # quiet runs; assertLogs still sees records
HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


async def settle(rounds: int = 20) -> None:
    """Lets every ready task run until nothing moves (a fixed number of loop turns)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class FakeClock:
    """Virtual time for the queue: clock() reads it, sleep() parks until advance() passes the wake-up time."""

    def __init__(self, now: float = 0.0):
        self.now = now
        self.sleeps: List[float] = []
        self._timers: List[Tuple[float, int, asyncio.Future]] = []
        self._seq = itertools.count()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.now + max(0.0, delay), next(self._seq), future))
        await future

    async def advance(self, seconds: float) -> None:
        """Moves time forward, waking each sleeper at its own time, in order."""
        target = self.now + seconds
        await settle()
        while self._timers and self._timers[0][0] <= target:
            when, _, future = heapq.heappop(self._timers)
            self.now = max(self.now, when)
            if not future.done():
                future.set_result(None)
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


class FakeDiscord:
    """A stand-in for Discord's REST API on loopback. `script` is a list of (status, headers, body, delay) answers
    served in turn (the last one repeats); every request's path and headers are recorded."""

    def __init__(self, script: List[Tuple[int, dict, bytes, float]]):
        self.script = list(script)
        self.requests: List[Tuple[str, dict]] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.requests.append((self.path, dict(self.headers)))
                status, headers, body, delay = fake.script.pop(0) if len(fake.script) > 1 else fake.script[0]
                time.sleep(delay)
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/api/v10"
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def gateway_body(max_concurrency: int = 1, total: int = 1000, remaining: int = 999, reset_after: int = 14_400_000) -> bytes:
    limit = {"total": total, "remaining": remaining, "reset_after": reset_after, "max_concurrency": max_concurrency}
    return json.dumps({"url": "wss://gateway.discord.gg", "shards": 1, "session_start_limit": limit}).encode()


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


class ConfigTests(unittest.TestCase):
    def test_defaults(self) -> None:
        config = gq.Config.from_env({})
        self.assertEqual((config.host, config.port, config.token, config.max_concurrency), ("127.0.0.1", 5000, None, 1))
        self.assertEqual((config.interval, config.log_level, config.auth_token), (5.1, "INFO", None))
        self.assertEqual(config.api_url, "https://discord.com/api/v10")

    def test_good_values(self) -> None:
        config = gq.Config.from_env({
            "HOST": "::", "PORT": "0", "DISCORD_TOKEN": "Bot abc.def", "DISCORD_API_URL": "http://127.0.0.1:9/api/",
            "MAX_CONCURRENCY": "16", "IDENTIFY_INTERVAL": "5.25", "LOG_LEVEL": "debug", "AUTH_TOKEN": "s3cret!",
        })
        self.assertEqual((config.host, config.port, config.token), ("::", 0, "abc.def"))
        self.assertEqual((config.api_url, config.max_concurrency, config.interval), ("http://127.0.0.1:9/api", 16, 5.25))
        self.assertEqual((config.log_level, config.auth_token), ("DEBUG", "s3cret!"))
        for host in ("0.0.0.0", "gateway-queue", "queue.internal.example", "[::1]", "fe80::1"):
            self.assertEqual(gq.Config.from_env({"HOST": host}).host, host.strip("[]"))
        self.assertEqual(gq.Config.from_env({"DISCORD_TOKEN": "plain"}).token, "plain")
        self.assertEqual(gq.Config.from_env({"IDENTIFY_INTERVAL": "5"}).interval, 5.0)

    def test_bad_values_name_the_variable(self) -> None:
        cases = [
            ("HOST", ""), ("HOST", "bad host"), ("HOST", "a..b"), ("HOST", "-x"),
            ("PORT", "65536"), ("PORT", "-1"), ("PORT", "+80"), ("PORT", " 80"), ("PORT", "8_0"), ("PORT", "٨٠"), ("PORT", ""),
            ("MAX_CONCURRENCY", "0"), ("MAX_CONCURRENCY", "1025"), ("MAX_CONCURRENCY", "1.5"),
            ("IDENTIFY_INTERVAL", "4.99"), ("IDENTIFY_INTERVAL", "nan"), ("IDENTIFY_INTERVAL", "inf"),
            ("IDENTIFY_INTERVAL", "1e3"), ("IDENTIFY_INTERVAL", "5,1"), ("IDENTIFY_INTERVAL", "3601"),
            ("LOG_LEVEL", "TRACE"), ("DISCORD_API_URL", "ftp://x"), ("DISCORD_API_URL", "discord.com"),
            ("DISCORD_TOKEN", ""), ("DISCORD_TOKEN", "Bot "), ("DISCORD_TOKEN", "has space"), ("AUTH_TOKEN", ""),
            ("AUTH_TOKEN", "tab\tinside"),
        ]
        for name, value in cases:
            with self.subTest(name=name, value=value):
                with self.assertRaises(gq.ConfigError) as caught:
                    gq.Config.from_env({name: value})
                self.assertIn(name, str(caught.exception))

    def test_secrets_never_echoed(self) -> None:
        for name in ("DISCORD_TOKEN", "AUTH_TOKEN"):
            with self.assertRaises(gq.ConfigError) as caught:
                gq.Config.from_env({name: "my secret value"})
            self.assertNotIn("secret", str(caught.exception))
        config = gq.Config.from_env({"DISCORD_TOKEN": TOKEN, "AUTH_TOKEN": "hunter2hunter2"})
        self.assertNotIn(TOKEN, repr(config))
        self.assertNotIn("hunter2", repr(config))

    def test_floor_applies_to_environment_only(self) -> None:
        self.assertEqual(gq.Config(interval=0.05).interval, 0.05)  # tests use short intervals through the class


# ----------------------------------------------------------------------------------------------------------------
# HTTP/1.1 parsing
# ----------------------------------------------------------------------------------------------------------------

H = b"Host: q\r\n"
PARSER_CASES: List[Tuple[str, bytes, Optional[int]]] = [
    # well-formed: expected status None
    ("simple", b"GET /?shard=1 HTTP/1.1\r\n" + H + b"\r\n", None),
    ("http/1.0 without host", b"GET / HTTP/1.0\r\n\r\n", None),
    ("leading empty lines", b"\r\n\r\nGET / HTTP/1.1\r\n" + H + b"\r\n", None),
    ("content-length head", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\n", None),
    ("repeated equal lengths", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\nContent-Length: 3\r\n\r\n", None),
    ("obs-text and tab in value", b"GET / HTTP/1.1\r\n" + H + b"X-A: caf\xc3\xa9\tok\r\n\r\n", None),
    ("absolute form", b"GET http://q/x?shard=3 HTTP/1.1\r\n" + H + b"\r\n", None),
    ("asterisk form", b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", None),
    ("empty header value", b"GET / HTTP/1.1\r\n" + H + b"X-Empty:\r\n\r\n", None),
    # malformed
    ("bare LF", b"GET / HTTP/1.1\nHost: q\n\n", 400),
    ("bare LF in headers", b"GET / HTTP/1.1\r\nHost: q\n\r\n", 400),
    ("bare CR", b"GET / HTTP/1.1\rHost: q\r\n\r\n", 400),
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
    ("length not a number", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: abc\r\n\r\n", 400),
    ("length with sign", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\n", 400),
    ("empty length", b"POST / HTTP/1.1\r\n" + H + b"Content-Length:\r\n\r\n", 400),
    ("conflicting lengths", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5, 6\r\n\r\n", 400),
    ("conflicting length headers", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n", 400),
    ("length and chunked", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    ("chunked", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n", 411),
    ("unknown coding", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n", 501),
    ("coding in HTTP/1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    ("body too large", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 65537\r\n\r\n", 413),
    ("request line too long", b"GET /" + b"a" * gq.MAX_REQUEST_LINE + b" HTTP/1.1\r\n" + H + b"\r\n", 414),
    ("head too large", b"GET / HTTP/1.1\r\n" + H + b"X-A: " + b"a" * 8000 + b"\r\nX-B: " + b"b" * 9000 + b"\r\n\r\n", 431),
    ("too many headers", b"GET / HTTP/1.1\r\n" + H + b"X-A: 1\r\n" * gq.MAX_HEADERS + b"\r\n", 431),
]


class ParserTests(unittest.TestCase):
    """Each case is fed whole, one byte at a time, and followed by bytes that must survive (h11's approach)."""

    def outcome(self, data: bytes) -> Any:
        try:
            return gq.parse_request_head(data)
        except gq.HTTPError as exc:
            return exc.status

    def test_whole(self) -> None:
        for name, raw, status in PARSER_CASES:
            with self.subTest(name):
                result = self.outcome(raw)
                if status is None:
                    self.assertIsInstance(result, tuple, result)
                    self.assertEqual(result[1], len(raw))
                else:
                    self.assertEqual(result, status)

    def test_byte_by_byte(self) -> None:
        for name, raw, status in PARSER_CASES:
            with self.subTest(name):
                for end in range(1, len(raw) + 1):
                    result = self.outcome(raw[:end])
                    if result is not None:
                        break
                if status is None:
                    self.assertEqual(end, len(raw), "complete before the last byte")
                    self.assertEqual(result[1], len(raw))
                else:
                    self.assertEqual(result, status)

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

    def test_request_fields(self) -> None:
        request, _ = gq.parse_request_head(b"GET /x?shard=7&a=b HTTP/1.1\r\nHost: q\r\nX-Mixed: Value \r\n\r\n")
        self.assertEqual((request.method, request.path, request.query, request.version), ("GET", "/x", "shard=7&a=b", "1.1"))
        self.assertEqual(request.header(b"x-mixed"), b"Value")
        self.assertIsNone(request.header(b"absent"))
        request, _ = gq.parse_request_head(b"GET http://q/p?shard=3 HTTP/1.1\r\nHost: q\r\n\r\n")
        self.assertEqual((request.path, request.query), ("/p", "shard=3"))
        request, _ = gq.parse_request_head(b"POST / HTTP/1.1\r\nHost: q\r\nContent-Length: 12\r\n\r\n")
        self.assertEqual(request.content_length, 12)

    def test_keep_alive_rules(self) -> None:
        cases = [
            (b"GET / HTTP/1.1\r\nHost: q\r\n\r\n", True),
            (b"GET / HTTP/1.1\r\nHost: q\r\nConnection: close\r\n\r\n", False),
            (b"GET / HTTP/1.1\r\nHost: q\r\nConnection: Keep-Alive, CLOSE\r\n\r\n", False),
            (b"GET / HTTP/1.0\r\n\r\n", False),
            (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
        ]
        for raw, keep_alive in cases:
            with self.subTest(raw=raw):
                self.assertEqual(gq.parse_request_head(raw)[0].keep_alive, keep_alive)

    def test_shard_parameter(self) -> None:
        good = [("", None), ("other=1", None), ("shard=0", 0), ("shard=42&x=y", 42), ("x=1&shard=007", 7),
                ("shard=4294967295", 4294967295), ("shard=%34%32", 42)]
        for query, shard in good:
            with self.subTest(query=query):
                self.assertEqual(gq.parse_shard(query), shard)
        bad = ["shard=", "shard=-1", "shard=+1", "shard=1.0", "shard=abc", "shard=%EF%BC%91", "shard=1_0",
               "shard=+1", "shard=%201", "shard=4294967296", "shard=99999999999999999999", "shard=1&shard=2",
               "shard=0x10"]
        for query in bad:
            with self.subTest(query=query):
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
        self.assertEqual(json.loads(raw.split(b"\r\n\r\n", 1)[1]), {"message": "too big"})
        request, _ = gq.parse_request_head(b"GET / HTTP/1.1\r\nHost: q\r\n\r\n")
        raw = gq.render_error(gq.HTTPError(400, "bad shard", close=False), request)
        self.assertNotIn(b"Connection:", raw)


# ----------------------------------------------------------------------------------------------------------------
# Queue
# ----------------------------------------------------------------------------------------------------------------


class QueueTests(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self) -> None:
        self.clock = FakeClock(100.0)
        self.grants: List[Tuple[float, int]] = []

    def make(self, interval: float = 5.0, max_concurrency: int = 1) -> gq.IdentifyQueue:
        queue = gq.IdentifyQueue(interval, max_concurrency, clock=self.clock, sleep=self.clock.sleep)
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

    async def test_idle_bucket_grants_at_once_then_spaces(self) -> None:
        queue = self.make()
        for shard in range(3):
            self.put(queue, shard)
        await self.clock.advance(0)
        self.assertEqual(self.times(), [0.0])
        await self.clock.advance(4.99)
        self.assertEqual(self.times(), [0.0])
        await self.clock.advance(20)
        self.assertEqual(self.times(), [0.0, 5.0, 10.0])
        self.assertEqual(queue.stats.requests["granted"], 3)

    async def test_buckets_start_in_parallel(self) -> None:
        queue = self.make(max_concurrency=4)
        for shard in range(8):
            self.put(queue, shard)
        await self.clock.advance(0)
        self.assertEqual(sorted(s for _, s in self.grants), [0, 1, 2, 3])
        await self.clock.advance(5)
        self.assertEqual(sorted(s for t, s in self.grants if t == 105.0), [4, 5, 6, 7])

    async def test_first_come_first_served_within_a_bucket(self) -> None:
        queue = self.make(max_concurrency=4)
        for shard in (8, 0, 12, 4):
            self.put(queue, shard)
        await self.clock.advance(20)
        self.assertEqual([s for _, s in self.grants], [8, 0, 12, 4])

    async def test_cancelled_waiter_costs_no_slot(self) -> None:
        queue = self.make()
        queue.set_limits(1, gq.Budget(10, 10, 1e9))
        self.put(queue, 0)
        gone = self.put(queue, 1)
        self.put(queue, 2)
        await self.clock.advance(1)
        self.assertTrue(queue.cancel(gone))
        self.assertFalse(queue.cancel(gone))
        await self.clock.advance(10)
        self.assertEqual(self.grants, [(100.0, 0), (105.0, 2)])
        self.assertEqual(queue.budget.remaining, 8)

    async def test_client_gone_at_release_costs_no_slot(self) -> None:
        queue = self.make()
        queue.set_limits(1, gq.Budget(10, 10, 1e9))
        self.put(queue, 0, present=False)
        self.put(queue, 1)
        await self.clock.advance(0)
        self.assertEqual(self.grants, [(100.0, 1)])
        self.assertEqual(queue.stats.requests["cancelled"], 1)
        self.assertEqual(queue.budget.remaining, 9)

    async def test_interval_starts_when_the_grant_is_written(self) -> None:
        queue = self.make()
        self.put(queue, 0, write_time=0.25)
        self.put(queue, 1)
        await self.clock.advance(10)
        self.assertEqual(self.times(), [0.25, 5.25])

    async def test_long_wait_wakes_early_and_finishes_short(self) -> None:
        queue = self.make(interval=5.1)
        self.put(queue, 0)
        self.put(queue, 1)
        await self.clock.advance(10)
        self.assertEqual(self.times(), [0.0, 5.1])
        first, second = self.clock.sleeps[:2]
        self.assertLess(first, 5.1 - 0.005)  # 0.1% kernel slack on 5 s is 5 ms: wake before that
        self.assertAlmostEqual(first + second, 5.1)
        self.assertLess(second, 0.05)

    async def test_budget_exhaustion_waits_for_reset(self) -> None:
        queue = self.make(max_concurrency=2)
        queue.set_limits(2, gq.Budget(total=3, remaining=2, reset_at=160.0))
        for shard in range(5):
            self.put(queue, shard)
        await self.clock.advance(59)
        self.assertEqual(self.times(), [0.0, 0.0])
        self.assertEqual(queue.budget.remaining, 0)
        self.assertEqual(queue.waiting, 3)
        await self.clock.advance(1)  # the reset: the full budget comes back
        self.assertEqual(self.times(), [0.0, 0.0, 60.0, 60.0])
        await self.clock.advance(10)
        self.assertEqual(self.times(), [0.0, 0.0, 60.0, 60.0, 65.0])
        self.assertEqual(queue.budget.remaining, 0)
        self.assertEqual(queue.budget.reset_at, 160.0 + gq.BUDGET_WINDOW)

    async def test_no_budget_means_no_cap(self) -> None:
        queue = self.make(interval=5, max_concurrency=16)
        for shard in range(320):
            self.put(queue, shard)
        await self.clock.advance(19 * 5)
        self.assertEqual(len(self.grants), 320)

    async def test_rebucketing_keeps_order_and_spacing(self) -> None:
        queue = self.make()
        for shard in (0, 1, 2, 3, 4, 5):
            self.put(queue, shard)
        await self.clock.advance(1)
        self.assertEqual(self.grants, [(100.0, 0)])
        queue.set_limits(2, None)
        self.assertEqual([w.shard for w in queue.buckets[0].waiters], [2, 4])
        self.assertEqual([w.shard for w in queue.buckets[1].waiters], [1, 3, 5])
        await self.clock.advance(0)
        self.assertEqual(self.grants[-1], (101.0, 1))  # bucket 1 never granted: free at once
        await self.clock.advance(15)
        self.assertEqual(
            self.grants,
            [(100.0, 0), (101.0, 1), (105.0, 2), (106.0, 3), (110.0, 4), (111.0, 5)],
        )

    async def test_rebucketing_down_waits_for_every_recent_grant(self) -> None:
        queue = self.make(max_concurrency=2)
        self.put(queue, 0)
        await self.clock.advance(2)
        self.put(queue, 1)
        await self.clock.advance(0)
        self.put(queue, 2)
        queue.set_limits(1, None)  # shard 0 at 100 and shard 1 at 102 now share bucket 0
        await self.clock.advance(10)
        self.assertEqual(self.grants, [(100.0, 0), (102.0, 1), (107.0, 2)])

    async def test_take_all_returns_arrival_order(self) -> None:
        queue = self.make(max_concurrency=2)
        queue.budget = gq.Budget(1, 0, 1e9)
        for shard in (3, 2, 1, 0):
            self.put(queue, shard)
        self.assertEqual([w.shard for w in queue.take_all()], [3, 2, 1, 0])
        self.assertEqual(queue.waiting, 0)

    async def test_in_flight_counts_recent_grants(self) -> None:
        queue = self.make(max_concurrency=4)
        for shard in range(4):
            self.put(queue, shard)
        await self.clock.advance(0)
        self.assertEqual(queue.in_flight(self.clock()), 4)
        self.assertEqual(queue.in_flight(self.clock() + gq.IN_FLIGHT_WINDOW + 1), 0)

    async def test_thousands_parked_cost_no_timer_each(self) -> None:
        queue = self.make(max_concurrency=2)
        for shard in range(2000):
            self.put(queue, shard)
        await self.clock.advance(1)
        self.assertLessEqual(len(self.clock._timers), 2)  # one sleeping worker per bucket, whatever the crowd


class StatsTests(unittest.TestCase):
    def test_wait_histogram(self) -> None:
        stats = gq.Stats()
        for seconds in (0.0, 0.004, 0.5, 5.0, 10**6):
            stats.observe_wait(seconds)
        self.assertEqual(stats.wait_counts[0], 2)
        self.assertEqual(stats.wait_counts[gq.Stats.WAIT_BUCKETS.index(0.5)], 1)
        self.assertEqual(stats.wait_counts[gq.Stats.WAIT_BUCKETS.index(5)], 1)
        self.assertEqual(stats.wait_counts[-1], 1)
        self.assertEqual(sum(stats.wait_counts), 5)


# ----------------------------------------------------------------------------------------------------------------
# Discord
# ----------------------------------------------------------------------------------------------------------------


class GatewayBotParsingTests(unittest.TestCase):
    def test_good_answer(self) -> None:
        limits = gq.parse_gateway_bot(gateway_body(16, 2000, 1500, 3_600_000))
        self.assertEqual(limits, gq.GatewayLimits(16, 2000, 1500, 3600.0, 1))

    def test_bad_answers(self) -> None:
        bodies = [b"", b"<html>", b"[]", b"{}", b'{"session_start_limit": {}}',
                  gateway_body(0), gateway_body(total=0), gateway_body(remaining=-1),
                  gateway_body().replace(b'"max_concurrency": 1', b'"max_concurrency": true'),
                  gateway_body().replace(b'"total": 1000', b'"total": "1000"'),
                  gateway_body().replace(b'"reset_after": 14400000', b'"reset_after": 1.5')]
        for body in bodies:
            with self.subTest(body=body):
                with self.assertRaises(gq.DiscordError) as caught:
                    gq.parse_gateway_bot(body)
                self.assertFalse(caught.exception.fatal)

    def test_backoff(self) -> None:
        self.assertEqual(gq.backoff_delay(1, rand=lambda: 0.0), 0.5)
        self.assertEqual(gq.backoff_delay(1, rand=lambda: 1.0), 1.0)
        self.assertEqual(gq.backoff_delay(4, rand=lambda: 1.0), 8.0)
        self.assertEqual(gq.backoff_delay(100, rand=lambda: 1.0), gq.BACKOFF_CAP)
        self.assertEqual(gq.backoff_delay(100, rand=lambda: 0.0), gq.BACKOFF_CAP / 2)
        self.assertEqual(gq.backoff_delay(1, retry_after=42.5, rand=lambda: 1.0), 42.5)


class FetchTests(unittest.TestCase):
    def fetch(self, *answers: Tuple[int, dict, bytes, float], timeout: float = 2.0) -> Tuple[Any, FakeDiscord]:
        fake = FakeDiscord(list(answers))
        self.addCleanup(fake.close)
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
        error, _ = self.fetch((429, {"Retry-After": "7"}, b"not json", 0))
        self.assertEqual(error.retry_after, 7.0)

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

    def test_unreachable(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with self.assertRaises(gq.DiscordError) as caught:
            gq.fetch_gateway_bot(f"http://127.0.0.1:{port}/api", TOKEN, 1.0)
        self.assertNotIn(TOKEN, str(caught.exception))


class DiscordLimitsTests(unittest.IsolatedAsyncioTestCase):
    """The refresh loop with a scripted fetch and a recording sleep (no time passes)."""

    async def run_script(self, script: List[Any], sleeps_allowed: int = 10) -> Tuple[gq.DiscordLimits, List[float], List[Any]]:
        clock = FakeClock(1000.0)
        queue = gq.IdentifyQueue(5.0, 1, clock=clock, sleep=clock.sleep)
        fatal: List[Any] = []
        sleeps: List[float] = []
        answers = iter(script)

        def fetch() -> gq.GatewayLimits:
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

        limits = gq.DiscordLimits(queue, fetch, on_fatal=fatal.append, refresh_interval=600, sleep=sleep)
        try:
            await limits.run()
        except Done:
            pass
        return limits, sleeps, fatal

    async def test_refused_token_at_startup_is_fatal_and_not_retried(self) -> None:
        limits, sleeps, fatal = await self.run_script([gq.DiscordError("HTTP 401", status=401), gq.GatewayLimits(1, 1, 1, 1, 1)])
        self.assertEqual(len(fatal), 1)
        self.assertEqual(sleeps, [])
        self.assertEqual(limits.queue.stats.discord["401"], 1)

    async def test_refused_token_later_keeps_last_limits(self) -> None:
        limits, sleeps, fatal = await self.run_script([gq.GatewayLimits(4, 1000, 900, 3600, 1), gq.DiscordError("x", status=401)])
        self.assertEqual(fatal, [])
        self.assertEqual(limits.queue.max_concurrency, 4)
        self.assertEqual(limits.queue.budget.remaining, 900)
        self.assertEqual(sleeps, [600])

    async def test_rate_limit_is_honoured(self) -> None:
        _, sleeps, _ = await self.run_script([gq.DiscordError("429", status=429, retry_after=42.0), gq.GatewayLimits(1, 1000, 1000, 60, 1)])
        self.assertGreaterEqual(sleeps[0], 42.0)
        self.assertEqual(sleeps[1], 60 + gq.RESET_MARGIN)  # next refresh: at the budget's reset, before 600 s

    async def test_failures_back_off_and_limits_stay_unknown(self) -> None:
        errors = [gq.DiscordError(f"e{i}", status=s) for i, s in enumerate([500, None, 502, None])]
        limits, sleeps, _ = await self.run_script(errors + [gq.GatewayLimits(16, 1000, 999, 3600, 1)])
        self.assertEqual(len(sleeps), 5)
        for failures, delay in enumerate(sleeps[:4], start=1):
            step = min(gq.BACKOFF_CAP, gq.BACKOFF_BASE * 2 ** (failures - 1))
            self.assertTrue(step / 2 <= delay <= step, (failures, delay))
        self.assertEqual(limits.queue.max_concurrency, 16)
        self.assertTrue(limits.known)
        self.assertEqual(limits.queue.stats.discord["500"], 1)
        self.assertEqual(limits.queue.stats.discord["error"], 2)

    async def test_apply_subtracts_grants_in_flight(self) -> None:
        clock = FakeClock(50.0)
        queue = gq.IdentifyQueue(5.0, 4, clock=clock, sleep=clock.sleep)
        queue.recent.extend([(45.0, 0), (49.0, 1), (10.0, 2)])
        limits = gq.DiscordLimits(queue, lambda: None, on_fatal=lambda e: None)
        limits.apply(gq.GatewayLimits(4, 1000, 100, 10.0, 1))
        self.assertEqual(queue.budget.remaining, 98)
        self.assertEqual(queue.budget.reset_at, 50.0 + 10.0 + gq.RESET_MARGIN)


# ----------------------------------------------------------------------------------------------------------------
# Connections (end to end over loopback)
# ----------------------------------------------------------------------------------------------------------------


class ServerTestCase(unittest.IsolatedAsyncioTestCase):
    async def start(self, **kwargs: Any) -> gq.Server:
        server_options = {k: kwargs.pop(k) for k in list(kwargs) if k in (
            "head_timeout", "keepalive_timeout", "max_connections", "refresh_interval", "discord_timeout")}
        config = gq.Config(**{"host": "127.0.0.1", "port": 0, "interval": 0.3, **kwargs})
        server = gq.Server(config, **server_options)
        await server.start()
        self.addAsyncCleanup(server.stop)
        return server

    async def connect(self, server: gq.Server) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        self.addCleanup(writer.close)
        return reader, writer

    async def ask(self, server: gq.Server, raw: bytes, head: bool = False) -> Response:
        reader, writer = await self.connect(server)
        writer.write(raw)
        return await asyncio.wait_for(read_response(reader, head), 5)


class ConnectionTests(ServerTestCase):
    async def test_grant(self) -> None:
        server = await self.start()
        response = await self.ask(server, get("/?shard=3"))
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, gq.GRANT_BODY)
        self.assertEqual(response.headers["content-type"], "application/json")
        self.assertEqual(server.stats.requests["granted"], 1)

    async def test_any_method_and_path_is_queued(self) -> None:
        server = await self.start(max_concurrency=3)
        for i, raw in enumerate([get("/anything?shard=0"), get("/?shard=1", method="POST"), get("/x/y?shard=2", method="DELETE")]):
            self.assertEqual((await self.ask(server, raw)).status, 200)
        self.assertEqual(server.stats.requests["granted"], 3)

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
        self.assertLess(elapsed, 1.5)

    async def test_different_buckets_go_together(self) -> None:
        server = await self.start(max_concurrency=4, interval=5.0)
        started = time.monotonic()
        results = await asyncio.gather(*(self.ask(server, get(f"/?shard={s}")) for s in range(4)))
        self.assertEqual([r.status for r in results], [200] * 4)
        self.assertLess(time.monotonic() - started, 1.0)

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
        self.assertEqual([s for s, _ in statuses], [200, 200, 200, 200, 200])
        self.assertEqual(statuses[0][1], gq.GRANT_BODY[:12])
        self.assertEqual(statuses[1][1], b'{"status": "')
        self.assertEqual(server.stats.requests["granted"], 3)

    async def test_body_is_read_and_discarded(self) -> None:
        server = await self.start()
        reader, writer = await self.connect(server)
        writer.write(b"POST /?shard=0 HTTP/1.1\r\nHost: q\r\nContent-Length: 11\r\n\r\nhello")
        await asyncio.sleep(0.05)
        writer.write(b" world" + get("/healthz"))
        self.assertEqual((await asyncio.wait_for(read_response(reader), 5)).status, 200)
        self.assertEqual((await asyncio.wait_for(read_response(reader), 5)).json()["status"], "ok")

    async def test_disconnect_while_parked_costs_nothing(self) -> None:
        server = await self.start(interval=0.4)
        first = await self.ask(server, get("/?shard=0"))
        granted_at = time.monotonic()
        self.assertEqual(first.status, 200)
        reader, writer = await self.connect(server)
        writer.write(get("/?shard=0"))
        await asyncio.sleep(0.05)
        self.assertEqual(server.queue.waiting, 1)
        writer.close()
        await asyncio.sleep(0.05)
        self.assertEqual(server.queue.waiting, 0)  # dropped when its connection closed, not at its turn
        self.assertEqual(server.stats.requests["cancelled"], 1)
        third = await self.ask(server, get("/?shard=0"))
        waited = time.monotonic() - granted_at
        self.assertEqual(third.status, 200)
        self.assertGreaterEqual(waited, 0.4)
        self.assertLess(waited, 0.7)  # on schedule: the cancelled one did not take the slot
        self.assertEqual(server.stats.requests["granted"], 2)

    async def test_bad_shard_is_400_and_nothing_queued(self) -> None:
        server = await self.start()
        reader, writer = await self.connect(server)
        for query in ("shard=abc", "shard=-1", "shard=4294967296", "shard=1&shard=2", "shard="):
            writer.write(get(f"/?{query}"))
            response = await asyncio.wait_for(read_response(reader), 5)
            self.assertEqual(response.status, 400, query)
            self.assertIn("shard", response.json()["message"])
        writer.write(get("/healthz"))  # the connection is still usable
        self.assertEqual((await asyncio.wait_for(read_response(reader), 5)).status, 200)
        self.assertEqual(server.stats.requests["granted"], 0)
        self.assertEqual(server.stats.requests["rejected"], 5)

    async def test_missing_shard_is_shard_zero_with_one_warning(self) -> None:
        server = await self.start(max_concurrency=2, interval=0.05)
        with self.assertLogs("gateway_queue", logging.WARNING) as logs:
            for _ in range(2):
                self.assertEqual((await self.ask(server, get("/"))).status, 200)
        self.assertEqual(len([r for r in logs.records if "shard" in r.getMessage()]), 1)

    async def test_malformed_request_closes_and_others_are_served(self) -> None:
        server = await self.start()
        for raw, status in [(b"GET / HTTP/1.1\nHost: q\n\n", 400), (b"GET / HTTP/3.0\r\nHost: q\r\n\r\n", 505),
                            (b"POST / HTTP/1.1\r\nHost: q\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
                            (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)), 400)]:
            reader, writer = await self.connect(server)
            writer.write(raw)
            response = await asyncio.wait_for(read_response(reader), 5)
            self.assertEqual(response.status, status)
            self.assertEqual(response.headers["connection"], "close")
            self.assertIn("message", response.json())
            self.assertTrue(await closed_by_peer(reader))
        self.assertEqual((await self.ask(server, get("/?shard=0"))).status, 200)

    async def test_size_limits(self) -> None:
        server = await self.start()
        cases = [
            (get("/" + "a" * gq.MAX_REQUEST_LINE), 414),
            (get("/", *[f"X-{i}: {'v' * 200}" for i in range(90)]), 431),
            (get("/", *[f"X-{i}: v" for i in range(gq.MAX_HEADERS + 1)]), 431),
            (get("/", "Content-Length: 100000", method="POST"), 413),
        ]
        for raw, status in cases:
            response = await self.ask(server, raw)
            self.assertEqual((response.status, response.headers["connection"]), (status, "close"))
        self.assertEqual(server.stats.requests["granted"], 0)

    async def test_slow_request_head_gets_408(self) -> None:
        server = await self.start(head_timeout=0.2)
        reader, writer = await self.connect(server)
        writer.write(b"GET /?shard=0 HTTP/1.1\r\nHo")
        started = time.monotonic()
        response = await asyncio.wait_for(read_response(reader), 5)
        self.assertEqual(response.status, 408)
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertTrue(await closed_by_peer(reader))

    async def test_trickled_head_cannot_extend_its_deadline(self) -> None:
        server = await self.start(head_timeout=0.3)
        reader, writer = await self.connect(server)
        started = time.monotonic()
        for byte in b"GET /?shard=0 HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaa":
            writer.write(bytes([byte]))
            await asyncio.sleep(0.02)
            if reader.at_eof() or len(reader._buffer):  # the 408 has arrived
                break
        response = await asyncio.wait_for(read_response(reader), 5)
        self.assertEqual(response.status, 408)
        self.assertLess(time.monotonic() - started, 0.8)

    async def test_trickled_head_is_parsed_once_per_line(self) -> None:
        server = await self.start(head_timeout=5.0)
        calls = []
        real = gq.parse_request_head

        def counting(data: bytes) -> Any:
            calls.append(len(data))
            return real(data)

        with unittest.mock.patch.object(gq, "parse_request_head", counting):
            reader, writer = await self.connect(server)
            head = get("/?shard=0", "X-Long: " + "a" * 3000)
            for byte in head:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0)  # let the server read each byte on its own
            response = await asyncio.wait_for(read_response(reader), 5)
            self.assertEqual(response.status, 200)
        self.assertLessEqual(len(calls), 2 * head.count(b"\n") + 2)  # not once per byte

    async def test_trickled_overlong_lines_still_hit_their_limits(self) -> None:
        server = await self.start(head_timeout=5.0)
        for raw, status in [(b"GET /" + b"a" * (gq.MAX_REQUEST_LINE + 10), 414),
                            (b"GET / HTTP/1.1\r\nX-A: " + b"a" * (gq.MAX_HEAD_BYTES + 10), 431)]:
            reader, writer = await self.connect(server)
            for start in range(0, len(raw), 512):
                writer.write(raw[start:start + 512])
                await asyncio.sleep(0.001)
            response = await asyncio.wait_for(read_response(reader), 5)
            self.assertEqual(response.status, status)

    async def test_idle_keep_alive_is_closed(self) -> None:
        server = await self.start(keepalive_timeout=0.2)
        reader, writer = await self.connect(server)
        writer.write(get("/healthz"))
        await read_response(reader)
        self.assertTrue(await closed_by_peer(reader, timeout=1.0))
        self.assertEqual(len(server.connections), 0)

    async def test_parked_request_has_no_timeout(self) -> None:
        server = await self.start(interval=5.0, head_timeout=0.1, keepalive_timeout=0.1)
        await self.ask(server, get("/?shard=0"))
        reader, writer = await self.connect(server)
        writer.write(get("/?shard=0"))
        await asyncio.sleep(0.4)
        self.assertEqual(server.queue.waiting, 1)
        self.assertFalse(reader.at_eof())

    async def test_connection_cap_answers_503(self) -> None:
        server = await self.start(max_connections=2)
        for _ in range(2):
            await self.connect(server)
        await asyncio.sleep(0.05)
        reader, writer = await self.connect(server)
        response = await asyncio.wait_for(read_response(reader), 5)
        self.assertEqual((response.status, response.headers["connection"]), (503, "close"))
        self.assertTrue(await closed_by_peer(reader))

    async def test_reserved_paths_are_never_queued(self) -> None:
        server = await self.start()
        server.queue.set_limits(1, gq.Budget(1, 0, time.monotonic() + 3600))  # nothing could be granted
        parked_reader, parked_writer = await self.connect(server)
        parked_writer.write(get("/?shard=0"))
        health = await self.ask(server, get("/healthz"))
        self.assertEqual((health.status, health.json()["waiting"]), (200, 1))
        head = await self.ask(server, get("/healthz", method="HEAD"), head=True)
        self.assertEqual(head.status, 200)
        wrong = await self.ask(server, get("/healthz", method="POST"))
        self.assertEqual((wrong.status, wrong.headers["allow"]), (405, "GET, HEAD"))
        self.assertEqual(server.queue.waiting, 1)

    async def test_server_keeps_serving_after_resets(self) -> None:
        server = await self.start()
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.sendall(get("/?shard=0"))
            sock.close()  # RST
        await asyncio.sleep(0.1)
        self.assertEqual((await self.ask(server, get("/healthz"))).status, 200)


class LifecycleTests(ServerTestCase):
    async def test_stop_answers_parked_requests_503(self) -> None:
        server = await self.start(interval=5.0)
        await self.ask(server, get("/?shard=0"))
        reader, writer = await self.connect(server)
        writer.write(get("/?shard=0"))
        idle_reader, _ = await self.connect(server)
        await asyncio.sleep(0.05)
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
        for _ in range(100):
            if server.limits_source == "discord":
                break
            await asyncio.sleep(0.02)
        self.assertEqual((server.limits_source, server.queue.max_concurrency), ("discord", 4))
        started = time.monotonic()
        results = await asyncio.gather(*(self.ask(server, get(f"/?shard={s}")) for s in range(4)))
        self.assertEqual([r.status for r in results], [200] * 4)
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual(server.queue.budget.remaining, 496)

    async def test_serves_with_fallback_until_discord_answers(self) -> None:
        fake = FakeDiscord([(503, {}, b"down", 0)])
        self.addCleanup(fake.close)
        server = await self.start(token=TOKEN, api_url=fake.url, interval=5.0)
        response = await self.ask(server, get("/?shard=5"))
        self.assertEqual(response.status, 200)
        self.assertEqual((server.limits_source, server.queue.max_concurrency, server.queue.budget), ("fallback", 1, None))

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


class AlwaysThere:
    def release(self) -> bool:
        return True


class DrainEstimateTests(unittest.TestCase):
    """The /status estimate on a fake clock: no worker runs, the queue is only looked at."""

    def queue(self, max_concurrency: int, waiting: List[int], budget: Optional[gq.Budget] = None) -> gq.IdentifyQueue:
        queue = gq.IdentifyQueue(5.0, max_concurrency, clock=lambda: 100.0)
        queue.budget = budget
        for bucket, count in enumerate(waiting):
            for _ in range(count):
                queue.put(bucket, AlwaysThere())
        return queue

    def test_empty(self) -> None:
        self.assertEqual(self.queue(4, [0, 0, 0, 0]).drain_estimate(100.0), 0.0)

    def test_slowest_bucket_decides(self) -> None:
        queue = self.queue(4, [3, 1, 5, 0])
        self.assertEqual(queue.drain_estimate(100.0), 20.0)  # bucket 2: now, +5, +10, +15, +20
        queue.buckets[1].next_at = 130.0
        self.assertEqual(queue.drain_estimate(100.0), 30.0)

    def test_budget_that_runs_out_adds_the_reset(self) -> None:
        budget = gq.Budget(total=10, remaining=2, reset_at=1000.0)
        queue = self.queue(2, [2, 2], budget)
        # two grants now (one per bucket), the budget is gone, the other two go at the reset, together
        self.assertEqual(queue.drain_estimate(100.0), 900.0)
        queue.budget = gq.Budget(total=10, remaining=4, reset_at=1000.0)
        self.assertEqual(queue.drain_estimate(100.0), 5.0)

    def test_several_resets(self) -> None:
        queue = self.queue(1, [5], gq.Budget(total=2, remaining=0, reset_at=200.0))
        # 2 at the first reset (200, 205), 2 at the next (86600, 86605), the last at the third reset
        self.assertEqual(queue.drain_estimate(100.0), 200.0 + 2 * gq.BUDGET_WINDOW - 100.0)


class OperatorViewHelperTests(unittest.TestCase):
    def test_prefers_html(self) -> None:
        browser = b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        self.assertTrue(gq.prefers_html(browser))
        for accept in (None, b"", b"*/*", b"application/json", b"application/json, text/html",
                       b"text/html;q=0.5, application/json", b"text/*;q=0.2, */*;q=0.5"):
            with self.subTest(accept=accept):
                self.assertFalse(gq.prefers_html(accept))
        self.assertTrue(gq.prefers_html(b"text/*, application/json;q=0.9"))

    def test_describe_seconds(self) -> None:
        cases = [(0, "now"), (0.4, "now"), (1, "about 1 second"), (59.6, "about 1 minute"),
                 (250, "about 4 minutes 10 seconds"), (3 * 3600 + 5 * 60 + 7, "about 3 hours 5 minutes"),
                 (86400 * 2 + 3600, "about 2 days 1 hour")]
        for seconds, words in cases:
            self.assertEqual(gq.describe_seconds(seconds), words)


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
            "gateway_queue_discord_requests_total": "counter",
        }
        for name, kind in expected.items():
            self.assertEqual(families[name][0], kind, name)
        for name, (kind, _) in families.items():
            self.assertRegex(name, r"^(gateway_queue|process)_[a-z_]+$")
            self.assertEqual(kind == "counter", name.endswith("_total"), name)  # _total is for counters only
        if os.path.exists("/proc/self/stat"):
            for name in ("process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds_total",
                         "process_start_time_seconds", "process_max_fds"):
                self.assertIn(name, samples)
            self.assertGreater(samples["process_resident_memory_bytes"], 1_000_000)
            self.assertAlmostEqual(samples["process_start_time_seconds"], time.time(), delta=600)
        self.assertEqual(samples['gateway_queue_waiting_requests{bucket="1"}'], 0)
        self.assertEqual(samples["gateway_queue_max_concurrency"], 2)
        self.assertEqual(samples["gateway_queue_open_connections"], 1)

    async def test_counters_move_on_grant_cancel_and_reject(self) -> None:
        server = await self.start(interval=5.0)
        await self.ask(server, get("/?shard=0"))  # granted
        reader, writer = await self.connect(server)
        writer.write(get("/?shard=0"))  # parked behind the first
        await asyncio.sleep(0.05)
        _, samples = await self.metrics(server)
        self.assertEqual(samples['gateway_queue_waiting_requests{bucket="0"}'], 1)
        writer.close()  # cancelled
        await asyncio.sleep(0.05)
        await self.ask(server, get("/?shard=x"))  # rejected
        _, samples = await self.metrics(server)
        self.assertEqual(samples['gateway_queue_requests_total{outcome="granted"}'], 1)
        self.assertEqual(samples['gateway_queue_requests_total{outcome="cancelled"}'], 1)
        self.assertEqual(samples['gateway_queue_requests_total{outcome="rejected"}'], 1)
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
        server.queue.set_limits(2, gq.Budget(total=1000, remaining=1, reset_at=time.monotonic() + 3600))
        await self.ask(server, get("/?shard=0"))  # spends the last session start
        parked = [await self.connect(server) for _ in range(3)]
        for shard, (_, writer) in enumerate(parked):
            writer.write(get(f"/?shard={shard + 1}"))
        await asyncio.sleep(0.1)
        _, samples = await self.metrics(server)
        self.assertEqual(samples["gateway_queue_session_starts_remaining"], 0)
        self.assertEqual(samples["gateway_queue_session_start_limit"], 1000)
        self.assertAlmostEqual(samples["gateway_queue_session_start_reset_seconds"], 3600, delta=5)
        status = (await self.ask(server, get("/status"))).json()
        self.assertEqual(status["session_starts"]["remaining"], 0)
        self.assertEqual(status["waiting"], 3)
        self.assertEqual([b["waiting"] for b in status["buckets"]], [1, 2])
        self.assertAlmostEqual(status["buckets"][0]["next_grant_in"], 3600, delta=5)
        # after the reset: bucket 0 and 1 go together, bucket 1's second one an interval later
        self.assertAlmostEqual(status["estimated_drain_seconds"], 3605, delta=5)
        self.assertEqual(status["limits"], {"source": "environment", "max_concurrency": 2, "identify_interval": 5.0})
        self.assertEqual(status["open_connections"], 6)  # 3 parked, and 3 kept alive by ask(): grant, metrics, status

    async def test_status_html_for_browsers(self) -> None:
        import html.parser

        server = await self.start(interval=5.0, max_concurrency=3)
        await self.ask(server, get("/?shard=2"))
        for _ in range(4):
            _, writer = await self.connect(server)
            writer.write(get("/?shard=2"))
        await asyncio.sleep(0.1)
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
            for target in ("/?shard=0", "/metrics", "/status"):
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


# ----------------------------------------------------------------------------------------------------------------
# Fuzzing: mutated requests against the parser and a live server
# ----------------------------------------------------------------------------------------------------------------

FUZZ_SECONDS = float(os.environ.get("GATEWAY_QUEUE_FUZZ_SECONDS", "10"))  # the long run: GATEWAY_QUEUE_FUZZ_SECONDS=600
FUZZ_SEED = int(os.environ.get("GATEWAY_QUEUE_FUZZ_SEED", "20261126"))
FUZZ_CORPUS = [raw for _, raw, _ in PARSER_CASES] + [
    get("/?shard=1") + get("/healthz") + get("/?shard=2", method="HEAD"),
    b"POST /?shard=3 HTTP/1.1\r\nHost: q\r\nContent-Length: 4\r\n\r\nbody" + get("/status", "Accept: text/html"),
    b"GET /metrics HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    get("/?shard=7&x=%ff&shard", "Authorization: Bearer x", "Connection: close"),
]
FUZZ_TOKENS = [b"\r\n", b"\n", b"\r", b"\r\n\r\n", b" ", b"\t", b":", b"\x00", b"\x7f", b"\xff", b"?shard=", b"%",
               b"Content-Length: 3\r\n", b"Content-Length: 99999999999999999999\r\n", b"Transfer-Encoding: chunked\r\n",
               b"Host: q\r\n", b"Connection: close\r\n", b"HTTP/1.0", b"HTTP/9.9", b"HEAD", b"/healthz", b"a" * 9000]


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


class ErrorLogCatcher(logging.Handler):
    """Collects every ERROR record from the service and from asyncio (unhandled exceptions land there)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


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
        config = gq.Config(host="127.0.0.1", port=0, interval=0.001, max_concurrency=64)
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


# ----------------------------------------------------------------------------------------------------------------
# Command line
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
        code, err = self.run_main([], {"IDENTIFY_INTERVAL": "4", "DISCORD_TOKEN": TOKEN})
        self.assertEqual(code, 2)
        self.assertIn("IDENTIFY_INTERVAL", err)
        self.assertEqual(len(err.strip().splitlines()), 1)
        self.assertNotIn(TOKEN, err)

    def test_flags_override_environment(self) -> None:
        code, err = self.run_main(["--port", "http"], {"PORT": "80"})
        self.assertEqual(code, 2)
        self.assertIn("PORT", err)

    def test_help(self) -> None:
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code, _ = self.run_main(["--help"], {})
        self.assertEqual(code, 0)
        self.assertIn("DISCORD_TOKEN", stdout.getvalue())

    def test_healthcheck_fails_without_a_service(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        code, err = self.run_main(["--healthcheck"], {"PORT": str(port)})
        self.assertEqual(code, 1)


class ProcessTests(unittest.TestCase):
    """The real process: start, answer, SIGTERM, exit 0 within 2 s."""

    def start(self, **environ: str) -> Tuple[subprocess.Popen, int]:
        env = {"PATH": os.environ.get("PATH", ""), "PORT": "0", **environ}
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "gateway_queue.py")], env=env,
                                stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        self.addCleanup(proc.stderr.close)
        line = proc.stderr.readline()
        self.assertIn("listening on 127.0.0.1:", line)
        return proc, int(line.split("listening on 127.0.0.1:")[1].split(";")[0])

    def test_sigterm_answers_parked_and_exits_0(self) -> None:
        proc, port = self.start(IDENTIFY_INTERVAL="60")
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

    def test_loop_closing_with_open_connections_is_quiet(self) -> None:
        code = (
            "import asyncio, gateway_queue as gq\n"
            "async def main():\n"
            "    server = gq.Server(gq.Config(port=0, interval=60))\n"
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

if __name__ == "__main__":
    unittest.main()
