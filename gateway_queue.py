"""gateway-queue: one identify queue for every shard of a Discord bot.

Discord lets a bot IDENTIFY once per 5 seconds per bucket (bucket = shard_id % max_concurrency) and caps the number
of session starts a day. Shards that run in many processes on many hosts cannot see each other, so each one asks this
service before it identifies: the request is parked until that shard may go, then answered

    200 {"message": "You're free to connect now! :)"}

It is a drop-in replacement for twilight-rs/gateway-queue: clients call `http://gateway-queue?shard=42`. Several
replicas can share one Redis (REDIS_URL) so that no single process is a point of failure.

Run it:   python3 gateway_queue.py            (or --host/--port; --help lists everything)
Test it:  python3 -m unittest -v
Poke it:  curl -i 'http://127.0.0.1:5000/?shard=0'   and   curl -i http://127.0.0.1:5000/healthz

Environment (read once at startup by Config.from_env; a bad value exits 2 with a line naming the variable):

    variable          default                        meaning
    HOST              127.0.0.1                      bind address: IPv4 or IPv6 literal, or a host name; "::" is
                                                     dual-stack (IPv6 and IPv4)
    PORT              5000                           bind port; 0 picks a free one (the bound address is logged)
    DISCORD_TOKEN     unset                          bot token ("Bot " prefix optional); limits come from Discord
    DISCORD_API_URL   https://discord.com/api/v10    Discord's REST base; the token is sent there and nowhere else
    MAX_CONCURRENCY   1                              number of buckets when no token is set (1-1024)
    IDENTIFY_INTERVAL 5.1                            seconds between two grants in one bucket; at least 5
    STARTUP_HOLD      IDENTIFY_INTERVAL              seconds every bucket waits after startup before its first grant
                                                     (a restarted queue does not know its last grants); 0: none
    LEASE_TIMEOUT     0                              lease mode when > 0: a grant holds its bucket until the shard
                                                     reports (POST /release) or this many seconds pass
    REDIS_URL         unset                          redis://[[user]:password@]host[:port][/db] or rediss://...:
                                                     replicas share slots, leases and the budget through it
    REDIS_PREFIX      gateway-queue:<application id> key prefix in Redis (without a token: gateway-queue:default)
    LOG_LEVEL         INFO                           DEBUG, INFO, WARNING or ERROR
    AUTH_TOKEN        unset                          shared secret: every request but /healthz needs
                                                     "Authorization: Bearer <AUTH_TOKEN>"

HTTP API:

    any method on /, or any path with ?shard=N        parked until shard N may identify, then 200 (HEAD: no body);
                                                      / without shard is shard 0
    POST /release?shard=N[&outcome=ready|invalid_session|closed]
                                                      lease mode: shard N is READY (or failed); its bucket's interval
                                                      starts now. 200, or 4xx saying why nothing changed
    GET|HEAD /healthz                                 200 {"status": "ok", ...} at once, never queued; 503 when this
                                                      replica cannot grant (Redis unreachable)
    GET|HEAD /metrics                                 Prometheus text format, never queued
    GET|HEAD /status                                  JSON snapshot (HTML for browsers), never queued

Status codes: 200 granted or answered; 400 bad shard, bad Host or malformed request; 401 missing or wrong AUTH_TOKEN;
404 any other path (nothing is queued); 405 wrong method on a reserved path; 408 request slower than 10 s; 409
release without a matching lease; 411 chunked body; 413 body too large; 414 request line too long; 431 header block
too large; 501 unknown transfer coding; 503 shutting down, too many connections or no coordination backend (retry);
505 HTTP version other than 1.0 and 1.1. Errors carry a JSON {"message": ...}; errors where framing is unsure also
carry "Connection: close" and close the connection once the client has had a moment to read the answer.

Every resource one client can use has a named bound below (# Limits): bytes buffered, unsent output, time per
request, time per event-loop turn, descriptors. Known omissions: no TLS on the listening side (run it on a private
network or behind a proxy), no chunked request bodies (411), no HTTP/2, no HTTP proxy for Discord's API. A client
that half-closes its socket while parked is treated as gone: its request is dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import dataclasses
import errno
import gc
import hashlib
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
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Awaitable, Callable, Deque, Dict, List, Mapping, Optional, Protocol, Sequence, Set, Tuple, TypeVar, Union

try:
    import resource
except ImportError:  # not on Windows; the service then keeps the default descriptor limit
    resource = None  # type: ignore[assignment]

VERSION = "2.0.0"
PROJECT_URL = "https://github.com/gateway-queue/gateway-queue"
USER_AGENT = f"DiscordBot ({PROJECT_URL}, {VERSION})"  # Discord may block requests without this form

log = logging.getLogger("gateway_queue")


# ----------------------------------------------------------------------------------------------------------------
# Limits
# ----------------------------------------------------------------------------------------------------------------

# One client's request
MAX_REQUEST_LINE = 8 * 1024  # 414 past it; queue URLs are tiny, and 8 KiB is what nginx and most servers allow
MAX_HEAD_BYTES = 16 * 1024  # 431 past it (empty lines, request line and headers together); like h11 and IIS
MAX_HEADERS = 100  # 431 past it; like http.client
MAX_EMPTY_LINES = 8  # RFC 9112 asks us to skip at least one CRLF before a request; a run longer than this is noise
MAX_NUMBER_DIGITS = 18  # a longer number from a client is refused before conversion (int() of 4,301 digits raises)
MAX_BODY_BYTES = 64 * 1024  # 413 past it; queue calls carry no body, the few bytes a client sends are discarded
HEAD_TIMEOUT = 10.0  # 408 when a request takes longer from its first byte; a connection that sends none is closed

# One client's connection
KEEPALIVE_TIMEOUT = 75.0  # an idle connection (no request, none parked) is closed after this; nginx's default
READ_CHUNK = 64 * 1024  # bytes asked of the socket per read
STREAM_LIMIT = 16 * 1024  # asyncio's reader stops reading the socket past twice this while we do not read
PARKED_BUFFER_LIMIT = 4 * 1024  # bytes a client may pipeline behind a parked request; past it, it is dropped
PIPELINE_LIMIT = 64 * 1024  # bytes a client may send ahead of answers it does not read; past it, it is dropped
OUTPUT_LIMIT = 64 * 1024  # unsent bytes past which a connection's pipeline waits for the client to read
SEND_TIMEOUT = 10.0  # a client that leaves our answers unread this long loses its connection (abort)
LINGER_TIMEOUT = 2.0  # after an error, we read (and drop) what the client still sends this long, then close,
LINGER_BYTES = 64 * 1024  # ...or this much: so the client reads our answer instead of a connection reset
CLOSE_TIMEOUT = 5.0  # a closing connection whose last bytes the client does not take is aborted after this
MAX_TURN = 0.002  # one connection answers pipelined requests for at most this long before yielding the loop
TCP_KEEPALIVE = (60, 10, 6)  # idle s, probe interval s, probes: a parked client whose host vanished leaves in 2 min

# The whole service
LISTEN_BACKLOG = 4096  # an accept burst of thousands of shards needs it; Linux caps it at net.core.somaxconn
ACCEPT_BATCH = 128  # connections asyncio accepts per loop turn (before any of them reaches us; see FD_RESERVE)
FD_RESERVE = 64 + 4 * ACCEPT_BATCH  # descriptors kept from the connection cap: Discord, Redis, logs, and the
#                                     connections accepted in a burst before the cap sees them
TIMER_TICK = 0.1  # resolution of connection deadlines (one timing wheel for all, no timer per request)
LOG_EVERY = 10.0  # a repeated warning (refused requests, full descriptor table) is logged once per this
SHUTDOWN_GRACE = 1.0  # seconds given to flush the 503s at shutdown; the whole stop stays under 2 s
GC_YOUNG_THRESHOLD = 10_000  # allocations between young collections (CPython: 700): parked connections live long,
#                              so most collections would find nothing to free; measured ~8% of an accept burst

# Discord's rules and ours
MIN_INTERVAL = 5.0  # Discord: one IDENTIFY per 5 s per bucket
DEFAULT_INTERVAL = 5.1  # 100 ms over Discord's 5 s, because Discord times IDENTIFY to IDENTIFY (see README)
MAX_INTERVAL = 3600.0  # anything longer is a typo, not a rate limit
MAX_HOLD = 3600.0  # the longest STARTUP_HOLD or LEASE_TIMEOUT accepted: an hour
MAX_CONCURRENCY = 1024  # Discord hands out 1, 16, 64...; each bucket costs one worker task
MAX_SHARD = 2**32  # shard ids are 32-bit in every client library
TIMER_SLACK = 0.002  # a long sleep wakes this much + 0.2% early, then finishes with a short one (see _pause)
SHORT_SLEEP = 0.05  # a wait this short is slept in one go: its kernel slack is microseconds
SPIN_WAIT = 0.001  # the last millisecond before a grant passes in loop turns: asyncio rounds a timer up to the ms

# Discord's API
DISCORD_TIMEOUT = 10.0  # one socket operation of GET /gateway/bot
DISCORD_DEADLINE = 20.0  # the whole GET /gateway/bot, connect to last byte: a dripping answer is cut here
DISCORD_MAX_BODY = 16 * 1024  # /gateway/bot answers are ~200 bytes; a bigger one is garbage
DISCORD_MAX_DEPTH = 8  # JSON nesting accepted from Discord (its answer nests 2); deeper is garbage, not a recursion
DISCORD_MAX_NUMBER = 20  # characters in a Retry-After header; longer is garbage
MAX_RESET_AFTER = 3 * 86400.0  # Discord's window is a day: a reset further away than this is malformed
MAX_SESSION_TOTAL = 10**9  # a session-start total beyond this is malformed
MAX_RETRY_AFTER = 600.0  # the longest wait a 429 may impose before we ask again (logged when clamped)
REFRESH_INTERVAL = 600.0  # re-read /gateway/bot every 10 minutes: 144 calls a day, far below any rate limit
RESET_MARGIN = 1.0  # ask Discord this long after its reset_after, so that its answer is past the reset
BUDGET_WINDOW = 86400.0  # Discord's session-start window, used to estimate drains across resets
IN_FLIGHT_WINDOW = 30.0  # grants this recent may not have reached Discord's count yet: subtracted from a fetch
BACKOFF_BASE = 1.0  # first retry after a Discord failure, doubling per failure...
BACKOFF_CAP = 300.0  # ...up to this: a flapping Discord sees at most one call per 5 minutes from us
MAX_ESTIMATE_WINDOWS = 64  # /status plays the budget forward at most this many resets (two months)

# Redis (REDIS_URL)
MAX_REDIS_URL = 2048  # REDIS_URL characters; a real one is under 200, a longer one is a pasted mistake
MAX_REDIS_DB = 9999  # SELECT index; Redis ships 16 databases and refuses any it lacks, this only stops overlong numbers
RESP_MAX_LINE_BYTES = 8 * 1024  # one status, error, integer or length line; Redis's are short, a Lua error ~300 bytes
RESP_MAX_BULK_BYTES = 1024 * 1024  # one bulk string; the queue stores tens of bytes, INFO is ~6 KiB
RESP_MAX_ARRAY_ITEMS = 4096  # one array; CONFIG GET * is ~450 items, the queue's scripts return a handful
RESP_MAX_REPLY_ITEMS = 16 * 1024  # elements declared in one reply, nested arrays together: bounds the Python objects
RESP_MAX_REPLY_BYTES = 4 * 1024 * 1024  # one reply's bytes: four maximal bulk strings, far past anything we ask for
RESP_MAX_DEPTH = 8  # arrays nested in one reply; Redis nests 2-4 deep (XREAD, COMMAND INFO), the queue 1
REDIS_MAX_COMMAND_BYTES = 1024 * 1024  # one encoded command; the queue's largest is a Lua script of a few KiB
REDIS_MAX_PENDING = 10_000  # commands in flight on one connection; more means Redis has stalled, not that it is slow
REDIS_READ_CHUNK = 64 * 1024  # bytes asked of the socket per read
REDIS_WRITE_HIGH_WATER = 256 * 1024  # unsent bytes past which execute() waits for the socket before its reply
REDIS_CONNECT_TIMEOUT = 5.0  # connect, TLS handshake, AUTH, SELECT and PING together
REDIS_COMMAND_TIMEOUT = 2.0  # a command unanswered by then drops its connection: a late reply is worse than none
REDIS_CLOSE_TIMEOUT = 1.0  # aclose() waits this long for the socket to finish closing, then moves on
REDIS_PING_INTERVAL = 5.0  # an idle subscriber PINGs this often, so a Redis that vanished without a FIN is noticed
REDIS_SUBSCRIBER_BACKLOG = 1024  # messages not yet taken from a subscriber; past it, it drops as if disconnected
REDIS_BACKOFF_BASE = 0.1  # first reconnect wait after a failure, doubling per failure in a row...
REDIS_BACKOFF_CAP = 2.0  # ...up to this: grants resume within ~2 s of Redis coming back



# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A bad environment value; the message names the variable and what is accepted, never a secret's value."""


