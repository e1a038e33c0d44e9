"""gateway-queue: one identify queue for every shard of a Discord bot.

Discord lets a bot IDENTIFY once per 5 seconds per bucket (bucket = shard_id % max_concurrency) and caps the number
of session starts a day. Shards that run in many processes on many hosts cannot see each other, so each one asks this
service before it identifies: the request is parked until that shard may go, then answered

    200 {"message": "You're free to connect now! :)"}

It is a drop-in replacement for twilight-rs/gateway-queue: clients call `http://gateway-queue?shard=42`.

Run it:   python3 gateway_queue.py            (or --host/--port; --help lists everything)
Test it:  python3 -m unittest -v
Poke it:  curl -i 'http://127.0.0.1:5000/?shard=0'   and   curl -i http://127.0.0.1:5000/healthz

Environment (read once at startup by Config.from_env; a bad value exits 2 with a line naming the variable):

    variable          default                        meaning
    HOST              127.0.0.1                      bind address: IPv4 or IPv6 literal, or a host name
    PORT              5000                           bind port; 0 picks a free one (the bound address is logged)
    DISCORD_TOKEN     unset                          bot token ("Bot " prefix optional); limits come from Discord
    DISCORD_API_URL   https://discord.com/api/v10    Discord's REST base
    MAX_CONCURRENCY   1                              number of buckets when no token is set (1-1024)
    IDENTIFY_INTERVAL 5.1                            seconds between two grants in one bucket; at least 5
    LOG_LEVEL         INFO                           DEBUG, INFO, WARNING or ERROR
    AUTH_TOKEN        unset                          shared secret: every request but /healthz needs
                                                     "Authorization: Bearer <AUTH_TOKEN>"

HTTP API:

    any method, any path but the reserved ones, ?shard=N   parked until shard N may identify, then 200 (HEAD: no body)
    GET|HEAD /healthz                                      200 {"status": "ok", ...} at once, never queued
    GET|HEAD /metrics                                      Prometheus text format, never queued
    GET|HEAD /status                                       JSON snapshot (HTML for browsers), never queued

Status codes: 200 granted or answered; 400 bad shard or malformed request; 401 missing or wrong AUTH_TOKEN;
404 unknown reserved path; 405 wrong method on a reserved path; 408 request head too slow; 411 chunked body;
413 body too large; 414 request line too long; 431 header block too large; 501 unknown transfer coding;
503 shutting down or too many connections (retry); 505 HTTP version other than 1.0 and 1.1. Errors carry a JSON
{"message": ...}; errors where framing is unsure also carry "Connection: close" and close the connection.

Known omissions: no TLS (run it on a private network or behind a proxy), no chunked request bodies (411), no
HTTP/2. A client that half-closes its socket while parked is treated as gone: its request is dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import hashlib
import heapq
import hmac
import html
import http.client
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Coroutine, Deque, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

try:
    import resource
except ImportError:  # not on Windows; the service then keeps the default descriptor limit
    resource = None  # type: ignore[assignment]

VERSION = "1.0.0"
PROJECT_URL = "https://github.com/gateway-queue/gateway-queue"
USER_AGENT = f"DiscordBot ({PROJECT_URL}, {VERSION})"  # Discord may block requests without this form

log = logging.getLogger("gateway_queue")


# ----------------------------------------------------------------------------------------------------------------
# Limits
# ----------------------------------------------------------------------------------------------------------------

MAX_REQUEST_LINE = 8 * 1024  # 414 past it; queue URLs are tiny, and 8 KiB is what nginx and most servers allow
MAX_HEAD_BYTES = 16 * 1024  # 431 past it (request line and headers together); like h11 and IIS
MAX_HEADERS = 100  # 431 past it; like http.client
MAX_BODY_BYTES = 64 * 1024  # 413 past it; queue calls carry no body, the few bytes a client sends are discarded
HEAD_TIMEOUT = 10.0  # 408 when a request takes longer from its first byte: a slow sender cannot hold a slot forever
KEEPALIVE_TIMEOUT = 75.0  # an idle connection (no request, none parked) is closed after this; nginx's default
READ_CHUNK = 64 * 1024  # bytes asked of the socket per read
MAX_PIPELINED_BYTES = 64 * 1024  # a client this far ahead of its answers is not read until it catches up
WRITE_HIGH_WATER = 64 * 1024  # a client that does not read its answers is not read either, past this
LISTEN_BACKLOG = 4096  # an accept burst of thousands of shards needs it; Linux caps it at net.core.somaxconn
FD_RESERVE = 64  # descriptors kept back from the connection cap for the listener, Discord calls, logs, /proc
SHUTDOWN_GRACE = 1.0  # seconds given to flush the 503s at shutdown; the whole stop stays under 2 s

MIN_INTERVAL = 5.0  # Discord: one IDENTIFY per 5 s per bucket
DEFAULT_INTERVAL = 5.1  # 100 ms over Discord's 5 s, because Discord times IDENTIFY to IDENTIFY (see README)
MAX_INTERVAL = 3600.0  # anything longer is a typo, not a rate limit
MAX_CONCURRENCY = 1024  # Discord hands out 1, 16, 64...; each bucket costs one worker task
MAX_SHARD = 2**32  # shard ids are 32-bit in every client library
TIMER_SLACK = 0.002  # a long sleep wakes this much + 0.2% early, then finishes with a short one (see _sleep_until)
SHORT_SLEEP = 0.05  # a wait this short is slept in one go: its kernel slack is microseconds

DISCORD_TIMEOUT = 10.0  # one GET /gateway/bot, connect to last byte
DISCORD_MAX_BODY = 64 * 1024  # /gateway/bot answers are ~200 bytes; a bigger one is garbage
REFRESH_INTERVAL = 600.0  # re-read /gateway/bot every 10 minutes: 144 calls a day, far below any rate limit
RESET_MARGIN = 1.0  # wait this long past Discord's reset_after before trusting that the budget is back
BUDGET_WINDOW = 86400.0  # Discord's session-start window, used when the reset is rolled forward locally
IN_FLIGHT_WINDOW = 30.0  # grants this recent may not have reached Discord's count yet: subtracted from a fetch
BACKOFF_BASE = 1.0  # first retry after a Discord failure, doubling per failure...
BACKOFF_CAP = 300.0  # ...up to this: a flapping Discord sees at most one call per 5 minutes from us


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A bad environment value; the message names the variable and what is accepted, never a secret's value."""