_DIGITS = re.compile(r"[0-9]{1,18}")  # int() alone would take "+1", " 1", "1_0", non-ASCII digits, 5,000 digits
_DECIMAL = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9})?")  # float() alone would take "nan", "inf", "1e3" and 400 digits
_SECRET = re.compile(r"[\x21-\x7e]{1,4096}")  # it travels in an HTTP header: visible ASCII, no spaces
_HOST_NAME = re.compile(r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")
_PREFIX = re.compile(r"[\x21-\x7e]{1,100}")  # a Redis key prefix: visible ASCII, short
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
    startup_hold: Optional[float] = None  # None: one interval
    lease_timeout: float = 0.0
    redis_url: Optional[str] = dataclasses.field(default=None, repr=False)
    redis_prefix: Optional[str] = None  # None: derived from the token
    log_level: str = "INFO"
    auth_token: Optional[str] = dataclasses.field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "Config":
        """Validates every variable; raises ConfigError naming the first bad one."""
        interval = _seconds(environ, "IDENTIFY_INTERVAL", DEFAULT_INTERVAL, MIN_INTERVAL, MAX_INTERVAL,
                            " (Discord allows one IDENTIFY per 5 s per bucket)")
        redis_url = environ.get("REDIS_URL") or None
        if redis_url is not None:
            try:
                parse_redis_url(redis_url)  # its message names REDIS_URL and never holds the password
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        return cls(
            host=_host(environ.get("HOST", cls.host)),
            port=_integer(environ, "PORT", cls.port, 0, 65535),
            token=_secret(environ, "DISCORD_TOKEN", strip_prefix="bot "),
            api_url=_api_url(environ.get("DISCORD_API_URL", cls.api_url)),
            max_concurrency=_integer(environ, "MAX_CONCURRENCY", cls.max_concurrency, 1, MAX_CONCURRENCY),
            interval=interval,
            startup_hold=_seconds(environ, "STARTUP_HOLD", interval, 0.0, MAX_HOLD),
            lease_timeout=_seconds(environ, "LEASE_TIMEOUT", 0.0, 0.0, MAX_HOLD),
            redis_url=redis_url,
            redis_prefix=_prefix(environ.get("REDIS_PREFIX")),
            log_level=_log_level(environ.get("LOG_LEVEL", cls.log_level)),
            auth_token=_secret(environ, "AUTH_TOKEN"),
        )

    @property
    def hold(self) -> float:
        """Seconds every bucket waits after startup. In lease mode without Redis, a lease the previous process left
        open may still run: the hold then covers it and the interval after it."""
        hold = self.interval if self.startup_hold is None else self.startup_hold
        if self.lease_timeout and not self.redis_url:
            hold = max(hold, self.lease_timeout + self.interval)
        return hold


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
    raise ConfigError(f"HOST must be an IPv4 or IPv6 address or a host name, got {value[:100]!r}")


def _integer(environ: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    value = environ.get(name)
    if value is None:
        return default
    if not _DIGITS.fullmatch(value) or not low <= int(value) <= high:
        raise ConfigError(f"{name} must be a whole number from {low} to {high}, got {value[:40]!r}")
    return int(value)


def _seconds(environ: Mapping[str, str], name: str, default: float, low: float, high: float, why: str = "") -> float:
    value = environ.get(name)
    if value is None:
        return default
    if not _DECIMAL.fullmatch(value) or not low <= float(value) <= high:
        raise ConfigError(f"{name} must be a number of seconds from {low:g} to {high:g}{why}, got {value[:40]!r}")
    return float(value)


def _secret(environ: Mapping[str, str], name: str, strip_prefix: str = "") -> Optional[str]:
    value = environ.get(name)
    if value is None:
        return None
    if strip_prefix and value[: len(strip_prefix)].lower() == strip_prefix:
        value = value[len(strip_prefix) :]
    if not _SECRET.fullmatch(value):  # the value itself is never echoed
        raise ConfigError(f"{name} is set but is empty, too long, or holds spaces or non-ASCII characters; unset it or fix it")
    return value


def _api_url(value: str) -> str:
    try:
        parts = urllib.parse.urlsplit(value)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.query and not parts.fragment
        parts.port  # raises for a port that is not a number from 0 to 65535
    except ValueError:  # a malformed port or IPv6 host
        valid = False
    if len(value) > 2048 or not valid:
        raise ConfigError(f"DISCORD_API_URL must be an http:// or https:// base URL, got {value[:100]!r}")
    return value.rstrip("/")


def _prefix(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    if not _PREFIX.fullmatch(value):
        raise ConfigError(f"REDIS_PREFIX must be 1 to 100 visible ASCII characters, got {value[:100]!r}")
    return value


def _log_level(value: str) -> str:
    if value.upper() not in LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {value[:40]!r}")
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
_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_TOKEN = re.compile(_TCHAR + rb"+")
# request-line = method SP request-target SP HTTP-version; HTTP-version = "HTTP/" DIGIT "." DIGIT; the target is
# visible ASCII (VCHAR = %x21-7E) in any of its forms
_REQUEST_LINE = re.compile(rb"(" + _TCHAR + rb"+) ([\x21-\x7e]+) HTTP/1\.([01])")
# field-line = field-name ":" OWS field-value OWS; field-value = *( field-vchar / SP / HTAB ), field-vchar = VCHAR /
# obs-text: no control byte but HTAB. obs-fold (a line starting with SP or HTAB) does not match the name.
_FIELD_LINE = re.compile(rb"(" + _TCHAR + rb"+):([\t\x20-\x7e\x80-\xff]*)")
_FIELD_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# The common case in one pass: a whole, valid head at the start of the buffer. A head this does not match (leading
# empty lines, an error, pieces still arriving) takes the careful path below, which also says what is wrong.
_FIELD_VALUE = rb"[\t\x20-\x7e\x80-\xff]*"
_WHOLE_HEAD = re.compile(rb"(" + _TCHAR + rb"+) ([\x21-\x7e]+) HTTP/1\.([01])\r\n((?:" + _TCHAR + rb"+:" + _FIELD_VALUE
                         + rb"\r\n)*)\r\n")
_FIELDS = re.compile(rb"(" + _TCHAR + rb"+):[ \t]*(" + _FIELD_VALUE + rb")\r\n")  # the value's trailing OWS: rstrip
# RFC 9112 section 2.2: an empty line (CRLF) before the request line is skipped, a few of them at most here
_EMPTY_LINES = re.compile(rb"(?:\r\n){0,%d}" % MAX_EMPTY_LINES)
# bare LF (an LF not after a CR) and bare CR (a CR not before an LF) are both refused: RFC 9112 section 2.2
_BARE_LINE_END = re.compile(rb"(?<!\r)\n|\r(?!\n)")
# Host = uri-host [ ":" port ] (RFC 9112 section 3.2, RFC 3986): an IP literal in brackets or a reg-name
_HOST_FIELD = re.compile(rb"(\[[0-9A-Fa-f:.]{2,45}\]|\[v[0-9A-Fa-f]+\.[!$&'()*+,;=:\w.~-]+\]|[!$&'()*+,;=\w.~%-]*)(:[0-9]{0,5})?")
_LENGTH = re.compile(rb"[0-9]{1,%d}" % MAX_NUMBER_DIGITS)


class Request:
    """A parsed request head. Header names are lower-cased bytes; values are bytes with surrounding OWS removed."""

    __slots__ = ("method", "target", "path", "query", "version", "headers", "keep_alive", "content_length",
                 "expect_continue")

    def __init__(self, method: str, target: str, path: str, query: str, version: str,
                 headers: Tuple[Tuple[bytes, bytes], ...], keep_alive: bool, content_length: int,
                 expect_continue: bool):
        self.method = method
        self.target = target
        self.path = path
        self.query = query
        self.version = version  # "1.0" or "1.1"
        self.headers = headers
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.expect_continue = expect_continue  # "Expect: 100-continue" on an HTTP/1.1 request with a body

    def header(self, name: bytes) -> Optional[bytes]:
        """The first value of a header (name in lower case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def __repr__(self) -> str:
        return f"Request({self.method} {self.target[:80]} HTTP/{self.version})"


class PartialHead:
    """What the earlier pieces of an incomplete head established, so that each byte is scanned once: how many bytes
    were checked, and where the request line ends (-1 while it has not)."""

    __slots__ = ("checked", "line_end")

    def __init__(self) -> None:
        self.checked = 0
        self.line_end = -1


def parse_request_head(data: bytes, partial: Optional[PartialHead] = None) -> Optional[Tuple[Request, int]]:
    """Parses one request head from the start of data.

    Returns (request, bytes used) once the head is complete, None while more bytes are needed, and raises HTTPError
    as soon as the bytes at hand cannot start a valid request (so a byte-at-a-time sender fails as early as a fast
    one). The body, if any, is left to the caller: request.content_length bytes follow the head.

    A connection passes the same `partial` for every piece of one head (data growing each time): the work per call
    is then proportional to the new bytes, so a head trickled a byte at a time costs no more than one sent whole.
    Every byte, leading empty lines included, counts toward the limits.
    """
    whole = _WHOLE_HEAD.match(data) if partial is None or partial.checked == 0 else None
    if whole is not None and whole.end() <= MAX_HEAD_BYTES and whole.start(4) - 2 <= MAX_REQUEST_LINE:
        method, target, minor, block = whole.groups()
        fields = _FIELDS.findall(block)
        if len(fields) > MAX_HEADERS:
            raise HTTPError(431, f"more than {MAX_HEADERS} header fields")
        return _build_request(method.decode("ascii"), target.decode("ascii"), "1.1" if minor == b"1" else "1.0",
                              tuple([(name.lower(), value.rstrip(b" \t")) for name, value in fields])), whole.end()
    start = 0
    if data[:1] == b"\r":
        start = _EMPTY_LINES.match(data).end()
        if data.startswith(b"\r\n", start):
            raise HTTPError(400, f"more than {MAX_EMPTY_LINES} empty lines before the request line")
    checked = partial.checked if partial is not None else 0
    end = data.find(b"\r\n\r\n", max(start, checked - 3))
    if end < 0:
        _check_partial_head(data, start, partial or PartialHead())
        return None
    line_end = partial.line_end if partial is not None and partial.line_end >= 0 else data.find(b"\r\n", start)
    if line_end - start > MAX_REQUEST_LINE:  # judged before the head's size: an overlong line is a 414 however sent
        raise HTTPError(414, f"request line longer than {MAX_REQUEST_LINE} bytes")
    if end + 4 > MAX_HEAD_BYTES:
        raise HTTPError(431, f"request head longer than {MAX_HEAD_BYTES} bytes")
    scan_from = checked - 1 if checked > start and data[checked - 1] == 13 else max(start, checked)
    pairs = data.count(b"\r\n", scan_from, end + 4)  # no CR or LF outside a CRLF: three counts in C
    if data.count(b"\r", scan_from, end + 4) != pairs or data.count(b"\n", scan_from, end + 4) != pairs:
        _check_line_ends(data, scan_from, end + 4)
    match = _REQUEST_LINE.fullmatch(data, start, line_end)
    if match is None:
        _refuse_request_line(data[start:line_end])
    method, target, minor = match.groups()
    headers = []
    if line_end < end:
        lines = data[line_end + 2 : end].split(b"\r\n")
        if len(lines) > MAX_HEADERS:
            raise HTTPError(431, f"more than {MAX_HEADERS} header fields")
        for line in lines:
            field = _FIELD_LINE.fullmatch(line)
            if field is None:
                _refuse_field_line(line)
            headers.append((field.group(1).lower(), field.group(2).strip(b" \t")))
    return _build_request(method.decode("ascii"), target.decode("ascii"), "1.1" if minor == b"1" else "1.0",
                          tuple(headers)), end + 4


def _check_partial_head(data: bytes, start: int, partial: PartialHead) -> None:
    """The checks an incomplete head can fail, on the bytes not checked before: line endings, the request line once
    it is complete, and the size limits. Records what it found in `partial`."""
    checked = _resume_at(data, max(start, partial.checked))
    _check_line_ends(data, checked, len(data) - 1 if data.endswith(b"\r") else len(data))  # a final CR may yet get its LF
    if partial.line_end < 0:
        line_end = data.find(b"\r\n", checked)
        if line_end >= 0:  # the request line has just completed: judge it now rather than after the headers
            if line_end - start > MAX_REQUEST_LINE:
                raise HTTPError(414, f"request line longer than {MAX_REQUEST_LINE} bytes")
            _parse_request_line(data[start:line_end])
            partial.line_end = line_end
        elif len(data) - start > MAX_REQUEST_LINE:
            raise HTTPError(414, f"request line longer than {MAX_REQUEST_LINE} bytes")
    if len(data) > MAX_HEAD_BYTES:
        raise HTTPError(431, f"request head longer than {MAX_HEAD_BYTES} bytes")
    partial.checked = len(data)


def _resume_at(data: bytes, checked: int) -> int:
    """Where to resume checking line endings: one byte back when the checked part ended in a CR (it was left out, as
    its LF might follow), so that no CRLF is ever split."""
    return checked - 1 if checked and data[checked - 1] == 13 else checked


def _check_line_ends(data: bytes, start: int, end: int) -> None:
    """HTTPError(400) when data[start:end] holds a CR or LF outside a CRLF. Three counts in C: the regex that says
    which one is wrong runs only on the error path."""
    pairs = data.count(b"\r\n", start, end)
    if data.count(b"\r", start, end) != pairs or data.count(b"\n", start, end) != pairs:
        fault = _BARE_LINE_END.search(data, start, end)
        if fault is not None and fault.group() == b"\n":
            raise HTTPError(400, "line ending without CR (bare LF)")
        raise HTTPError(400, "CR not followed by LF (bare CR)")


def _parse_request_line(line: bytes) -> None:
    """Judges a request line on its own (of a head still arriving); HTTPError when it is wrong."""
    if _REQUEST_LINE.fullmatch(line) is None:
        _refuse_request_line(line)


def _refuse_request_line(line: bytes) -> None:
    """Says what is wrong with a request line that does not match the grammar (the slow path, errors only)."""
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HTTPError(400, "request line must be: method SP target SP version")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HTTPError(400, "method is not a token")
    if not re.fullmatch(rb"[\x21-\x7e]+", target):
        raise HTTPError(400, "request target holds spaces, control bytes or non-ASCII bytes")
    if re.fullmatch(rb"HTTP/[0-9]\.[0-9]", version):
        raise HTTPError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    raise HTTPError(400, "malformed HTTP version")


def _refuse_field_line(line: bytes) -> None:
    """Says what is wrong with a header line that does not match the grammar (the slow path, errors only)."""
    if line[:1] in (b" ", b"\t"):
        raise HTTPError(400, "obsolete line folding in headers")
    name, colon, value = line.partition(b":")
    if not colon:
        raise HTTPError(400, "header line without a colon")
    if not _TOKEN.fullmatch(name):  # also catches whitespace before the colon and non-ASCII names
        raise HTTPError(400, "header name is not a token (whitespace before the colon?)")
    raise HTTPError(400, "control byte in a header value")


def _build_request(method: str, target: str, version: str, headers: Tuple[Tuple[bytes, bytes], ...]) -> Request:
    host = lengths = codings = connection = expect = None
    for name, value in headers:  # only the fields that decide framing and routing are looked at here
        if name == b"host":
            if host is not None:
                raise HTTPError(400, "more than one Host header")
            host = value
        elif name == b"content-length":
            lengths = value if lengths is None else lengths + b"," + value
        elif name == b"transfer-encoding":
            codings = value if codings is None else codings + b"," + value
        elif name == b"connection":
            connection = value if connection is None else connection + b"," + value
        elif name == b"expect":
            expect = value
    if host is None:
        if version == "1.1":
            raise HTTPError(400, "HTTP/1.1 request without a Host header")
    elif not _HOST_FIELD.fullmatch(host):
        raise HTTPError(400, "malformed Host header")

    content_length = 0
    if codings is not None:
        if lengths is not None:
            raise HTTPError(400, "both Content-Length and Transfer-Encoding")
        if version == "1.0":
            raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if codings.lower().replace(b" ", b"").replace(b"\t", b"") == b"chunked":
            raise HTTPError(411, "chunked request bodies are not accepted; send Content-Length (or no body)")
        raise HTTPError(501, "unsupported transfer coding")
    if lengths is not None:
        items = {item.strip(b" \t") for item in lengths.split(b",")}
        if not all(_LENGTH.fullmatch(item) for item in items):
            raise HTTPError(400, f"Content-Length is not a number of at most {MAX_NUMBER_DIGITS} digits")
        if len({int(item) for item in items}) > 1:
            raise HTTPError(400, "conflicting Content-Length values")
        content_length = int(items.pop())
        if content_length > MAX_BODY_BYTES:
            raise HTTPError(413, f"request body larger than {MAX_BODY_BYTES} bytes")

    if connection is None:
        keep_alive = version == "1.1"
    else:
        tokens = {item.strip(b" \t").lower() for item in connection.split(b",")}
        keep_alive = b"close" not in tokens and (version == "1.1" or b"keep-alive" in tokens)
    expect_continue = (expect is not None and version == "1.1" and content_length > 0
                       and expect.lower() == b"100-continue")

    # origin-form = absolute-path [ "?" query ]; absolute-form = absolute-URI; asterisk-form = "*" (OPTIONS only)
    if target[0] == "/":
        path, _, query = target.partition("?")
    elif target == "*" and method == "OPTIONS":
        path, query = "*", ""
    elif target[:7].lower() == "http://" or target[:8].lower() == "https://":
        try:
            parts = urllib.parse.urlsplit(target)
        except ValueError:  # urlsplit refuses some hosts, such as an unclosed "[" (found by the fuzzer)
            raise HTTPError(400, "malformed absolute request target") from None
        path, query = parts.path or "/", parts.query
    else:
        raise HTTPError(400, "request target must start with '/' or be an absolute http URL")
    return Request(method, target, path, query, version, headers, keep_alive, content_length, expect_continue)


def parse_shard(query: str) -> Optional[int]:
    """The shard id from a query string: None when absent; HTTPError(400) when malformed, repeated or too large."""
    value = _query_value(query, "shard")
    if value is None:
        return None
    if not _DIGITS.fullmatch(value):
        raise HTTPError(400, f"shard must be a whole number written in ASCII digits, got {value[:40]!r}", close=False)
    if len(value) > 10 or int(value) >= MAX_SHARD:
        raise HTTPError(400, f"shard must be below {MAX_SHARD}", close=False)
    return int(value)


def _mentions_shard(query: str) -> bool:
    """Whether a query names a shard in any spelling (any case, percent-encoded, after a stray "?" or ";"): such
    a request is refused rather than taken for shard 0 or answered as a status page."""
    return "shard" in urllib.parse.unquote(query[:MAX_REQUEST_LINE]).lower()


def _query_value(query: str, name: str) -> Optional[str]:
    """The one value of a query parameter, None when absent; HTTPError(400) when given twice or the query is huge."""
    if name not in query:  # a cheap way out for queries that cannot hold it
        return None
    if query.startswith(name + "=") and "&" not in query and "%" not in query and "+" not in query \
            and ";" not in query:
        return query[len(name) + 1 :]  # "shard=12", the common case, as parse_qsl would read it
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, max_num_fields=MAX_HEADERS)
    except ValueError:
        raise HTTPError(400, "too many query parameters", close=False) from None
    values = [value for key, value in pairs if key == name]
    if not values:
        return None
    if len(values) > 1:
        raise HTTPError(400, f"the {name} parameter is given more than once", close=False)
    return values[0]


# ----------------------------------------------------------------------------------------------------------------
# Responses
# ----------------------------------------------------------------------------------------------------------------

REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
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
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CONNECTION_HEADER = {(False, False): b"", (True, False): b"Connection: close\r\n",
                      (False, True): b"Connection: keep-alive\r\n", (True, True): b"Connection: close\r\n"}
_HEADS: Dict[Tuple[int, str], bytes] = {}  # the first lines of a response, per status and content type


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
    first = _HEADS.get((status, content_type))
    if first is None:
        first = _HEADS[status, content_type] = (
            f"HTTP/1.1 {status} {REASONS[status]}\r\nServer: gateway-queue/{VERSION}\r\nContent-Type: {content_type}\r\n"
            "Cache-Control: no-store\r\nContent-Length: ").encode("latin-1")
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers).encode("latin-1") if headers else b""
    return b"%s%d\r\n%s%s\r\n%s" % (first, len(body), extra, _CONNECTION_HEADER[close, keep_alive_10], b"" if head else body)


def render_json(status: int, payload: Any, **kwargs: Any) -> bytes:
    """A JSON response ending in a newline (so that curl's output does not run into the prompt); see render."""
    return render(status, json.dumps(payload).encode() + b"\n", **kwargs)


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


def response_options(request: Request) -> Dict[str, bool]:
    """The keyword arguments of render() that a request's method, version and Connection header decide."""
    return {"head": request.method == "HEAD", "close": not request.keep_alive,
            "keep_alive_10": request.keep_alive and request.version == "1.0"}


class Grant:
    """A parked request's answer, rendered once per (HEAD, close, HTTP/1.0 keep-alive) combination and shared: a
    parked connection keeps this instead of its whole request."""

    __slots__ = ("head", "close", "response")

    def __init__(self, head: bool, close: bool, response: bytes):
        self.head = head
        self.close = close
        self.response = response


_GRANTS: Dict[Tuple[bool, bool, bool], Grant] = {}


def grant_for(request: Request) -> Grant:
    """The shared Grant for this request."""
    key = (request.method == "HEAD", not request.keep_alive, request.keep_alive and request.version == "1.0")
    grant = _GRANTS.get(key)
    if grant is None:
        grant = _GRANTS[key] = Grant(key[0], key[1], render(200, GRANT_BODY, head=key[0], close=key[1], keep_alive_10=key[2]))
    return grant


# ----------------------------------------------------------------------------------------------------------------
# Queue
# ----------------------------------------------------------------------------------------------------------------

Clock = Callable[[], float]
CallLater = Callable[[float, Callable[[], None]], Any]  # loop.call_later, or a test's fake: returns a cancellable handle


class Histogram:
    """A Prometheus histogram: cumulative counts per upper bound, their sum and count."""

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Counts one observation into its bucket."""
        index = next((i for i, bound in enumerate(self.bounds) if value <= bound), len(self.bounds))
        self.counts[index] += 1
        self.sum += value

    def samples(self) -> List[Tuple[str, float]]:
        """The _bucket, _sum and _count samples of the exposition format."""
        cumulative = list(itertools.accumulate(self.counts))
        bounds = [_metric_value(bound) for bound in self.bounds] + ["+Inf"]
        return ([(f'_bucket{{le="{le}"}}', count) for le, count in zip(bounds, cumulative)]
                + [("_sum", self.sum), ("_count", cumulative[-1])])


class Stats:
    """Counters shared by the queue, the coordinator, the connections and the Discord client; /metrics renders
    them. Everything here is counted as it happens: a scrape never walks connections, tasks or descriptors."""

    WAIT_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)
    LEASE_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 3600)

    def __init__(self) -> None:
        self.requests: Dict[str, int] = {"granted": 0, "cancelled": 0, "rejected": 0}
        self.wait = Histogram(self.WAIT_BUCKETS)
        self.leases: Dict[str, int] = {"ready": 0, "invalid_session": 0, "closed": 0, "timeout": 0, "undelivered": 0}
        self.lease_held = Histogram(self.LEASE_BUCKETS)
        self.discord: Dict[str, int] = collections.Counter()
        self.errors: Dict[int, int] = collections.Counter()  # HTTP error responses by status
        self.connections_refused = 0
        self.claims: Dict[str, int] = collections.Counter()  # coordinator answers by reason
        self.backend_errors = 0


class Waiter:
    """One parked request: its shard, its place in arrival order, and the client to release."""

    __slots__ = ("shard", "seq", "arrived", "client", "bucket")

    def __init__(self, shard: int, seq: int, arrived: float, client: "Client", bucket: "Bucket"):
        self.shard = shard
        self.seq = seq
        self.arrived = arrived
        self.client = client  # the client itself, not a bound method: one object less per parked request
        self.bucket = bucket


class Client(Protocol):
    """Whoever parked a request: release() writes the grant, False if the client is already gone."""

    def release(self) -> bool: ...


class Bucket:
    """One bucket's line: waiters in arrival order, and what its worker last heard from the coordinator.

    An OrderedDict rather than an asyncio.Queue: a client that disconnects must leave the line in O(1), whatever
    its place, so that a storm of thousands of cancellations costs nothing.
    """

    __slots__ = ("index", "waiters", "wakeup", "idle", "retry_at", "reason", "retired")

    def __init__(self, index: int):
        self.index = index
        self.waiters: "collections.OrderedDict[Waiter, None]" = collections.OrderedDict()
        self.wakeup: Optional[asyncio.Future] = None  # set while the worker waits (for a waiter, a time or a poke)
        self.idle = False  # the worker waits for a first waiter
        self.retry_at = 0.0  # when the coordinator said the bucket may be free; 0: ask now
        self.reason = ""  # why it is not free yet, for /status
        self.retired = False  # replaced after a change of max_concurrency: its worker ends


def _resolve(future: "asyncio.Future[None]") -> None:
    if not future.done():
        future.set_result(None)


class IdentifyQueue:
    """Per-bucket FIFO lines, each drained by one worker task that asks the coordinator for the bucket's slot.

    A worker sleeps exactly until the coordinator's answer says the slot may be free (waking early and finishing
    with a short sleep, see _pause), or until poked: a new waiter in an empty line, a lease released, limits
    changed. Only the clock and the timer are injected: the queue knows nothing of sockets.
    """

    def __init__(self, coordinator: "Coordinator", *, clock: Clock = time.monotonic,
                 call_later: Optional[CallLater] = None, stats: Optional[Stats] = None):
        self.coordinator = coordinator
        self.clock = clock
        self._call_later = call_later
        self._spin = call_later is None  # on the loop's own timers (a test's fake timer never spins)
        self.stats = stats or Stats()
        self.max_concurrency = coordinator.max_concurrency
        self.buckets = [Bucket(i) for i in range(self.max_concurrency)]
        self.waiting = 0  # parked requests, counted as they come and go
        self._seq = itertools.count()
        self._workers: List[asyncio.Task] = []
        coordinator.on_change = self.poke

    # -- lifetime ------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts one worker per bucket."""
        if self._call_later is None:
            self._call_later = asyncio.get_running_loop().call_later
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
        self.waiting += 1
        if bucket.idle and bucket.wakeup is not None:
            _resolve(bucket.wakeup)
        return waiter

    def cancel(self, waiter: Waiter) -> bool:
        """Takes a waiter out of its line; False if it was no longer there (granted or already cancelled)."""
        if waiter.bucket.waiters.pop(waiter, False) is None:
            self.waiting -= 1
            return True
        return False

    def take_all(self) -> List[Waiter]:
        """Removes and returns every parked waiter in arrival order (for shutdown and re-bucketing)."""
        waiters = sorted((w for bucket in self.buckets for w in bucket.waiters), key=lambda w: w.seq)
        for bucket in self.buckets:
            bucket.waiters.clear()
        self.waiting = 0
        return waiters

    # -- changes -------------------------------------------------------------------------------------------------

    def poke(self, shard: Optional[int] = None) -> None:
        """Something may let a bucket grant sooner (a release, new limits): its worker (or every one) asks again
        now. A change of the coordinator's max_concurrency re-buckets the parked requests, keeping their order."""
        if self.coordinator.max_concurrency != self.max_concurrency:
            self.rebucket(self.coordinator.max_concurrency)
            return
        for bucket in self.buckets if shard is None else (self.buckets[shard % self.max_concurrency],):
            bucket.retry_at = 0.0
            if bucket.wakeup is not None:
                _resolve(bucket.wakeup)

    def rebucket(self, max_concurrency: int) -> None:
        """Moves every parked request to its bucket under a new max_concurrency, in arrival order. The coordinator
        keeps the slots' history, so no shard goes early; the new workers simply ask it."""
        parked = self.take_all()
        for bucket in self.buckets:
            bucket.retired = True
            if bucket.wakeup is not None:
                _resolve(bucket.wakeup)
        self.max_concurrency = max_concurrency
        self.buckets = [Bucket(i) for i in range(max_concurrency)]
        for waiter in parked:
            waiter.bucket = self.buckets[waiter.shard % max_concurrency]
            waiter.bucket.waiters[waiter] = None
        self.waiting = len(parked)
        if self._workers:
            self._workers = [task for task in self._workers if not task.done()]
            self._workers.extend(asyncio.ensure_future(self._work(bucket)) for bucket in self.buckets)

    def drain_estimate(self, now: float) -> float:
        """Seconds until every parked request is granted, if nobody else arrives or leaves and clients answer at
        once (and, in lease mode, report at once). See estimate_drain."""
        lines = [(max(now, b.retry_at if b.retry_at < math.inf else now), len(b.waiters)) for b in self.buckets if b.waiters]
        budget = self.coordinator.budget
        interval = self.coordinator.interval
        return estimate_drain(lines, interval, now, budget)

    # -- workers -------------------------------------------------------------------------------------------------

    async def _work(self, bucket: Bucket) -> None:
        while not bucket.retired:
            if not bucket.waiters:
                bucket.idle = True
                await self._pause(bucket, math.inf)
                bucket.idle = False
                continue
            wait = bucket.retry_at - self.clock()
            if wait > 0:
                if wait <= SPIN_WAIT and self._spin:
                    await asyncio.sleep(0)  # a few loop turns, other work in between, and the grant within ~0.1 ms
                    continue
                if SHORT_SLEEP < wait < math.inf:
                    early = wait - TIMER_SLACK - wait * TIMER_SLACK  # then a short wait, then the last ms
                elif self._spin and wait < math.inf:
                    early = wait - SPIN_WAIT
                else:
                    early = wait
                await self._pause(bucket, early)
                continue
            await self._grant_next(bucket)

    async def _grant_next(self, bucket: Bucket) -> None:
        """One claim for the bucket's first waiter, and the grant if the coordinator consents. A method of its own,
        so that no worker keeps a waiter (and its connection) alive in a local variable between claims."""
        coordinator, stats = self.coordinator, self.stats
        waiter = next(iter(bucket.waiters))
        verdict = await coordinator.claim(waiter.shard)
        claimed_at = self.clock()
        stats.claims[verdict.reason] += 1
        if not verdict.granted:
            bucket.retry_at = claimed_at + verdict.wait
            bucket.reason = verdict.reason
            if verdict.max_concurrency != self.max_concurrency:
                self.poke()  # re-buckets: the coordinator counts buckets differently now
            return
        if bucket.retired or waiter not in bucket.waiters:  # it left, or moved, while the claim was out
            await coordinator.settle(verdict, False)
            return
        del bucket.waiters[waiter]
        self.waiting -= 1
        bucket.retry_at = claimed_at + verdict.wait  # no claim before the slot frees (a release pokes sooner)
        try:
            delivered = waiter.client.release()
        except Exception:  # a bug in one connection must not stall the bucket
            log.exception("could not deliver a grant to shard %d", waiter.shard)
            delivered = False
        await coordinator.settle(verdict, delivered)
        bucket.reason = ""
        if not delivered:  # the client left before we noticed: no slot, no session start spent
            bucket.retry_at = 0.0
            stats.requests["cancelled"] += 1
            return
        now = self.clock()
        stats.requests["granted"] += 1
        stats.wait.observe(now - waiter.arrived)
        log.debug("granted shard %d (bucket %d of %d) at %.6f after %.3f s",
                  waiter.shard, verdict.bucket, verdict.max_concurrency, now, now - waiter.arrived)
        if verdict.max_concurrency != self.max_concurrency:
            self.poke()

    async def _pause(self, bucket: Bucket, delay: float) -> None:
        """Waits `delay` seconds (math.inf: until poked) or until poked. On Linux a long timer may fire 0.1% late
        (the kernel's slack), and asyncio rounds timeouts up to the millisecond: so the worker asks for a long wait
        less a margin, and its next, short wait lands within a millisecond of the deadline, never before it."""
        future = bucket.wakeup = asyncio.get_running_loop().create_future()
        handle = None if delay == math.inf else self._call_later(delay, lambda: _resolve(future))
        try:
            await future
        finally:
            bucket.wakeup = None
            if handle is not None:
                handle.cancel()


def estimate_drain(lines: Sequence[Tuple[float, int]], interval: float, now: float, budget: Optional["Budget"],
                   window: float = BUDGET_WINDOW) -> float:
    """Seconds until every line is through: each line (start, count) grants at start, start + interval, ...

    Without a binding budget it is the slowest line. When the budget runs out first, the grants that it allows are
    taken in time order across lines (found by bisection on time, O(lines) per step; grants due at one moment go
    earliest-due first, then in bucket order), every line waits for the reset, and the next window starts with the
    full total. The cost depends on the number of lines and resets, never on the number of parked requests.
    """
    pending = [(start, count, index) for index, (start, count) in enumerate(lines) if count > 0]
    if not pending:
        return 0.0
    waiting = sum(count for _, count, _ in pending)
    if budget is None or budget.remaining >= waiting:
        return max(start + (count - 1) * interval for start, count, _ in pending) - now
    if budget.remaining + (MAX_ESTIMATE_WINDOWS - 1) * budget.total < waiting:
        return math.inf  # past the windows played, known without playing them (a budget of 1 a day, 4,096 waiting)
    allowed, reset_at, floor = budget.remaining, budget.reset_at, now
    for _ in range(MAX_ESTIMATE_WINDOWS):
        due = [max(start, floor) for start, _, _ in pending]  # a line held past its time by the reset goes at it
        counts = [count for _, count, _ in pending]
        if allowed >= sum(counts):
            return max(at + (count - 1) * interval for at, count in zip(due, counts)) - now
        if allowed > 0:
            last = _time_of_grant(due, counts, interval, allowed)
            taken = [0 if at > last + 1e-9 else min(count, int((last - at) / interval + 1e-9) + 1)
                     for at, count in zip(due, counts)]
            ties = [i for i, took in enumerate(taken) if took and abs(due[i] + (took - 1) * interval - last) < 1e-9]
            # the latest in line among the grants due at `last` are the ones the budget refuses
            ties.sort(key=lambda i: (pending[i][0] if taken[i] == 1 else last, pending[i][2]), reverse=True)
            for i in ties[: sum(taken) - allowed]:
                taken[i] -= 1
            pending = [(at + took * interval if took else start, count - took, index)
                       for at, took, (start, count, index) in zip(due, taken, pending) if count > took]
        floor = max(floor, reset_at)  # the reset restores the total; resets follow one window apart
        allowed, reset_at = budget.total, floor + window
    return math.inf


def _time_of_grant(starts: Sequence[float], counts: Sequence[int], interval: float, nth: int) -> float:
    """The time of the nth grant (1-based) when line i grants at starts[i] + k * interval for k < counts[i]."""

    def granted_by(moment: float) -> int:
        return sum(min(count, int((moment - start) / interval + 1e-9) + 1)
                   for start, count in zip(starts, counts) if moment >= start - 1e-9)

    low, high = min(starts), max(start + (count - 1) * interval for start, count in zip(starts, counts))
    for _ in range(64):
        if high - low <= 1e-7:
            break
        middle = (low + high) / 2
        if granted_by(middle) >= nth:
            high = middle
        else:
            low = middle
    # snap to the grant time just at or after the bisection's bound
    candidates = [start + max(0, math.ceil((high - start) / interval - 1e-6)) * interval
                  for start, count in zip(starts, counts) if start + (count - 1) * interval >= high - 1e-6]
    return min(candidates) if candidates else high


# ----------------------------------------------------------------------------------------------------------------
# Coordination: where slots, leases and the budget live
# ----------------------------------------------------------------------------------------------------------------

# Why a bucket waits (Verdict.reason), as /status and /metrics show it
GRANTED = "granted"
INTERVAL = "interval"  # the previous grant's interval is running
LEASE = "lease"  # a granted shard has not reported READY yet
HOLD = "startup hold"  # the first interval after startup (a restarted queue does not know its last grants)
BUDGET = "budget"  # no session starts left until Discord's reset
CONFIRM = "awaiting Discord"  # the reset has passed: nothing is spent until Discord's fresh answer says so
FAIR = "another replica's turn"  # Redis: a replica whose line waited longer takes the slot first
UNAVAILABLE = "backend unavailable"  # Redis cannot be reached: no grant without its consent
LATE = "late reply"  # Redis answered too late to act on; the claim was given back
OUTCOMES = ("ready", "invalid_session", "closed")  # what a shard may report to POST /release


@dataclasses.dataclass
class Budget:
    """Discord's session-start budget as the coordinator sees it: `remaining` of `total`; Discord restores it at
    `reset_at` (the coordinator's clock), which the service believes only once Discord says so."""

    total: int
    remaining: int
    reset_at: float


class BackendError(Exception):
    """The coordination backend (Redis) could not do what was asked; nothing was granted or spent on our side."""


class Verdict:
    """A coordinator's answer to claim(): granted, or how long to wait and why. `bucket` and `max_concurrency` are
    the coordinator's own count, which the queue follows when it differs from its own."""

    __slots__ = ("granted", "wait", "reason", "shard", "bucket", "max_concurrency", "claim")

    def __init__(self, granted: bool, wait: float, reason: str, shard: int, bucket: int, max_concurrency: int,
                 claim: Any = None):
        self.granted = granted
        self.wait = wait  # seconds; math.inf: until the coordinator pokes the queue (a fresh budget, a release).
        #                   Granted: how soon, at the earliest, the bucket's next claim can succeed (0: ask at once)
        self.reason = reason
        self.shard = shard
        self.bucket = bucket
        self.max_concurrency = max_concurrency
        self.claim = claim  # the implementation's handle on a granted claim, for settle()


class Coordinator:
    """The one small interface between the queue and wherever the shared state lives.

    claim(shard):   take the shard's bucket now and spend one session start, atomically; or say how long to wait.
    settle(v, ok):  after the grant was written (ok) or could not be (the client left: the slot and the start come
                    back). In lease mode a delivered claim holds the bucket for the shard until release() or
                    lease_timeout, then the interval runs.
    release(shard): ends the shard's lease (POST /release).
    apply(limits):  Discord's limits for the whole group; refresh_turn() says whether this process should fetch them
                    now (one process of a group does), load() reads what another one fetched.
    Two implementations: MemoryCoordinator (this process) and RedisCoordinator (replicas); the queue never asks which.
    """

    name = "base"

    def __init__(self, interval: float, max_concurrency: int, *, lease_timeout: float, clock: Clock, stats: Stats):
        self.interval = interval
        self.max_concurrency = max_concurrency
        self.lease_timeout = lease_timeout
        self.clock = clock
        self.stats = stats
        self.budget: Optional[Budget] = None
        self.known = False  # limits have come from Discord (directly or through the group) at least once
        self.on_change: Callable[[Optional[int]], None] = lambda shard: None  # set by the queue
        self.on_lost: Callable[[], None] = lambda: None  # set by the server: the shared limits are gone, fetch them

    async def start(self, hold: float) -> None:
        """Begins coordinating; a process without shared state holds every bucket `hold` seconds from now."""

    async def stop(self) -> None:
        """Ends coordinating (closes connections)."""

    async def claim(self, shard: int) -> Verdict:
        raise NotImplementedError

    async def settle(self, verdict: Verdict, delivered: bool) -> None:
        raise NotImplementedError

    async def release(self, shard: int, outcome: str) -> Tuple[int, Dict[str, Any]]:
        """(HTTP status, JSON body) for POST /release."""
        raise NotImplementedError

    async def apply(self, limits: "GatewayLimits") -> None:
        raise NotImplementedError

    async def refresh_turn(self, period: float) -> bool:
        """True when this process should fetch /gateway/bot now; alone, always."""
        return True

    async def load(self) -> None:
        """Reads the limits another process of the group fetched; alone, nothing to do."""

    def problem(self) -> Optional[str]:
        """Why this process cannot grant right now (for /healthz), or None."""
        return None

    def outlook(self, bucket: int, now: float) -> Tuple[float, str, Optional[Dict[str, Any]]]:
        """For /status: seconds until `bucket` may grant, why, and its open lease if any."""
        raise NotImplementedError

    def _lease_ended(self, bucket: int, shard: int, outcome: str, held: float, since_previous: Optional[float]) -> None:
        """Counts and logs the end of a lease, wherever it is kept."""
        self.stats.leases[outcome] += 1
        if outcome != "undelivered":
            self.stats.lease_held.observe(held)
        if outcome == "timeout":
            log.warning("shard %d (bucket %d) did not report READY within LEASE_TIMEOUT (%g s): its bucket waits the "
                        "interval from now", shard, bucket, self.lease_timeout)
        elif outcome == "invalid_session":
            gap = "no earlier grant known" if since_previous is None else f"{since_previous:.3f} s after the bucket's previous grant"
            log.warning("shard %d (bucket %d) reported INVALID_SESSION: Discord found the spacing too tight (it was "
                        "granted %s); consider a longer IDENTIFY_INTERVAL", shard, bucket, gap)


class _Slot:
    """One bucket's slot in memory: when it may grant again, and its last grant and lease."""

    __slots__ = ("free_at", "why", "holder", "granted_at", "previous_at", "lease_until", "lease_state", "timer",
                 "claimed")

    def __init__(self) -> None:
        self.free_at = -math.inf
        self.why = INTERVAL
        self.holder: Optional[int] = None  # the shard of the last grant
        self.granted_at: Optional[float] = None
        self.previous_at: Optional[float] = None  # the grant before it, for the INVALID_SESSION warning
        self.lease_until: Optional[float] = None
        self.lease_state: Optional[str] = None  # "open", "released", "timed out", or None (no lease yet)
        self.timer: Any = None  # the lease's timeout
        self.claimed = False  # claimed, not yet settled


class MemoryCoordinator(Coordinator):
    """Slots, leases and the budget in this process's memory: right for one replica, which must then be deployed
    stop-then-start (the startup hold covers the restart); never two side by side."""

    name = "memory"

    def __init__(self, interval: float, max_concurrency: int, *, lease_timeout: float = 0.0,
                 clock: Clock = time.monotonic, call_later: Optional[CallLater] = None, stats: Optional[Stats] = None):
        super().__init__(interval, max_concurrency, lease_timeout=lease_timeout, clock=clock, stats=stats or Stats())
        self._call_later = call_later
        self.slots = [_Slot() for _ in range(max_concurrency)]
        self.hold_until = -math.inf
        self.recent: Deque[Tuple[float, int]] = collections.deque()  # (grant time, shard), newest last

    async def start(self, hold: float) -> None:
        if self._call_later is None:
            self._call_later = asyncio.get_running_loop().call_later
        self.hold_until = self.clock() + hold

    async def claim(self, shard: int) -> Verdict:
        now = self.clock()
        index = shard % self.max_concurrency
        slot = self.slots[index]
        wait, why = slot.free_at - now, slot.why
        if self.hold_until - now > wait:
            wait, why = self.hold_until - now, HOLD
        if slot.claimed:
            wait, why = math.inf, INTERVAL  # settled in a moment, and the settling pokes
        if wait <= 0 and self.budget is not None and self.budget.remaining <= 0:
            wait = self.budget.reset_at - now
            why = BUDGET if wait > 0 else CONFIRM
            if wait <= 0:
                wait = math.inf  # until a fresh answer from Discord (apply) pokes the queue
        if wait > 0:
            return Verdict(False, wait, why, shard, index, self.max_concurrency)
        slot.claimed = True
        if self.budget is not None:
            self.budget.remaining -= 1
        return Verdict(True, 0.0, GRANTED, shard, index, self.max_concurrency, slot)

    async def settle(self, verdict: Verdict, delivered: bool) -> None:
        slot: _Slot = verdict.claim
        slot.claimed = False
        if not delivered:
            if self.budget is not None:
                self.budget.remaining += 1
            if self.lease_timeout:
                self.stats.leases["undelivered"] += 1  # the lease ends as it begins: no shard will identify with it
            return
        now = self.clock()  # after the write: the interval (or the lease) starts when the grant is on the wire
        slot.holder, slot.previous_at, slot.granted_at = verdict.shard, slot.granted_at, now
        self.recent.append((now, verdict.shard))
        horizon = now - max(IN_FLIGHT_WINDOW, self.interval)
        while self.recent and self.recent[0][0] < horizon:
            self.recent.popleft()
        if self.budget is not None and self.budget.remaining == 0:
            log.warning("session-start budget exhausted: every bucket waits %.0f s for Discord's reset",
                        max(0.0, self.budget.reset_at - now))
        if not self.lease_timeout:
            slot.free_at, slot.why = now + self.interval, INTERVAL
            return
        if slot.timer is not None:
            slot.timer.cancel()
        slot.lease_until, slot.lease_state = now + self.lease_timeout, "open"
        slot.free_at, slot.why = slot.lease_until + self.interval, LEASE
        slot.timer = self._call_later(self.lease_timeout, lambda: self._lease_timed_out(slot, verdict.shard))

    def _lease_timed_out(self, slot: _Slot, shard: int) -> None:
        slot.timer = None
        if slot.lease_state == "open" and slot.holder == shard:
            slot.lease_state = "timed out"
            slot.why = INTERVAL
            index = self.slots.index(slot) if slot in self.slots else shard % self.max_concurrency
            self._lease_ended(index, shard, "timeout", self.lease_timeout, None)

    async def release(self, shard: int, outcome: str) -> Tuple[int, Dict[str, Any]]:
        if not self.lease_timeout:
            return 404, {"message": "lease mode is off (LEASE_TIMEOUT is 0): there is no lease to release"}
        now = self.clock()
        index = shard % self.max_concurrency
        slot = self.slots[index]
        refusal = _release_refusal(shard, index, slot.holder, slot.lease_state)
        if refusal:
            return 409, {"message": refusal}
        if slot.timer is not None:
            slot.timer.cancel()
            slot.timer = None
        assert slot.granted_at is not None
        held = now - slot.granted_at
        since_previous = None if slot.previous_at is None else slot.granted_at - slot.previous_at
        slot.lease_state, slot.free_at, slot.why = "released", now + self.interval, INTERVAL
        self._lease_ended(index, shard, outcome, held, since_previous)
        self.on_change(shard)
        return 200, {"message": f"released shard {shard}'s lease on bucket {index}", "bucket": index,
                     "held_seconds": round(held, 3), "next_grant_in": self.interval}

    async def apply(self, limits: "GatewayLimits") -> None:
        now = self.clock()
        remaining = max(0, limits.remaining - self.in_flight(now))
        self.budget = Budget(limits.total, remaining, now + limits.reset_after + RESET_MARGIN)
        if limits.max_concurrency != self.max_concurrency:
            self._remap(limits.max_concurrency, now)
        self.known = True
        self.on_change(None)

    def in_flight(self, now: float) -> int:
        """Grants in the last IN_FLIGHT_WINDOW seconds: Discord may not have counted their IDENTIFY yet."""
        return sum(1 for granted_at, _ in self.recent if granted_at >= now - IN_FLIGHT_WINDOW)

    def _remap(self, max_concurrency: int, now: float) -> None:
        """A new max_concurrency: each new bucket waits for the latest grant (and lease) that now maps to it."""
        slots = [_Slot() for _ in range(max_concurrency)]
        for old in self.slots:
            if old.holder is None:
                continue
            new = slots[old.holder % max_concurrency]
            keep_lease = old.lease_state == "open" and (new.lease_state != "open" or (new.lease_until or 0) < (old.lease_until or 0))
            if old.free_at > new.free_at:
                new.free_at, new.why = old.free_at, old.why
            if keep_lease or new.holder is None:
                if new.timer is not None:  # the lease it displaces still bounds the slot by its end, above
                    new.timer.cancel()
                for name in ("holder", "granted_at", "previous_at", "lease_until", "lease_state", "timer"):
                    setattr(new, name, getattr(old, name))
            elif old.timer is not None:
                old.timer.cancel()
        self.slots, self.max_concurrency = slots, max_concurrency

    def outlook(self, bucket: int, now: float) -> Tuple[float, str, Optional[Dict[str, Any]]]:
        slot = self.slots[bucket] if bucket < len(self.slots) else _Slot()
        wait, why = slot.free_at - now, slot.why
        if self.hold_until - now > wait:
            wait, why = self.hold_until - now, HOLD
        if self.budget is not None and self.budget.remaining <= 0:
            budget_wait = self.budget.reset_at - now
            if budget_wait <= 0:
                wait, why = math.inf, CONFIRM
            elif budget_wait > wait:
                wait, why = budget_wait, BUDGET
        lease = None
        if slot.lease_state == "open" and slot.granted_at is not None and slot.lease_until is not None:
            lease = {"shard": slot.holder, "held_for": round(now - slot.granted_at, 3),
                     "ends_by": round(max(0.0, slot.lease_until - now), 3)}
        return max(0.0, wait), (why if wait > 0 else ""), lease


def _release_refusal(shard: int, bucket: int, holder: Optional[int], state: Optional[str]) -> Optional[str]:
    """Why a release of `shard` changes nothing, given its bucket's last holder and lease state; None if it may."""
    if holder is None or state is None:
        return f"no lease is open in bucket {bucket}: shard {shard} was not granted"
    if holder != shard:
        if state != "open":  # the last lease there was another shard's, and it has ended
            return f"no lease is open in bucket {bucket}: its last was shard {holder}'s, now {state}"
        return f"bucket {bucket}'s lease belongs to shard {holder}, not shard {shard}"
    if state == "released":
        return f"shard {shard} already released its lease"
    if state == "timed out":
        return f"shard {shard}'s lease timed out (LEASE_TIMEOUT); its bucket has moved on"
    return None


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


class Cutter:
    """The connections one fetch opens, so that the event loop can cut them when the fetch's deadline passes: a
    blocked read in the fetch's thread then fails at once, and the thread ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: List[socket.socket] = []
        self.cut_off = False

    def track(self, connection_class: Any) -> Any:
        """A subclass of urllib's connection class that records its sockets: the plain one as soon as it connects
        (a TLS handshake can be cut too) and the one it reads from (urllib lets go of connection.sock once the
        headers are in, so the connection object cannot be asked later)."""
        cutter = self

        class Tracked(connection_class):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                create = self._create_connection

                def create_tracked(*args: Any, **kwargs: Any) -> socket.socket:
                    return cutter._add(create(*args, **kwargs))

                self._create_connection = create_tracked

            def connect(self) -> None:
                super().connect()
                cutter._add(self.sock)

        return Tracked

    def _add(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
            cut_off = self.cut_off
        if cut_off:
            self._shut(sock)
        return sock

    def cut(self) -> None:
        """Shuts the sockets down from another thread. The plain socket's shutdown, not SSLSocket's: it must not
        touch the TLS state that the blocked thread is using."""
        with self._lock:
            self.cut_off = True
            sockets = list(self._sockets)
        for sock in sockets:
            self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:  # not connected, or detached when TLS wrapped it
            pass


class _OriginOnly(urllib.request.AbstractHTTPHandler):
    """urllib's HTTP(S) handler without its companions: no redirect handler (a 3xx is an error, so the token never
    follows a Location), no proxy handler (the token goes to DISCORD_API_URL's host and nowhere else), certificates
    checked, every connection tracked for the deadline."""

    def __init__(self, cutter: Cutter):
        super().__init__()
        self._cutter = cutter
        self._context = ssl.create_default_context()

    def http_open(self, request: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._cutter.track(http.client.HTTPConnection), request)

    def https_open(self, request: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._cutter.track(http.client.HTTPSConnection), request, context=self._context)

    http_request = urllib.request.AbstractHTTPHandler.do_request_
    https_request = urllib.request.AbstractHTTPHandler.do_request_


def fetch_gateway_bot(api_url: str, token: str, timeout: float = DISCORD_TIMEOUT, cutter: Optional[Cutter] = None) -> GatewayLimits:
    """GET {api_url}/gateway/bot (blocking; run it in a thread). Raises DiscordError, whose text never holds the
    token: every message is built here from the status, never from the request."""
    cutter = cutter or Cutter()
    opener = urllib.request.OpenerDirector()
    for handler in (_OriginOnly(cutter), urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    request = urllib.request.Request(
        f"{api_url}/gateway/bot",
        headers={"Authorization": f"Bot {token}", "User-Agent": USER_AGENT, "Accept": JSON_TYPE},
    )
    try:
        with opener.open(request, timeout=timeout) as response:
            body = response.read(DISCORD_MAX_BODY + 1)
    except urllib.error.HTTPError as exc:
        with exc:
            status = exc.code
            if 300 <= status < 400:
                where = _redirect_host(exc.headers.get("Location") or "", token)
                raise DiscordError(f"Discord's API answered a redirect (HTTP {status} to {where}); it is not "
                                   "followed, the token goes to DISCORD_API_URL only", status=status) from None
            body = exc.read(DISCORD_MAX_BODY)
            retry_after = _retry_after(exc.headers.get("Retry-After"), body) if status == 429 else None
        hint = {401: " (DISCORD_TOKEN is wrong or was reset)", 403: " (DISCORD_TOKEN may not use this endpoint)"}
        raise DiscordError(f"Discord answered HTTP {status}{hint.get(status, '')}", status=status, retry_after=retry_after) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DiscordError(f"cannot reach Discord: {type(reason).__name__}: {_redact(str(reason), token)[:200]}") from None
    if cutter.cut_off:
        raise DiscordError("Discord's answer took longer than the deadline")
    if len(body) > DISCORD_MAX_BODY:
        raise DiscordError("Discord's answer is too large to be /gateway/bot")
    return parse_gateway_bot(body)


def parse_gateway_bot(body: bytes) -> GatewayLimits:
    """Validates a /gateway/bot body; DiscordError when it is not what Discord documents, or holds a number no real
    Discord sends."""
    if len(body) > DISCORD_MAX_BODY or _json_depth(body) > DISCORD_MAX_DEPTH:
        raise DiscordError("Discord's /gateway/bot answer is too large or too deeply nested")
    try:
        data = json.loads(body)
        limit = data["session_start_limit"]
        numbers = {key: limit[key] for key in ("total", "remaining", "reset_after", "max_concurrency")}
        shards = data.get("shards", 0)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        raise DiscordError("Discord's /gateway/bot answer is not the documented JSON") from None
    if not all(type(value) is int and value >= 0 for value in (*numbers.values(), shards)):
        raise DiscordError("Discord's /gateway/bot answer holds a value that is not a whole number")
    if (not 1 <= numbers["max_concurrency"] <= MAX_CONCURRENCY or not 1 <= numbers["total"] <= MAX_SESSION_TOTAL
            or numbers["reset_after"] > MAX_RESET_AFTER * 1000 or shards >= MAX_SHARD):
        raise DiscordError("Discord's /gateway/bot answer holds an impossible limit")
    remaining = min(numbers["remaining"], numbers["total"])
    return GatewayLimits(numbers["max_concurrency"], numbers["total"], remaining, numbers["reset_after"] / 1000, shards)


_JSON_STRUCTURE = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _json_depth(body: bytes) -> int:
    """How deeply a JSON text nests (strings skipped), so that a hostile body never reaches the recursive parser."""
    depth = deepest = 0
    for match in _JSON_STRUCTURE.finditer(body):
        char = match.group()[0]
        if char in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in b"]}":
            depth -= 1
    return deepest


def _retry_after(header: Optional[str], body: bytes) -> Optional[float]:
    """The longer of the Retry-After header and the JSON retry_after (both seconds), None when neither parses."""
    waits = []
    header = (header or "").strip()
    if len(header) <= DISCORD_MAX_NUMBER and _DECIMAL.fullmatch(header):
        waits.append(float(header))
    try:
        value = json.loads(body).get("retry_after") if _json_depth(body) <= DISCORD_MAX_DEPTH else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf:
            waits.append(float(value))
    except (ValueError, AttributeError, RecursionError):
        pass
    return max(waits) if waits else None


def _redact(text: str, secret: str) -> str:
    """The text with the token, and each of its dot-separated parts, replaced whatever their case: a hostile answer
    may echo the token into a host name (lower-cased) or a message, whole or in part."""
    if not secret:
        return text
    for part in sorted({secret, *(p for p in secret.split(".") if len(p) >= 6)}, key=len, reverse=True):
        text = re.sub(re.escape(part), "[token]", text, flags=re.IGNORECASE)
    return text


def _redirect_host(location: str, token: str) -> str:
    """The host a redirect pointed to, for the log: "an unreadable Location" when it does not parse (urlsplit raises
    ValueError for "http://[x]/"), and never the token if the answer echoed it there."""
    try:
        host = urllib.parse.urlsplit(location).hostname or "nowhere"
    except ValueError:
        return "an unreadable Location"
    return _redact(host[:100], token)


def backoff_delay(failures: int, retry_after: Optional[float] = None, rand: Callable[[], float] = random.random,
                  base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Capped exponential backoff with jitter after `failures` failures in a row, never shorter than Discord's own
    retry_after: half the step is fixed, half is random, so many restarts do not retry in step."""
    step = min(cap, base * 2 ** min(failures - 1, 30))
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


Sleep = Callable[[float], Awaitable[Any]]


class DiscordLimits:
    """Keeps the group's limits in step with GET /gateway/bot: at startup, every `refresh_interval`, and at the
    budget's reset. One process of a group fetches (the coordinator says which); the others load what it found.
    No exception ends the loop: every failure is logged, counted, shown in /status and retried with backoff. A
    refused token at startup calls on_fatal; later, it keeps the last limits and stops asking."""

    def __init__(
        self,
        coordinator: Coordinator,
        fetch: Callable[[Cutter], GatewayLimits],
        *,
        on_fatal: Callable[[DiscordError], None],
        refresh_interval: float = REFRESH_INTERVAL,
        deadline: float = DISCORD_DEADLINE,
        sleep: Sleep = asyncio.sleep,
        stats: Optional[Stats] = None,
    ):
        self.coordinator = coordinator
        self.fetch = fetch
        self.on_fatal = on_fatal
        self.refresh_interval = refresh_interval
        self.deadline = deadline
        self._sleep = sleep
        self.stats = stats or coordinator.stats
        self.last_error: Optional[str] = None
        self.stopped_asking = False
        self._thread: Optional["asyncio.Future[Any]"] = None  # the one fetch thread, while it runs
        self._nudge: Optional["asyncio.Future[None]"] = None  # set while the loop sleeps; wake() resolves it

    @property
    def known(self) -> bool:
        """Limits have come from Discord (here or through the group) at least once."""
        return self.coordinator.known

    async def run(self) -> None:
        """The refresh loop; returns only after a refused token."""
        failures = 0
        while True:
            retry_after = None
            try:
                if await self.coordinator.refresh_turn(self.refresh_interval):
                    limits = await self._fetch()
                    self.stats.discord["200"] += 1
                    changed = (self.coordinator.max_concurrency, self.coordinator.budget and self.coordinator.budget.total) \
                        != (limits.max_concurrency, limits.total)
                    await self.coordinator.apply(limits)
                    (log.info if changed or failures else log.debug)(
                        "limits from Discord: max_concurrency %d, %d of %d session starts left, reset in %.0f s",
                        limits.max_concurrency, limits.remaining, limits.total, limits.reset_after)
                else:
                    await self.coordinator.load()
                failed = False
            except DiscordError as error:
                self.stats.discord[str(error.status or "error")] += 1
                self.last_error = str(error)
                if error.fatal:
                    if not self.known:
                        self.on_fatal(error)
                    else:
                        log.error("%s; keeping the last known limits and no longer asking Discord", error)
                        self.stopped_asking = True
                    return
                retry_after, failed = error.retry_after, True
            except BackendError as error:
                self.stats.backend_errors += 1
                self.last_error, failed = f"{self.coordinator.name}: {error}", True
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a bug or an answer nobody foresaw: logged, shown, retried
                log.exception("refreshing Discord's limits failed unexpectedly")
                self.stats.discord["error"] += 1
                self.last_error, failed = f"unexpected {type(error).__name__}", True
            if not failed:
                failures, self.last_error = 0, None
                await self._doze(self.next_refresh())
                continue
            failures += 1
            if retry_after is not None and retry_after > MAX_RETRY_AFTER:
                log.warning("Discord asked us to wait %.0f s; waiting %.0f s instead", retry_after, MAX_RETRY_AFTER)
                retry_after = MAX_RETRY_AFTER
            delay = backoff_delay(failures, retry_after)
            log.warning("GET /gateway/bot failed: %s; retry %d in %.1f s", self.last_error, failures, delay)
            await self._doze(delay)

    def wake(self) -> None:
        """Fetch now (the shared limits were lost), unless a fetch is under way."""
        if self._nudge is not None:
            _resolve(self._nudge)

    async def _doze(self, delay: float) -> None:
        self._nudge = asyncio.get_running_loop().create_future()
        sleeper = asyncio.ensure_future(self._sleep(delay))
        try:
            await asyncio.wait([sleeper, self._nudge], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._nudge = None
            if not sleeper.done():
                sleeper.cancel()
        if sleeper.done() and not sleeper.cancelled() and sleeper.exception() is not None:
            raise sleeper.exception()  # type: ignore[misc]

    async def _fetch(self) -> GatewayLimits:
        """One fetch in its own thread, cut at the deadline. The next fetch waits for this thread to end, so at most
        one exists however Discord behaves."""
        if self._thread is not None:
            await asyncio.wait([self._thread])
        cutter = Cutter()
        thread = self._thread = run_in_thread(lambda: self.fetch(cutter))
        try:
            return await asyncio.wait_for(asyncio.shield(thread), self.deadline)
        except asyncio.TimeoutError:
            cutter.cut()
            raise DiscordError(f"Discord did not answer /gateway/bot within {self.deadline:g} s; the request was cut") from None
        finally:
            if thread.done():
                self._thread = None
                if not thread.cancelled():
                    thread.exception()  # retrieved: a late failure after the cut is not an error to report
            else:
                thread.add_done_callback(lambda done: done.cancelled() or done.exception())

    def next_refresh(self) -> float:
        """Seconds to the next fetch: the refresh interval, or sooner when the budget resets before it."""
        budget = self.coordinator.budget
        wait = self.refresh_interval
        if budget is not None:
            wait = min(wait, budget.reset_at - self.coordinator.clock())
        return max(wait, 1.0)



# ----------------------------------------------------------------------------------------------------------------
# Redis client: errors
# ----------------------------------------------------------------------------------------------------------------


class RedisError(Exception):
    """Anything that went wrong talking to Redis."""


class RedisReplyError(RedisError):
    """Redis answered a command with an error reply (`-ERR ...`): that command failed, the connection is fine.

    `kind` is the reply's first word when it is an error code (ERR, NOSCRIPT, WRONGPASS, NOAUTH, BUSY, READONLY...),
    else "" (a Lua script's `redis.error_reply("my error")` arrives as `-my error`). `message` is the whole text."""

    def __init__(self, text: bytes):
        message = text.decode("utf-8", "replace")
        word = message.split(" ", 1)[0]
        self.kind = word if _RESP_ERROR_KIND.fullmatch(word) else ""
        self.message = message
        super().__init__(message)


class RedisConnectionError(RedisError):
    """The connection could not be opened, or is gone; every command pending on it failed with one of these.
    The owner reconnects (open_redis_with_backoff) and assumes that anything it sent may or may not have run."""


class RedisAuthError(RedisConnectionError):
    """AUTH was refused, or Redis wants a password that REDIS_URL lacks. The message never holds the password."""


class RedisTimeoutError(RedisConnectionError):
    """A command was not answered within its timeout; its connection was dropped."""


class RedisProtocolError(RedisConnectionError):
    """Redis sent bytes that are not a RESP2 reply within our limits; the connection was dropped."""


# ----------------------------------------------------------------------------------------------------------------
# Redis client: REDIS_URL
# ----------------------------------------------------------------------------------------------------------------

# redis-url   = ( "redis://" / "rediss://" ) [ userinfo "@" ] host [ ":" port ] [ "/" [ db ] ]
# userinfo    = [ user ] ":" password           (RFC 3986 characters: unreserved / pct-encoded / sub-delims / ":")
# host        = "[" IPv6address "]" / IPv4address / host-name      port = 1-65535      db = 0-MAX_REDIS_DB
# A userinfo without ":" is refused: redis-cli reads `redis://x@host` as a password, redis-py as a user name.
_REDIS_USERINFO = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:%]*")
_REDIS_HEX = "0123456789abcdefABCDEF"
# host names as DNS and Docker use them: labels of letters, digits, "-" and "_" (compose service names hold "_")
_REDIS_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_REDIS_HOST_NAME = re.compile(rf"(?=.{{1,253}}\Z){_REDIS_LABEL}(\.{_REDIS_LABEL})*\.?")
_REDIS_PORT = re.compile(r"[1-9][0-9]{0,4}")  # at most 5 digits before int(); 1-65535 checked after
_REDIS_DB = re.compile(r"0|[1-9][0-9]{0,3}")  # at most 4 digits: 0..9999 == MAX_REDIS_DB


@dataclasses.dataclass(frozen=True)
class RedisAddress:
    """Where Redis is and how to log in. `str()` gives the URL with the password masked, for logs."""

    host: str  # a host name, or an IP address without brackets
    port: int = 6379
    db: int = 0
    tls: bool = False
    username: Optional[str] = None  # None: the "default" user (AUTH password)
    password: Optional[str] = dataclasses.field(default=None, repr=False)

    @property
    def scheme(self) -> str:
        return "rediss" if self.tls else "redis"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        credentials = "" if self.password is None else f"{self.username or ''}:***@"
        return f"{self.scheme}://{credentials}{host}:{self.port}/{self.db}"


def parse_redis_url(url: str, name: str = "REDIS_URL") -> RedisAddress:
    """Reads `redis://[[user]:password@]host[:port][/db]` or `rediss://...` (TLS) into a RedisAddress.

    User and password are percent-decoded (UTF-8); an IPv6 host goes in brackets; the port defaults to 6379, the db to
    0. Query strings, fragments, other schemes, an empty host or password, and anything else unexpected raise
    ValueError with a message that starts with `name` and holds no part of the URL, so never the password."""

    def refuse(why: str) -> ValueError:
        return ValueError(f"{name} {why} (expected redis://[[user]:password@]host[:port][/db] or rediss://...)")

    if not isinstance(url, str) or len(url) > MAX_REDIS_URL:
        raise refuse(f"must be a URL of at most {MAX_REDIS_URL} characters")
    if not url.isascii() or any(c <= " " or c == "\x7f" for c in url):
        raise refuse("holds spaces, control or non-ASCII characters; percent-encode them in user and password")
    if url.startswith("redis://"):
        tls, rest = False, url[len("redis://") :]
    elif url.startswith("rediss://"):
        tls, rest = True, url[len("rediss://") :]
    else:
        raise refuse("must start with redis:// or rediss://")
    if "?" in rest or "#" in rest:
        raise refuse("must have no query (?...) or fragment (#...); in a password write '?' as %3F and '#' as %23")
    authority, slash, path = rest.partition("/")
    userinfo, at, hostport = authority.rpartition("@")
    username: Optional[str] = None
    password: Optional[str] = None
    if at:
        if "@" in userinfo:
            raise refuse("has more than one '@'; write an '@' in user or password as %40")
        if not _REDIS_USERINFO.fullmatch(userinfo):
            raise refuse("has a character in user or password that must be percent-encoded")
        user_text, colon, password_text = userinfo.partition(":")
        if not colon:
            raise refuse("has credentials without ':'; write ':password@' or 'user:password@'")
        username = _redis_percent_decode(user_text, refuse) or None
        password = _redis_percent_decode(password_text, refuse)
        if not password:
            raise refuse("has an empty password; leave the credentials out or set one")
        if username is not None and any(c <= " " or c == "\x7f" for c in username):
            raise refuse("has a user name with spaces or control characters, which Redis ACLs do not allow")
    host, port_text = _redis_host_port(hostport, refuse)
    port = 6379
    if port_text is not None:
        if not _REDIS_PORT.fullmatch(port_text) or int(port_text) > 65535:
            raise refuse("has a port that is not a whole number from 1 to 65535 (IPv6 hosts go in brackets)")
        port = int(port_text)
    db = 0
    if slash and path:
        if not _REDIS_DB.fullmatch(path):
            raise refuse(f"must end in /DB, a database number from 0 to {MAX_REDIS_DB}, or nothing")
        db = int(path)
    return RedisAddress(host=host, port=port, db=db, tls=tls, username=username, password=password)


def _redis_percent_decode(text: str, refuse: Callable[[str], ValueError]) -> str:
    # pct-encoded = "%" HEXDIG HEXDIG; unlike urllib.parse.unquote, a stray "%" is an error, not a literal
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "%":
            pair = text[i + 1 : i + 3]
            if len(pair) != 2 or pair[0] not in _REDIS_HEX or pair[1] not in _REDIS_HEX:
                raise refuse("has a '%' in user or password not followed by two hex digits; write '%' as %25")
            out.append(int(pair, 16))
            i += 3
        else:
            out.append(ord(text[i]))
            i += 1
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise refuse("has a user or password that is not UTF-8 once percent-decoded") from None


def _redis_host_port(hostport: str, refuse: Callable[[str], ValueError]) -> Tuple[str, Optional[str]]:
    """Splits `host[:port]`; returns the host (IPv6 without brackets) and the port text, or None when absent."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0:
            raise refuse("has a '[' without ']' around its IPv6 host")
        literal, after = hostport[1:end], hostport[end + 1 :]
        try:
            if "%" in literal:  # zone ids (fe80::1%eth0) would need %25 and mean nothing to a remote Redis
                raise ValueError
            host = str(ipaddress.IPv6Address(literal))
        except ValueError:
            raise refuse("has brackets around something that is not an IPv6 address") from None
        if after and not after.startswith(":"):
            raise refuse("has characters after its IPv6 host other than ':port'")
        return host, (after[1:] if after else None)
    host, colon, port_text = hostport.partition(":")
    if not host:
        raise refuse("has no host")
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise refuse("has a host that looks like an IPv4 address but is not one") from None
    elif not _REDIS_HOST_NAME.fullmatch(host):
        raise refuse("has a host that is neither a host name nor an IP address")
    return host, (port_text if colon else None)


# ----------------------------------------------------------------------------------------------------------------
# Redis client: RESP2 replies (pure: bytes in, typed values out, no asyncio)
# ----------------------------------------------------------------------------------------------------------------

# reply        = simple / error / integer / bulk / array           every line ends in CRLF, nothing else does
# simple       = "+" *( any byte but CR and LF ) CRLF               -> bytes
# error        = "-" *( any byte but CR and LF ) CRLF               -> RedisReplyError (raised for a command's reply)
# integer      = ":" ( "0" / [ "-" ] %x31-39 0*18DIGIT ) CRLF       -> int, signed 64 bits
# bulk         = "$" length CRLF length*OCTET CRLF / "$-1" CRLF    -> bytes / None
# array        = "*" length CRLF length*reply / "*-1" CRLF          -> list / None
# length       = "0" / %x31-39 *DIGIT                                (bounded by the RESP_MAX_* limits)
# RESP3's types (_ , # ! = ( % ~ | >) are refused: we never send HELLO 3, so Redis never sends them.
RedisReply = Union[bytes, int, None, List[Any], RedisReplyError]
RedisArg = Union[bytes, bytearray, str, int]

_RESP_INTEGER = re.compile(rb"0|-?[1-9][0-9]{0,18}")  # 19 digits at most before int(); no "+1", "01", "-0", " 1"
_RESP_LENGTH = re.compile(rb"-1|0|[1-9][0-9]{0,9}")  # 10 digits at most before int(); the RESP_MAX_* checked after
_RESP_ERROR_KIND = re.compile(r"[A-Z][A-Z0-9_]{0,31}")
_RESP3_TYPES = frozenset(b"_,#!=(%~|>")
_RESP_INT64_MIN, _RESP_INT64_MAX = -(2**63), 2**63 - 1


class _RespNeedMore:
    __slots__ = ()

    def __repr__(self) -> str:
        return "RESP_NEED_MORE"


RESP_NEED_MORE = _RespNeedMore()  # RespParser.get()'s answer while a reply is incomplete (None is a reply: a null bulk)


class RespParser:
    """Incremental RESP2 reply parser: feed() bytes as they arrive, then call get() until it returns RESP_NEED_MORE.

    Never rescans what it already parsed (a server sending one byte at a time costs O(n), not O(n^2)). Every length
    is checked against its limit before anything is allocated or converted; an unknown type byte, a bare LF or CR, a
    bulk string not followed by CRLF, a non-canonical number or any limit passed raises RedisProtocolError, and the
    parser then stays broken (every later get() raises again): the stream has lost its framing.

    Error replies are returned, not raised, as RedisReplyError values (nested ones stay inside their array), so that
    the caller decides what they mean; the stream stays usable after them."""

    def __init__(self) -> None:
        self._buffer = bytearray()  # unparsed bytes; parsed ones are deleted (cheap at the front of a bytearray)
        self._scanned = 0  # leading bytes of _buffer already searched for LF without finding one
        self._bulk = -1  # length of the bulk string whose payload is awaited, else -1
        self._stack: List[Tuple[List[RedisReply], int]] = []  # open arrays: items so far, items declared
        self._items = 0  # elements declared so far in the current reply
        self._bytes = 0  # bytes of the current reply consumed so far
        self._broken: Optional[str] = None

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet part of a returned reply (including a partial reply's consumed bytes)."""
        return len(self._buffer) + self._bytes

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def get(self) -> Union[RedisReply, _RespNeedMore]:
        """The next complete reply, or RESP_NEED_MORE. Raises RedisProtocolError on anything that is not RESP2."""
        if self._broken is not None:
            raise RedisProtocolError(self._broken)
        try:
            return self._get()
        except RedisProtocolError as exc:
            self._broken = str(exc)
            raise

    def _get(self) -> Union[RedisReply, _RespNeedMore]:
        buffer = self._buffer
        while True:
            value: RedisReply
            if self._bulk >= 0:
                length = self._bulk
                if len(buffer) < length + 2:
                    return RESP_NEED_MORE
                if buffer[length] != 0x0D or buffer[length + 1] != 0x0A:
                    raise RedisProtocolError(f"bulk string of {length} bytes is not followed by CRLF")
                value = bytes(buffer[:length])
                self._consume(length + 2)
                self._bulk = -1
            else:
                line = self._line()
                if line is None:
                    return RESP_NEED_MORE
                kind, text = line[0], line[1:]
                if kind == 0x2B:  # "+"
                    value = text
                elif kind == 0x2D:  # "-"
                    value = RedisReplyError(text)
                elif kind == 0x3A:  # ":"
                    if not _RESP_INTEGER.fullmatch(text) or not _RESP_INT64_MIN <= int(text) <= _RESP_INT64_MAX:
                        raise RedisProtocolError(
                            f"integer reply is not a canonical signed 64-bit number: {_resp_excerpt(text)}"
                        )
                    value = int(text)
                elif kind == 0x24:  # "$"
                    length = self._length(text, RESP_MAX_BULK_BYTES, "bulk string")
                    if length < 0:
                        value = None
                    else:
                        if self._bytes + length + 2 > RESP_MAX_REPLY_BYTES:
                            raise RedisProtocolError(f"reply longer than {RESP_MAX_REPLY_BYTES} bytes")
                        self._bulk = length
                        continue
                elif kind == 0x2A:  # "*"
                    count = self._length(text, RESP_MAX_ARRAY_ITEMS, "array")
                    if len(self._stack) >= RESP_MAX_DEPTH:
                        raise RedisProtocolError(f"arrays nested more than {RESP_MAX_DEPTH} deep")
                    if count < 0:
                        value = None
                    else:
                        self._items += count
                        if self._items > RESP_MAX_REPLY_ITEMS:
                            raise RedisProtocolError(f"reply of more than {RESP_MAX_REPLY_ITEMS} elements")
                        if count > 0:
                            self._stack.append(([], count))
                            continue
                        value = []
                elif kind in _RESP3_TYPES:
                    raise RedisProtocolError(f"RESP3 reply type {chr(kind)!r}; this client speaks RESP2")
                else:
                    raise RedisProtocolError(f"unknown reply type byte {bytes([kind])!r}")
            while self._stack:  # a finished value completes its array, which may complete its parent...
                items, declared = self._stack[-1]
                items.append(value)
                if len(items) < declared:
                    break
                self._stack.pop()
                value = items
            else:
                self._items = 0
                self._bytes = 0
                return value

    def _line(self) -> Optional[bytes]:
        """The next line without its CRLF (type byte included), consumed; None if it has not all arrived."""
        buffer = self._buffer
        lf = buffer.find(b"\n", self._scanned)
        if lf < 0:
            self._scanned = len(buffer)
            if self._scanned > RESP_MAX_LINE_BYTES + 1:  # +1: the CR may already be there
                raise RedisProtocolError(f"line longer than {RESP_MAX_LINE_BYTES} bytes")
            return None
        if lf == 0 or buffer[lf - 1] != 0x0D:
            raise RedisProtocolError("bare LF (a line must end in CRLF)")
        if lf - 1 > RESP_MAX_LINE_BYTES:
            raise RedisProtocolError(f"line longer than {RESP_MAX_LINE_BYTES} bytes")
        if lf == 1:
            raise RedisProtocolError("empty line where a reply type byte was expected")
        line = bytes(buffer[: lf - 1])
        if b"\r" in line:
            raise RedisProtocolError("bare CR inside a line")
        self._consume(lf + 1)
        self._scanned = 0
        return line

    def _consume(self, count: int) -> None:
        del self._buffer[:count]
        self._bytes += count
        if self._bytes > RESP_MAX_REPLY_BYTES:
            raise RedisProtocolError(f"reply longer than {RESP_MAX_REPLY_BYTES} bytes")

    @staticmethod
    def _length(text: bytes, limit: int, what: str) -> int:
        if not _RESP_LENGTH.fullmatch(text):
            raise RedisProtocolError(f"{what} length is not -1 or a canonical whole number: {_resp_excerpt(text)}")
        length = int(text)
        if length > limit:
            raise RedisProtocolError(f"{what} of {length} exceeds the limit of {limit}")
        return length


def _resp_excerpt(text: bytes) -> str:
    """A short, printable excerpt of bad bytes for an error message (never of a command's arguments)."""
    return repr(text[:40]) + ("..." if len(text) > 40 else "")


def encode_redis_command(args: Sequence[RedisArg]) -> bytes:
    """One command as a RESP array of bulk strings. Arguments are bytes, str (sent as UTF-8) or int; bool, float and
    None raise TypeError (format a float yourself: Redis parses it, we do not guess its precision)."""
    if not args:
        raise ValueError("a Redis command needs at least its name")
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, (bytes, bytearray)):
            data = bytes(arg)
        elif isinstance(arg, str):
            data = arg.encode("utf-8")
        elif isinstance(arg, int) and not isinstance(arg, bool):
            data = b"%d" % arg
        else:
            raise TypeError(f"a Redis argument is bytes, str or int, not {type(arg).__name__}")
        parts += (b"$%d\r\n" % len(data), data, b"\r\n")
    command = b"".join(parts)
    if len(command) > REDIS_MAX_COMMAND_BYTES:
        raise ValueError(f"a Redis command of {len(command)} bytes exceeds the limit of {REDIS_MAX_COMMAND_BYTES}")
    return command


# ----------------------------------------------------------------------------------------------------------------
# Redis client: connection
# ----------------------------------------------------------------------------------------------------------------


class RedisConnection:
    """One connection to Redis. Commands may be issued concurrently (pipelined): each is written at once, in call
    order, and its future queued; one reader task parses replies and resolves the futures in the same FIFO order.

    A command not answered within its timeout drops the connection: every pending command then fails with
    RedisConnectionError (the late one with RedisTimeoutError), because a reply that arrives late may describe a
    state that has moved on. EOF, resets and protocol errors drop it the same way, promptly. A dropped connection
    stays dropped: open a new one (open_redis_with_backoff). A caller cancelled while waiting leaves its command on the
    wire; its reply is read and discarded, and the command may well have run."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: RedisAddress):
        """Use open(), which also logs in; this only wires up an established stream."""
        # per connection
        self.address = address
        self._reader = reader
        self._writer = writer
        self._parser = RespParser()
        self._pending: Deque["asyncio.Future[RedisReply]"] = collections.deque()
        self._drain_lock = asyncio.Lock()
        self._error: Optional[RedisConnectionError] = None  # why it closed; None while open
        self._closed = asyncio.get_running_loop().create_future()  # resolves (to _error) when it closes
        self._push: Optional[Callable[[RedisReply], bool]] = None  # RedisSubscriber's hook: True if it took the reply
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def open(
        cls, address: RedisAddress, *, timeout: float = REDIS_CONNECT_TIMEOUT,
        ssl_context: Optional[ssl.SSLContext] = None,
    ) -> "RedisConnection":
        """Connects (TLS for rediss://, with `ssl_context` or `ssl.create_default_context()`, which checks the host
        name), sends AUTH when the address has a password, SELECT when its db is not 0, then PING, all within
        `timeout`. Raises RedisAuthError when Redis refuses the credentials or wants some, RedisConnectionError for
        anything else (unreachable, TLS failure, SELECT refused, timeout); ValueError for an ssl_context given for
        a plain redis:// address."""
        _redis_check_timeout(timeout)
        if ssl_context is not None and not address.tls:
            raise ValueError("an ssl_context was given for a redis:// address; use rediss:// for TLS")
        context = (ssl_context or ssl.create_default_context()) if address.tls else None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    address.host, address.port, ssl=context, server_hostname=address.host if context else None
                ),
                timeout,
            )
        except asyncio.TimeoutError:
            raise RedisConnectionError(f"could not connect to {address} within {timeout:g} s") from None
        except OSError as exc:  # refused, unreachable, DNS (gaierror), TLS (SSLError, certificate checks)
            raise RedisConnectionError(f"could not connect to {address}: {exc}") from exc
        connection = cls(reader, writer, address)
        try:
            await connection._log_in(deadline)
        except BaseException:
            connection.close()
            raise
        return connection

    async def _log_in(self, deadline: float) -> None:
        address = self.address
        loop = asyncio.get_running_loop()

        def left() -> float:
            return max(deadline - loop.time(), 0.001)

        who = f"user {address.username!r}" if address.username else "the default user"
        try:
            if address.password is not None:
                if address.username:
                    await self.execute("AUTH", address.username, address.password, timeout=left())
                else:
                    await self.execute("AUTH", address.password, timeout=left())
        except RedisReplyError as exc:  # WRONGPASS; ERR when no password is set, or from a server without AUTH,
            # whose "unknown command" message quotes the arguments: the password. Only the error's kind is shown.
            raise RedisAuthError(f"Redis authentication failed for {who} at {address}: {exc.kind or 'error'} "
                                 "(Redis's own words are not shown: they may quote the password)") from None
        try:
            if address.db:
                await self.execute("SELECT", address.db, timeout=left())
            reply = await self.execute("PING", timeout=left())
        except RedisReplyError as exc:
            if exc.kind == "NOAUTH":
                raise RedisAuthError(f"Redis at {address} requires a password; REDIS_URL has none") from None
            if exc.kind == "NOPERM":
                raise RedisAuthError(f"Redis refused {who} at {address}: {exc.message}") from None
            raise RedisConnectionError(f"Redis at {address} refused to set up the connection: {exc.message}") from None
        if reply != b"PONG":
            raise RedisProtocolError(f"Redis at {address} answered PING with {reply!r}")

    @property
    def closed(self) -> bool:
        return self._error is not None

    @property
    def error(self) -> Optional[RedisConnectionError]:
        """Why the connection closed (also for close(): "closed by the client"); None while it is open."""
        return self._error

    async def execute(self, *args: RedisArg, timeout: float = REDIS_COMMAND_TIMEOUT) -> RedisReply:
        """Sends one command and returns its reply: bytes (simple and bulk strings), int, list (arrays, whose error
        elements are RedisReplyError values) or None (null bulk or array). Raises RedisReplyError for an error reply
        (the connection stays open), RedisConnectionError if the connection is or gets dropped, including when this
        command is not answered within `timeout` seconds (RedisTimeoutError); TypeError/ValueError for arguments it
        cannot send, before anything is sent."""
        _redis_check_timeout(timeout)
        if self._error is not None:
            raise RedisConnectionError(f"Redis connection is closed: {self._error}")
        if len(self._pending) >= REDIS_MAX_PENDING:
            raise RedisError(f"more than {REDIS_MAX_PENDING} commands in flight on one Redis connection")
        command = encode_redis_command(args)
        loop = asyncio.get_running_loop()
        future: "asyncio.Future[RedisReply]" = loop.create_future()
        self._pending.append(future)  # appended and written in one step: the wire order is the queue order
        self._writer.write(command)
        timer = loop.call_later(timeout, self._expire, future, timeout, _redis_command_name(args[0]))
        try:
            if self._writer.transport.get_write_buffer_size() > REDIS_WRITE_HIGH_WATER:
                await self._drain()
            return await future
        finally:
            timer.cancel()
            if not future.done():  # the caller was cancelled; the reader discards this reply when it comes
                future.cancel()

    async def evalsha(
        self, script: bytes, keys: Sequence[RedisArg] = (), args: Sequence[RedisArg] = (), *,
        timeout: float = REDIS_COMMAND_TIMEOUT,
    ) -> RedisReply:
        """Runs a Lua script by its SHA1 (EVALSHA), sending its body (EVAL) once if Redis answers NOSCRIPT, as it
        does after a restart, a SCRIPT FLUSH or a failover (scripts are replicated as effects, never as bodies).
        `timeout` bounds both together."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        sha = hashlib.sha1(script, usedforsecurity=False).hexdigest()
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args, timeout=timeout)
        except RedisReplyError as exc:
            if exc.kind != "NOSCRIPT":
                raise
        left = max(deadline - loop.time(), 0.001)  # what EVALSHA left of the budget; none left times EVAL out
        return await self.execute("EVAL", script, len(keys), *keys, *args, timeout=left)

    def close(self) -> None:
        """Closes at once; pending commands fail with RedisConnectionError. Safe to call twice."""
        self._drop(RedisConnectionError("Redis connection closed by the client"), log_level=logging.DEBUG)

    async def aclose(self) -> None:
        """close(), then waits (at most REDIS_CLOSE_TIMEOUT) until the socket and the reader task are gone."""
        self.close()
        await self.wait_closed()
        try:
            await asyncio.wait_for(self._writer.wait_closed(), REDIS_CLOSE_TIMEOUT)
        except (OSError, asyncio.TimeoutError, RuntimeError):
            pass  # it was aborted; a peer that never finishes the close costs us nothing more

    async def wait_closed(self) -> RedisConnectionError:
        """Waits until the connection is closed, for any reason, and returns the reason (also the `error` property).
        The reader task has ended by then."""
        error = await asyncio.shield(self._closed)
        if self._reader_task is not _redis_current_task():
            await asyncio.gather(self._reader_task, return_exceptions=True)
        return error

    # -- internals -----------------------------------------------------------------------------------------------

    async def _drain(self) -> None:
        async with self._drain_lock:  # one drainer at a time: concurrent drain() is unsafe before Python 3.10
            try:
                await self._writer.drain()
            except (OSError, RuntimeError) as exc:
                self._drop(RedisConnectionError(f"Redis connection lost while sending: {exc}"))

    def _expire(self, future: "asyncio.Future[RedisReply]", timeout: float, name: str) -> None:
        if not future.done():
            error = RedisTimeoutError(f"Redis did not answer {name} within {timeout:g} s; connection dropped")
            self._drop(error, future)

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(REDIS_READ_CHUNK)
                if not data:
                    partial = " in the middle of a reply" if self._parser.buffered else ""
                    self._drop(RedisConnectionError(f"Redis closed the connection{partial}"))
                    return
                self._parser.feed(data)
                while True:
                    reply = self._parser.get()
                    if reply is RESP_NEED_MORE:
                        break
                    self._deliver(reply)  # type: ignore[arg-type]
                    if self._error is not None:  # a subscriber's hook dropped the connection
                        return
        except RedisProtocolError as exc:  # the oldest pending command gets it, the rest a connection error
            culprit = self._pending[0] if self._pending else None
            self._drop(RedisProtocolError(f"Redis sent a malformed reply ({exc}); connection dropped"), culprit)
        except OSError as exc:  # reset, TLS errors
            self._drop(RedisConnectionError(f"Redis connection lost: {exc}"))
        except asyncio.CancelledError:
            self._drop(RedisConnectionError("Redis connection closed by the client"), log_level=logging.DEBUG)
            raise
        except Exception as exc:  # a bug here must fail the commands, never leave them hanging
            log.exception("Redis reader failed")
            self._drop(RedisConnectionError(f"Redis reader failed: {exc!r}"))

    def _deliver(self, reply: RedisReply) -> None:
        if self._push is not None and self._push(reply):
            return
        if not self._pending:
            raise RedisProtocolError("a reply arrived for no command")
        future = self._pending.popleft()
        if future.done():  # its caller was cancelled
            return
        if isinstance(reply, RedisReplyError):
            future.set_exception(reply)
        else:
            future.set_result(reply)

    def _drop(
        self, error: RedisConnectionError, culprit: Optional["asyncio.Future[RedisReply]"] = None,
        log_level: int = logging.WARNING,
    ) -> None:
        """Closes the connection for `error`: every pending command fails (the culprit with `error` itself, the rest
        with a RedisConnectionError naming it), the socket is aborted (buffered commands are not sent), the reader
        stops. Only the first reason counts."""
        if self._error is not None:
            return
        self._error = error
        log.log(log_level, "Redis connection to %s dropped: %s", self.address, error)
        pending, self._pending = self._pending, collections.deque()
        for future in pending:
            if future.done():
                continue
            if future is culprit:
                future.set_exception(error)
            else:
                future.set_exception(RedisConnectionError(f"Redis connection lost: {error}"))
        self._closed.set_result(error)
        self._writer.transport.abort()
        if self._reader_task is not _redis_current_task():
            self._reader_task.cancel()


def _redis_current_task() -> Optional["asyncio.Task[Any]"]:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop: close() called from synchronous code
        return None


def _redis_check_timeout(timeout: float) -> None:
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout < float("inf"):
        raise ValueError(f"a Redis timeout is a positive number of seconds, not {timeout!r}")


def _redis_command_name(name: RedisArg) -> str:
    """A command's name for messages; its arguments (AUTH's password among them) never appear in one."""
    text = name.decode("ascii", "replace") if isinstance(name, (bytes, bytearray)) else str(name)
    return text[:32].upper()


# ----------------------------------------------------------------------------------------------------------------
# Redis client: subscriber
# ----------------------------------------------------------------------------------------------------------------


class RedisSubscriber:
    """A connection of its own in SUBSCRIBE mode on one channel. Messages arrive as (channel, payload) bytes: passed
    to `on_message` (called in the reader task; it must not block, and what it raises is logged), or, without a
    callback, taken with `async for channel, payload in subscriber`.

    It PINGs every `ping_interval` so that a Redis gone without a FIN is noticed within ping_interval + ping_timeout.
    When the connection drops (EOF, reset, a PING unanswered, more than REDIS_SUBSCRIBER_BACKLOG messages not taken),
    `wait_closed()` returns the reason and the iterator raises it as RedisConnectionError after handing out what had
    arrived; the owner then reconnects and must assume it missed messages. After close() the iterator just ends."""

    def __init__(
        self, connection: RedisConnection, channel: bytes,
        on_message: Optional[Callable[[bytes, bytes], None]], ping_interval: float, ping_timeout: float,
    ):
        """Use open()."""
        # per subscription
        self.channel = channel
        self._connection = connection
        self._on_message = on_message
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._backlog: Deque[Tuple[bytes, bytes]] = collections.deque()
        self._wakeup = asyncio.Event()
        self._closed_by_owner = False
        self._pinger: Optional["asyncio.Task[None]"] = None
        self._watcher: Optional["asyncio.Task[None]"] = None

    @classmethod
    async def open(
        cls, address: RedisAddress, channel: Union[bytes, str], *,
        on_message: Optional[Callable[[bytes, bytes], None]] = None,
        timeout: float = REDIS_CONNECT_TIMEOUT, ssl_context: Optional[ssl.SSLContext] = None,
        ping_interval: float = REDIS_PING_INTERVAL, ping_timeout: float = REDIS_COMMAND_TIMEOUT,
    ) -> "RedisSubscriber":
        """Connects like RedisConnection.open and subscribes; returns once Redis has confirmed the subscription, so a
        PUBLISH sent after it returns reaches this subscriber. Raises what RedisConnection.open raises."""
        _redis_check_timeout(ping_interval)
        _redis_check_timeout(ping_timeout)
        name = channel.encode("utf-8") if isinstance(channel, str) else bytes(channel)
        if not name:
            raise ValueError("a Redis channel name cannot be empty")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        connection = await RedisConnection.open(address, timeout=timeout, ssl_context=ssl_context)
        subscriber = cls(connection, name, on_message, ping_interval, ping_timeout)
        connection._push = subscriber._take  # before SUBSCRIBE: a message may follow its confirmation at once
        try:
            reply = await connection.execute("SUBSCRIBE", name, timeout=max(deadline - loop.time(), 0.001))
            if reply != [b"subscribe", name, 1]:
                raise RedisProtocolError(f"Redis answered SUBSCRIBE with {reply!r}")
        except BaseException:
            connection.close()
            raise
        subscriber._pinger = loop.create_task(subscriber._ping_loop())
        subscriber._watcher = loop.create_task(subscriber._watch())
        return subscriber

    @property
    def closed(self) -> bool:
        return self._connection.closed

    async def wait_closed(self) -> RedisConnectionError:
        """Waits until the subscription is gone, for whatever reason, and returns that reason."""
        return await self._connection.wait_closed()

    def close(self) -> None:
        self._closed_by_owner = True
        self._connection.close()
        self._wakeup.set()

    async def aclose(self) -> None:
        self.close()
        await asyncio.gather(*(t for t in (self._pinger, self._watcher) if t is not None), return_exceptions=True)
        await self._connection.aclose()

    def __aiter__(self) -> "RedisSubscriber":
        return self

    async def __anext__(self) -> Tuple[bytes, bytes]:
        while True:
            if self._backlog:
                return self._backlog.popleft()
            if self._connection.closed:
                if self._closed_by_owner:
                    raise StopAsyncIteration
                raise RedisConnectionError(f"Redis subscription to {self.channel!r} lost: {self._connection.error}")
            self._wakeup.clear()
            await self._wakeup.wait()

    def _take(self, reply: RedisReply) -> bool:
        """The connection's push hook: takes `message` arrays, leaves everything else (SUBSCRIBE's confirmation,
        PING's `pong`) to the command queue, where anything unasked for is a protocol error."""
        if not (isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message"):
            return False
        channel, payload = reply[1], reply[2]
        if channel != self.channel or not isinstance(payload, bytes):
            raise RedisProtocolError(f"a pub/sub message for {channel!r}, subscribed to {self.channel!r}")
        if self._on_message is not None:
            try:
                self._on_message(channel, payload)
            except Exception:
                log.exception("Redis subscriber callback failed")
            return True
        if len(self._backlog) >= REDIS_SUBSCRIBER_BACKLOG:  # its owner would act on stale news: make it resync
            self._connection._drop(RedisConnectionError(
                f"subscriber to {self.channel!r} fell behind: more than {REDIS_SUBSCRIBER_BACKLOG} messages not taken"))
            return True
        self._backlog.append((channel, payload))
        self._wakeup.set()
        return True

    async def _ping_loop(self) -> None:
        connection = self._connection
        while not connection.closed:
            await asyncio.sleep(self._ping_interval)  # a period, not a wait for something to happen
            try:
                reply = await connection.execute("PING", timeout=self._ping_timeout)
            except RedisError:
                return  # the connection dropped (the timeout dropped it); wait_closed() tells the owner
            if reply != [b"pong", b""]:
                connection._drop(RedisProtocolError(f"Redis answered a subscriber's PING with {reply!r}"))

    async def _watch(self) -> None:
        await self._connection.wait_closed()
        self._wakeup.set()
        if self._pinger is not None and self._pinger is not asyncio.current_task():
            self._pinger.cancel()


# ----------------------------------------------------------------------------------------------------------------
# Redis client: reconnecting
# ----------------------------------------------------------------------------------------------------------------

_RedisOpened = TypeVar("_RedisOpened")


def redis_backoff_delay(failures: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after `failures` failed attempts in a row: REDIS_BACKOFF_BASE doubling up to
    REDIS_BACKOFF_CAP, half of it fixed and half random, so replicas restarted together do not retry in step."""
    return backoff_delay(max(failures, 1), rand=rand, base=REDIS_BACKOFF_BASE, cap=REDIS_BACKOFF_CAP)


async def open_redis_with_backoff(
    opener: Callable[[], Awaitable[_RedisOpened]], *, what: str = "Redis",
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep, rand: Callable[[], float] = random.random,
    clock: Callable[[], float] = time.monotonic,
) -> _RedisOpened:
    """Awaits `opener()` (e.g. `lambda: RedisConnection.open(address)`) until it succeeds, sleeping
    redis_backoff_delay(n) after the n-th RedisConnectionError in a row; any other exception propagates. Cancel the
    awaiting task to give up. Logs the first failure and each new kind of failure at WARNING, repeats at DEBUG, and
    the recovery at INFO, so a long outage costs a few log lines, not one every 2 s."""
    failures = 0
    started = clock()
    last = ""
    while True:
        try:
            result = await opener()
        except RedisConnectionError as exc:
            failures += 1
            message = str(exc)
            level = logging.WARNING if message != last else logging.DEBUG
            last = message
            delay = redis_backoff_delay(failures, rand)
            log.log(level, "%s unavailable (attempt %d): %s; retrying in %.2f s", what, failures, message, delay)
            await sleep(delay)
            continue
        if failures:
            log.info("%s available again after %d failed attempts (%.1f s)", what, failures, clock() - started)
        return result


# ----------------------------------------------------------------------------------------------------------------
# Coordination on Redis: replicas
# ----------------------------------------------------------------------------------------------------------------

# Keys under the prefix P (standalone Redis; the scripts name their keys from P, so Redis Cluster is not supported):
#   P:epoch       a random id, set when the group's state is new; gone means Redis lost its data
#   P:hold        exists (with a TTL) while every bucket waits after such a loss
#   P:limits      hash: mc (max_concurrency), total, remaining, reset_at (Redis ms), fetched_at (Redis ms)
#   P:slot:<b>    bucket b's slot: "shard:claim:state:granted_ms:lease_end_ms:previous_ms"; its TTL is the time until
#                 the bucket may grant again (state: plain, open (a lease), released, timedout)
#   P:want:<b>    hash replica -> "first_ms:expires_ms": replicas whose line waits for b, and since when (fairness)
#   P:grants      sorted set of recent grants "claim:shard" by Redis ms (the in-flight count, the re-bucketing)
#   P:seq         claim counter
#   P:refresh     the replica fetching /gateway/bot right now (a lock with a TTL)
#   P:events      pub/sub channel: "release <shard> <claim>", "limits"
# Every time is Redis's clock (TIME, PTTL): a replica's clock never decides a slot.

_LUA_COMMON = b"""
local p = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function ends(ms)  -- a whole millisecond at least `ms` after this moment, plus one: Redis judges expiry on
  -- its cached command time, which was seen once (in 1 of ~80 runs) to sit a millisecond past TIME's
  return math.ceil((now_us + ms * 1000) / 1000) + 1
end
local function fields(value)
  local out = {}
  for item in string.gmatch(value, '([^:]+)') do out[#out + 1] = item end
  return out
end
local function limits()
  local l = redis.call('HMGET', p .. ':limits', 'mc', 'total', 'remaining', 'reset_at')
  return tonumber(l[1]) or 1, tonumber(l[2]), tonumber(l[3]), tonumber(l[4])
end
"""

# ARGV: prefix, known epoch (unused: the caller compares), candidate epoch, replica, shard, interval ms, lease ms, hold ms, grace ms, window ms,
# confirm ms. Returns {granted 0/1, reason, wait µs, bucket, mc, epoch, remaining, total, reset_in ms, claim}.
_LUA_CLAIM = _LUA_COMMON + b"""
local replica, shard = ARGV[4], tonumber(ARGV[5])
local interval, lease, hold, grace = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local window, confirm = tonumber(ARGV[10]), tonumber(ARGV[11])
local epoch = redis.call('GET', p .. ':epoch')
if not epoch then  -- new, or lost: every bucket waits before granting (a grant may have gone out just before)
  epoch = ARGV[3]
  redis.call('SET', p .. ':epoch', epoch)
  redis.call('SET', p .. ':hold', '1', 'PX', hold)
end
local mc, total, remaining, reset_at = limits()
local bucket = shard % mc
local function answer(granted, reason, wait, claim)  -- wait in ms, fractions kept: the reply carries microseconds
  return {granted, reason, math.floor(wait * 1000), bucket, mc, epoch, remaining or -1, total or -1,
          reset_at and math.max(0, reset_at - now) or -1, claim or 0}
end
local wants = p .. ':want:' .. bucket
local first = now
local mine = redis.call('HGET', wants, replica)
if mine then
  local f = fields(mine)
  if tonumber(f[2]) > now then first = tonumber(f[1]) end
end
local function wait(reason, ms)
  redis.call('HSET', wants, replica, first .. ':' .. math.ceil(now + ms + grace))
  redis.call('PEXPIRE', wants, math.ceil(ms + grace + 60000))
  return answer(0, reason, ms)
end
local held = redis.call('PTTL', p .. ':hold')
if held > 0 then return wait('startup hold', held) end
local slot = p .. ':slot:' .. bucket
local ttl = redis.call('PTTL', slot)
local previous = 0
local value = redis.call('GET', slot)
if value then previous = tonumber(fields(value)[4]) or 0 end
local others = redis.call('HGETALL', wants)
local turn = nil
for i = 1, #others, 2 do
  local f = fields(others[i + 1])
  local expires = tonumber(f[2])
  if expires <= now then
    redis.call('HDEL', wants, others[i])
  elseif others[i] ~= replica and tonumber(f[1]) < first then
    turn = math.min(turn or expires, expires)
  end
end
if ttl > 0 then
  local f = fields(value)
  local left = ttl  -- PTTL counts from the ms this script started in; the expiry we set says it to the microsecond
  if tonumber(f[7]) then left = math.max(0, math.min(ttl, (tonumber(f[7]) * 1000 - now_us) / 1000)) end
  -- a replica whose line waited longer takes the freed slot: come back once its grace is over, so that at the
  -- moment the slot frees only that replica asks (the others' claims would only delay its grant)
  if turn then left = left + grace end
  if f[3] == 'open' and tonumber(f[5]) > now then return wait('lease', left) end
  return wait('interval', left)
end
if turn then return wait("another replica's turn", math.max(1, math.min(turn - now, grace))) end
if remaining and remaining <= 0 then
  if reset_at and reset_at > now then return answer(0, 'budget', reset_at - now) end
  return answer(0, 'awaiting Discord', confirm)
end
local claim = redis.call('INCR', p .. ':seq')
local state = 'plain'
if lease > 0 then state = 'open' end
local expires = ends(lease + interval)
redis.call('SET', slot, shard .. ':' .. claim .. ':' .. state .. ':' .. now .. ':' .. (now + lease) .. ':' .. previous
           .. ':' .. expires)
redis.call('PEXPIREAT', slot, expires)
if remaining then
  remaining = remaining - 1
  redis.call('HSET', p .. ':limits', 'remaining', remaining)
end
redis.call('ZADD', p .. ':grants', now, claim .. ':' .. shard)
redis.call('ZREMRANGEBYSCORE', p .. ':grants', '-inf', now - window)
redis.call('HDEL', wants, replica)
return answer(1, 'granted', (expires * 1000 - now_us) / 1000, claim)  -- until the slot frees
"""

# ARGV: prefix, bucket, claim. A grant that could not be delivered: the slot and the session start come back.
_LUA_UNCLAIM = _LUA_COMMON + b"""
local slot = p .. ':slot:' .. ARGV[2]
local value = redis.call('GET', slot)
if not value or fields(value)[2] ~= ARGV[3] then return 0 end
redis.call('DEL', slot)
local f = fields(value)
local previous = tonumber(f[6]) or 0
local mc, total, remaining = limits()
if remaining then redis.call('HINCRBY', p .. ':limits', 'remaining', 1) end
redis.call('ZREM', p .. ':grants', f[2] .. ':' .. f[1])
return 1
"""

# ARGV: prefix, shard, interval ms. Returns {ok 0/1, what, bucket, holder, held ms, since previous ms, claim}.
_LUA_RELEASE = _LUA_COMMON + b"""
local shard = ARGV[2]
local mc = limits()
local bucket = tonumber(shard) % mc
local slot = p .. ':slot:' .. bucket
local value = redis.call('GET', slot)
if not value then return {0, 'none', bucket, -1, 0, -1, 0} end
local f = fields(value)
local held, since = now - tonumber(f[4]), -1
if tonumber(f[6]) > 0 then since = tonumber(f[4]) - tonumber(f[6]) end
if f[1] ~= shard then
  if f[3] == 'open' and tonumber(f[5]) > now then return {0, 'other', bucket, tonumber(f[1]), held, since, 0} end
  return {0, 'other ended', bucket, tonumber(f[1]), held, since, 0}
end
if f[3] == 'released' then return {0, 'released', bucket, tonumber(f[1]), held, since, 0} end
if f[3] == 'timedout' or (f[3] == 'open' and tonumber(f[5]) <= now) then
  return {0, 'timed out', bucket, tonumber(f[1]), held, since, 0}
end
if f[3] ~= 'open' then return {0, 'none', bucket, tonumber(f[1]), held, since, 0} end
local expires = ends(tonumber(ARGV[3]))
redis.call('SET', slot, f[1] .. ':' .. f[2] .. ':released:' .. f[4] .. ':' .. f[5] .. ':' .. f[6] .. ':' .. expires)
redis.call('PEXPIREAT', slot, expires)
redis.call('PUBLISH', p .. ':events', 'release ' .. f[1] .. ' ' .. f[2])
return {1, 'released', bucket, tonumber(f[1]), held, since, tonumber(f[2])}
"""

# ARGV: prefix, bucket, claim. At a lease's deadline: 1 if it timed out (and is now marked so), 0 if it had ended.
_LUA_LEASE_CHECK = _LUA_COMMON + b"""
local slot = p .. ':slot:' .. ARGV[2]
local value = redis.call('GET', slot)
if not value then return 0 end
local f = fields(value)
if f[2] ~= ARGV[3] or f[3] ~= 'open' or tonumber(f[5]) > now then return 0 end
redis.call('SET', slot, f[1] .. ':' .. f[2] .. ':timedout:' .. f[4] .. ':' .. f[5] .. ':' .. f[6] .. ':' .. (f[7] or ''),
           'KEEPTTL')
return 1
"""

# ARGV: prefix, mc, total (0: none), remaining, reset_after ms, in-flight window ms, margin ms.
# Writes the group's limits (less the grants Discord may not have counted yet) and, when max_concurrency changes,
# moves each slot to its holder's new bucket, keeping the longest wait where two meet. Returns {in flight, old mc}.
_LUA_APPLY = _LUA_COMMON + b"""
local mc, total = tonumber(ARGV[2]), tonumber(ARGV[3])
local old = limits()
local inflight = redis.call('ZCOUNT', p .. ':grants', now - tonumber(ARGV[6]), '+inf')
if total > 0 then
  redis.call('HSET', p .. ':limits', 'mc', mc, 'total', total,
             'remaining', math.max(0, tonumber(ARGV[4]) - inflight),
             'reset_at', now + tonumber(ARGV[5]) + tonumber(ARGV[7]), 'fetched_at', now)
else
  redis.call('HSET', p .. ':limits', 'mc', mc)
end
redis.call('DEL', p .. ':refresh')
if old ~= mc then
  local moved = {}
  for b = 0, old - 1 do
    local key = p .. ':slot:' .. b
    local value, ttl = redis.call('GET', key), redis.call('PTTL', key)
    if value and ttl > 0 then
      local nb = tonumber(fields(value)[1]) % mc
      if not moved[nb] or moved[nb][2] < ttl then moved[nb] = {value, ttl} end
    end
    redis.call('DEL', key, p .. ':want:' .. b)
  end
  for nb, entry in pairs(moved) do redis.call('SET', p .. ':slot:' .. nb, entry[1], 'PX', entry[2] + 1) end
end
redis.call('PUBLISH', p .. ':events', 'limits')
return {inflight, old}
"""

# ARGV: prefix, replica, period ms, lock ms. 1 when this replica should fetch /gateway/bot now: the group's limits
# are older than the period, or Discord's reset has passed since they were fetched, and nobody else is fetching.
_LUA_REFRESH_TURN = _LUA_COMMON + b"""
local l = redis.call('HMGET', p .. ':limits', 'fetched_at', 'reset_at')
local fetched, reset_at = tonumber(l[1]), tonumber(l[2])
local due = (not fetched) or now - fetched >= tonumber(ARGV[3]) or (reset_at and reset_at <= now and fetched < reset_at)
if not due then return 0 end
local holder = redis.call('GET', p .. ':refresh')
if holder and holder ~= ARGV[2] then return 0 end
redis.call('SET', p .. ':refresh', ARGV[2], 'PX', tonumber(ARGV[4]))
return 1
"""

# ARGV: prefix. Returns {mc, total, remaining, reset_in ms} (-1 where unknown).
_LUA_LOAD = _LUA_COMMON + b"""
local mc, total, remaining, reset_at = limits()
return {mc, total or -1, remaining or -1, reset_at and math.max(0, reset_at - now) or -1}
"""

def _ms(seconds: float) -> int:
    """Seconds as whole milliseconds for Redis, rounded up (5.1 is 5100, not 5101 from float error): never short."""
    return math.ceil(seconds * 1000 - 1e-6)


MAX_CLAIM_RTT = 0.05  # a claim answered later than this is given back, not acted on: half the interval's 0.1 s margin
LATE_BACKOFF = (0.01, 1.0)  # after a claim given back, the bucket asks again after 10 ms, doubling up to 1 s
LATE_STREAK = 5  # this many late answers in a row, and /healthz says this replica cannot grant (503)
FAIR_GRACE = 0.2  # a replica whose line waited longest has this long to take a freed slot before others may
VIEW_REFRESH = 2.0  # Redis: how often a replica re-reads the group's limits for /status (grants elsewhere move them)
CONFIRM_POLL = 5.0  # Redis: how often a bucket waiting for Discord's fresh budget asks again (a publish is sooner)
REFRESH_LOCK = DISCORD_DEADLINE + 10.0  # the fetching replica's lock: it expires if that replica dies mid-fetch


def redis_prefix(config: Config) -> str:
    """REDIS_PREFIX, or one derived from the bot: a token's first part is its application id in base64, so two bots
    on one Redis never share buckets, while every replica of one bot (and a reset token) lands on the same keys."""
    if config.redis_prefix:
        return config.redis_prefix
    if not config.token:
        return "gateway-queue:default"
    first = config.token.split(".")[0]
    try:
        decoded = base64.urlsafe_b64decode(first + "=" * (-len(first) % 4)).decode("ascii")
    except (ValueError, UnicodeDecodeError):
        decoded = ""
    if re.fullmatch(r"[0-9]{1,20}", decoded):
        return f"gateway-queue:{decoded}"
    return "gateway-queue:" + hashlib.sha256(config.token.encode()).hexdigest()[:16]  # not the token itself


def _number(value: Any, default: int = -1) -> int:
    return value if isinstance(value, int) else default


class RedisCoordinator(Coordinator):
    """Slots, leases and the budget in Redis, shared by every replica: each grant is one script run (claim), which
    checks the slot, the fair turn among replicas and the budget, and takes them together on Redis's clock.

    No grant without Redis's consent: while Redis is unreachable, claims wait (parked requests stay parked) and
    problem() says why, so /healthz answers 503. A reply later than MAX_CLAIM_RTT is given back, not acted on (the
    slot it describes may have expired since). Releases (and new limits) are published, so every replica's waiting
    bucket asks again at once instead of sleeping out a lease.
    """

    name = "redis"

    def __init__(self, config: Config, *, clock: Clock = time.monotonic, stats: Optional[Stats] = None,
                 ssl_context: Optional[ssl.SSLContext] = None, call_later: Optional[CallLater] = None):
        super().__init__(config.interval, 1 if config.token else config.max_concurrency,
                         lease_timeout=config.lease_timeout, clock=clock, stats=stats or Stats())
        assert config.redis_url is not None
        self.address = parse_redis_url(config.redis_url)
        self.prefix = redis_prefix(config)
        self.static_limits = None if config.token else config.max_concurrency
        self.replica = os.urandom(8).hex()
        self.hold_ms = int((config.interval + config.lease_timeout) * 1000) + 1
        self._ssl_context = ssl_context
        self._call_later = call_later
        self._epoch = b""
        self._conn: Optional[RedisConnection] = None
        self._down = "connecting to Redis"
        self._tasks: List[asyncio.Task] = []
        self._leases: Dict[int, Tuple[int, int, float, Any]] = {}  # claim -> (bucket, shard, granted, timer), ours
        self._lease_of: Dict[int, int] = {}  # bucket -> claim of the lease this replica granted there
        self._seen: Dict[int, Tuple[float, str]] = {}  # bucket -> (free by, why), from the latest claim answer
        self._script_errors = Throttle(clock)
        self._late = 0  # claims in a row answered later than MAX_CLAIM_RTT

    async def start(self, hold: float) -> None:
        if self._call_later is None:
            self._call_later = asyncio.get_running_loop().call_later
        self._tasks = [asyncio.ensure_future(self._keep_connected()), asyncio.ensure_future(self._keep_subscribed()),
                       asyncio.ensure_future(self._keep_viewing())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _, _, _, timer in self._leases.values():
            timer.cancel()
        if self._conn is not None:
            await self._conn.aclose()

    def problem(self) -> Optional[str]:
        if self._conn is None:
            return self._down
        if self._late >= LATE_STREAK:
            return (f"Redis answers claims too slowly ({self._late} in a row over {MAX_CLAIM_RTT * 1000:.0f} ms): "
                    "no grant is made on a late answer")
        return None

    # -- the connections -----------------------------------------------------------------------------------------

    async def _keep_connected(self) -> None:
        """Holds the command connection open, reconnecting with capped, jittered backoff."""
        while True:
            conn = await open_redis_with_backoff(self._open, what=f"Redis at {self.address}")
            self._conn = conn
            await self._apply_static()
            self.on_change(None)  # every waiting bucket asks again now
            error = await conn.wait_closed()
            self._conn = None
            self._down = f"Redis unreachable: {error}"
            self.stats.backend_errors += 1
            log.warning("lost the connection to Redis (%s): no grants until it is back", error)

    async def _keep_viewing(self) -> None:
        """Re-reads the group's limits now and then, so that /status shows the budget other replicas spent."""
        while True:
            await asyncio.sleep(VIEW_REFRESH)
            if self._conn is not None:
                with contextlib.suppress(BackendError):
                    await self.load()

    async def _open(self) -> RedisConnection:
        try:
            conn = await RedisConnection.open(self.address, ssl_context=self._ssl_context)
        except RedisConnectionError as exc:
            self._down = f"Redis unreachable: {exc}"  # what /healthz and /status say until it works
            raise
        try:
            await self._check_eviction(conn)
        except RedisConnectionError as exc:
            await conn.aclose()
            self._down = str(exc)
            raise
        return conn

    async def _check_eviction(self, conn: RedisConnection) -> None:
        """A slot's TTL is its interval: a Redis that may evict keys with a TTL (maxmemory set, a volatile-* or
        allkeys-* policy) could drop a slot early and let its bucket grant early. Such a Redis is refused, with the
        setting to change. A Redis that will not say (INFO disabled) is used, with a warning."""
        try:
            info = await conn.execute("INFO", "memory")
        except RedisReplyError as exc:
            self._script_errors.warning("info", "Redis refused INFO (%s): cannot check that it never evicts keys; "
                                        "make sure maxmemory-policy is noeviction", exc.kind or "error")
            return
        fields = dict(line.split(":", 1) for line in bytes(info or b"").decode("ascii", "replace").splitlines()
                      if ":" in line)
        limit, policy = fields.get("maxmemory", "0").strip(), fields.get("maxmemory_policy", "noeviction").strip()
        if limit != "0" and policy != "noeviction":
            raise RedisConnectionError(
                f"Redis at {self.address} may evict keys (maxmemory {limit[:20]}, maxmemory-policy {policy[:40]}): an "
                "evicted slot would let its bucket grant early. Set maxmemory-policy noeviction (or maxmemory 0); "
                "no grants until then")

    async def _apply_static(self) -> None:
        """Without a token, this replica's MAX_CONCURRENCY is the group's (the last replica started wins)."""
        try:
            if self.static_limits is not None:
                _, old = await self._run(_LUA_APPLY, self.static_limits, 0, 0, 0, int(IN_FLIGHT_WINDOW * 1000), 0)
                if old != self.static_limits:
                    log.info("the group's max_concurrency in Redis was %d; this replica sets MAX_CONCURRENCY=%d",
                             old, self.static_limits)
            await self.load()
        except BackendError:
            pass

    async def _keep_subscribed(self) -> None:
        """Holds the subscription to P:events; after a gap, every bucket asks again (a message may be lost)."""
        channel = f"{self.prefix}:events"
        while True:
            subscriber = await open_redis_with_backoff(
                lambda: RedisSubscriber.open(self.address, channel, on_message=self._event, ssl_context=self._ssl_context),
                what=f"Redis subscription at {self.address}")
            self.on_change(None)
            await subscriber.wait_closed()

    def _event(self, channel: bytes, payload: bytes) -> None:
        words = payload.split(b" ")
        if words[0] == b"release" and len(words) == 3 and words[1].isdigit() and words[2].isdigit():
            self._forget_lease(int(words[2]))
            self.on_change(int(words[1]))
        elif words[0] == b"limits":
            asyncio.ensure_future(self._load_quietly())

    async def _load_quietly(self) -> None:
        try:
            await self.load()
        except BackendError:
            pass
        self.on_change(None)

    async def _run(self, script: bytes, *args: Any) -> Any:
        """Runs a script (EVALSHA, EVAL on NOSCRIPT); BackendError when Redis cannot be reached or refuses."""
        conn = self._conn
        if conn is None:
            raise BackendError(self._down)
        try:
            return await conn.evalsha(script, (), (self.prefix, *args))
        except RedisReplyError as exc:
            self.stats.backend_errors += 1
            self._script_errors.warning("script", "Redis refused a script: %s", exc.message[:200])
            raise BackendError(f"Redis refused a script: {exc.message[:200]}") from None
        except RedisError as exc:
            self.stats.backend_errors += 1
            raise BackendError(str(exc)) from None

    # -- the interface -------------------------------------------------------------------------------------------

    async def claim(self, shard: int) -> Verdict:
        sent = self.clock()
        try:
            reply = await self._run(_LUA_CLAIM, self._epoch, os.urandom(8).hex(), self.replica, shard,
                                    _ms(self.interval), _ms(self.lease_timeout), self.hold_ms,
                                    int(FAIR_GRACE * 1000), int(max(IN_FLIGHT_WINDOW, self.interval + self.lease_timeout) * 1000),
                                    int(CONFIRM_POLL * 1000))
        except BackendError:
            return Verdict(False, math.inf, UNAVAILABLE, shard, shard % self.max_concurrency, self.max_concurrency)
        now = self.clock()
        late = now - sent > MAX_CLAIM_RTT  # Redis acted at some moment in [sent, now]: too vague to grant on
        if not late:
            self._late = 0
        granted, reason, wait_us, bucket, mc, epoch, remaining, total, reset_in, claim = reply
        self._learn(epoch, mc, remaining, total, reset_in, now)
        reason = reason.decode("ascii", "replace")
        if not granted:
            self._seen[bucket] = (now + wait_us / 1e6, reason)
            return Verdict(False, wait_us / 1e6, reason, shard, bucket, mc)
        if late:
            self._late += 1
            self._script_errors.warning("late", "Redis took %.0f ms to answer a claim (over %.0f ms): giving it back",
                                        (now - sent) * 1000, MAX_CLAIM_RTT * 1000)
            await self._unclaim(bucket, claim)
            first, cap = LATE_BACKOFF
            return Verdict(False, backoff_delay(self._late, base=first, cap=cap), LATE, shard, bucket, mc)
        self._seen.pop(bucket, None)
        return Verdict(True, wait_us / 1e6, GRANTED, shard, bucket, mc, claim)

    def _learn(self, epoch: bytes, mc: int, remaining: int, total: int, reset_in: int, now: float) -> None:
        """Takes in what a script said of the group's state."""
        if epoch != self._epoch:
            if self._epoch:
                log.warning("Redis lost the group's state (its epoch changed): every bucket waits %.1f s before "
                            "granting again, and the limits are fetched again", self.hold_ms / 1000)
                self.on_change(None)
                self.on_lost()
                if self.static_limits is not None:
                    asyncio.ensure_future(self._apply_static())
            self._epoch = epoch
        self.max_concurrency = mc
        if total > 0:
            self.budget = Budget(total, max(remaining, 0), now + reset_in / 1000)
            self.known = True
        else:
            self.budget = None

    async def _unclaim(self, bucket: int, claim: int) -> None:
        try:
            await self._run(_LUA_UNCLAIM, bucket, claim)
        except BackendError:
            pass  # the slot stays taken for its interval and the start spent: safe, only slower

    async def settle(self, verdict: Verdict, delivered: bool) -> None:
        if not delivered:
            if self.lease_timeout:
                self.stats.leases["undelivered"] += 1
            await self._unclaim(verdict.bucket, verdict.claim)
            return
        if self.budget is not None and self.budget.remaining == 0:
            log.warning("session-start budget exhausted: every bucket waits %.0f s for Discord's reset",
                        max(0.0, self.budget.reset_at - self.clock()))
        if self.lease_timeout:
            claim = verdict.claim
            timer = self._call_later(self.lease_timeout, lambda: asyncio.ensure_future(self._check_lease(claim)))
            self._forget_lease(self._lease_of.get(verdict.bucket, -1))
            self._leases[claim] = (verdict.bucket, verdict.shard, self.clock(), timer)
            self._lease_of[verdict.bucket] = claim

    def _forget_lease(self, claim: int) -> Optional[Tuple[int, int, float, Any]]:
        lease = self._leases.pop(claim, None)
        if lease is not None:
            lease[3].cancel()
            if self._lease_of.get(lease[0]) == claim:
                del self._lease_of[lease[0]]
        return lease

    async def _check_lease(self, claim: int) -> None:
        lease = self._forget_lease(claim)
        if lease is None:
            return
        bucket, shard, granted, _ = lease
        try:
            timed_out = await self._run(_LUA_LEASE_CHECK, bucket, claim)
        except BackendError:
            return
        if timed_out == 1:
            self._lease_ended(bucket, shard, "timeout", self.clock() - granted, None)

    async def release(self, shard: int, outcome: str) -> Tuple[int, Dict[str, Any]]:
        if not self.lease_timeout:
            return 404, {"message": "lease mode is off (LEASE_TIMEOUT is 0): there is no lease to release"}
        ok, what, bucket, holder, held_ms, since_ms, claim = await self._run(_LUA_RELEASE, shard, _ms(self.interval))
        if not ok:
            state = {b"none": None, b"other": "open", b"other ended": "ended", b"released": "released",
                     b"timed out": "timed out"}[what]
            refusal = _release_refusal(shard, bucket, None if holder < 0 else holder, state)
            return 409, {"message": refusal or f"shard {shard} holds no lease in bucket {bucket}"}
        self._forget_lease(claim)
        self._lease_ended(bucket, shard, outcome, held_ms / 1000, None if since_ms < 0 else since_ms / 1000)
        self.on_change(shard)
        return 200, {"message": f"released shard {shard}'s lease on bucket {bucket}", "bucket": bucket,
                     "held_seconds": round(held_ms / 1000, 3), "next_grant_in": self.interval}

    async def apply(self, limits: GatewayLimits) -> None:
        inflight, old = await self._run(_LUA_APPLY, limits.max_concurrency, limits.total, limits.remaining,
                                        int(limits.reset_after * 1000), int(IN_FLIGHT_WINDOW * 1000), int(RESET_MARGIN * 1000))
        await self.load()
        self.on_change(None)

    async def refresh_turn(self, period: float) -> bool:
        return await self._run(_LUA_REFRESH_TURN, self.replica, int(period * 1000), int(REFRESH_LOCK * 1000)) == 1

    async def load(self) -> None:
        mc, total, remaining, reset_in = await self._run(_LUA_LOAD)
        self.max_concurrency = mc
        if total > 0:
            self.budget = Budget(total, max(remaining, 0), self.clock() + reset_in / 1000)
            self.known = True

    def outlook(self, bucket: int, now: float) -> Tuple[float, str, Optional[Dict[str, Any]]]:
        free_by, why = self._seen.get(bucket, (0.0, ""))
        lease = None
        if bucket in self._lease_of:
            _, shard, granted, _ = self._leases[self._lease_of[bucket]]
            lease = {"shard": shard, "held_for": round(now - granted, 3),
                     "ends_by": round(max(0.0, granted + self.lease_timeout - now), 3)}
        return max(0.0, free_by - now), why if free_by > now else "", lease

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


def process_start_time(fallback: float) -> float:
    """The process's start time in seconds since the epoch, from /proc where present (read once, at startup)."""
    try:
        with open("/proc/self/stat", "rb") as stat_file:
            fields = stat_file.read().rsplit(b")", 1)[1].split()  # the command name may hold spaces and parens
        with open("/proc/stat", "rb") as system_stat:
            boot = next(int(line.split()[1]) for line in system_stat if line.startswith(b"btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return fallback


def process_metrics(metrics: Metrics, start_time: float) -> None:
    """The process_ families that the official Prometheus clients export on Linux, each read in O(1): open
    descriptors are not listed (that walks every one; gateway_queue_open_connections counts them instead)."""
    times = os.times()
    metrics.family("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.",
                   [("", times.user + times.system)])
    metrics.family("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.",
                   [("", start_time)])
    try:
        with open("/proc/self/statm", "rb") as statm:
            virtual, resident = (int(field) for field in statm.read().split()[:2])
        page = os.sysconf("SC_PAGE_SIZE")
        metrics.family("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", [("", virtual * page)])
        metrics.family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", [("", resident * page)])
    except (OSError, ValueError):
        pass
    if resource is not None:
        metrics.family("process_max_fds", "gauge", "Maximum number of open file descriptors.",
                       [("", resource.getrlimit(resource.RLIMIT_NOFILE)[0])])


def utc_after(seconds: float) -> Optional[str]:
    """The UTC time `seconds` from now, ISO 8601; None for a time no calendar can show."""
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + seconds))
    except (OverflowError, OSError, ValueError):
        return None


def status_html(status: Dict[str, Any]) -> bytes:
    """The /status snapshot as one small page: no scripts, no outside assets (not even a favicon request), refreshing
    itself."""
    esc = html.escape
    buckets = status["buckets"]
    widest = max([b["waiting"] for b in buckets] + [1])
    rows = "\n".join(
        f'<tr><td>{b["bucket"]}</td><td class="bar"><span style="width:{100 * b["waiting"] / widest:.1f}%"></span></td>'
        f'<td>{b["waiting"]}</td><td>{esc(describe_seconds(b["next_grant_in"]))}</td><td>{esc(b["waiting_for"])}</td>'
        f'<td>{"" if b["lease"] is None else esc("shard %s, %s" % (b["lease"]["shard"], describe_seconds(b["lease"]["held_for"])))}</td></tr>'
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
    backend = status["backend"]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{STATUS_REFRESH}">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>gateway-queue status</title>
<link rel="icon" href="data:,">
<style>
body {{ font: 15px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 60em; padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.4em; }} .estimate {{ font-size: 1.2em; font-weight: 600; }}
table {{ border-collapse: collapse; width: 100%; }} td, th {{ padding: 2px 8px; text-align: right; }}
td.bar {{ width: 40%; text-align: left; }} td.bar span {{ display: inline-block; height: 0.9em; background: #5865f2; }}
dt {{ float: left; clear: left; width: 13em; color: #555; }} dd {{ margin: 0 0 0.3em 13em; }}
</style></head><body>
<h1>gateway-queue {esc(VERSION)}</h1>
<p class="estimate">{esc(estimate)}</p>
<dl>
<dt>Limits from</dt><dd>{esc(status["limits"]["source"])}</dd>
<dt>max_concurrency</dt><dd>{status["limits"]["max_concurrency"]}</dd>
<dt>Identify interval</dt><dd>{status["limits"]["identify_interval"]:g} s</dd>
<dt>Lease timeout</dt><dd>{esc(f'{status["limits"]["lease_timeout"]:g} s' if status["limits"]["lease_timeout"] else "off")}</dd>
<dt>Session starts</dt><dd>{esc(budget_text)}</dd>
<dt>Coordination</dt><dd>{esc(backend["name"])}: {esc(backend["problem"] or "ok")}</dd>
<dt>Discord</dt><dd>{esc(status["discord_error"] or "ok")}</dd>
<dt>Waiting</dt><dd>{waiting}</dd>
<dt>Open connections</dt><dd>{status["open_connections"]}</dd>
</dl>
<table><thead><tr><th>bucket</th><th></th><th>waiting</th><th>next grant</th><th>waiting for</th><th>lease</th></tr></thead><tbody>
{rows}
</tbody></table>
<p><small>Refreshes every {STATUS_REFRESH} s. The same data as JSON: <code>curl http://&lt;queue&gt;/status</code>.</small></p>
</body></html>
"""
    return page.encode()


def describe_seconds(seconds: Optional[float]) -> str:
    """Plain words for a duration: "now", "about 12 seconds", "about 4 minutes 10 seconds", "about 3 hours 5 minutes"."""
    if seconds is None or seconds != seconds or seconds > 10 * 365 * 86400:
        return "not foreseeable"
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
    for item in accept.decode("latin-1").split(",")[:MAX_HEADERS]:
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


def _finite(seconds: float) -> Optional[float]:
    """A duration for JSON: rounded, or None (JSON has no infinity) when nobody can say."""
    return round(seconds, 3) if seconds < 10 * 365 * 86400 else None


# ----------------------------------------------------------------------------------------------------------------
# Connections
# ----------------------------------------------------------------------------------------------------------------

OPEN, LINGERING, CLOSED = 0, 1, 2  # Connection.state


def _drop_transport_cycle(transport: asyncio.BaseTransport) -> None:
    """asyncio's selector transport keeps bound methods of itself (`_read_ready_cb`, and `_write_ready` from 3.12)
    after it has lost its socket: one reference cycle per connection, which only a full collection frees (3.12
    clears them on close() but not on abort(); 3.9-3.11 never). A storm of 15,000 closes left ~13 MiB for the next
    load to fragment. Nothing calls a transport without a socket again; dropping the methods lets reference
    counting free it at once. Another loop's transport, without these instance attributes, is left alone."""
    attributes = getattr(transport, "__dict__", {})
    if attributes.get("_sock", True) is None:
        for name in ("_read_ready_cb", "_write_ready"):
            if attributes.get(name) is not None:
                attributes[name] = None


class Deadlines:
    """Every connection's deadline in one coarse timing wheel: a slot per TIMER_TICK, swept by one task.

    A connection arms its slot once; when its deadline moves later (the next keep-alive request), only a float
    changes, and the sweep re-slots it when its old slot comes up. So a request costs no timer, a parked request
    holds none, and the sweep touches only the connections whose slot is due.
    """

    def __init__(self, clock: Clock, tick: float = TIMER_TICK):
        self.clock = clock
        self.tick = tick
        self.slots: Dict[int, Set["Connection"]] = {}
        self._next = int(clock() / tick)  # the first slot not swept yet
        self._wakeup: Optional[asyncio.Future] = None

    def arm(self, conn: "Connection") -> None:
        """Makes sure conn is swept no later than its deadline (conn.deadline, > 0)."""
        tick = int(conn.deadline / self.tick) + 1
        if conn.tick:
            if conn.tick <= tick:
                return
            self.slots[conn.tick].discard(conn)
        slot = self.slots.get(tick)
        if slot is None:
            slot = self.slots[tick] = set()
        slot.add(conn)
        conn.tick = tick
        if self._wakeup is not None:
            _resolve(self._wakeup)

    def discard(self, conn: "Connection") -> None:
        """Takes conn out of the wheel (parked, or gone)."""
        if conn.tick:
            slot = self.slots.get(conn.tick)
            if slot is not None:
                slot.discard(conn)
                if not slot:
                    del self.slots[conn.tick]
            conn.tick = 0

    def sweep(self, now: float) -> None:
        """Expires every connection whose deadline has passed; re-slots those whose deadline moved on."""
        current = int(now / self.tick)
        if current - self._next > len(self.slots):  # after a quiet spell: visit the slots there are, not every tick
            due = sorted(tick for tick in self.slots if tick <= current)
        else:
            due = range(self._next, current + 1)
        self._next = current + 1
        for tick in due:
            for conn in self.slots.pop(tick, ()):
                conn.tick = 0
                if not conn.deadline:
                    continue
                if conn.deadline > now:
                    self.arm(conn)
                else:
                    conn.expire(now)

    async def run(self) -> None:
        """Sweeps every tick while any deadline is armed; sleeps without a timer while none is."""
        while True:
            if not self.slots:
                self._wakeup = asyncio.get_running_loop().create_future()
                try:
                    await self._wakeup
                finally:
                    self._wakeup = None
                self._next = int(self.clock() / self.tick)
            await asyncio.sleep(self.tick)
            self.sweep(self.clock())


class Connection:
    """One client connection: the only code that touches a socket.

    Its task reads all the time, even while a request is parked, because asyncio reports a peer's EOF only to a
    reader: a client that goes away leaves the line at once, in every state. Requests are answered in order by
    _process(), which runs when bytes arrive, when a parked request is granted, and after a yield; it stops at a
    parked request, at an incomplete request, when unsent output passes OUTPUT_LIMIT, and after MAX_TURN seconds.
    Bytes are bounded in every state (a head by MAX_HEAD_BYTES, a pipeline behind a parked request by
    PARKED_BUFFER_LIMIT, one behind unread output by PIPELINE_LIMIT), and time by one deadline at a time in the
    server's wheel. The connection counts toward the cap until its descriptor is closed.
    """

    __slots__ = ("server", "reader", "writer", "transport", "buf", "partial", "started", "request", "body_left",
                 "waiter", "grant", "pending", "deadline", "tick", "state", "held", "blocked_at", "discarded")

    def __init__(self, server: "Server", reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        # per connection
        self.server = server
        self.reader = reader
        self.writer = writer
        self.transport = writer.transport
        self.buf = b""  # bytes, not bytearray: the empty value is shared, so an idle or parked connection holds none
        self.state = OPEN
        self.held = False  # a yield or full output owns processing: bytes that arrive are only buffered
        self.blocked_at = 0.0  # when unsent output passed OUTPUT_LIMIT (0: it has not)
        self.discarded = 0  # bytes dropped while lingering
        self.tick = 0  # the wheel slot it sits in (0: none)
        self.deadline = server.clock() + server.head_timeout  # a new connection must send a request
        server.deadlines.arm(self)
        # per request: the one arriving, the one whose body is being discarded, the one parked or being answered
        self.partial: Optional[PartialHead] = None
        self.started = 0.0  # when the incomplete request's first byte arrived (0: none)
        self.request: Optional[Request] = None
        self.body_left = 0
        self.waiter: Optional[Waiter] = None
        self.grant: Optional[Grant] = None
        self.pending: Optional[asyncio.Task] = None  # an answer being worked out (a release, with Redis)

    async def run(self) -> None:
        """Reads until EOF, error or close; the connection is forgotten only once its socket is closed."""
        reader = self.reader
        try:
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    break
                if self.state != OPEN:  # lingering after an error: what the client still sends is dropped
                    self.discarded += len(data)
                    if self.discarded > LINGER_BYTES:
                        break
                    continue
                self.buf = self.buf + data if self.buf else data
                if self.waiter is not None or self.pending is not None or self.held:
                    if len(self.buf) > (PIPELINE_LIMIT if self.held else PARKED_BUFFER_LIMIT):
                        self.abort()  # a parked request is cancelled at no cost
                        break
                    continue
                self._process()
        except (ConnectionError, OSError):
            pass  # the peer reset the connection: not an error
        except asyncio.CancelledError:
            self.abort()  # the loop is closing: end quietly and at once (3.11 logs a traceback per task otherwise)
        except Exception:
            log.exception("internal error on a connection; closing it")
            self._refuse(HTTPError(500, "internal error"))
        finally:
            self.close()
            try:
                await self.writer.wait_closed()
            except (Exception, asyncio.CancelledError):
                pass
            _drop_transport_cycle(self.writer.transport)
            self.server.forget(self)

    # -- requests ------------------------------------------------------------------------------------------------

    def _process(self) -> None:
        """Answers the complete requests in the buffer, in order (see the class docstring for where it stops)."""
        clock = self.server.clock
        turn_ends = 0.0  # read only once a pipeline has a second request
        while self.state == OPEN:
            if self.body_left:
                taken = min(self.body_left, len(self.buf))
                self.buf = self.buf[taken:]
                self.body_left -= taken
                if self.body_left:
                    self._await_more()
                    return
                request, self.request = self.request, None
                assert request is not None
            elif not self.buf:
                self._idle()
                return
            else:
                try:
                    parsed = parse_request_head(self.buf, self.partial)
                except HTTPError as exc:
                    self._refuse(exc)
                    return
                if parsed is None:
                    if self.partial is None:
                        self.partial = PartialHead()  # from now on each piece is scanned once
                    self._await_more()
                    return
                request, used = parsed
                self.buf, self.partial = self.buf[used:], None
                if request.content_length:
                    if request.expect_continue and not self.buf:
                        self.transport.write(CONTINUE)  # the body will be read: say so, or curl waits a second
                    self.request, self.body_left = request, request.content_length
                    continue
            self.started = 0.0
            if not self._dispatch(request):
                return
            if self.transport.get_write_buffer_size() > OUTPUT_LIMIT:
                self._block()
                return
            if self.buf:
                if not turn_ends:
                    turn_ends = clock() + MAX_TURN
                elif clock() > turn_ends:
                    self.held = True  # other connections get the loop; this one goes on in a moment
                    asyncio.get_running_loop().call_soon(self._resume)
                    return

    def _dispatch(self, request: Request) -> bool:
        """Answers, parks or refuses one request; True when the next pipelined request may be processed."""
        try:
            answer = self.server.respond(request)
        except HTTPError as exc:
            self._refuse(exc, request)
            return self.state == OPEN
        if isinstance(answer, bytes):
            self.transport.write(answer)
            if not request.keep_alive:
                self.close()
                return False
            return True
        if isinstance(answer, int):  # a queue request: park it
            self.waiter = self.server.queue.put(answer, self)
            self.grant = grant_for(request)
        else:  # an answer still being worked out
            self.pending = asyncio.ensure_future(answer)
            self.pending.add_done_callback(lambda task: self._answered(task, request))
        self._hold_deadline()
        return False

    def _answered(self, task: "asyncio.Task[bytes]", request: Request) -> None:
        self.pending = None
        if self.state != OPEN or task.cancelled():
            return
        try:
            self.transport.write(task.result())
        except HTTPError as exc:
            self._refuse(exc, request)
            return
        except Exception:
            log.exception("internal error while answering a request")
            self._refuse(HTTPError(500, "internal error"), request)
            return
        if not request.keep_alive:
            self.close()
        else:
            self._resume()

    def release(self) -> bool:
        """Called by the bucket's worker: writes the grant; False if the client is already gone."""
        if self.state != OPEN or self.transport.is_closing():
            return False
        grant = self.grant
        assert grant is not None
        self.transport.write(grant.response)
        self.grant = self.waiter = None
        if grant.close:
            self.close()
        elif self.buf:
            self.held = True
            asyncio.get_running_loop().call_soon(self._resume)
        else:
            self._idle()
        return True

    def _resume(self) -> None:
        """Goes on with the buffered pipeline after a grant, an answer, a yield or drained output."""
        self.held = False
        if self.state == OPEN and self.waiter is None and self.pending is None:
            self._process()

    def _refuse(self, exc: HTTPError, request: Optional[Request] = None) -> None:
        self.server.refused(exc, self)
        if self.state != OPEN:
            return
        self.transport.write(render_error(exc, request))
        if exc.close or request is None or not request.keep_alive:
            self._linger()

    # -- states and deadlines ------------------------------------------------------------------------------------

    def _idle(self) -> None:
        """Nothing to do until the next request: the keep-alive deadline runs."""
        self.deadline = self.server.clock() + self.server.keepalive_timeout
        self.server.deadlines.arm(self)  # cheap when the slot it sits in comes sooner: it is re-slotted then

    def _await_more(self) -> None:
        """A request is incomplete: its deadline runs from its first byte, however slowly the rest arrives."""
        server = self.server
        if not self.started:
            self.started = server.clock()
        self.deadline = self.started + server.head_timeout
        server.deadlines.arm(self)

    def _hold_deadline(self) -> None:
        """Parked (or awaiting an answer): no deadline, unless earlier answers sit unsent (the client is not reading)."""
        if self.transport.get_write_buffer_size():
            self.deadline = self.server.clock() + self.server.send_timeout
            self.server.deadlines.arm(self)
        else:
            self.deadline = 0.0
            self.server.deadlines.discard(self)

    def _block(self) -> None:
        """Unsent output passed OUTPUT_LIMIT: the pipeline waits until the client reads (checked every tick)."""
        self.held = True
        self.blocked_at = self.server.clock()
        self.deadline = self.blocked_at + self.server.deadlines.tick
        self.server.deadlines.arm(self)

    def _linger(self) -> None:
        """After an error that ends the connection: stop writing, keep reading (and dropping) for a moment, so the
        client reads our answer instead of a reset, then close."""
        self._leave()
        self.state = LINGERING
        self.buf, self.partial, self.body_left = b"", None, 0
        try:
            self.transport.write_eof()
        except (OSError, RuntimeError):
            pass
        self.deadline = self.server.clock() + LINGER_TIMEOUT
        self.server.deadlines.arm(self)

    def expire(self, now: float) -> None:
        """The deadline has passed: what that means depends on the state."""
        self.deadline = 0.0
        if self.state == CLOSED:  # its last bytes were not taken in CLOSE_TIMEOUT
            self.transport.abort()
        elif self.state == LINGERING:
            self.close()
        elif self.blocked_at:
            if self.transport.get_write_buffer_size() <= OUTPUT_LIMIT // 4:
                self.blocked_at = 0.0
                self._resume()
            elif now - self.blocked_at >= self.server.send_timeout:
                self.abort()  # it does not read its answers
            else:
                self.deadline = now + self.server.deadlines.tick
                self.server.deadlines.arm(self)
        elif self.waiter is not None or self.pending is not None:
            if self.transport.get_write_buffer_size():
                self.abort()  # answers left unread for SEND_TIMEOUT: the parked request goes with it, at no cost
        elif self.started or self.buf or self.body_left:
            self._refuse(HTTPError(408, f"request not received within {self.server.head_timeout:g} s"))
        else:
            self.close()  # idle

    def _leave(self) -> None:
        """Takes a parked request out of the line (at no cost) and drops an answer being worked out."""
        if self.waiter is not None and self.server.queue.cancel(self.waiter):
            self.server.stats.requests["cancelled"] += 1
        self.waiter = self.grant = None
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None

    def close(self) -> None:
        """Closes the connection after flushing what was written (aborting if that takes CLOSE_TIMEOUT)."""
        if self.state == CLOSED:
            return
        self._leave()
        self.state = CLOSED
        self.transport.close()
        if self.transport.get_write_buffer_size():
            self.deadline = self.server.clock() + CLOSE_TIMEOUT
            self.server.deadlines.arm(self)
        else:
            self.deadline = 0.0

    def abort(self) -> None:
        """Drops the connection at once, unsent bytes and all."""
        self._leave()
        self.state = CLOSED
        self.deadline = 0.0
        self.transport.abort()

    def shutdown(self) -> None:
        """Server stop: a parked request gets 503 (so the client retries elsewhere or later); everyone is closed."""
        if self.waiter is not None and self.server.queue.cancel(self.waiter):
            self.waiter = None
            self.server.stats.requests["rejected"] += 1
            self.transport.write(render_json(503, {"message": "gateway-queue is shutting down; retry"}, close=True,
                                             head=self.grant is not None and self.grant.head, headers=(("Retry-After", "1"),)))
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


def listening_sockets(host: str, port: int) -> List[socket.socket]:
    """Bound (not yet listening) sockets for HOST and PORT: "::" is one dual-stack socket (IPv6 and IPv4, as other
    servers do), a host name gets one per address. Options set here (TCP keepalive) are inherited by accepted
    sockets, so they cost nothing per connection."""
    if host == "::":
        infos = [(socket.AF_INET6, ("::", port))]
    else:
        infos = list(dict.fromkeys((family, address[:2]) for family, _, _, _, address in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)))
    sockets: List[socket.socket] = []
    try:
        for family, address in infos:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for option, value in zip(("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT"), TCP_KEEPALIVE):
                if hasattr(socket, option):  # Linux; elsewhere the system's keepalive defaults apply
                    sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
            if port == 0 and len(sockets) > 1:  # one port for every address
                address = (address[0], sockets[0].getsockname()[1])
            sock.bind(address)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Throttle:
    """Logs a repeated warning at most once per LOG_EVERY seconds per kind, saying how many were held back."""

    def __init__(self, clock: Clock, every: float = LOG_EVERY):
        self.clock = clock
        self.every = every
        self._last: Dict[str, float] = {}
        self._held: Dict[str, int] = collections.Counter()

    def warning(self, kind: str, message: str, *args: Any) -> None:
        now = self.clock()
        if now - self._last.get(kind, -math.inf) < self.every:
            self._held[kind] += 1
            return
        self._last[kind] = now
        held = self._held.pop(kind, 0)
        log.warning(message + (f" ({held} more like it in the last {self.every:g} s)" if held else ""), *args)


class Server:
    """The service: listener, queue, coordinator, Discord limits and connections. run() is the whole life."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock = time.monotonic,
        head_timeout: float = HEAD_TIMEOUT,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        send_timeout: float = SEND_TIMEOUT,
        refresh_interval: float = REFRESH_INTERVAL,
        max_connections: Optional[int] = None,
        discord_timeout: float = DISCORD_TIMEOUT,
        discord_deadline: float = DISCORD_DEADLINE,
        coordinator: Optional[Coordinator] = None,
    ):
        # server-wide, fixed
        self.config = config
        self.clock = clock
        self.head_timeout = head_timeout
        self.keepalive_timeout = keepalive_timeout
        self.send_timeout = send_timeout
        self.fd_limit = raise_file_limit()
        self.max_connections = max_connections or max(1, (self.fd_limit or 1024) - FD_RESERVE)
        self.started = time.time()
        self.start_time = process_start_time(self.started)
        self._secret_digest = hashlib.sha256(config.auth_token.encode()).digest() if config.auth_token else None
        self.stats = Stats()
        if coordinator is None:
            if config.redis_url:
                coordinator = RedisCoordinator(config, clock=clock, stats=self.stats)
            else:
                coordinator = MemoryCoordinator(config.interval, config.max_concurrency, lease_timeout=config.lease_timeout,
                                                clock=clock, stats=self.stats)
        self.coordinator = coordinator
        self.queue = IdentifyQueue(coordinator, clock=clock, stats=self.stats)
        self.deadlines = Deadlines(clock)
        self.warnings = Throttle(clock)
        self.discord: Optional[DiscordLimits] = None
        if config.token:
            token, api_url = config.token, config.api_url
            self.discord = DiscordLimits(
                coordinator,
                lambda cutter: fetch_gateway_bot(api_url, token, discord_timeout, cutter),
                on_fatal=self._fatal,
                refresh_interval=refresh_interval,
                deadline=discord_deadline,
                stats=self.stats,
            )
            coordinator.on_lost = self.discord.wake
        # server-wide, changing
        self.connections: Set[Connection] = set()
        self.exit_code = 0
        self.addresses: List[Tuple[str, int]] = []
        self._servers: List[asyncio.AbstractServer] = []
        self._tasks: List[asyncio.Task] = []
        self._stopping: Optional[asyncio.Future] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._previous_handler: Any = None
        self._warned_no_shard = False
        self._full = render_error(HTTPError(503, "too many open connections; retry shortly", headers=(("Retry-After", "1"),)))

    @property
    def limits_source(self) -> str:
        """Where the limits in force come from: "discord", "environment" (no token) or "fallback" (not yet known)."""
        if self.discord is None:
            return "environment"
        return "discord" if self.coordinator.known else "fallback"

    async def start(self) -> None:
        """Binds and starts serving; OSError if the address cannot be bound."""
        loop = self._loop = asyncio.get_running_loop()
        self._stopping = loop.create_future()
        sockets = listening_sockets(self.config.host, self.config.port)
        try:
            for sock in sockets:
                self._servers.append(await asyncio.start_server(self._accept, sock=sock, backlog=ACCEPT_BATCH, limit=STREAM_LIMIT))
                sock.listen(LISTEN_BACKLOG)  # the kernel's queue stays long; asyncio accepts ACCEPT_BATCH per turn
        except BaseException:
            for server in self._servers:
                server.close()
            for sock in sockets:
                sock.close()
            raise
        self.addresses = [sock.getsockname()[:2] for sock in sockets]
        self._previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._loop_exception)
        await self.coordinator.start(self.config.hold)
        self.queue.start()
        self._tasks.append(asyncio.ensure_future(self.deadlines.run()))
        if self.discord is not None:
            self._tasks.append(asyncio.ensure_future(self.discord.run()))
        where = ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.addresses)
        source = {
            "environment": f"MAX_CONCURRENCY={self.config.max_concurrency}, no session-start cap (no DISCORD_TOKEN)",
            "fallback": "Discord (max_concurrency 1 until it answers)",
            "discord": "Discord",
        }[self.limits_source]
        log.info(
            "gateway-queue %s listening on %s; limits: %s; identify interval %.3f s; startup hold %.3f s; "
            "lease mode %s; coordination %s; auth %s; connection cap %d",
            VERSION, where, source, self.config.interval, self.config.hold,
            f"on ({self.config.lease_timeout:g} s)" if self.config.lease_timeout else "off", self.coordinator.name,
            "on" if self.config.auth_token else "off", self.max_connections,
        )

    @property
    def port(self) -> int:
        """The bound port (useful with PORT=0)."""
        return self.addresses[0][1]

    @property
    def stopping(self) -> bool:
        return self._stopping is not None and self._stopping.done()

    def request_stop(self, exit_code: int = 0) -> None:
        """Asks run() to stop (signal handlers, fatal errors); a second call changes nothing."""
        self.exit_code = self.exit_code or exit_code
        if self._stopping is not None and not self._stopping.done():
            self._stopping.set_result(None)

    def request_stop_threadsafe(self) -> None:
        """request_stop from a signal handler or another thread; harmless before start and after the loop closed."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self.request_stop)
        except RuntimeError:  # the loop has closed: we are stopping anyway
            pass

    async def wait_stopped(self) -> None:
        """Waits until request_stop() is called."""
        assert self._stopping is not None
        await self._stopping

    async def stop(self) -> None:
        """Stops accepting, answers every parked request 503, closes every connection, flushes for up to 1 s."""
        if self._stopping is not None and not self._stopping.done():
            self._stopping.set_result(None)
        for server in self._servers:
            server.close()
        self.queue.stop()
        for task in self._tasks:
            task.cancel()
        waiting = self.queue.waiting
        for conn in list(self.connections):
            conn.shutdown()
        if waiting:
            log.info("stopped: answered %d parked request(s) 503 so they retry", waiting)
        deadline = time.monotonic() + SHUTDOWN_GRACE
        while time.monotonic() < deadline and any(c.transport.get_write_buffer_size() for c in self.connections):
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.abort()  # whatever is left unflushed after the grace goes now
        for server in self._servers:  # on 3.12+ this also waits for the connections' transports to close
            try:
                await asyncio.wait_for(server.wait_closed(), SHUTDOWN_GRACE)
            except asyncio.TimeoutError:
                pass
        await self.coordinator.stop()
        await asyncio.sleep(0)  # let the transports' close callbacks run
        if self._loop is not None and self._loop.get_exception_handler() == self._loop_exception:
            self._loop.set_exception_handler(self._previous_handler)

    async def run(self) -> int:
        """The process's life: start, serve until request_stop (a signal, a fatal error), stop. The exit code."""
        try:
            await self.start()
        except OSError as exc:
            log.error("cannot listen on %s port %d: %s (check HOST and PORT)", self.config.host, self.config.port, exc.strerror or exc)
            return 1
        await self.wait_stopped()
        await self.stop()
        return self.exit_code

    def _fatal(self, error: DiscordError) -> None:
        log.error("%s: stopping. Fix DISCORD_TOKEN; a bad token is never retried (it counts toward Discord's IP ban)", error)
        self.request_stop(1)

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: Dict[str, Any]) -> None:
        """asyncio's accept loop reports a full descriptor table once per connection it could not accept, with a
        traceback each: here it is one warning per LOG_EVERY. asyncio pauses accepting for a second and resumes."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            self.warnings.warning("descriptors", "cannot accept connections: %s (%d open, limit %d); retrying every "
                                  "second", exc.strerror, len(self.connections), self.fd_limit)
            return
        if self._previous_handler is not None:
            self._previous_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    # -- connections ---------------------------------------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Optional[Awaitable[None]]:
        """start_server's callback. It returns the connection's coroutine rather than awaiting it, so that asyncio
        wraps that coroutine in the connection's task directly: one coroutine frame less per parked request."""
        if len(self.connections) >= self.max_connections or self.stopping:
            if not self.stopping:
                self.stats.connections_refused += 1
                self.warnings.warning("full", "connection cap reached (%d): answering 503 to new connections",
                                      self.max_connections)
            writer.transport.write(self._full)
            writer.transport.close()
            return None
        conn = Connection(self, reader, writer)
        self.connections.add(conn)
        return conn.run()

    def forget(self, conn: Connection) -> None:
        """A connection's socket is closed: it no longer counts."""
        self.connections.discard(conn)
        self.deadlines.discard(conn)

    def refused(self, exc: HTTPError, conn: Connection) -> None:
        """Counts (and for 401, logs, rate-limited) a refused request."""
        self.stats.requests["rejected"] += 1
        self.stats.errors[exc.status] += 1
        if exc.status == 401:
            peer = conn.writer.get_extra_info("peername") or ("?",)
            self.warnings.warning("401", "refused a request without the right AUTH_TOKEN (from %s)", peer[0])

    # -- requests ------------------------------------------------------------------------------------------------

    def respond(self, request: Request) -> "bytes | int | Awaitable[bytes]":
        """What to do with a request: bytes to send now, a shard to park, or an awaitable answer. HTTPError to
        refuse. Only "/" (any query) and requests that carry ?shard= are queued: anything else is a 404, so that a
        stray request (a favicon, a typo) never spends a slot or a session start."""
        path = request.path
        if path in ("/healthz", "/metrics", "/status") and _mentions_shard(request.query):
            # a QUEUE_URL that points here would get a 200 at once, which a client takes for a grant
            raise HTTPError(400, f"{path} is not the queue: shards ask the queue's root, GET /?shard=N (check QUEUE_URL)",
                            close=False)
        if path == "/healthz":
            if request.method not in ("GET", "HEAD"):
                raise HTTPError(405, "/healthz answers GET and HEAD only", close=False, headers=(("Allow", "GET, HEAD"),))
            return self.healthz(request)
        self._authorize(request)
        if path in ("/metrics", "/status"):
            if request.method not in ("GET", "HEAD"):
                raise HTTPError(405, f"{path} answers GET and HEAD only", close=False, headers=(("Allow", "GET, HEAD"),))
            if path == "/metrics":
                return render(200, self.metrics(), content_type=METRICS_TYPE, **response_options(request))
            status = self.status()
            if prefers_html(request.header(b"accept")):
                return render(200, status_html(status), content_type=HTML_TYPE, **response_options(request))
            return render_json(200, status, **response_options(request))
        if path == "/release":
            if request.method != "POST":
                raise HTTPError(405, "/release answers POST only", close=False, headers=(("Allow", "POST"),))
            return self._release(request)
        shard = parse_shard(request.query)
        if shard is None:
            if _mentions_shard(request.query):  # "??shard=1", "x=1;shard=1", "SHARD=1": not shard 0's bucket
                raise HTTPError(400, "a shard is named but not as ?shard=N (check QUEUE_URL for a stray ? or query)",
                                close=False)
            if path != "/":
                raise HTTPError(404, f"nothing at {path[:100]}: ask GET /?shard=N before identifying", close=False)
            shard = 0
            if self.queue.max_concurrency > 1 and not self._warned_no_shard:
                self._warned_no_shard = True
                log.warning("a request without ?shard= was queued as shard 0 (logged once); pass ?shard=<id>")
        return shard

    def _authorize(self, request: Request) -> None:
        if self._secret_digest is None:
            return
        scheme, _, credentials = (request.header(b"authorization") or b"").partition(b" ")
        # Digests of equal length are compared, so timing reveals neither the secret's content nor its length.
        given = hashlib.sha256(credentials.strip(b" ")).digest()
        if not hmac.compare_digest(given, self._secret_digest) or scheme.lower() != b"bearer":
            raise HTTPError(  # and the connection closes: no pipelining, no keep-alive without the secret
                401, "missing or wrong credentials: send Authorization: Bearer <AUTH_TOKEN>", close=True,
                headers=(("WWW-Authenticate", 'Bearer realm="gateway-queue"'),),
            )

    def healthz(self, request: Request) -> bytes:
        """200 while this process can grant; 503 with the reason otherwise, so that load balancers send shards to a
        replica that can. O(1) whatever the number of buckets or parked requests."""
        problem = "shutting down" if self.stopping else self.coordinator.problem()
        if problem is None:
            body = b'{"status": "ok", "waiting": %d, "limits": "%s", "backend": "%s"}\n' % (
                self.queue.waiting, self.limits_source.encode(), self.coordinator.name.encode())
            return render(200, body, **response_options(request))
        return render_json(503, {"status": "unavailable", "reason": problem, "waiting": self.queue.waiting},
                           headers=(("Retry-After", "1"),), **response_options(request))

    async def _release(self, request: Request) -> bytes:
        shard = parse_shard(request.query)
        if shard is None:
            raise HTTPError(400, "POST /release needs ?shard=N", close=False)
        outcome = _query_value(request.query, "outcome") or "ready"
        if outcome not in OUTCOMES:
            raise HTTPError(400, f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome[:40]!r}", close=False)
        try:
            status, body = await self.coordinator.release(shard, outcome)
        except BackendError as exc:
            raise HTTPError(503, f"cannot reach the coordination backend: {exc}; retry", close=False,
                            headers=(("Retry-After", "1"),)) from None
        if status != 200:
            raise HTTPError(status, body["message"], close=False)
        return render_json(200, body, **response_options(request))

    def metrics(self) -> bytes:
        """The /metrics exposition: O(buckets), nothing walked per connection, descriptor or task."""
        queue, stats, coordinator = self.queue, self.stats, self.coordinator
        budget, now = coordinator.budget, self.clock()
        metrics = Metrics()
        metrics.family("gateway_queue_requests_total", "counter",
                       "Queue requests by outcome: granted, cancelled (the client left first), rejected (refused).",
                       [(f'{{outcome="{outcome}"}}', count) for outcome, count in stats.requests.items()])
        metrics.family("gateway_queue_http_errors_total", "counter", "Error responses by HTTP status.",
                       sorted((f'{{status="{status}"}}', count) for status, count in stats.errors.items()))
        metrics.family("gateway_queue_waiting_requests", "gauge", "Requests parked, per bucket.",
                       [(f'{{bucket="{b.index}"}}', len(b.waiters)) for b in queue.buckets])
        metrics.family("gateway_queue_wait_seconds", "histogram", "Time from a request's arrival to its grant.",
                       stats.wait.samples())
        metrics.family("gateway_queue_open_connections", "gauge",
                       "Client connections, counted until their socket is closed.", [("", len(self.connections))])
        metrics.family("gateway_queue_connections_refused_total", "counter",
                       "Connections answered 503 because the connection cap was reached.", [("", stats.connections_refused)])
        metrics.family("gateway_queue_max_concurrency", "gauge", "Buckets in force (Discord's max_concurrency).",
                       [("", coordinator.max_concurrency)])
        metrics.family("gateway_queue_identify_interval_seconds", "gauge", "Minimum time between two grants in a bucket.",
                       [("", coordinator.interval)])
        metrics.family("gateway_queue_limits_info", "gauge", "Where the limits in force come from.",
                       [(f'{{source="{self.limits_source}"}}', 1)])
        metrics.family("gateway_queue_session_start_limit", "gauge", "Session starts allowed per window (Discord's total).",
                       [("", budget.total)] if budget else [])
        metrics.family("gateway_queue_session_starts_remaining", "gauge", "Session starts left before the reset.",
                       [("", budget.remaining)] if budget else [])
        metrics.family("gateway_queue_session_start_reset_seconds", "gauge", "Seconds until the session-start budget resets.",
                       [("", min(max(0.0, budget.reset_at - now), MAX_RESET_AFTER))] if budget else [])
        metrics.family("gateway_queue_discord_requests_total", "counter",
                       "GET /gateway/bot calls by HTTP status (error: no answer).",
                       sorted((f'{{status="{status}"}}', count) for status, count in stats.discord.items()))
        metrics.family("gateway_queue_claims_total", "counter",
                       "The coordinator's answers to the bucket workers, by reason (granted, or why they wait).",
                       sorted((f'{{reason="{reason}"}}', count) for reason, count in stats.claims.items()))
        metrics.family("gateway_queue_backend_up", "gauge", "1 while the coordination backend can grant, else 0.",
                       [(f'{{backend="{coordinator.name}"}}', 0 if coordinator.problem() else 1)])
        metrics.family("gateway_queue_backend_errors_total", "counter", "Failed calls to the coordination backend.",
                       [("", stats.backend_errors)])
        metrics.family("gateway_queue_leases_total", "counter",
                       "Leases ended, by how: ready, invalid_session, closed (the shard reported), timeout, undelivered.",
                       [(f'{{outcome="{outcome}"}}', count) for outcome, count in stats.leases.items()])
        metrics.family("gateway_queue_lease_seconds", "histogram", "How long a lease held its bucket, grant to end.",
                       stats.lease_held.samples())
        process_metrics(metrics, self.start_time)
        return metrics.render()

    def status(self) -> Dict[str, Any]:
        """The /status snapshot: O(buckets), whatever the number of parked requests."""
        queue, coordinator, now = self.queue, self.coordinator, self.clock()
        budget = coordinator.budget
        session_starts = None
        if budget is not None:
            resets_in = max(0.0, budget.reset_at - now)
            session_starts = {"total": budget.total, "remaining": budget.remaining, "resets_in": _finite(resets_in),
                              "resets_at": utc_after(resets_in)}
        buckets = []
        for bucket in queue.buckets:
            wait, why, lease = coordinator.outlook(bucket.index, now)
            buckets.append({"bucket": bucket.index, "waiting": len(bucket.waiters), "next_grant_in": _finite(wait),
                            "waiting_for": why, "lease": lease})
        return {
            "version": VERSION,
            "limits": {"source": self.limits_source, "max_concurrency": coordinator.max_concurrency,
                       "identify_interval": coordinator.interval, "lease_timeout": coordinator.lease_timeout},
            "session_starts": session_starts,
            "backend": {"name": coordinator.name, "problem": coordinator.problem()},
            "waiting": queue.waiting,
            "open_connections": len(self.connections),
            "estimated_drain_seconds": _finite(queue.drain_estimate(now)),
            "buckets": buckets,
            "requests": dict(self.stats.requests),
            "discord_error": self.discord.last_error if self.discord else None,
        }


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

ENVIRONMENT_HELP = """environment (defaults in brackets):
  HOST               bind address; "::" is dual-stack             [127.0.0.1]
  PORT               bind port; 0 picks a free one                [5000]
  DISCORD_TOKEN      bot token: limits come from Discord          [unset: MAX_CONCURRENCY, no daily cap]
  DISCORD_API_URL    Discord's REST base                          [https://discord.com/api/v10]
  MAX_CONCURRENCY    buckets without a token (1-1024)             [1]
  IDENTIFY_INTERVAL  seconds between grants in a bucket (>= 5)    [5.1]
  STARTUP_HOLD       seconds each bucket waits after startup      [IDENTIFY_INTERVAL]
  LEASE_TIMEOUT      lease mode: hold a bucket until READY        [0: off]
  REDIS_URL          replicas share state: redis://, rediss://    [unset: this process alone]
  REDIS_PREFIX       Redis key prefix                             [gateway-queue:<application id>]
  LOG_LEVEL          DEBUG, INFO, WARNING or ERROR                [INFO]
  AUTH_TOKEN         shared secret for every route but /healthz   [unset: no authentication]
A bad value exits 2 with one line naming the variable. See README.md."""


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


def install_signal_handlers(server: Server) -> None:
    """SIGTERM and SIGINT ask the server to stop. Installed with signal.signal for the whole life of the process,
    not the loop's add_signal_handler: asyncio removes those when the loop closes, and a second signal in that
    window would kill the process (exit -15) instead of being ignored (main() ignores them once stopped)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: server.request_stop_threadsafe())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit code (2 for a bad configuration)."""
    parser = argparse.ArgumentParser(
        prog="gateway_queue.py",
        description="An identify queue for Discord bot shards: GET /?shard=N waits until shard N may identify.",
        epilog=ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
        return 1 if args.healthcheck else 2  # Docker reserves a health check's exit code 2
    if args.healthcheck:
        return healthcheck(config)
    try:
        socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        print(f"gateway-queue: HOST {config.host!r} does not resolve to an address to bind: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("asyncio").setLevel(max(logging.INFO, logging.getLevelName(config.log_level)))  # DEBUG: ours only
    server = Server(config)
    install_signal_handlers(server)
    gc.collect()
    gc.freeze()  # what startup made lives as long as the process: no collection needs to look at it again
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    try:
        return asyncio.run(server.run())
    finally:  # stopped: a late signal is ignored (CPython's exit resets a Python handler, not SIG_IGN, to the default)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(main())