_DIGITS = re.compile(r"[0-9]+")  # int() alone would take "+1", " 1", "1_0" and non-ASCII digits
_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?")  # float() alone would take "nan", "inf" and "1e3"
_SECRET = re.compile(r"[\x21-\x7e]+")  # it travels in an HTTP header: visible ASCII, no spaces
_HOST_NAME = re.compile(r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the service reads from its environment. Tests build one directly, without the 5 s floor."""

    host: str = "127.0.0.1"
    port: int = 5000
    token: Optional[str] = dataclasses.field(default=None, repr=False)
    api_url: str = "https://discord.com/api/v10"
    max_concurrency: int = 1
    interval: float = DEFAULT_INTERVAL
    log_level: str = "INFO"
    auth_token: Optional[str] = dataclasses.field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "Config":
        """Validates every variable; raises ConfigError naming the first bad one."""
        return cls(
            host=_host(environ.get("HOST", cls.host)),
            port=_integer(environ, "PORT", cls.port, 0, 65535),
            token=_secret(environ, "DISCORD_TOKEN", strip_prefix="bot "),
            api_url=_api_url(environ.get("DISCORD_API_URL", cls.api_url)),
            max_concurrency=_integer(environ, "MAX_CONCURRENCY", cls.max_concurrency, 1, MAX_CONCURRENCY),
            interval=_interval(environ.get("IDENTIFY_INTERVAL")),
            log_level=_log_level(environ.get("LOG_LEVEL", cls.log_level)),
            auth_token=_secret(environ, "AUTH_TOKEN"),
        )


def _host(value: str) -> str:
    if value.startswith("[") and value.endswith("]"):  # "[::1]" as in a URL
        value = value[1:-1]
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if _HOST_NAME.fullmatch(value):
        return value
    raise ConfigError(f"HOST must be an IPv4 or IPv6 address or a host name, got {value!r}")


def _integer(environ: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    value = environ.get(name)
    if value is None:
        return default
    if not _DIGITS.fullmatch(value) or not low <= int(value) <= high:
        raise ConfigError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return int(value)


def _interval(value: Optional[str]) -> float:
    if value is None:
        return DEFAULT_INTERVAL
    if not _DECIMAL.fullmatch(value) or not MIN_INTERVAL <= float(value) <= MAX_INTERVAL:
        raise ConfigError(
            f"IDENTIFY_INTERVAL must be a number of seconds from {MIN_INTERVAL:g} to {MAX_INTERVAL:g} "
            f"(Discord allows one IDENTIFY per 5 s per bucket), got {value!r}"
        )
    return float(value)


def _secret(environ: Mapping[str, str], name: str, strip_prefix: str = "") -> Optional[str]:
    value = environ.get(name)
    if value is None:
        return None
    if strip_prefix and value[: len(strip_prefix)].lower() == strip_prefix:
        value = value[len(strip_prefix) :]
    if not _SECRET.fullmatch(value):  # the value itself is never echoed
        raise ConfigError(f"{name} is set but is empty or holds spaces or non-ASCII characters; unset it or fix it")
    return value


def _api_url(value: str) -> str:
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"DISCORD_API_URL must be an http:// or https:// base URL, got {value!r}")
    return value.rstrip("/")


def _log_level(value: str) -> str:
    if value.upper() not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return value.upper()


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


class HTTPError(Exception):
    """A request the service refuses. It becomes a response: status, a JSON {"message": ...} and extra headers.

    close=True where the framing of what follows is unsure (a malformed head, an unread body): the connection is
    closed after the response. close=False where the request was well-formed and only its content is refused.
    """

    def __init__(self, status: int, message: str, *, close: bool = True, headers: Sequence[Tuple[str, str]] = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close
        self.headers = tuple(headers)


# ----------------------------------------------------------------------------------------------------------------
# HTTP/1.1 parsing (RFC 9112)
# ----------------------------------------------------------------------------------------------------------------

# tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." / "^" / "_" / "`" / "|" / "~" / DIGIT / ALPHA
# token = 1*tchar
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# request-target: origin-form / absolute-form / asterisk-form, all visible ASCII (VCHAR = %x21-7E)
_TARGET = re.compile(rb"[\x21-\x7e]+")
# HTTP-version = HTTP-name "/" DIGIT "." DIGIT
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
# field-value = *( field-vchar / SP / HTAB ), field-vchar = VCHAR / obs-text: anything else is a control byte
_FIELD_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# bare LF (an LF not after a CR) and bare CR (a CR not before an LF) are both refused: RFC 9112 section 2.2
_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")


@dataclasses.dataclass(frozen=True)
class Request:
    """A parsed request head. Header names are lower-cased bytes; values are bytes with surrounding OWS removed."""

    method: str
    target: str
    path: str
    query: str
    version: str  # "1.0" or "1.1"
    headers: Tuple[Tuple[bytes, bytes], ...]
    keep_alive: bool
    content_length: int

    def header(self, name: bytes) -> Optional[bytes]:
        """The first value of a header (name in lower case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


def parse_request_head(data: bytes) -> Optional[Tuple[Request, int]]:
    """Parses one request head from the start of data.

    Returns (request, bytes used) once the head is complete, None while more bytes are needed, and raises HTTPError
    as soon as the bytes at hand cannot start a valid request (so a byte-at-a-time sender fails as early as a fast
    one). The body, if any, is left to the caller: request.content_length bytes follow the head.
    """
    data = bytes(data)
    # RFC 9112 section 2.2: a server SHOULD ignore at least one empty line (CRLF) received before the request-line.
    start = 0
    while data.startswith(b"\r\n", start):
        start += 2
    end = data.find(b"\r\n\r\n", start)
    if end < 0:
        line_end = data.find(b"\r\n", start)
        if (line_end < 0 and len(data) - start > MAX_REQUEST_LINE) or line_end - start > MAX_REQUEST_LINE:
            raise HTTPError(414, f"request line longer than {MAX_REQUEST_LINE} bytes")
        if len(data) - start > MAX_HEAD_BYTES:
            raise HTTPError(431, f"request head longer than {MAX_HEAD_BYTES} bytes")
        partial = data[start:-1] if data.endswith(b"\r") else data[start:]  # a final CR may yet get its LF
        _check_line_endings(partial)
        if line_end >= 0:  # the request line is complete: judge it now rather than after the headers
            _parse_request_line(data[start:line_end])
        return None
    if end + 4 - start > MAX_HEAD_BYTES:
        raise HTTPError(431, f"request head longer than {MAX_HEAD_BYTES} bytes")
    head = data[start:end]
    _check_line_endings(head)
    lines = head.split(b"\r\n")
    if len(lines[0]) > MAX_REQUEST_LINE:
        raise HTTPError(414, f"request line longer than {MAX_REQUEST_LINE} bytes")
    method, target, version = _parse_request_line(lines[0])
    if len(lines) - 1 > MAX_HEADERS:
        raise HTTPError(431, f"more than {MAX_HEADERS} header fields")
    headers = tuple(_parse_field_line(line) for line in lines[1:])
    return _build_request(method, target, version, headers), end + 4


def _check_line_endings(data: bytes) -> None:
    if _BARE_LF.search(data):
        raise HTTPError(400, "line ending without CR (bare LF)")
    if _BARE_CR.search(data):
        raise HTTPError(400, "CR not followed by LF (bare CR)")


# request-line = method SP request-target SP HTTP-version
def _parse_request_line(line: bytes) -> Tuple[str, str, str]:
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HTTPError(400, "request line must be: method SP target SP version")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HTTPError(400, "method is not a token")
    if not _TARGET.fullmatch(target):
        raise HTTPError(400, "request target holds spaces, control bytes or non-ASCII bytes")
    match = _VERSION.fullmatch(version)
    if not match:
        raise HTTPError(400, "malformed HTTP version")
    if match.group(1, 2) not in ((b"1", b"0"), (b"1", b"1")):
        raise HTTPError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    return method.decode("ascii"), target.decode("ascii"), version[5:].decode("ascii")


# field-line = field-name ":" OWS field-value OWS; obs-fold (a line starting with SP or HTAB) is refused
def _parse_field_line(line: bytes) -> Tuple[bytes, bytes]:
    if line[:1] in (b" ", b"\t"):
        raise HTTPError(400, "obsolete line folding in headers")
    name, colon, value = line.partition(b":")
    if not colon:
        raise HTTPError(400, "header line without a colon")
    if not _TOKEN.fullmatch(name):  # also catches whitespace before the colon and non-ASCII names
        raise HTTPError(400, "header name is not a token (whitespace before the colon?)")
    value = value.strip(b" \t")
    if _FIELD_CONTROL.search(value):
        raise HTTPError(400, "control byte in a header value")
    return name.lower(), value


def _build_request(method: str, target: str, version: str, headers: Tuple[Tuple[bytes, bytes], ...]) -> Request:
    def values(name: bytes) -> List[bytes]:
        return [value for key, value in headers if key == name]

    hosts = values(b"host")
    if len(hosts) > 1:
        raise HTTPError(400, "more than one Host header")
    if version == "1.1" and not hosts:
        raise HTTPError(400, "HTTP/1.1 request without a Host header")

    lengths = [item.strip(b" \t") for value in values(b"content-length") for item in value.split(b",")]
    if values(b"transfer-encoding"):
        if lengths:
            raise HTTPError(400, "both Content-Length and Transfer-Encoding")
        if version == "1.0":
            raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = b",".join(values(b"transfer-encoding")).lower().replace(b" ", b"").replace(b"\t", b"")
        if codings == b"chunked":
            raise HTTPError(411, "chunked request bodies are not accepted; send Content-Length (or no body)")
        raise HTTPError(501, "unsupported transfer coding")
    content_length = 0
    if lengths:
        if not all(_DIGITS.fullmatch(item.decode("ascii", "replace")) for item in lengths):
            raise HTTPError(400, "Content-Length is not a number")
        if len(set(int(item) for item in lengths)) > 1:
            raise HTTPError(400, "conflicting Content-Length values")
        content_length = int(lengths[0])
        if content_length > MAX_BODY_BYTES:
            raise HTTPError(413, f"request body larger than {MAX_BODY_BYTES} bytes")

    tokens = {item.strip(b" \t").lower() for value in values(b"connection") for item in value.split(b",")}
    keep_alive = b"close" not in tokens and (version == "1.1" or b"keep-alive" in tokens)

    # origin-form = absolute-path [ "?" query ]; absolute-form = absolute-URI; asterisk-form = "*" (OPTIONS only)
    if target.startswith("/"):
        path, _, query = target.partition("?")
    elif target == "*" and method == "OPTIONS":
        path, query = "*", ""
    elif target.lower().startswith(("http://", "https://")):
        try:
            parts = urllib.parse.urlsplit(target)
        except ValueError:  # urlsplit refuses some hosts, such as an unclosed "[" (found by the fuzzer)
            raise HTTPError(400, "malformed absolute request target") from None
        path, query = parts.path or "/", parts.query
    else:
        raise HTTPError(400, "request target must start with '/' or be an absolute http URL")
    return Request(method, target, path, query, version, headers, keep_alive, content_length)


def parse_shard(query: str) -> Optional[int]:
    """The shard id from a query string: None when absent; HTTPError(400) when malformed, repeated or too large."""
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, max_num_fields=MAX_HEADERS)
    except ValueError:
        raise HTTPError(400, "too many query parameters", close=False) from None
    values = [value for key, value in pairs if key == "shard"]
    if not values:
        return None
    if len(values) > 1:
        raise HTTPError(400, "the shard parameter is given more than once", close=False)
    value = values[0]
    if not _DIGITS.fullmatch(value):
        raise HTTPError(400, f"shard must be a whole number written in ASCII digits, got {value[:40]!r}", close=False)
    if len(value) > 10 or int(value) >= MAX_SHARD:
        raise HTTPError(400, f"shard must be below {MAX_SHARD}", close=False)
    return int(value)


# ----------------------------------------------------------------------------------------------------------------
# Responses
# ----------------------------------------------------------------------------------------------------------------

REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
JSON_TYPE = "application/json"
GRANT_BODY = b'{"message": "You\'re free to connect now! :)"}'  # twilight's 45 bytes, byte for byte


def render(
    status: int,
    body: bytes = b"",
    *,
    content_type: str = JSON_TYPE,
    headers: Sequence[Tuple[str, str]] = (),
    head: bool = False,
    close: bool = False,
    keep_alive_10: bool = False,
) -> bytes:
    """Renders a complete HTTP/1.1 response. head=True omits the body but keeps its Content-Length.

    close adds "Connection: close"; keep_alive_10 adds "Connection: keep-alive" for an HTTP/1.0 client that asked.
    """
    lines = [
        f"HTTP/1.1 {status} {REASONS[status]}",
        f"Server: gateway-queue/{VERSION}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
    ]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if close:
        lines.append("Connection: close")
    elif keep_alive_10:
        lines.append("Connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body)


def render_json(status: int, payload: Any, **kwargs: Any) -> bytes:
    """A JSON response; see render for the keyword arguments."""
    return render(status, json.dumps(payload).encode(), **kwargs)


def render_error(exc: HTTPError, request: Optional[Request] = None) -> bytes:
    """The response for a refused request: the status, {"message": ...}, and Connection: close where needed."""
    close = exc.close or request is None or not request.keep_alive
    return render_json(
        exc.status,
        {"message": exc.message},
        headers=exc.headers,
        head=request is not None and request.method == "HEAD",
        close=close,
        keep_alive_10=not close and request is not None and request.version == "1.0",
    )


@dataclasses.dataclass(frozen=True)
class Grant:
    """A parked request's answer, rendered once per (HEAD, close, HTTP/1.0 keep-alive) combination and shared: a
    parked connection keeps this instead of its whole request."""

    head: bool
    close: bool
    response: bytes


_GRANTS: Dict[Tuple[bool, bool, bool], Grant] = {}


def grant_for(request: Request) -> Grant:
    """The shared Grant for this request."""
    key = (request.method == "HEAD", not request.keep_alive, request.keep_alive and request.version == "1.0")
    if key not in _GRANTS:
        _GRANTS[key] = Grant(key[0], key[1], render(200, GRANT_BODY, head=key[0], close=key[1], keep_alive_10=key[2]))
    return _GRANTS[key]


# ----------------------------------------------------------------------------------------------------------------
# Queue
# ----------------------------------------------------------------------------------------------------------------

Clock = Callable[[], float]
Sleep = Callable[[float], Any]  # an awaitable-returning sleep, asyncio.sleep or a test's fake


class Stats:
    """Counters shared by the queue, the connections and the Discord client; /metrics renders them."""

    WAIT_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)

    def __init__(self) -> None:
        self.requests: Dict[str, int] = {"granted": 0, "cancelled": 0, "rejected": 0}
        self.wait_counts = [0] * (len(self.WAIT_BUCKETS) + 1)  # the last one is +Inf
        self.wait_sum = 0.0
        self.discord: Dict[str, int] = collections.Counter()

    def observe_wait(self, seconds: float) -> None:
        """Counts one grant's wait (arrival to grant) into its histogram bucket."""
        index = next((i for i, bound in enumerate(self.WAIT_BUCKETS) if seconds <= bound), len(self.WAIT_BUCKETS))
        self.wait_counts[index] += 1
        self.wait_sum += seconds


@dataclasses.dataclass
class Budget:
    """Discord's session-start budget: `remaining` of `total` until clock() reaches `reset_at`."""

    total: int
    remaining: int
    reset_at: float


class Client(Protocol):
    """Whoever parked a request: release() writes the grant, False if the client is already gone."""

    def release(self) -> bool: ...


class Waiter:
    """One parked request: its shard, its place in arrival order, and the client to release."""

    __slots__ = ("shard", "seq", "arrived", "client", "bucket")

    def __init__(self, shard: int, seq: int, arrived: float, client: Client, bucket: "Bucket"):
        self.shard = shard
        self.seq = seq
        self.arrived = arrived
        self.client = client  # the client itself, not a bound method: one object less per parked request
        self.bucket = bucket


class Bucket:
    """One rate-limit bucket: its waiters in arrival order and the earliest time it may grant again.

    An OrderedDict rather than an asyncio.Queue: a client that disconnects must leave the line in O(1), whatever
    its place, so that a storm of thousands of cancellations costs nothing.
    """

    __slots__ = ("index", "waiters", "next_at", "wakeup")

    def __init__(self, index: int, next_at: float):
        self.index = index
        self.waiters: "collections.OrderedDict[Waiter, None]" = collections.OrderedDict()
        self.next_at = next_at
        self.wakeup: Optional[asyncio.Future] = None  # set while the worker waits for a first waiter


class IdentifyQueue:
    """The rate limiter: per-bucket FIFO lines drained by one timed worker task each.

    A bucket grants at most once per `interval`, measured from the moment the previous grant was written; an idle
    bucket grants at once. With a Budget, every grant spends one session start, at grant time; at 0 every bucket
    waits for the reset. Only the clock and the sleep are injected: the queue knows nothing of sockets.
    """

    def __init__(
        self,
        interval: float,
        max_concurrency: int = 1,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        stats: Optional[Stats] = None,
    ):
        self.interval = interval
        self.clock = clock
        self._sleep = sleep
        self.stats = stats or Stats()
        self.max_concurrency = max_concurrency
        self.budget: Optional[Budget] = None
        self.buckets = [Bucket(i, -math.inf) for i in range(max_concurrency)]
        self.recent: Deque[Tuple[float, int]] = collections.deque()  # (grant time, shard), newest last
        self._seq = itertools.count()
        self._workers: List[asyncio.Task] = []

    # -- lifetime ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts one worker per bucket (again, after a change of limits)."""
        self.stop()
        self._workers = [asyncio.ensure_future(self._work(bucket)) for bucket in self.buckets]

    def stop(self) -> None:
        """Stops the workers; parked waiters stay parked (see take_all)."""
        for task in self._workers:
            task.cancel()
        self._workers = []

    # -- waiters -------------------------------------------------------------------------------------------------

    def put(self, shard: int, client: Client) -> Waiter:
        """Parks a request for `shard`; `client.release()` is called when it may identify."""
        bucket = self.buckets[shard % self.max_concurrency]
        waiter = Waiter(shard, next(self._seq), self.clock(), client, bucket)
        bucket.waiters[waiter] = None
        if bucket.wakeup is not None and not bucket.wakeup.done():
            bucket.wakeup.set_result(None)
        return waiter

    def cancel(self, waiter: Waiter) -> bool:
        """Takes a waiter out of its line; False if it was no longer there (granted or already cancelled)."""
        return waiter.bucket.waiters.pop(waiter, False) is None

    def take_all(self) -> List[Waiter]:
        """Removes and returns every parked waiter in arrival order (for shutdown)."""
        waiters = sorted((w for bucket in self.buckets for w in bucket.waiters), key=lambda w: w.seq)
        for bucket in self.buckets:
            bucket.waiters.clear()
        return waiters

    @property
    def waiting(self) -> int:
        """How many requests are parked."""
        return sum(len(bucket.waiters) for bucket in self.buckets)

    # -- limits --------------------------------------------------------------------------------------------------

    def set_limits(self, max_concurrency: int, budget: Optional[Budget]) -> None:
        """Applies new limits. A new max_concurrency re-buckets parked requests, keeping their arrival order; each
        new bucket waits an interval after the most recent grant that now maps to it, so no shard goes early."""
        self.budget = budget
        if max_concurrency != self.max_concurrency:
            parked = self.take_all()
            self.max_concurrency = max_concurrency
            self.buckets = [Bucket(i, -math.inf) for i in range(max_concurrency)]
            for granted_at, shard in self.recent:
                bucket = self.buckets[shard % max_concurrency]
                bucket.next_at = max(bucket.next_at, granted_at + self.interval)
            for waiter in parked:
                waiter.bucket = self.buckets[waiter.shard % max_concurrency]
                waiter.bucket.waiters[waiter] = None
        if self._workers:
            self.start()  # wake every worker: a budget or bucket change moves their deadlines

    def in_flight(self, now: float) -> int:
        """Grants in the last IN_FLIGHT_WINDOW seconds: Discord may not have counted their IDENTIFY yet."""
        return sum(1 for granted_at, _ in self.recent if granted_at >= now - IN_FLIGHT_WINDOW)

    def roll_budget(self, now: float) -> None:
        """Restores the full budget once its reset time has passed (Discord does the same on its side)."""
        budget = self.budget
        if budget is not None and now >= budget.reset_at and budget.remaining < budget.total:
            log.info("session-start budget reset: %d of %d available", budget.total, budget.total)
            budget.remaining = budget.total
            budget.reset_at = now + BUDGET_WINDOW  # until Discord tells us better at the next refresh

    def delay(self, bucket: Bucket, now: float) -> float:
        """Seconds until `bucket` may grant: its interval, or the budget's reset when none is left."""
        wait = bucket.next_at - now
        budget = self.budget
        if budget is not None and budget.remaining <= 0:
            wait = max(wait, budget.reset_at - now)
        return wait

    def drain_estimate(self, now: float) -> float:
        """Seconds until every parked request is granted, if nobody else arrives or leaves and clients answer at once.

        Without a binding budget it is the slowest bucket's line times the interval. When the budget runs out first,
        grants are played forward in time order across buckets, each reset restoring the full budget.
        """
        lines = [(max(now, b.next_at), b.index, len(b.waiters)) for b in self.buckets if b.waiters]
        if not lines:
            return 0.0
        budget = self.budget
        waiting = sum(count for _, _, count in lines)
        if budget is None or budget.remaining >= waiting or (now >= budget.reset_at and budget.total >= waiting):
            return max(start + (count - 1) * self.interval for start, _, count in lines) - now
        remaining, reset_at, floor, last = budget.remaining, budget.reset_at, now, now
        heapq.heapify(lines)
        while lines:
            at, index, count = heapq.heappop(lines)
            if remaining <= 0:  # every bucket waits for the reset, then the full budget is back
                floor, remaining, reset_at = max(floor, reset_at), budget.total, max(floor, reset_at) + BUDGET_WINDOW
            last = max(at, floor)
            remaining -= 1
            if count > 1:
                heapq.heappush(lines, (last + self.interval, index, count - 1))
        return last - now

    # -- workers -------------------------------------------------------------------------------------------------

    async def _work(self, bucket: Bucket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not bucket.waiters:
                bucket.wakeup = loop.create_future()
                await bucket.wakeup
                bucket.wakeup = None
                continue
            now = self.clock()
            self.roll_budget(now)
            wait = self.delay(bucket, now)
            if wait > 0:
                await self._sleep_until(wait)
                continue  # re-check everything: the head may have left, the budget may have changed
            waiter, _ = bucket.waiters.popitem(last=False)
            self._grant(bucket, waiter)

    async def _sleep_until(self, wait: float) -> None:
        """Sleeps about `wait` seconds, waking early rather than late. On Linux a long timer may fire 0.1% late (the
        kernel's slack), and asyncio rounds timeouts up to the millisecond: so a long wait stops short by a margin
        and the caller's next, short sleep lands within a millisecond of the deadline, never before it."""
        await self._sleep(wait if wait <= SHORT_SLEEP else wait - TIMER_SLACK - wait * TIMER_SLACK)

    def _grant(self, bucket: Bucket, waiter: Waiter) -> None:
        try:
            delivered = waiter.client.release()
        except Exception:  # a bug in one connection must not stall the bucket
            log.exception("could not deliver a grant to shard %d", waiter.shard)
            delivered = False
        if not delivered:  # the client left before we noticed: no slot, no session start spent
            self.stats.requests["cancelled"] += 1
            return
        now = self.clock()  # after the write: the interval starts when the grant is on the wire
        bucket.next_at = now + self.interval
        if self.budget is not None:
            self.budget.remaining -= 1
            if self.budget.remaining == 0:
                log.warning(
                    "session-start budget exhausted: every bucket waits %.0f s for the reset",
                    max(0.0, self.budget.reset_at - now),
                )
        self.recent.append((now, waiter.shard))
        horizon = now - max(IN_FLIGHT_WINDOW, self.interval)
        while self.recent and self.recent[0][0] < horizon:
            self.recent.popleft()
        self.stats.requests["granted"] += 1
        self.stats.observe_wait(now - waiter.arrived)
        log.debug("granted shard %d (bucket %d of %d) at %.6f after %.3f s",
                  waiter.shard, bucket.index, self.max_concurrency, now, now - waiter.arrived)


# ----------------------------------------------------------------------------------------------------------------
# Discord
# ----------------------------------------------------------------------------------------------------------------


class DiscordError(Exception):
    """A failed GET /gateway/bot. fatal: the token was refused (never retried). retry_after: Discord's own wait."""

    def __init__(self, message: str, *, status: Optional[int] = None, retry_after: Optional[float] = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.fatal = status in (401, 403)


@dataclasses.dataclass(frozen=True)
class GatewayLimits:
    """What /gateway/bot says: session_start_limit and the recommended shard count. reset_after is in seconds."""

    max_concurrency: int
    total: int
    remaining: int
    reset_after: float
    shards: int


def fetch_gateway_bot(api_url: str, token: str, timeout: float = DISCORD_TIMEOUT) -> GatewayLimits:
    """GET {api_url}/gateway/bot (blocking; run it in a thread). Raises DiscordError, whose text never holds the
    token: every message is built here from the status, never from the request."""
    request = urllib.request.Request(
        f"{api_url}/gateway/bot",
        headers={"Authorization": f"Bot {token}", "User-Agent": USER_AGENT, "Accept": JSON_TYPE},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(DISCORD_MAX_BODY + 1)
    except urllib.error.HTTPError as exc:
        with exc:
            body = exc.read(DISCORD_MAX_BODY)
            status = exc.code
            retry_after = _retry_after(exc.headers.get("Retry-After"), body) if status == 429 else None
        hint = {401: " (DISCORD_TOKEN is wrong or was reset)", 403: " (DISCORD_TOKEN may not use this endpoint)"}
        raise DiscordError(f"Discord answered HTTP {status}{hint.get(status, '')}", status=status, retry_after=retry_after) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise DiscordError(f"cannot reach Discord: {type(reason).__name__}: {_redact(str(reason), token)}") from None
    if len(body) > DISCORD_MAX_BODY:
        raise DiscordError("Discord's answer is too large to be /gateway/bot")
    return parse_gateway_bot(body)


def parse_gateway_bot(body: bytes) -> GatewayLimits:
    """Validates a /gateway/bot body; DiscordError when it is not what Discord documents."""
    try:
        data = json.loads(body)
        limit = data["session_start_limit"]
        numbers = {key: limit[key] for key in ("total", "remaining", "reset_after", "max_concurrency")}
        shards = data.get("shards", 0)
    except (ValueError, TypeError, KeyError):
        raise DiscordError("Discord's /gateway/bot answer is not the documented JSON") from None
    if not all(type(value) is int and value >= 0 for value in (*numbers.values(), shards)):
        raise DiscordError("Discord's /gateway/bot answer holds a value that is not a whole number")
    if not 1 <= numbers["max_concurrency"] <= MAX_CONCURRENCY or numbers["total"] < 1:
        raise DiscordError("Discord's /gateway/bot answer holds an impossible limit")
    remaining = min(numbers["remaining"], numbers["total"])
    return GatewayLimits(numbers["max_concurrency"], numbers["total"], remaining, numbers["reset_after"] / 1000, shards)


def _retry_after(header: Optional[str], body: bytes) -> Optional[float]:
    """The longer of the Retry-After header and the JSON retry_after (both seconds), None when neither parses."""
    waits = []
    if header and _DECIMAL.fullmatch(header.strip()):
        waits.append(float(header))
    try:
        value = json.loads(body).get("retry_after")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf:
            waits.append(float(value))
    except (ValueError, AttributeError):
        pass
    return max(waits) if waits else None


def _redact(text: str, secret: str) -> str:
    return text.replace(secret, "[token]") if secret else text


def backoff_delay(failures: int, retry_after: Optional[float] = None, rand: Callable[[], float] = random.random) -> float:
    """Capped exponential backoff with jitter after `failures` failures in a row, never shorter than Discord's own
    retry_after: half the step is fixed, half is random, so many restarts do not retry in step."""
    step = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(failures - 1, 30))
    delay = step / 2 + rand() * step / 2
    return max(delay, retry_after or 0.0)


def run_in_thread(function: Callable[[], Any]) -> "asyncio.Future[Any]":
    """Runs a blocking call in a daemon thread. Unlike the default executor, a hung call never delays exit."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result: Any, error: Optional[BaseException]) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def target() -> None:
        try:
            result, error = function(), None
        except BaseException as exc:  # handed to the awaiting task, which decides
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=target, name="gateway-bot", daemon=True).start()
    return future


class DiscordLimits:
    """Keeps the queue's limits in step with GET /gateway/bot: at startup, every `refresh_interval`, and when the
    budget resets. Failures are retried with backoff; a refused token at startup calls on_fatal and stops."""

    def __init__(
        self,
        queue: IdentifyQueue,
        fetch: Callable[[], GatewayLimits],
        *,
        on_fatal: Callable[[DiscordError], None],
        refresh_interval: float = REFRESH_INTERVAL,
        timeout: float = DISCORD_TIMEOUT,
        sleep: Sleep = asyncio.sleep,
    ):
        self.queue = queue
        self.fetch = fetch
        self.on_fatal = on_fatal
        self.refresh_interval = refresh_interval
        self.timeout = timeout
        self._sleep = sleep
        self.known = False  # limits have come from Discord at least once
        self.last_error: Optional[str] = None

    async def run(self) -> None:
        """The refresh loop; returns only after a refused token."""
        failures = 0
        while True:
            try:
                limits = await asyncio.wait_for(run_in_thread(self.fetch), self.timeout + 5)
            except (DiscordError, asyncio.TimeoutError) as exc:
                error = exc if isinstance(exc, DiscordError) else DiscordError("Discord did not answer in time")
                self.queue.stats.discord[str(error.status or "error")] += 1
                self.last_error = str(error)
                if error.fatal:
                    if not self.known:
                        self.on_fatal(error)
                    else:
                        log.error("%s; keeping the last known limits and no longer asking Discord", error)
                    return
                failures += 1
                delay = backoff_delay(failures, error.retry_after)
                log.warning("GET /gateway/bot failed: %s; retry %d in %.1f s", error, failures, delay)
                await self._sleep(delay)
                continue
            self.queue.stats.discord["200"] += 1
            failures, self.last_error = 0, None
            self.apply(limits)
            await self._sleep(self.next_refresh())

    def apply(self, limits: GatewayLimits) -> None:
        """Hands Discord's limits to the queue, less the grants Discord may not have counted yet."""
        queue = self.queue
        now = queue.clock()
        remaining = max(0, limits.remaining - queue.in_flight(now))
        budget = Budget(limits.total, remaining, now + limits.reset_after + RESET_MARGIN)
        changed = (queue.max_concurrency, queue.budget and queue.budget.total) != (limits.max_concurrency, limits.total)
        queue.set_limits(limits.max_concurrency, budget)
        (log.info if changed or not self.known else log.debug)(
            "limits from Discord: max_concurrency %d, %d of %d session starts left, reset in %.0f s",
            limits.max_concurrency, remaining, limits.total, limits.reset_after,
        )
        self.known = True

    def next_refresh(self) -> float:
        """Seconds to the next fetch: the refresh interval, or sooner when the budget resets before it."""
        budget = self.queue.budget
        wait = self.refresh_interval
        if budget is not None:
            wait = min(wait, budget.reset_at - self.queue.clock())
        return max(wait, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Operator views: /metrics, /status
# ----------------------------------------------------------------------------------------------------------------

METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus text exposition format 0.0.4
HTML_TYPE = "text/html; charset=utf-8"
STATUS_REFRESH = 3  # seconds between the HTML page's self-refreshes


class Metrics:
    """Builds one Prometheus text exposition: a family is HELP, TYPE, then its samples."""

    def __init__(self) -> None:
        self.lines: List[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Sequence[Tuple[str, float]] = ()) -> None:
        """Adds a family; each sample is (label text such as '{bucket="0"}', or a _bucket/_sum suffix, value)."""
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        self.lines.extend(f"{name}{labels} {_metric_value(value)}" for labels, value in samples)

    def render(self) -> bytes:
        """The exposition as bytes, ending in a newline as the format requires."""
        return ("\n".join(self.lines) + "\n").encode()


def _metric_value(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))


def process_metrics(metrics: Metrics, started: float) -> None:
    """The process_ families that the official Prometheus clients export on Linux, read from /proc where present."""
    times = os.times()
    metrics.family("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.",
                   [("", times.user + times.system)])
    start_time, memory, open_fds = started, [], None  # without /proc: the time the server object was made
    try:
        with open("/proc/self/stat", "rb") as stat_file:
            fields = stat_file.read().rsplit(b")", 1)[1].split()  # the command name may hold spaces and parens
        with open("/proc/stat", "rb") as system_stat:
            boot = next(int(line.split()[1]) for line in system_stat if line.startswith(b"btime "))
        ticks, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
        start_time = boot + int(fields[19]) / ticks
        memory = [("process_virtual_memory_bytes", "Virtual memory size in bytes.", int(fields[20])),
                  ("process_resident_memory_bytes", "Resident memory size in bytes.", int(fields[21]) * page)]
        open_fds = len(os.listdir("/proc/self/fd"))
    except (OSError, IndexError, ValueError, StopIteration):
        pass
    metrics.family("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.",
                   [("", start_time)])
    if open_fds is None:
        return
    for name, help_text, value in memory:
        metrics.family(name, "gauge", help_text, [("", value)])
    metrics.family("process_open_fds", "gauge", "Number of open file descriptors.", [("", open_fds)])
    if resource is not None:
        metrics.family("process_max_fds", "gauge", "Maximum number of open file descriptors.",
                       [("", resource.getrlimit(resource.RLIMIT_NOFILE)[0])])


def status_html(status: Dict[str, Any]) -> bytes:
    """The /status snapshot as one small page: no scripts, no outside assets, refreshing itself."""
    esc = html.escape
    buckets = status["buckets"]
    widest = max([b["waiting"] for b in buckets] + [1])
    rows = "\n".join(
        f'<tr><td>{b["bucket"]}</td><td class="bar"><span style="width:{100 * b["waiting"] / widest:.1f}%"></span></td>'
        f'<td>{b["waiting"]}</td><td>{esc(describe_seconds(b["next_grant_in"]))}</td></tr>'
        for b in buckets
    )
    budget = status["session_starts"]
    budget_text = (
        f'{budget["remaining"]} of {budget["total"]} session starts left; resets in {describe_seconds(budget["resets_in"])}'
        if budget else "no session-start cap (no DISCORD_TOKEN, or Discord has not answered yet)"
    )
    waiting = status["waiting"]
    estimate = (
        f'All {waiting} waiting request{"s" if waiting != 1 else ""} should be granted in '
        f'{describe_seconds(status["estimated_drain_seconds"])}.' if waiting else "Nobody is waiting."
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{STATUS_REFRESH}">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>gateway-queue status</title>
<style>
body {{ font: 15px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 52em; padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.4em; }} .estimate {{ font-size: 1.2em; font-weight: 600; }}
table {{ border-collapse: collapse; width: 100%; }} td, th {{ padding: 2px 8px; text-align: right; }}
td.bar {{ width: 60%; text-align: left; }} td.bar span {{ display: inline-block; height: 0.9em; background: #5865f2; }}
dt {{ float: left; clear: left; width: 13em; color: #555; }} dd {{ margin: 0 0 0.3em 13em; }}
</style></head><body>
<h1>gateway-queue {esc(VERSION)}</h1>
<p class="estimate">{esc(estimate)}</p>
<dl>
<dt>Limits from</dt><dd>{esc(status["limits"]["source"])}</dd>
<dt>max_concurrency</dt><dd>{status["limits"]["max_concurrency"]}</dd>
<dt>Identify interval</dt><dd>{status["limits"]["identify_interval"]:g} s</dd>
<dt>Session starts</dt><dd>{esc(budget_text)}</dd>
<dt>Waiting</dt><dd>{waiting}</dd>
<dt>Open connections</dt><dd>{status["open_connections"]}</dd>
</dl>
<table><thead><tr><th>bucket</th><th></th><th>waiting</th><th>next grant</th></tr></thead><tbody>
{rows}
</tbody></table>
<p><small>Refreshes every {STATUS_REFRESH} s. The same data as JSON: <code>curl http://&lt;queue&gt;/status</code>.</small></p>
</body></html>
"""
    return page.encode()


def describe_seconds(seconds: float) -> str:
    """Plain words for a duration: "now", "about 12 seconds", "about 4 minutes 10 seconds", "about 3 hours 5 minutes"."""
    seconds = max(0, round(seconds))
    if seconds == 0:
        return "now"
    units = [("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)]
    parts = []
    for name, size in units:
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count} {name}{'s' if count != 1 else ''}")
        if len(parts) == 2:
            break
    return "about " + " ".join(parts)


def prefers_html(accept: Optional[bytes]) -> bool:
    """True when an Accept header ranks text/html above application/json (a browser); JSON wins ties."""
    if not accept:
        return False
    ranges: Dict[str, float] = {}
    for item in accept.decode("latin-1").split(","):
        media, *params = [part.strip().lower() for part in item.split(";")]
        quality = 1.0
        for param in params:
            if param.startswith("q=") and _DECIMAL.fullmatch(param[2:]):
                quality = float(param[2:])
        ranges[media] = max(quality, ranges.get(media, 0.0))

    def quality_of(media: str) -> float:
        kind = media.split("/")[0]
        for candidate in (media, f"{kind}/*", "*/*"):
            if candidate in ranges:
                return ranges[candidate]
        return 0.0

    return quality_of("text/html") > quality_of("application/json")


# ----------------------------------------------------------------------------------------------------------------
# Connections
# ----------------------------------------------------------------------------------------------------------------

RESERVED_PATHS = ("/healthz", "/metrics", "/status")


class Connection:
    """One client connection: the only code that touches a socket.

    One task per connection reads all the time, even while a request is parked, because asyncio only reports a
    peer's EOF to a reader: so a client that goes away leaves the queue at once. Requests are answered in order; a
    parked request's grant is written by the bucket's worker (release), which then resumes any pipelined requests.
    Timers exist only while a request is arriving (HEAD_TIMEOUT) or the connection idles (KEEPALIVE_TIMEOUT): a
    parked request costs no timer.
    """

    __slots__ = ("server", "reader", "writer", "buf", "scanned", "request", "body_left", "waiter", "grant", "timer",
                 "timer_kind", "closed", "resume")

    def __init__(self, server: "Server", reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        # per connection
        self.server = server
        self.reader = reader
        self.writer = writer
        self.buf = b""  # bytes, not bytearray: the empty value is shared, so an idle or parked connection holds none
        self.scanned = 0  # how much of an incomplete head was already parsed (see _head_may_have_changed)
        self.closed = False
        self.timer: Optional[asyncio.TimerHandle] = None
        self.timer_kind: Optional[str] = None
        self.resume: Optional[asyncio.Future] = None  # set while reading is paused behind a parked request
        # per request: the one whose body is being discarded, or the one parked
        self.request: Optional[Request] = None
        self.body_left = 0
        self.waiter: Optional[Waiter] = None
        self.grant: Optional[Grant] = None

    async def run(self) -> None:
        """Reads until EOF, error or close; answers requests as they complete."""
        try:
            self._process()
            while not self.closed:
                if self.waiter is not None and len(self.buf) > MAX_PIPELINED_BYTES:
                    self.resume = asyncio.get_running_loop().create_future()
                    await self.resume
                    continue
                data = await self.reader.read(READ_CHUNK)
                if not data:
                    break
                self.buf += data
                self._process()
                if self.writer.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
                    await self.writer.drain()
        except (ConnectionError, OSError):
            pass  # the peer reset the connection: not an error
        except asyncio.CancelledError:
            pass  # the loop is closing: end quietly (3.11 logs a traceback per cancelled connection task)
        except Exception:
            log.exception("internal error on a connection; closing it")
            self._refuse(HTTPError(500, "internal error"))
        finally:
            self.close()

    def _process(self) -> None:
        """Answers every complete request in the buffer, in order, until one parks or the buffer runs dry."""
        while not self.closed and self.waiter is None:
            if self.body_left:
                taken = min(self.body_left, len(self.buf))
                self.buf = self.buf[taken:]
                self.body_left -= taken
                if self.body_left:
                    self._arm("head")
                    return
                request, self.request = self.request, None
                assert request is not None
                self._dispatch(request)
                continue
            if not self.buf:
                self._arm("idle")
                return
            if not self._head_may_have_changed():
                return
            try:
                parsed = parse_request_head(self.buf)
            except HTTPError as exc:
                self._refuse(exc)
                return
            if parsed is None:
                self.scanned = len(self.buf)
                self._arm("head")
                return
            request, used = parsed
            self.buf, self.scanned = self.buf[used:], 0
            if request.content_length:
                self.request, self.body_left = request, request.content_length
                continue
            self._dispatch(request)

    def _head_may_have_changed(self) -> bool:
        """Whether an incomplete head deserves another parse: only when a line has ended since the last one, or the
        buffer has crossed a size limit. Without this a client trickling a 16 KiB head a byte at a time would make
        the service re-parse it 16,000 times (about a CPU-second per connection); with it, once per line."""
        if not self.scanned:
            return True
        limit = MAX_HEAD_BYTES if self.buf.find(b"\n", 0, self.scanned) >= 0 else MAX_REQUEST_LINE
        return len(self.buf) > limit or self.buf.find(b"\n", self.scanned) >= 0

    def _dispatch(self, request: Request) -> None:
        self._disarm()
        try:
            response = self.server.respond(request)
            if response is None:  # a queue request: park it
                self.waiter = self.server.park(request, self)
                self.grant = grant_for(request)
                return
        except HTTPError as exc:
            self._refuse(exc, request)
            return
        self.writer.write(response)
        if not request.keep_alive:
            self.close()

    def release(self) -> bool:
        """Called by the bucket's worker: writes the grant; False if the client is already gone."""
        if self.closed or self.writer.transport.is_closing():
            return False
        grant = self.grant
        assert grant is not None
        self.writer.write(grant.response)
        self.grant = self.waiter = None
        if grant.close:
            self.close()
        elif self.buf or self.resume is not None:
            asyncio.get_running_loop().call_soon(self._continue)
        else:
            self._arm("idle")
        return True

    def _continue(self) -> None:
        if self.resume is not None:
            self.resume.set_result(None)
            self.resume = None
        self._process()

    def _refuse(self, exc: HTTPError, request: Optional[Request] = None) -> None:
        self.server.stats.requests["rejected"] += 1
        if self.closed:
            return
        self.writer.write(render_error(exc, request))
        if exc.close or request is None or not request.keep_alive:
            self.close()

    def shutdown(self) -> None:
        """Server stop: a parked request gets 503 (so the client retries elsewhere or later); everyone is closed."""
        if self.waiter is not None and self.server.queue.cancel(self.waiter):
            self.waiter = None
            self.server.stats.requests["rejected"] += 1
            self.writer.write(render_json(503, {"message": "gateway-queue is shutting down; retry"}, close=True,
                                          head=self.grant is not None and self.grant.head, headers=(("Retry-After", "1"),)))
        self.close()

    def close(self) -> None:
        """Closes the connection (after flushing what was written); a parked request is cancelled, at no cost."""
        if self.closed:
            return
        self.closed = True
        self._disarm()
        if self.waiter is not None and self.server.queue.cancel(self.waiter):
            self.server.stats.requests["cancelled"] += 1
        self.waiter = None
        if self.resume is not None and not self.resume.done():
            self.resume.set_result(None)
        self.writer.transport.close()
        self.server.connections.discard(self)

    # -- timers --------------------------------------------------------------------------------------------------

    def _arm(self, kind: str) -> None:
        if self.timer_kind == kind:
            return  # a request's deadline runs from its first byte, not from its latest
        self._disarm()
        delay = self.server.head_timeout if kind == "head" else self.server.keepalive_timeout
        self.timer = asyncio.get_running_loop().call_later(delay, self._expire, kind)
        self.timer_kind = kind

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.timer_kind = None

    def _expire(self, kind: str) -> None:
        self.timer = self.timer_kind = None
        if kind == "head":
            self._refuse(HTTPError(408, f"request not received within {self.server.head_timeout:g} s"))
        else:
            self.close()


# ----------------------------------------------------------------------------------------------------------------
# Server lifecycle
# ----------------------------------------------------------------------------------------------------------------


def raise_file_limit() -> int:
    """Raises the soft RLIMIT_NOFILE to the hard limit; returns the limit now in force (0 if unknown)."""
    if resource is None:
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class Server:
    """The service: listener, queue, Discord limits and connections. run() is the whole life of the process."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock = time.monotonic,
        head_timeout: float = HEAD_TIMEOUT,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        refresh_interval: float = REFRESH_INTERVAL,
        max_connections: Optional[int] = None,
        discord_timeout: float = DISCORD_TIMEOUT,
    ):
        # server-wide, fixed
        self.config = config
        self.head_timeout = head_timeout
        self.keepalive_timeout = keepalive_timeout
        limit = raise_file_limit()
        self.max_connections = max_connections or max(1, (limit or 1024) - FD_RESERVE)
        self.started = time.time()
        self._secret_digest = hashlib.sha256(config.auth_token.encode()).digest() if config.auth_token else None
        self.stats = Stats()
        self.queue = IdentifyQueue(config.interval, config.max_concurrency, clock=clock, stats=self.stats)
        self.discord: Optional[DiscordLimits] = None
        if config.token:
            token, api_url = config.token, config.api_url
            self.discord = DiscordLimits(
                self.queue,
                lambda: fetch_gateway_bot(api_url, token, discord_timeout),
                on_fatal=self._fatal,
                refresh_interval=refresh_interval,
                timeout=discord_timeout,
            )
        # server-wide, changing
        self.connections: "set[Connection]" = set()
        self.exit_code = 0
        self.addresses: List[Tuple[str, int]] = []
        self._server: Optional[asyncio.AbstractServer] = None
        self._tasks: List[asyncio.Task] = []
        self._stopping: Optional[asyncio.Future] = None
        self._warned_no_shard = False

    @property
    def limits_source(self) -> str:
        """Where the limits in force come from: "discord", "environment" (no token) or "fallback" (not yet known)."""
        if self.discord is None:
            return "environment"
        return "discord" if self.discord.known else "fallback"

    async def start(self) -> None:
        """Binds and starts serving; OSError if the address cannot be bound."""
        self._stopping = asyncio.get_running_loop().create_future()
        self._server = await asyncio.start_server(
            self._accept, self.config.host, self.config.port, backlog=LISTEN_BACKLOG, limit=READ_CHUNK
        )
        self.addresses = [sock.getsockname()[:2] for sock in self._server.sockets]
        self.queue.start()
        if self.discord is not None:
            self._tasks.append(asyncio.ensure_future(self.discord.run()))
        where = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.addresses)
        source = {
            "environment": f"MAX_CONCURRENCY={self.config.max_concurrency}, no session-start cap (no DISCORD_TOKEN)",
            "fallback": "Discord (max_concurrency 1 until it answers)",
        }[self.limits_source]
        log.info(
            "gateway-queue %s listening on %s; limits: %s; identify interval %.3f s; auth %s; connection cap %d",
            VERSION, where, source, self.config.interval, "on" if self.config.auth_token else "off", self.max_connections,
        )

    @property
    def port(self) -> int:
        """The bound port (useful with PORT=0)."""
        return self.addresses[0][1]

    def request_stop(self, exit_code: int = 0) -> None:
        """Asks run() to stop (signal handlers, fatal errors)."""
        self.exit_code = self.exit_code or exit_code
        if self._stopping is not None and not self._stopping.done():
            self._stopping.set_result(None)

    async def wait_stopped(self) -> None:
        """Waits until request_stop() is called."""
        assert self._stopping is not None
        await self._stopping

    async def stop(self) -> None:
        """Stops accepting, answers every parked request 503, closes every connection, flushes for up to 1 s."""
        if self._server is not None:
            self._server.close()
        self.queue.stop()
        for task in self._tasks:
            task.cancel()
        waiting = self.queue.waiting
        for conn in list(self.connections):
            conn.shutdown()
        if waiting:
            log.info("stopped: answered %d parked request(s) 503 so they retry", waiting)
        deadline = time.monotonic() + SHUTDOWN_GRACE
        while time.monotonic() < deadline and any(c.writer.transport.get_write_buffer_size() for c in self.connections):
            await asyncio.sleep(0.01)
        if self._server is not None:  # on 3.12+ this also waits for the connections' transports to close
            try:
                await asyncio.wait_for(self._server.wait_closed(), SHUTDOWN_GRACE)
            except asyncio.TimeoutError:
                pass
        await asyncio.sleep(0)  # let the transports' close callbacks run

    async def run(self) -> int:
        """The process's life: start, serve until SIGTERM/SIGINT or a fatal error, stop. Returns the exit code."""
        try:
            await self.start()
        except OSError as exc:
            log.error("cannot listen on %s port %d: %s (check HOST and PORT)", self.config.host, self.config.port, exc.strerror or exc)
            return 1
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError):  # not on Windows, nor off the main thread
                pass
        await self.wait_stopped()
        await self.stop()
        return self.exit_code

    def _fatal(self, error: DiscordError) -> None:
        log.error("%s: stopping. Fix DISCORD_TOKEN; a bad token is never retried (it counts toward Discord's IP ban)", error)
        self.request_stop(1)

    # -- requests ------------------------------------------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Optional[Coroutine[Any, Any, None]]:
        """start_server's callback. It returns the connection's coroutine rather than awaiting it, so that asyncio
        wraps that coroutine in the connection's task directly: one coroutine frame less per parked request."""
        if len(self.connections) >= self.max_connections or (self._stopping is not None and self._stopping.done()):
            self.stats.requests["rejected"] += 1
            writer.write(render_error(HTTPError(503, "too many open connections; retry shortly", headers=(("Retry-After", "1"),))))
            writer.close()
            return None
        conn = Connection(self, reader, writer)
        self.connections.add(conn)
        return conn.run()

    def respond(self, request: Request) -> Optional[bytes]:
        """The response to a request that is not queued, or None for a queue request. Raises HTTPError to refuse."""
        if request.path != "/healthz":
            self._authorize(request)
        if request.path not in RESERVED_PATHS:
            return None
        if request.method not in ("GET", "HEAD"):
            raise HTTPError(405, f"{request.path} answers GET and HEAD only", close=False, headers=(("Allow", "GET, HEAD"),))
        options: Dict[str, Any] = {
            "head": request.method == "HEAD",
            "close": not request.keep_alive,
            "keep_alive_10": request.keep_alive and request.version == "1.0",
        }
        if request.path == "/healthz":
            return render_json(200, {"status": "ok", "waiting": self.queue.waiting, "limits": self.limits_source}, **options)
        if request.path == "/metrics":
            return render(200, self.metrics(), content_type=METRICS_TYPE, **options)
        status = self.status()
        if prefers_html(request.header(b"accept")):
            return render(200, status_html(status), content_type=HTML_TYPE, **options)
        return render_json(200, status, **options)

    def _authorize(self, request: Request) -> None:
        if self._secret_digest is None:
            return
        scheme, _, credentials = (request.header(b"authorization") or b"").partition(b" ")
        # Digests of equal length are compared, so timing reveals neither the secret's content nor its length.
        given = hashlib.sha256(credentials.strip(b" ")).digest()
        if not hmac.compare_digest(given, self._secret_digest) or scheme.lower() != b"bearer":
            raise HTTPError(
                401, "missing or wrong credentials: send Authorization: Bearer <AUTH_TOKEN>", close=False,
                headers=(("WWW-Authenticate", 'Bearer realm="gateway-queue"'),),
            )

    def metrics(self) -> bytes:
        """The /metrics exposition."""
        queue, stats, budget, now = self.queue, self.stats, self.queue.budget, self.queue.clock()
        metrics = Metrics()
        metrics.family("gateway_queue_requests_total", "counter",
                       "Queue requests by outcome: granted, cancelled (the client left first), rejected (refused).",
                       [(f'{{outcome="{outcome}"}}', count) for outcome, count in stats.requests.items()])
        metrics.family("gateway_queue_waiting_requests", "gauge", "Requests parked, per bucket.",
                       [(f'{{bucket="{b.index}"}}', len(b.waiters)) for b in queue.buckets])
        cumulative = list(itertools.accumulate(stats.wait_counts))
        bounds = [_metric_value(bound) for bound in Stats.WAIT_BUCKETS] + ["+Inf"]
        metrics.family("gateway_queue_wait_seconds", "histogram", "Time from a request's arrival to its grant.",
                       [(f'_bucket{{le="{le}"}}', count) for le, count in zip(bounds, cumulative)]
                       + [("_sum", stats.wait_sum), ("_count", cumulative[-1])])
        metrics.family("gateway_queue_open_connections", "gauge", "Open client connections.", [("", len(self.connections))])
        metrics.family("gateway_queue_asyncio_tasks", "gauge", "asyncio tasks alive: one per connection, one per bucket.",
                       [("", len(asyncio.all_tasks()))])
        metrics.family("gateway_queue_max_concurrency", "gauge", "Buckets in force (Discord's max_concurrency).",
                       [("", queue.max_concurrency)])
        metrics.family("gateway_queue_identify_interval_seconds", "gauge", "Minimum time between two grants in a bucket.",
                       [("", queue.interval)])
        metrics.family("gateway_queue_limits_info", "gauge", "Where the limits in force come from.",
                       [(f'{{source="{self.limits_source}"}}', 1)])
        metrics.family("gateway_queue_session_start_limit", "gauge", "Session starts allowed per window (Discord's total).",
                       [("", budget.total)] if budget else [])
        metrics.family("gateway_queue_session_starts_remaining", "gauge", "Session starts left before the reset.",
                       [("", budget.remaining)] if budget else [])
        metrics.family("gateway_queue_session_start_reset_seconds", "gauge", "Seconds until the session-start budget resets.",
                       [("", max(0.0, budget.reset_at - now))] if budget else [])
        metrics.family("gateway_queue_discord_requests_total", "counter",
                       "GET /gateway/bot calls by HTTP status (error: no answer).",
                       sorted((f'{{status="{status}"}}', count) for status, count in stats.discord.items()))
        process_metrics(metrics, self.started)
        return metrics.render()

    def status(self) -> Dict[str, Any]:
        """The /status snapshot."""
        queue, budget, now = self.queue, self.queue.budget, self.queue.clock()
        session_starts = None
        if budget is not None:
            resets_in = max(0.0, budget.reset_at - now)
            session_starts = {
                "total": budget.total, "remaining": budget.remaining, "resets_in": round(resets_in, 3),
                "resets_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + resets_in)),
            }
        return {
            "version": VERSION,
            "limits": {"source": self.limits_source, "max_concurrency": queue.max_concurrency,
                       "identify_interval": queue.interval},
            "session_starts": session_starts,
            "waiting": queue.waiting,
            "open_connections": len(self.connections),
            "estimated_drain_seconds": round(queue.drain_estimate(now), 3),
            "buckets": [{"bucket": b.index, "waiting": len(b.waiters), "next_grant_in": round(max(0.0, queue.delay(b, now)), 3)}
                        for b in queue.buckets],
            "requests": dict(self.stats.requests),
            "discord_error": self.discord.last_error if self.discord else None,
        }

    def park(self, request: Request, client: Client) -> Waiter:
        """Queues a request; HTTPError(400) for a bad shard parameter."""
        shard = parse_shard(request.query)
        if shard is None:
            shard = 0
            if self.queue.max_concurrency > 1 and not self._warned_no_shard:
                self._warned_no_shard = True
                log.warning("a request without ?shard= was queued as shard 0 (logged once); pass ?shard=<id>")
        return self.queue.put(shard, client)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def healthcheck(config: Config) -> int:
    """--healthcheck: 0 if this host's service answers GET /healthz with 200, else 1 (for Docker's HEALTHCHECK)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(config.host, config.host)
    try:
        conn = http.client.HTTPConnection(host, config.port or 80, timeout=3)
        conn.request("GET", "/healthz")
        status = conn.getresponse().status
        conn.close()
    except (OSError, http.client.HTTPException) as exc:
        print(f"gateway-queue healthcheck: {exc}", file=sys.stderr)
        return 1
    return 0 if status == 200 else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit code (2 for a bad configuration)."""
    parser = argparse.ArgumentParser(
        prog="gateway_queue.py",
        description="An identify queue for Discord bot shards: GET /?shard=N waits until shard N may identify.",
        epilog="Configuration comes from HOST, PORT, DISCORD_TOKEN, DISCORD_API_URL, MAX_CONCURRENCY, "
        "IDENTIFY_INTERVAL, LOG_LEVEL and AUTH_TOKEN; see the module docstring or README.md.",
    )
    parser.add_argument("--host", help="bind address (overrides HOST)")
    parser.add_argument("--port", help="bind port (overrides PORT)")
    parser.add_argument("--healthcheck", action="store_true", help="probe a running service's /healthz and exit 0 or 1")
    parser.add_argument("--version", action="version", version=f"gateway-queue {VERSION}")
    args = parser.parse_args(argv)
    environ = dict(os.environ)
    if args.host is not None:
        environ["HOST"] = args.host
    if args.port is not None:
        environ["PORT"] = args.port
    try:
        config = Config.from_env(environ)
    except ConfigError as exc:
        print(f"gateway-queue: {exc}", file=sys.stderr)
        return 2
    if args.healthcheck:
        return healthcheck(config)
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("asyncio").setLevel(max(logging.INFO, logging.getLevelName(config.log_level)))  # DEBUG: ours only
    return asyncio.run(Server(config).run())


if __name__ == "__main__":
    sys.exit(main())
