"""Benchmark gateway_queue.py from outside, the way a fleet of shards loads it.

Starts the service as a separate process on loopback, spreads thousands of client connections over several worker
processes (one process may open at most RLIMIT_NOFILE files), and measures what an operator cares about: memory per
parked request, the accept burst, CPU while parked, grant precision, a cancel storm and /healthz throughput. It prints
a table; --json FILE writes the figures. It is a benchmark, not a test: CI does not run it.

    python3 bench_gateway_queue.py                       # sizes 1000, 5000, 15000 (about 2 minutes)
    python3 bench_gateway_queue.py --sizes 2000 --json out.json
    python3 bench_gateway_queue.py --service /tmp/copy/gateway_queue.py --python /usr/bin/python3
    python3 bench_gateway_queue.py --peers               # side by side with aiohttp and two asyncio floors
    python3 bench_gateway_queue.py --ops                 # /metrics, /status, /healthz with 1,000 and 15,000 parked
    python3 bench_gateway_queue.py --profile             # where gateway-queue spends its time per request (py-spy)
    python3 bench_gateway_queue.py --soak 300                # thousands of misbehaving clients for 5 minutes
    python3 bench_gateway_queue.py --faults 120              # a flapping Discord while the budget is spent
    python3 bench_gateway_queue.py --replicas 3 --sizes 3000 # three replicas on one redis-server

--peers, --ops and --profile may be combined in one run; without any of them (and without --soak or --faults) the
default size run is made. --service measures any copy of gateway_queue.py, --python runs it (and the peers) with
another interpreter.

Every figure is taken with a note of how much CPU other processes on the machine used meanwhile (the "other
processes" rows): on a shared machine a figure taken beside someone's test suite is not comparable, and the report
says so. --wait-quiet SECONDS makes each figure wait (up to SECONDS) for a quiet second first.

Side by side (--peers) measures four servers with the same load, each in its own process, pinned to one CPU while
the load runs on another (--no-pin to let the scheduler place them):
    gateway-queue      the copy under test
    aiohttp            the same contract in aiohttp (GET /?shard=N parked per bucket with the interval, /healthz
                       answering JSON at once), run from a throwaway venv that the script makes itself
    Protocol floor     a bare asyncio.Protocol that answers every request with canned bytes: what Python can do
    streams floor      asyncio.start_server with readuntil and canned bytes: what asyncio's streams can do

The script itself uses the standard library only. Third-party tools (aiohttp for the peer, py-spy for --profile) go
into a venv under ~/.cache/gateway-queue-bench (or --cache-dir), created on first use with pip; they are never a
dependency of the service. Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

NEEDS = """\
What it needs:
  open files   the service holds every parked connection, so the hard RLIMIT_NOFILE must exceed the largest
               count asked for by a few hundred: 20,000 for the default 15,000 parked (ulimit -n 20000, or
               docker run --ulimit nofile=20000:20000). With too few the script stops at once and says so.
  wrk          for the /healthz throughput figures (apt-get install -y wrk); without it those are skipped.
  pip          --peers and --profile create a venv and pip-install aiohttp / py-spy into it (first run only).
  2 cores      with --peers the server runs on one CPU and the load on another.
  a quiet box  figures taken while other processes use more than 0.25 cores are flagged; --wait-quiet helps.

How long it takes (2 cores, measured; --wait-quiet adds up to its SECONDS per figure):
  default      about 2 minutes (three sizes of 31 s each, the cancel storm, 5 s of wrk); up to 3 on a busy box
  --peers      about 70 s (+15 s to make the venv on a first run)
  --ops        about 35 s
  --profile    about 15 s (+10 s to add py-spy to the venv on a first run)
  --soak N     N seconds plus up to 35 (clients finish their last wait); --faults N: N seconds plus about 2
  --replicas   about 40 s; needs redis-server (apt-get install -y redis-server)
"""

HERE = os.path.dirname(os.path.abspath(__file__))
SERVICE = os.path.join(HERE, "gateway_queue.py")
BENCH = os.path.abspath(__file__)
CLIENTS_PER_PROCESS = 5000  # a process may open 20,000 files here; keep well below
MAX_CONCURRENCY = 16
INTERVAL = 5.1
PARKED_INTERVAL = 3600.0  # where parked requests must stay parked while measured: the service's largest interval
ROUNDS = 6  # grant rounds watched for precision: 5 gaps per bucket
CLIENT_JITTER = 0.001  # a client notes its answer up to this late, so a gap it sees may look this short; the service's
                       # own log is what says "never early"
FD_MARGIN = 256  # descriptors beyond the connections: the service's own reserve (64), pipes, logs, /proc
BUSY_WARN = 0.25  # cores used by other processes past which a figure is flagged as taken on a shared machine
QUIET_CORES = 0.1  # --wait-quiet waits for a second in which other processes use less than this
LISTEN_BACKLOG = 4096  # what gateway-queue asks of listen(); the peers ask the same, so a burst treats all alike

WRK_CONNECTIONS = 50  # --peers: wrk -t1 -c50
WRK_SECONDS = 5
RUNS = 2  # --peers: each throughput and accept test is run this many times per server; the report gives each and the best
ACCEPT_COUNT = 3000  # --peers: connections in the paced accept test...
ACCEPT_RATE = 1000.0  # ...opened at this steady rate (per second), which every server here keeps up with
PEER_PARKED = 5000  # --peers: parked requests for the memory and CPU-per-parked figures
OPS_SIZES = (1000, 15000)  # --ops: parked counts
OPS_CONCURRENCIES = (16, 1024)  # --ops: MAX_CONCURRENCY values (1024 is the service's largest)
OPS_REPEATS = {"/healthz": 1000, "/status": 200, "/status (HTML)": 100, "/metrics": 200}

AIOHTTP = "aiohttp==3.14.5"  # pinned, so that figures from different days compare
PY_SPY = "py-spy==0.4.3"
CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gateway-queue-bench")


class BenchError(Exception):
    """A condition the operator must fix before the benchmark can run; main() prints it as one line."""


# ----------------------------------------------------------------------------------------------------------------
# The servers under test
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """What is measured: a copy of gateway_queue.py and the interpreter that runs it (the peers use it too)."""

    path: str = SERVICE
    python: str = sys.executable

    def argv(self) -> List[str]:
        return [self.python, self.path]


_VERSIONS: Dict[str, str] = {}


def python_version(python: str) -> str:
    """'CPython 3.11.7' for an interpreter path; BenchError if it does not run."""
    if python not in _VERSIONS:
        try:
            out = subprocess.run([python, "-c", "import platform; print(platform.python_implementation(), platform.python_version())"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            raise BenchError(f"cannot run the interpreter {python}: {exc}") from None
        _VERSIONS[python] = out
    return _VERSIONS[python]


class Service:
    """A server in its own process (gateway_queue.py or a peer), with its log collected and /proc read for RSS and
    CPU. Every server here logs a line containing "listening on 127.0.0.1:PORT" once it is bound to PORT=0."""

    def __init__(self, argv: Sequence[str], cpu: Optional[int] = None, **environ: str):
        env = {"PATH": os.environ.get("PATH", ""), "HOST": "127.0.0.1", "PORT": "0", **environ}
        self.proc = subprocess.Popen(list(argv), env=env, stderr=subprocess.PIPE, text=True)
        if cpu is not None:  # before it starts serving; threads it makes later inherit the mask
            os.sched_setaffinity(self.proc.pid, {cpu})
        self.log: List[str] = []
        for line in self.proc.stderr:  # the startup line names the bound port
            self.log.append(line)
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if match:
                self.banner = line.strip()
                break
        else:
            self.proc.wait()
            tail = " | ".join(line.strip() for line in self.log[-3:]) or "no output"
            raise BenchError(f"{os.path.basename(argv[-1])} did not start (exit code {self.proc.returncode}): {tail}")
        self.port = int(match.group(1))
        threading.Thread(target=self._drain, daemon=True).start()

    @classmethod
    def gateway_queue(cls, target: Target, cpu: Optional[int] = None, **environ: str) -> "Service":
        return cls(target.argv(), cpu, **environ)

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    def rss(self) -> int:
        """Resident set size in bytes."""
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def cpu(self) -> float:
        """User + system CPU seconds so far (all threads; the clock ticks every 1/CLK_TCK s, 10 ms here)."""
        with open(f"/proc/{self.proc.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def get(self, path: str, timeout: float = 10.0) -> Tuple[int, bytes, float]:
        """One GET on a fresh connection: (status, body, seconds)."""
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), body, time.monotonic() - started

    def status(self) -> Dict[str, Any]:
        return json.loads(self.get("/status")[1])

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


class KeepAliveClient:
    """One keep-alive connection for timing requests back to back: a blocking socket and a minimal reader, so the
    client adds little to what it times."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def get(self, path: str, headers: bytes = b"") -> Tuple[int, int, float]:
        """(status, body bytes, seconds from sending the request to its last byte)."""
        started = time.perf_counter()
        self.sock.sendall(b"GET %s HTTP/1.1\r\nHost: bench\r\n%s\r\n" % (path.encode(), headers))
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)\r\ncontent-length: *([0-9]+)", head).group(1))
        while len(rest) < length:
            rest += self._recv()
        self.buf = rest[length:]
        return int(head[9:12]), length, time.perf_counter() - started

    def _recv(self) -> bytes:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("the server closed the keep-alive connection")
        return chunk

    def close(self) -> None:
        self.sock.close()


# ----------------------------------------------------------------------------------------------------------------
# Peers: the same contract in aiohttp, and two asyncio floors (run as `bench_gateway_queue.py --serve KIND`)
# ----------------------------------------------------------------------------------------------------------------

# The floors answer with the bytes gateway-queue sends for /healthz, so all servers move the same bytes.
_CANNED_BODY = b'{"status": "ok", "waiting": 0, "limits": "environment"}'
_CANNED_HEAD = (b"HTTP/1.1 200 OK\r\nServer: floor\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Cache-Control: no-store\r\n" % len(_CANNED_BODY))
CANNED = _CANNED_HEAD + b"\r\n" + _CANNED_BODY
CANNED_CLOSE = _CANNED_HEAD + b"Connection: close\r\n\r\n" + _CANNED_BODY


def _listening(name: str, port: int) -> None:
    print(f"{name} listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)


async def _serve_aiohttp() -> None:
    """The queue's contract written the way an aiohttp user would: one future per parked request in a deque per
    bucket, one worker task per bucket that grants the oldest live one, then sleeps the interval. The client
    leaving cancels its handler (handler_cancellation) and so its future; the worker skips cancelled futures. No
    access log and a 75 s keep-alive, as gateway-queue."""
    from aiohttp import web  # only in the bench venv

    interval = float(os.environ.get("IDENTIFY_INTERVAL", "5.1"))
    concurrency = int(os.environ.get("MAX_CONCURRENCY", "1"))
    loop = asyncio.get_running_loop()
    buckets: List[Deque[asyncio.Future]] = [collections.deque() for _ in range(concurrency)]
    ready = [asyncio.Event() for _ in range(concurrency)]
    counts = {"waiting": 0, "granted": 0, "cancelled": 0}

    async def worker(index: int) -> None:
        waiters, event = buckets[index], ready[index]
        next_at = 0.0
        while True:
            await event.wait()
            if loop.time() < next_at:
                await asyncio.sleep(next_at - loop.time())
            while waiters:
                waiter = waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    next_at = loop.time() + interval
                    break
            if not waiters:
                event.clear()

    async def park(request: web.Request) -> web.Response:
        text = request.query.get("shard", "0")
        if not re.fullmatch(r"[0-9]{1,10}", text):
            return web.json_response({"message": "shard must be a non-negative integer"}, status=400)
        index = int(text) % concurrency
        waiter = loop.create_future()
        buckets[index].append(waiter)
        ready[index].set()
        counts["waiting"] += 1
        try:
            await waiter
        except asyncio.CancelledError:
            counts["cancelled"] += 1
            raise
        finally:
            counts["waiting"] -= 1
        counts["granted"] += 1
        return web.json_response({"message": "You're free to connect now! :)"})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "waiting": counts["waiting"]})

    async def status(request: web.Request) -> web.Response:  # the fields the bench reads from gateway-queue's
        return web.json_response({"waiting": counts["waiting"], "requests": {"granted": counts["granted"],
                                                                             "cancelled": counts["cancelled"]}})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/status", status)
    app.router.add_route("*", "/{tail:.*}", park)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, keepalive_timeout=75.0)
    await runner.setup()
    site = web.TCPSite(runner, os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "0")), backlog=LISTEN_BACKLOG)
    await site.start()
    workers = [asyncio.ensure_future(worker(i)) for i in range(concurrency)]
    import aiohttp

    _listening(f"aiohttp {aiohttp.__version__} peer", runner.addresses[0][1])
    await asyncio.gather(*workers)  # forever: the workers never return


class CannedProtocol(asyncio.Protocol):
    """The Python floor: finds the end of each request head and answers it with canned bytes. Nothing is parsed
    but "Connection: close" (so the accept test can end its connections); no timers, no tasks, no bounds."""

    __slots__ = ("transport", "buf")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        count = buf.count(b"\r\n\r\n")
        if not count:
            self.buf = buf
            return
        end = buf.rfind(b"\r\n\r\n") + 4
        heads, self.buf = buf[:end], buf[end:]
        if b"Connection: close" in heads:
            self.transport.write(CANNED * (count - 1) + CANNED_CLOSE)
            self.transport.close()
        else:
            self.transport.write(CANNED * count)


async def _canned_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The streams floor's connection: readuntil the end of a head, write canned bytes, until EOF or close."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if b"Connection: close" in head:
                writer.write(CANNED_CLOSE)
                break
            writer.write(CANNED)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


async def _serve_floor(kind: str) -> None:
    loop = asyncio.get_running_loop()
    host, port = os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "0"))
    if kind == "protocol":
        server = await loop.create_server(CannedProtocol, host, port, backlog=LISTEN_BACKLOG)
    else:
        server = await asyncio.start_server(_canned_stream, host, port, backlog=LISTEN_BACKLOG)
    _listening(f"{kind} floor", server.sockets[0].getsockname()[1])
    await asyncio.Event().wait()


PEER_KINDS = ("aiohttp", "protocol", "streams")


def serve_peer(kind: str) -> int:
    """`--serve KIND`: runs one peer until SIGTERM (which ends it with the default action)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(_serve_aiohttp() if kind == "aiohttp" else _serve_floor(kind))
    return 0


@dataclasses.dataclass(frozen=True)
class Peer:
    """One server of the side-by-side run: how to start it and whether it can park a request."""

    name: str
    argv: List[str]
    python: str
    parks: bool


def bench_venv(base_python: str, requirements: Sequence[str], cache_dir: str = CACHE_DIR) -> str:
    """The bench's own venv for third-party tools, made from base_python and kept in cache_dir (one per interpreter),
    with `requirements` pip-installed once. Returns its bin directory; BenchError with pip's last line if it fails."""
    version = python_version(base_python).split()[-1]
    key = hashlib.sha256(os.path.realpath(base_python).encode()).hexdigest()[:8]
    home = os.path.join(cache_dir, f"venv-{version}-{key}")
    bindir = os.path.join(home, "bin")
    marker = os.path.join(home, "bench-installed.txt")
    try:
        with open(marker) as installed:
            have = set(installed.read().split())
    except OSError:
        have = set()
    missing = [r for r in requirements if r not in have]
    if not missing:
        return bindir

    def run(argv: List[str], what: str) -> None:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        if done.returncode:
            last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
            raise BenchError(f"{what} failed: {last}")

    if not os.path.exists(os.path.join(bindir, "python")):
        print(f"creating the bench venv {home} ...", file=sys.stderr)
        os.makedirs(cache_dir, exist_ok=True)
        run([base_python, "-m", "venv", home], f"{base_python} -m venv")
    print(f"pip install {' '.join(missing)} into {home} ...", file=sys.stderr)
    run([os.path.join(bindir, "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", *missing], "pip install")
    with open(marker, "w") as installed:
        installed.write("\n".join(sorted(have | set(missing))) + "\n")
    return bindir


# ----------------------------------------------------------------------------------------------------------------
# The machine: other processes' load, which spoils a figure
# ----------------------------------------------------------------------------------------------------------------


class Contention:
    """How much CPU other processes on the machine used while a figure was measured: the machine's user + system
    time (/proc/stat) less this bench's own and its children's (the service, peers, client workers, wrk). A
    figure taken while others used a good part of a core is not comparable; the reports show this beside each."""

    def __init__(self) -> None:
        self.start = self.snapshot()

    @staticmethod
    def snapshot() -> Tuple[float, float, float]:
        """(monotonic time, machine CPU-s, this bench's CPU-s including children alive or reaped)."""
        ticks = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
        machine = (int(fields[1]) + int(fields[2]) + int(fields[3])) / ticks
        times = os.times()
        ours = times.user + times.system + times.children_user + times.children_system
        me = str(os.getpid())
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or pid == me:
                continue
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    rest = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            if rest[1] == me:  # a live child: its CPU so far (once reaped, os.times counts all of it)
                ours += (int(rest[11]) + int(rest[12])) / ticks
        return time.monotonic(), machine, ours

    def cores(self) -> float:
        """Other processes' CPU since this was made, in cores (CPU-s per second); 0 when none."""
        now, machine, ours = self.snapshot()
        then, machine0, ours0 = self.start
        return max(0.0, ((machine - machine0) - (ours - ours0)) / max(1e-9, now - then))

    wait_limit = 0.0  # --wait-quiet: how long settle() may wait, in seconds (0: not at all)

    @classmethod
    def settle(cls) -> None:
        """Before a figure: waits (up to wait_limit) for a second in which other processes use under QUIET_CORES."""
        deadline = time.monotonic() + cls.wait_limit
        told = False
        while time.monotonic() < deadline:
            probe = cls()
            time.sleep(1.0)
            other = probe.cores()
            if other < QUIET_CORES:
                return
            if not told:
                print(f"  waiting for the machine to quiet down (other processes use {other:.2f} cores)...", file=sys.stderr)
                told = True


# ----------------------------------------------------------------------------------------------------------------
# Client worker processes
# ----------------------------------------------------------------------------------------------------------------


def clients_per_process() -> int:
    """Connections one worker process holds: CLIENTS_PER_PROCESS, or fewer where the descriptor limit is lower."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return CLIENTS_PER_PROCESS if hard == resource.RLIM_INFINITY else max(100, min(CLIENTS_PER_PROCESS, hard - 100))


class ParkedClient(asyncio.Protocol):
    """One shard: sends its request on connect and notes when (and with what status) the answer arrives."""

    def __init__(self, worker: "ClientWorker", shard: int):
        self.worker = worker
        self.shard = shard
        self.transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(b"GET /?shard=%d HTTP/1.1\r\nHost: bench\r\n\r\n" % self.shard)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        status = int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else 0
        self.worker.answers.append((self.shard, time.monotonic(), status))

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.worker.open.discard(self)


@dataclasses.dataclass(frozen=True)
class Pace:
    """A steady schedule shared by several workers: connection i of the whole run starts at start + i / rate; a
    worker takes every stride-th one from offset."""

    rate: float
    start: float  # time.monotonic(), which is one clock for every process on Linux
    offset: int = 0
    stride: int = 1

    def at(self, j: int) -> float:
        return self.start + (self.offset + j * self.stride) / self.rate


class ClientWorker:
    """Runs in a child process: obeys commands from the pipe (load, hit, answers, close)."""

    def __init__(self, pipe: Any, port: int):
        self.pipe = pipe
        self.port = port
        self.open: "set[ParkedClient]" = set()
        self.answers: List[Tuple[int, float, int]] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        commands: asyncio.Queue = asyncio.Queue()

        def receive() -> None:
            try:
                commands.put_nowait(self.pipe.recv())
            except (EOFError, OSError):  # the bench is gone: so is this worker
                loop.remove_reader(self.pipe.fileno())
                commands.put_nowait(("exit", None))

        loop.add_reader(self.pipe.fileno(), receive)
        while True:
            command, argument = await commands.get()
            if command == "load":
                self.pipe.send(await self.load(*argument))
            elif command == "hit":
                self.pipe.send(await self.hit(*argument))
            elif command == "answers":
                self.pipe.send(self.answers)
                self.answers = []
            elif command == "close":
                for client in list(self.open):
                    client.transport.close()
                self.open.clear()
                self.pipe.send(True)
            elif command == "exit":
                return

    async def load(self, shards: Sequence[int], pace: Optional[Pace] = None) -> Dict[str, Any]:
        """Opens one parked connection per shard: all at once, or on the pace's schedule."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        slowest = 0.0

        async def one(j: int, shard: int) -> Any:
            nonlocal slowest
            if pace is not None:
                await asyncio.sleep(max(0.0, pace.at(j) - time.monotonic()))
            began = time.monotonic()
            result = await loop.create_connection(lambda: ParkedClient(self, shard), "127.0.0.1", self.port)
            slowest = max(slowest, time.monotonic() - began)
            return result

        results = await asyncio.gather(*(one(j, s) for j, s in enumerate(shards)), return_exceptions=True)
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        for result in results:
            if not isinstance(result, BaseException):
                self.open.add(result[1])
        return {"connected": len(shards) - len(errors), "errors": errors[:5], "seconds": time.monotonic() - started,
                "slowest_connect_s": slowest}

    async def hit(self, count: int, pace: Pace, path: str) -> Dict[str, Any]:
        """count connections on the pace's schedule; each sends one GET path with Connection: close and reads to EOF."""
        request = b"GET %s HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n" % path.encode()
        connects: List[float] = []
        totals: List[float] = []
        statuses: Dict[str, int] = {}
        errors: List[str] = []
        started = time.monotonic()

        async def one(j: int) -> None:
            await asyncio.sleep(max(0.0, pace.at(j) - time.monotonic()))
            began = time.monotonic()
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                connects.append(time.monotonic() - began)
                writer.write(request)
                data = await reader.read()
                writer.close()
            except OSError as exc:
                errors.append(repr(exc))
                return
            totals.append(time.monotonic() - began)
            status = data[9:12].decode("latin-1") if data.startswith(b"HTTP/1.") else "malformed"
            statuses[status] = statuses.get(status, 0) + 1

        await asyncio.gather(*(one(j) for j in range(count)))
        return {"done": len(totals), "errors": errors[:5], "error_count": len(errors), "statuses": statuses,
                "seconds": time.monotonic() - started, "connects": connects, "totals": totals}


def _worker_main(pipe: Any, port: int, cpu: Optional[int]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    asyncio.run(ClientWorker(pipe, port).run())


class ClientPool:
    """Several worker processes, each holding up to clients_per_process() connections; optionally pinned to a CPU."""

    def __init__(self, port: int, processes: int, cpu: Optional[int] = None):
        context = multiprocessing.get_context("fork")
        self.pipes = []
        self.procs = []
        for _ in range(processes):
            parent, child = context.Pipe()
            proc = context.Process(target=_worker_main, args=(child, port, cpu), daemon=True)
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)

    @classmethod
    def for_count(cls, port: int, count: int, cpu: Optional[int] = None) -> "ClientPool":
        return cls(port, max(1, math.ceil(count / clients_per_process())), cpu)

    def ask(self, command: str, arguments: Optional[List[Any]] = None) -> List[Any]:
        for pipe, argument in zip(self.pipes, arguments or [None] * len(self.pipes)):
            pipe.send((command, argument))
        return [pipe.recv() for pipe in self.pipes]

    def load(self, shards: Sequence[int], rate: Optional[float] = None) -> List[Dict[str, Any]]:
        """Parks one connection per shard, spread over the workers: all at once, or `rate` per second in all."""
        n = len(self.pipes)
        start = time.monotonic() + 0.1
        paces = [Pace(rate, start, i, n) if rate else None for i in range(n)]
        return self.ask("load", [(list(shards[i::n]), paces[i]) for i in range(n)])

    def hit(self, count: int, rate: float, path: str = "/healthz") -> List[Dict[str, Any]]:
        n = len(self.pipes)
        start = time.monotonic() + 0.1
        return self.ask("hit", [(len(range(i, count, n)), Pace(rate, start, i, n), path) for i in range(n)])

    def answers(self) -> List[Tuple[int, float, int]]:
        return sorted(a for part in self.ask("answers") for a in part)

    def close_all(self) -> None:
        self.ask("close")

    def stop(self) -> None:
        for pipe in self.pipes:
            pipe.send(("exit", None))
        for proc in self.procs:
            proc.join(5)


# ----------------------------------------------------------------------------------------------------------------
# Measurements: the size run (default)
# ----------------------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def wait_until_parked(service: Service, count: int, started: float, timeout: float = 60.0) -> float:
    """Polls /status until waiting + granted == count; returns the time since `started`."""
    while time.monotonic() - started < timeout:
        status = service.status()
        if status["waiting"] + status["requests"]["granted"] >= count:
            return time.monotonic() - started
        time.sleep(0.01)
    raise RuntimeError(f"only {status['waiting'] + status['requests']['granted']} of {count} parked after {timeout} s")


def lateness(answers: Sequence[Tuple[int, float, int]], max_concurrency: int, interval: float, after: float) -> Dict[str, Any]:
    """Per bucket, the gaps between consecutive grants as seen by the clients, minus the interval. Only grants
    received after `after` count: while the clients are still opening thousands of connections, they note an
    answer late, which would make the next gap look short."""
    by_bucket: Dict[int, List[float]] = {}
    for shard, at, status in answers:
        if status == 200 and at >= after:
            by_bucket.setdefault(shard % max_concurrency, []).append(at)
    late = []
    for times in by_bucket.values():
        times.sort()
        late.extend(b - a - interval for a, b in zip(times, times[1:]))
    late.sort()
    if not late:
        return {"gaps": 0}
    return {
        "gaps": len(late),
        "p50_ms": 1000 * statistics.median(late),
        "p99_ms": 1000 * percentile(late, 99),
        "worst_ms": 1000 * late[-1],
        "earliest_ms": 1000 * late[0],
        "early": sum(1 for x in late if x < 0),
        "short": sum(1 for x in late if x < -CLIENT_JITTER),
    }


def log_lateness(lines: Sequence[str], max_concurrency: int, interval: float) -> Dict[str, Any]:
    """The same figures as lateness(), from the service's DEBUG grant log: its own monotonic clock when each grant
    was written, so a client that notes an answer late (a busy machine) cannot make a gap look short."""
    by_bucket: Dict[int, List[float]] = {}
    for line in lines:
        match = re.search(r"granted shard (\d+) \(bucket \d+ of \d+\) at ([0-9.]+)", line)
        if match:
            by_bucket.setdefault(int(match.group(1)) % max_concurrency, []).append(float(match.group(2)))
    late = sorted(b - a - interval for times in by_bucket.values() for a, b in zip(sorted(times), sorted(times)[1:]))
    if not late:
        return {"gaps": 0}
    return {"gaps": len(late), "p50_ms": 1000 * statistics.median(late), "p99_ms": 1000 * percentile(late, 99),
            "worst_ms": 1000 * late[-1], "earliest_ms": 1000 * late[0], "early": sum(1 for x in late if x < 0)}


def measure_size(target: Target, count: int, rounds: int = ROUNDS, storm: bool = False) -> Dict[str, Any]:
    """Loads `count` parked requests into a fresh service and measures it; with storm, also the cancel storm and a
    second load-and-storm cycle. The service logs at DEBUG, which adds one line per grant and nothing else."""
    service = Service.gateway_queue(target, MAX_CONCURRENCY=str(MAX_CONCURRENCY), IDENTIFY_INTERVAL=str(INTERVAL),
                                    LOG_LEVEL="DEBUG")
    pool = ClientPool.for_count(service.port, count)
    result: Dict[str, Any] = {"parked": count}
    Contention.settle()
    busy = Contention()
    try:
        time.sleep(0.5)
        service.get("/healthz")
        baseline = service.rss()
        loaded_at = time.monotonic()
        loads = pool.load(range(count))
        burst = wait_until_parked(service, count, loaded_at)
        clients_idle = time.monotonic()
        result["accept_burst_s"] = burst
        result["connect_errors"] = sum(len(part["errors"]) for part in loads)
        rss_parked = service.rss()
        result["rss_baseline_mib"] = baseline / 2**20
        result["rss_parked_mib"] = rss_parked / 2**20
        result["bytes_per_parked"] = (rss_parked - baseline) / count
        cpu_before = service.cpu()
        time.sleep(10)
        result["cpu_parked_10s"] = service.cpu() - cpu_before
        remaining = clients_idle + rounds * INTERVAL + 0.5 - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
        answers = pool.answers()
        result["precision"] = lateness(answers, MAX_CONCURRENCY, INTERVAL, clients_idle)
        result["log_precision"] = log_lateness(service.log, MAX_CONCURRENCY, INTERVAL)
        result["grants"] = sum(1 for a in answers if a[2] == 200)
        if storm:
            result.update(cancel_storm(service, pool, answers, count))
        result["fds_end"] = service.fds()
    finally:
        pool.stop()
        result["exit_code"] = service.stop()
        result["other_cores"] = busy.cores()
    return result


class BenchRedis:
    """A throwaway redis-server on a free loopback port, without persistence; INFO read over a raw socket."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise BenchError("--replicas needs redis-server (apt-get install -y redis-server)")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.info("server")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError("redis-server did not start")
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def info(self, section: str) -> Dict[str, str]:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(f"INFO {section}\r\n".encode())
            data = b""
            while not data.startswith(b"$") or len(data) < data.index(b"\r\n") + 2 + int(data[1:data.index(b"\r\n")]):
                chunk = sock.recv(65536)
                if not chunk:
                    raise OSError("redis closed the connection")
                data += chunk
        lines = data.split(b"\r\n", 1)[1].decode().splitlines()
        return dict(line.split(":", 1) for line in lines if ":" in line)

    def calls(self) -> Dict[str, int]:
        """Commands processed so far, by name (INFO commandstats)."""
        out = {}
        for key, value in self.info("commandstats").items():
            out[key.replace("cmdstat_", "")] = int(re.search(r"calls=(\d+)", value).group(1))
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def measure_replicas(target: Target, replicas: int, count: int, rounds: int = ROUNDS) -> Dict[str, Any]:
    """`replicas` services on one Redis, `count` parked requests spread over them (shard i asks replica i % N, so
    every bucket's line is split between all of them). Lateness comes from the replicas' grant logs merged: one
    machine, one CLOCK_MONOTONIC. Redis's own command counts give the calls per grant."""
    redis = BenchRedis()
    services: List[Service] = []
    pools: List[ClientPool] = []
    result: Dict[str, Any] = {"replicas": replicas, "parked": count}
    Contention.settle()
    busy = Contention()
    try:
        for _ in range(replicas):
            services.append(Service.gateway_queue(target, MAX_CONCURRENCY=str(MAX_CONCURRENCY), IDENTIFY_INTERVAL=str(INTERVAL),
                                                  LOG_LEVEL="DEBUG", REDIS_URL=redis.url, REDIS_PREFIX="bench"))
        time.sleep(INTERVAL + 0.5)  # past the group's first hold (a new Redis: every bucket waits one interval)
        baselines = []
        for service in services:
            service.get("/healthz")
            baselines.append(service.rss())
        shares = [list(range(i, count, replicas)) for i in range(replicas)]
        pools = [ClientPool.for_count(service.port, len(share)) for service, share in zip(services, shares)]
        loaded_at = time.monotonic()
        for pool, share in zip(pools, shares):
            pool.load(share)
        for service, share in zip(services, shares):
            wait_until_parked(service, len(share), loaded_at)
        clients_idle = time.monotonic()
        result["accept_burst_s"] = clients_idle - loaded_at
        result["bytes_per_parked"] = statistics.mean((service.rss() - base) / len(share)
                                                     for service, base, share in zip(services, baselines, shares))
        calls_before, grants_before = redis.calls(), sum(len(grant_lines(s.log)) for s in services)
        time.sleep(max(0.0, clients_idle + rounds * INTERVAL + 0.5 - time.monotonic()))
        calls_after, grants_after = redis.calls(), sum(len(grant_lines(s.log)) for s in services)
        granted = grants_after - grants_before
        spent = {name: calls_after[name] - calls_before.get(name, 0) for name in calls_after}
        result["grants_measured"] = granted
        result["redis_calls"] = {name: n for name, n in sorted(spent.items()) if n}
        result["redis_calls_per_grant"] = sum(spent.values()) / granted if granted else None
        result["evalsha_per_grant"] = spent.get("evalsha", 0) / granted if granted else None
        merged = [line for service in services for line in service.log]
        result["log_precision"] = log_lateness(merged, MAX_CONCURRENCY, INTERVAL)
        by_replica = collections.Counter()
        for index, service in enumerate(services):
            by_replica[index] = len(grant_lines(service.log))
        result["grants_by_replica"] = [by_replica[i] for i in range(replicas)]
    finally:
        for pool in pools:
            pool.stop()
        result["exit_codes"] = [service.stop() for service in services]
        redis.stop()
        result["other_cores"] = busy.cores()
    return result


def grant_lines(lines: Sequence[str]) -> List[str]:
    return [line for line in lines if "granted shard" in line]


def replicas_report(result: Dict[str, Any]) -> str:
    precision = result["log_precision"]
    rows = [
        ("replicas on one redis-server", f"{result['replicas']}", ""),
        ("parked requests (all replicas)", f"{result['parked']:,}", ""),
        ("accept burst, until all parked (s)", fmt(result["accept_burst_s"]), ""),
        ("RSS per parked request, mean of replicas (bytes)", f"{result['bytes_per_parked']:.0f}", "as one process"),
        ("grant lateness p50 / p99 / worst (ms)",
         f"{fmt(precision.get('p50_ms'))} / {fmt(precision.get('p99_ms'))} / {fmt(precision.get('worst_ms'))}", "p99 <= 5"),
        ("grants early (gap under the interval)", fmt(precision.get("early")), "0"),
        ("earliest gap vs interval (ms)", fmt(precision.get("earliest_ms")), ">= 0"),
        ("gaps measured (merged grant logs)", fmt(precision.get("gaps")), ""),
        ("grants by replica", " / ".join(str(n) for n in result["grants_by_replica"]), ""),
        ("Redis commands per grant, all", fmt(result["redis_calls_per_grant"]), ""),
        ("Redis EVALSHA per grant", fmt(result["evalsha_per_grant"]), ""),
        ("other processes' CPU meanwhile (cores)", fmt(result["other_cores"]), f"<= {BUSY_WARN}"),
    ]
    lines = [f"{label:<52}{value:>16}   {target}" for label, value, target in rows]
    lines.append("Redis commands while measuring: " + ", ".join(f"{k} {v}" for k, v in result["redis_calls"].items()))
    return "\n".join(lines + busy_warning([result["other_cores"]]))


def cancel_storm(service: Service, pool: ClientPool, answers: List[Tuple[int, float, int]], count: int) -> Dict[str, Any]:
    """Every parked client closes at once; /healthz must keep answering, and the next grant must be on time.
    Then a second load-and-storm cycle, to see whether RSS keeps growing."""
    out: Dict[str, Any] = {}
    last_grant = max(at for shard, at, status in answers if status == 200 and shard % MAX_CONCURRENCY == 0)
    rss_before = service.rss()
    probe: List[float] = []
    stop = threading.Event()

    def prober() -> None:
        while not stop.is_set():
            probe.append(service.get("/healthz")[2])
            time.sleep(0.02)

    thread = threading.Thread(target=prober)
    thread.start()
    storm_at = time.monotonic()
    pool.close_all()
    deadline = time.monotonic() + 30
    while service.status()["waiting"] and time.monotonic() < deadline:
        time.sleep(0.01)
    out["storm_drained_s"] = time.monotonic() - storm_at
    time.sleep(0.5)
    stop.set()
    thread.join()
    out["healthz_worst_during_storm_s"] = max(probe)
    # the next grant for bucket 0: due one interval after its last grant, or at once if that has passed
    due = max(time.monotonic(), last_grant + INTERVAL)
    status = service.get("/?shard=0")[0]
    out["next_grant_late_ms"] = 1000 * (time.monotonic() - due) if status == 200 else None
    time.sleep(1)
    out["rss_after_storm1_mib"] = service.rss() / 2**20
    out["rss_storm1_parked_mib"] = rss_before / 2**20
    # second cycle
    granted = service.status()["requests"]["granted"]
    started = time.monotonic()
    loads = pool.load(range(count))
    connected = sum(part["connected"] for part in loads)
    out["cycle2_connect_errors"] = [error for part in loads for error in part["errors"]][:5]
    out["cycle2_accept_burst_s"] = wait_until_parked(service, connected + granted, started)
    out["rss_cycle2_parked_mib"] = service.rss() / 2**20
    pool.close_all()
    while service.status()["waiting"] and time.monotonic() < deadline + 60:
        time.sleep(0.01)
    time.sleep(1)
    out["rss_after_storm2_mib"] = service.rss() / 2**20
    out["rss_growth_cycle2_pct"] = 100 * (out["rss_after_storm2_mib"] / out["rss_after_storm1_mib"] - 1)
    out["rss_parked_growth_cycle2_pct"] = 100 * (out["rss_cycle2_parked_mib"] / out["rss_storm1_parked_mib"] - 1)
    return out


def healthz_throughput(target: Target, seconds: int = WRK_SECONDS) -> Dict[str, Any]:
    """The size run's throughput figure: wrk -t1 -c32 on /healthz, neither side pinned (as the README's figure)."""
    service = Service.gateway_queue(target)
    try:
        time.sleep(0.3)
        busy = Contention()
        return {**run_wrk(service.port, connections=32, seconds=seconds), "other_cores": busy.cores()}
    finally:
        service.stop()


def machine(target: Target) -> Dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[1], "service": target.path,
            "service_python": f"{python_version(target.python)} ({target.python})"}


# ----------------------------------------------------------------------------------------------------------------
# Load tools: wrk, the paced accept test, listen-queue drops
# ----------------------------------------------------------------------------------------------------------------


def _latency_ms(text: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text).groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(port: int, path: str = "/healthz", connections: int = WRK_CONNECTIONS, seconds: int = WRK_SECONDS,
            cpu: Optional[int] = None) -> Dict[str, Any]:
    """wrk -t1 -cN -dSs --latency against a loopback port; "skipped" says why when wrk is not installed."""
    wrk = shutil.which("wrk")
    command = f"wrk -t1 -c{connections} -d{seconds}s"
    if wrk is None:
        return {"wrk": command, "skipped": "wrk is not installed (apt-get install -y wrk)"}
    pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    Contention.settle()
    busy = Contention()
    done = subprocess.run([wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", f"http://127.0.0.1:{port}{path}"],
                          capture_output=True, text=True, timeout=seconds + 30, preexec_fn=pin)
    out = done.stdout
    rps = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    p50 = re.search(r"^\s+50%\s+(\S+)$", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)$", out, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if rps is None:
        return {"wrk": command, "skipped": f"wrk gave no figures: {(done.stderr or out).strip()[:200]}"}
    return {
        "wrk": command,
        "requests_per_s": float(rps.group(1)),
        "requests": int(total.group(1)) if total else None,
        "p50_ms": _latency_ms(p50.group(1)) if p50 else None,
        "p99_ms": _latency_ms(p99.group(1)) if p99 else None,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(1).strip() if errors else "none",
        "other_cores": busy.cores(),
    }


def listen_drops() -> int:
    """The kernel's count of connections dropped at a full listen queue (TcpExt ListenDrops, which includes
    ListenOverflows), for this network namespace: a dropped SYN costs the client a 1 s retransmit."""
    with open("/proc/net/netstat") as netstat:
        lines = netstat.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], (int(v) for v in values.split()[1:])))
            return table.get("ListenDrops", table.get("ListenOverflows", 0))
    return 0


def accept_cost(service: Service, count: int, rate: float, cpu: Optional[int]) -> Dict[str, Any]:
    """CPU of the server per connection when `count` connections arrive at a steady `rate`, each sending one
    /healthz with Connection: close and reading to EOF. The server's CPU is read just before and after, and
    nothing else talks to it meanwhile, so the figure is accept + read + answer + close, nothing more."""
    pool = ClientPool(service.port, 1, cpu)
    try:
        time.sleep(0.2)
        Contention.settle()
        drops, used, busy = listen_drops(), service.cpu(), Contention()
        result = pool.hit(count, rate)[0]
        used, drops, other = service.cpu() - used, listen_drops() - drops, busy.cores()
    finally:
        pool.stop()
    return {
        "connections": result["done"], "rate": rate, "seconds": result["seconds"],
        "cpu_us_per_connection": 1e6 * used / max(1, result["done"]), "cpu_s": used,
        "syn_drops": drops, "errors": result["error_count"], "statuses": result["statuses"], "other_cores": other,
        "connect_p99_ms": 1000 * percentile(result["connects"], 99) if result["connects"] else None,
        "slowest_connect_ms": 1000 * max(result["connects"]) if result["connects"] else None,
        "request_p99_ms": 1000 * percentile(result["totals"], 99) if result["totals"] else None,
    }


def parked_cost(service: Service, count: int, rate: float, cpu: Optional[int]) -> Dict[str, Any]:
    """`count` requests parked at a steady `rate` into a fresh server (MAX_CONCURRENCY=16, an interval long enough
    that only the first 16 are granted): its CPU per parked connection (accept, read, parse, park) and its RSS
    growth per parked request."""
    pool = ClientPool.for_count(service.port, count, cpu)
    try:
        time.sleep(0.3)
        service.get("/healthz")
        time.sleep(0.2)
        Contention.settle()
        baseline, drops, used, busy = service.rss(), listen_drops(), service.cpu(), Contention()
        started = time.monotonic()
        loads = pool.load(range(count), rate=rate)
        time.sleep(0.3)  # the last requests are read and parked; /status is polled only after the CPU is read
        used, drops, other = service.cpu() - used, listen_drops() - drops, busy.cores()
        connected = sum(part["connected"] for part in loads)
        wait_until_parked(service, connected, started)
        rss = service.rss()
        status = service.status()
    finally:
        pool.stop()
    return {
        "parked": status["waiting"], "granted": status["requests"]["granted"], "connected": connected, "rate": rate,
        "other_cores": other,
        "cpu_us_per_parked": 1e6 * used / max(1, connected), "syn_drops": drops,
        "slowest_connect_ms": 1000 * max(part["slowest_connect_s"] for part in loads),
        "errors": [error for part in loads for error in part["errors"]][:3],
        "rss_baseline_mib": baseline / 2**20, "rss_parked_mib": rss / 2**20,
        "bytes_per_parked": (rss - baseline) / max(1, connected),
    }


# ----------------------------------------------------------------------------------------------------------------
# Side by side (--peers)
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PeerOptions:
    """How the side-by-side run loads each server."""

    server_cpu: Optional[int]
    client_cpu: Optional[int]
    wrk_connections: int = WRK_CONNECTIONS
    wrk_seconds: int = WRK_SECONDS
    runs: int = RUNS
    accept_count: int = ACCEPT_COUNT
    accept_rate: float = ACCEPT_RATE
    parked: int = PEER_PARKED


def pinning(enabled: bool) -> Tuple[Optional[int], Optional[int]]:
    """(server CPU, client CPU): two different CPUs this process may use, or (None, None)."""
    cpus = sorted(os.sched_getaffinity(0))
    if not enabled or len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


def make_peers(target: Target, cache_dir: str) -> Tuple[List[Peer], List[str]]:
    """The four servers, and notes on any that cannot run (the aiohttp venv could not be made)."""
    python = target.python
    peers = [Peer("gateway-queue", target.argv(), python, parks=True)]
    notes = []
    try:
        venv_python = os.path.join(bench_venv(python, [AIOHTTP], cache_dir), "python")
        peers.append(Peer("aiohttp", [venv_python, BENCH, "--serve", "aiohttp"], venv_python, parks=True))
    except (BenchError, OSError, subprocess.SubprocessError) as exc:
        notes.append(f"aiohttp peer skipped: {exc}")
    peers.append(Peer("Protocol floor", [python, BENCH, "--serve", "protocol"], python, parks=False))
    peers.append(Peer("streams floor", [python, BENCH, "--serve", "streams"], python, parks=False))
    return peers, notes


PEER_ENVIRON = {"MAX_CONCURRENCY": str(MAX_CONCURRENCY), "IDENTIFY_INTERVAL": str(PARKED_INTERVAL)}


def side_by_side(target: Target, options: PeerOptions, cache_dir: str) -> Dict[str, Any]:
    """--peers: every server under the same loads, in one run. All four servers are up at once (an idle one costs
    nothing) and the wrk runs go round them in turn, so a slow spell on the machine spreads over all of them
    rather than landing on one. Then the accept test on each; then, for those that park, the parked test in a
    fresh process, so that its RSS baseline is a new server's."""
    peers, notes = make_peers(target, cache_dir)
    results = {peer.name: {"name": peer.name, "python": python_version(peer.python), "wrk": [], "accept": []} for peer in peers}
    services: Dict[str, Service] = {}
    try:
        for peer in peers:
            services[peer.name] = service = Service(peer.argv, options.server_cpu, **PEER_ENVIRON)
            results[peer.name]["banner"] = service.banner
        time.sleep(0.3)
        for peer in peers:
            results[peer.name]["healthz_check"] = services[peer.name].get("/healthz")[0]
        for round_ in range(options.runs):
            for peer in peers:
                print(f"  wrk run {round_ + 1}: {peer.name}", file=sys.stderr)
                service = services[peer.name]
                used = service.cpu()
                run = run_wrk(service.port, "/healthz", options.wrk_connections, options.wrk_seconds, options.client_cpu)
                if run.get("requests"):
                    run["cpu_us_per_request"] = 1e6 * (service.cpu() - used) / run["requests"]
                results[peer.name]["wrk"].append(run)
        for round_ in range(options.runs):
            for peer in peers:
                print(f"  accept test {round_ + 1}: {peer.name}", file=sys.stderr)
                results[peer.name]["accept"].append(
                    accept_cost(services[peer.name], options.accept_count, options.accept_rate, options.client_cpu))
    finally:
        for service in services.values():
            service.stop()
    for peer in peers:
        if peer.parks:
            print(f"  {options.parked:,} parked: {peer.name}", file=sys.stderr)
            service = Service(peer.argv, options.server_cpu, **PEER_ENVIRON)
            try:
                results[peer.name]["parked"] = parked_cost(service, options.parked, options.accept_rate, options.client_cpu)
            finally:
                service.stop()
    return {"options": dataclasses.asdict(options), "notes": notes, "servers": list(results.values())}


def best_run(result: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The wrk run with the most requests/s."""
    runs = [run for run in result.get("wrk", []) if run.get("requests_per_s")]
    return max(runs, key=lambda run: run["requests_per_s"]) if runs else None


def best_accept(result: Dict[str, Any]) -> Dict[str, Any]:
    """The accept run with the least CPU per connection."""
    return min(result["accept"], key=lambda run: run["cpu_us_per_connection"])


# ----------------------------------------------------------------------------------------------------------------
# Operator views (--ops): /metrics, /status and /healthz with many parked
# ----------------------------------------------------------------------------------------------------------------


def operator_views(target: Target, sizes: Sequence[int] = OPS_SIZES, concurrencies: Sequence[int] = OPS_CONCURRENCIES) -> List[Dict[str, Any]]:
    """For each MAX_CONCURRENCY and parked count: each operator view requested OPS_REPEATS times back to back on one
    keep-alive connection, timed from the client (send to last byte). The first request per bucket is granted at
    once, so concurrency + count requests are sent to leave count parked; IDENTIFY_INTERVAL=3600 keeps them there."""
    results = []
    for concurrency in concurrencies:
        for count in sizes:
            print(f"  MAX_CONCURRENCY={concurrency}, {count:,} parked...", file=sys.stderr)
            service = Service.gateway_queue(target, MAX_CONCURRENCY=str(concurrency), IDENTIFY_INTERVAL=str(PARKED_INTERVAL))
            pool = ClientPool.for_count(service.port, count + concurrency)
            try:
                time.sleep(0.3)
                started = time.monotonic()
                pool.load(range(count + concurrency))
                wait_until_parked(service, count + concurrency, started)
                time.sleep(0.2)
                parked = service.status()["waiting"]
                Contention.settle()
                client = KeepAliveClient(service.port)
                views: Dict[str, Any] = {}
                used, busy = service.cpu(), Contention()
                for view, repeats in OPS_REPEATS.items():
                    path, headers = ("/status", b"Accept: text/html\r\n") if view == "/status (HTML)" else (view, b"")
                    samples = [client.get(path, headers) for _ in range(repeats)]
                    seconds = [s[2] for s in samples]
                    views[view] = {"repeats": repeats, "bytes": samples[-1][1], "statuses": sorted({s[0] for s in samples}),
                                   "p50_ms": 1000 * statistics.median(seconds), "p99_ms": 1000 * percentile(seconds, 99),
                                   "max_ms": 1000 * max(seconds)}
                client.close()
                results.append({"max_concurrency": concurrency, "parked": parked, "views": views,
                                "cpu_s": service.cpu() - used, "rss_mib": service.rss() / 2**20, "other_cores": busy.cores()})
            finally:
                pool.stop()
                service.stop()
    return results


# ----------------------------------------------------------------------------------------------------------------
# Profile (--profile): where gateway-queue spends its time, sampled with py-spy
# ----------------------------------------------------------------------------------------------------------------


def collapse(raw: str) -> Tuple[int, Dict[str, int], Dict[str, int]]:
    """Reads py-spy's raw format (one "frame;frame;... count" line per stack): (samples, self, inclusive) with
    frames named "function (file)"."""
    own: Dict[str, int] = collections.Counter()
    inclusive: Dict[str, int] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    return total, own, inclusive


def profile(target: Target, options: PeerOptions, cache_dir: str, top: int = 12) -> Dict[str, Any]:
    """--profile: py-spy (from the bench venv) samples gateway-queue at 250 Hz, idle time left out, first while wrk
    loads /healthz on keep-alive, then during the paced accept test."""
    bindir = bench_venv(target.python, [PY_SPY], cache_dir)
    py_spy = os.path.join(bindir, "py-spy")
    service = Service.gateway_queue(target, options.server_cpu)
    phases: Dict[str, Any] = {}
    try:
        time.sleep(0.3)
        loads: List[Tuple[str, Callable[[], Any]]] = [
            ("keep-alive /healthz (wrk)",
             lambda: run_wrk(service.port, "/healthz", options.wrk_connections, options.wrk_seconds, options.client_cpu)),
            ("accept: connect, /healthz, close",
             lambda: accept_cost(service, options.accept_count, options.accept_rate, options.client_cpu)),
        ]
        for name, load in loads:
            with tempfile.NamedTemporaryFile("r", suffix=".txt") as out:
                spy = subprocess.Popen([py_spy, "record", "--pid", str(service.proc.pid), "--rate", "250", "--function",
                                        "--format", "raw", "--output", out.name], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE, text=True)
                time.sleep(1.0)  # py-spy attaches
                busy = Contention()
                load()
                other = busy.cores()
                spy.send_signal(signal.SIGINT)
                _, errors = spy.communicate(timeout=30)
                total, own, inclusive = collapse(out.read())
            if not total:
                phases[name] = {"error": (errors or "no samples").strip().splitlines()[-1]}
                continue
            ours = {frame: n for frame, n in inclusive.items() if "gateway_queue" in frame}
            phases[name] = {
                "samples": total, "other_cores": other,
                "self": [(frame, 100 * n / total) for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]],
                "inclusive_service": [(frame, 100 * n / total) for frame, n in sorted(ours.items(), key=lambda kv: -kv[1])[:top]],
            }
    finally:
        service.stop()
    return {"py_spy": PY_SPY, "phases": phases}


# ----------------------------------------------------------------------------------------------------------------
# Soak: thousands of clients misbehaving for a set time
# ----------------------------------------------------------------------------------------------------------------

SOAK_INTERVAL = 5.0  # the environment's floor: the tightest spacing the grant log must still respect


async def _soak_actor(port: int, deadline: float, rng: random.Random, counts: Dict[str, int]) -> None:
    """One client doing random things in a loop: park, cancel, pipeline, idle on keep-alive, trickle, slowloris,
    garbage. Every answer it gets must be a well-formed response."""
    request = lambda shard: b"GET /?shard=%d HTTP/1.1\r\nHost: soak\r\n\r\n" % shard  # noqa: E731
    health = b"GET /healthz HTTP/1.1\r\nHost: soak\r\n\r\n"
    while time.monotonic() < deadline:
        kind = rng.choices(["park", "cancel", "pipeline", "idle", "slow", "slowloris", "garbage"],
                           [30, 30, 10, 10, 10, 2, 8])[0]
        counts[kind] = counts.get(kind, 0) + 1
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            counts["connect_error"] = counts.get("connect_error", 0) + 1
            await asyncio.sleep(0.1)
            continue
        try:
            if kind == "park":
                writer.write(request(rng.randrange(5000)))
                await asyncio.wait_for(_expect(reader, counts), rng.uniform(5, 30))
            elif kind == "cancel":
                writer.write(request(rng.randrange(5000)))
                await asyncio.sleep(rng.uniform(0, 3))
            elif kind == "pipeline":
                writer.write(health + request(rng.randrange(5000)) + health)
                await asyncio.wait_for(_expect(reader, counts, 3), 10)
            elif kind == "idle":
                for _ in range(rng.randint(1, 3)):
                    writer.write(health)
                    await asyncio.wait_for(_expect(reader, counts), 10)
                    await asyncio.sleep(rng.uniform(0, 3))
            elif kind == "slow":
                for byte in request(rng.randrange(5000)):
                    writer.write(bytes([byte]))
                    await asyncio.sleep(0.02)
                await asyncio.wait_for(_expect(reader, counts), 10)
            elif kind == "slowloris":
                writer.write(b"GET /?shard=1 HTTP/1.1\r\nHost: so")
                await asyncio.wait_for(_expect(reader, counts), 20)  # 408 after the head timeout
            else:
                writer.write(bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))) + b"\r\n\r\n")
                await asyncio.wait_for(_expect(reader, counts), 15)
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


async def _expect(reader: asyncio.StreamReader, counts: Dict[str, int], responses: int = 1) -> None:
    for _ in range(responses):
        head = await reader.readuntil(b"\r\n\r\n")
        if not re.match(rb"HTTP/1\.1 \d{3} ", head):
            counts["malformed_response"] = counts.get("malformed_response", 0) + 1
            return
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        await reader.readexactly(length)
        status = head[9:12].decode()
        counts[status] = counts.get(status, 0) + 1


def _soak_worker(port: int, actors: int, seconds: float, seed: int, pipe: Any) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    counts: Dict[str, int] = {}

    async def run() -> None:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(_soak_actor(port, deadline, random.Random(seed * 100003 + i), counts) for i in range(actors)))

    asyncio.run(run())
    pipe.send(counts)


def metric(service: Service, name: str) -> float:
    body = service.get("/metrics")[1].decode()
    return float(re.search(rf"^{name} (\S+)$", body, re.M).group(1))


def grant_log_violations(lines: Sequence[str], interval: float) -> Tuple[int, int, float]:
    """Reads the DEBUG grant log ("granted shard N (bucket B of M) at T"): (grants, grants closer than interval to
    an earlier one in the same bucket, smallest such gap). Buckets are judged as Discord would at each grant:
    shard % max_concurrency in force then, so a re-bucketing cannot hide a violation. Times are the service's own
    monotonic clock, taken when each grant was written."""
    recent: List[Tuple[float, int]] = []
    grants = violations = 0
    smallest = math.inf
    for line in lines:
        match = re.search(r"granted shard (\d+) \(bucket \d+ of (\d+)\) at ([0-9.]+)", line)
        if not match:
            continue
        shard, concurrency, at = int(match.group(1)), int(match.group(2)), float(match.group(3))
        grants += 1
        recent = [(t, s) for t, s in recent if at - t < 60]
        gaps = [at - t for t, s in recent if s % concurrency == shard % concurrency]
        if gaps:
            smallest = min(smallest, min(gaps))
            violations += min(gaps) < interval
        recent.append((at, shard))
    return grants, violations, smallest


def soak(target: Target, seconds: float, actors: int, processes: int = 3) -> Dict[str, Any]:
    """Runs the soak and returns its figures."""
    service = Service.gateway_queue(target, MAX_CONCURRENCY="16", IDENTIFY_INTERVAL=str(SOAK_INTERVAL), LOG_LEVEL="DEBUG")
    time.sleep(0.5)
    baseline = {"rss_mib": service.rss() / 2**20, "fds": service.fds(), "tasks": metric(service, "gateway_queue_asyncio_tasks")}
    context = multiprocessing.get_context("fork")
    pipes, procs = [], []
    for i in range(processes):
        parent, child = context.Pipe()
        proc = context.Process(target=_soak_worker, args=(service.port, actors // processes, seconds, i + 1, child), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    samples = []
    started = time.monotonic()
    while any(p.is_alive() for p in procs) and time.monotonic() - started < seconds + 60:
        time.sleep(2)
        status = service.status()
        samples.append({"t": round(time.monotonic() - started, 1), "rss_mib": service.rss() / 2**20, "fds": service.fds(),
                        "tasks": metric(service, "gateway_queue_asyncio_tasks"), "waiting": status["waiting"],
                        "connections": status["open_connections"]})
    counts: Dict[str, int] = {}
    for pipe in pipes:
        for key, value in pipe.recv().items():
            counts[key] = counts.get(key, 0) + value
    for proc in procs:
        proc.join(10)
    time.sleep(2)
    after = {"rss_mib": service.rss() / 2**20, "fds": service.fds(), "tasks": metric(service, "gateway_queue_asyncio_tasks"),
             "connections": service.status()["open_connections"]}
    requests = service.status()["requests"]
    code = service.stop()
    grants, violations, smallest = grant_log_violations(service.log, SOAK_INTERVAL)
    third = max(1, len(samples) // 3)
    middle = samples[third:2 * third] or samples
    last = samples[-third:]
    return {
        "seconds": seconds, "actors": actors, "actions": counts, "requests": requests, "baseline": baseline,
        "after": after, "peak": {k: max(s[k] for s in samples) for k in ("rss_mib", "fds", "tasks", "waiting", "connections")},
        "rss_mid_mib": statistics.mean(s["rss_mib"] for s in middle), "rss_last_mib": statistics.mean(s["rss_mib"] for s in last),
        "grants_logged": grants, "interval_violations": violations, "smallest_gap_s": smallest,
        "tracebacks": sum("Traceback" in line for line in service.log), "exit_code": code, "samples": samples,
    }


def soak_report(result: Dict[str, Any]) -> str:
    lines = [f"soak: {result['seconds']:.0f} s, {result['actors']} concurrent clients",
             f"  actions: {json.dumps(result['actions'], sort_keys=True)}",
             f"  service counted: {result['requests']}",
             f"  baseline: {result['baseline']}",
             f"  peak:     {result['peak']}",
             f"  RSS mean, middle third vs last third: {result['rss_mid_mib']:.1f} / {result['rss_last_mib']:.1f} MiB",
             f"  after the clients left: {result['after']}",
             f"  grant log: {result['grants_logged']} grants, {result['interval_violations']} gaps under "
             f"{SOAK_INTERVAL} s (smallest {result['smallest_gap_s']:.4f} s)",
             f"  tracebacks in the service log: {result['tracebacks']}; exit code {result['exit_code']}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Fault injection: a Discord that flaps while the budget is spent and reset
# ----------------------------------------------------------------------------------------------------------------


class FlakyDiscord:
    """A Discord stand-in with a real session-start budget in short windows. /gateway/bot flaps between answers;
    /identify is where the test's shards 'identify', so this side sees what Discord would: overdrafts and IDENTIFYs
    closer than 5 s in a bucket."""

    MODES = ["ok", "429", "500", "ok", "hang", "garbage", "503", "ok"]

    def __init__(self, total: int, window: float, seed: int):
        import http.server

        self.rng = random.Random(seed)
        self.total, self.window = total, window
        self.max_concurrency = 1  # raised to 2 at the second window: re-bucketing under load
        self.windows = 0
        self.window_end = time.monotonic() + window
        self.spent = 0
        self.identifies: List[Tuple[float, int, int]] = []  # (time, shard, max_concurrency then)
        self.overdrafts = 0
        self.calls: Dict[str, int] = {}
        self.healthy = False
        self.lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/api/v10"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def roll(self) -> None:
        now = time.monotonic()
        while now >= self.window_end:
            self.window_end += self.window
            self.spent = 0
            self.windows += 1
            if self.windows == 2:  # Discord only ever raises it (a bot moved to large-bot sharding)
                self.max_concurrency = 2

    def handle(self, request: Any) -> None:
        with self.lock:
            self.roll()
            if request.path.startswith("/api/v10/identify"):
                shard = int(request.path.rsplit("=", 1)[1])
                self.identifies.append((time.monotonic(), shard, self.max_concurrency))
                self.spent += 1
                self.overdrafts += self.spent > self.total
                status, body, delay, headers = 200, b"{}", 0.0, {}
            else:
                mode = "ok" if self.healthy else self.rng.choice(self.MODES)
                self.calls[mode] = self.calls.get(mode, 0) + 1
                limit = {"total": self.total, "remaining": max(0, self.total - self.spent),
                         "reset_after": int((self.window_end - time.monotonic()) * 1000), "max_concurrency": self.max_concurrency}
                body = json.dumps({"url": "wss://gateway.discord.gg", "shards": 8, "session_start_limit": limit}).encode()
                status, delay, headers = 200, 0.0, {}
                if mode == "429":
                    status, body, headers = 429, b'{"message": "You are being rate limited.", "retry_after": 1.5, "global": false}', {"Retry-After": "1"}
                elif mode in ("500", "503"):
                    status, body = int(mode), b"upstream trouble"
                elif mode == "hang":
                    delay = 12.0  # past the service's 10 s timeout
                elif mode == "garbage":
                    body = b'{"session_start_limit": {"total": "lots"}}'
        time.sleep(delay)
        try:
            request.send_response(status)
            for name, value in headers.items():
                request.send_header(name, value)
            request.send_header("Content-Length", str(len(body)))
            request.end_headers()
            request.wfile.write(body)
        except OSError:
            pass

    def early_identifies(self) -> Tuple[int, float]:
        """IDENTIFYs closer than 5 s to the previous one in the same bucket (Discord's bucket at that moment)."""
        early, smallest = 0, math.inf
        for i, (at, shard, concurrency) in enumerate(self.identifies):
            for before, other, _ in reversed(self.identifies[:i]):
                if at - before >= 5.0:
                    break
                if other % concurrency == shard % concurrency:
                    early += 1
                    smallest = min(smallest, at - before)
                    break
        return early, smallest


async def _fault_shard(port: int, fake: FlakyDiscord, deadline: float, rng: random.Random, counts: Dict[str, int]) -> None:
    loop = asyncio.get_running_loop()
    while time.monotonic() < deadline:
        shard = rng.randrange(8)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /?shard=%d HTTP/1.1\r\nHost: shard\r\n\r\n" % shard)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), max(0.1, deadline - time.monotonic()))
            writer.close()
        except (asyncio.TimeoutError, OSError, asyncio.IncompleteReadError):
            counts["gave_up"] = counts.get("gave_up", 0) + 1
            continue
        status = head[9:12].decode()
        counts[status] = counts.get(status, 0) + 1
        if status == "200":  # identify right away, as a shard would
            url = f"{fake.url}/identify?shard={shard}"
            await loop.run_in_executor(None, lambda: urllib.request.urlopen(url, timeout=5).read())


def faults(target: Target, seconds: float, shards: int = 12, total: int = 6, window: float = 15.0) -> Dict[str, Any]:
    """Runs the fault injection: the first 75% of the time Discord flaps, then it answers properly."""

    fake = FlakyDiscord(total, window, seed=7)
    service = Service.gateway_queue(target, DISCORD_TOKEN="fault.injection.token", DISCORD_API_URL=fake.url, LOG_LEVEL="DEBUG")
    counts: Dict[str, int] = {}

    async def run() -> None:
        deadline = time.monotonic() + seconds
        healthy_at = time.monotonic() + seconds * 0.75
        actors = [asyncio.ensure_future(_fault_shard(service.port, fake, deadline, random.Random(i), counts)) for i in range(shards)]
        health_worst = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() >= healthy_at:
                fake.healthy = True
            took = await asyncio.get_running_loop().run_in_executor(None, lambda: service.get("/healthz")[2])
            health_worst = max(health_worst, took)
            await asyncio.sleep(0.5)
        counts["healthz_worst_ms"] = int(health_worst * 1000)
        await asyncio.gather(*actors)

    asyncio.run(run())
    time.sleep(1)
    status = service.status()
    code = service.stop()
    fake.httpd.shutdown()
    early, smallest = fake.early_identifies()
    grants, violations, _ = grant_log_violations(service.log, 5.1)
    return {
        "seconds": seconds, "budget": f"{total} per {window:.0f} s window", "discord_answers": fake.calls,
        "client_outcomes": counts, "identifies": len(fake.identifies), "overdrafts": fake.overdrafts,
        "early_identifies": early, "smallest_identify_gap_s": smallest, "grant_log": (grants, violations),
        "final_limits": {"source": status["limits"]["source"], "max_concurrency": status["limits"]["max_concurrency"],
                         "total": (status["session_starts"] or {}).get("total")},
        "discord_now": {"max_concurrency": fake.max_concurrency, "total": fake.total},
        "tracebacks": sum("Traceback" in line for line in service.log), "exit_code": code,
        "log_warnings": sum(" WARNING " in line for line in service.log),
    }


def faults_report(result: Dict[str, Any]) -> str:
    return "\n".join([
        f"fault injection: {result['seconds']:.0f} s, budget {result['budget']}",
        f"  /gateway/bot answers served: {json.dumps(result['discord_answers'], sort_keys=True)}",
        f"  shard outcomes: {json.dumps(result['client_outcomes'], sort_keys=True)}",
        f"  identifies: {result['identifies']}, overdrafts: {result['overdrafts']}, identifies under 5 s in a bucket: "
        f"{result['early_identifies']} (smallest gap {result['smallest_identify_gap_s']:.3f} s)",
        f"  grant log: {result['grant_log'][0]} grants, {result['grant_log'][1]} under the interval in a bucket",
        f"  limits at the end: {result['final_limits']} (Discord says {result['discord_now']})",
        f"  warnings logged: {result['log_warnings']}, tracebacks: {result['tracebacks']}, exit code {result['exit_code']}",
    ])


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------

TARGETS = [
    ("accept burst (s)", "accept_burst_s", "<= 4"),
    ("RSS per parked request (bytes)", "bytes_per_parked", "<= 6144"),
    ("CPU while parked 10 s (CPU-s)", "cpu_parked_10s", "<= 0.1"),
    ("clients: grant lateness p99 (ms)", ("precision", "p99_ms"), "<= 2"),
    ("clients: grant lateness worst (ms)", ("precision", "worst_ms"), "<= 10"),
    ("clients: gaps short by over 1 ms", ("precision", "short"), "0"),
    ("clients: earliest gap vs interval (ms)", ("precision", "earliest_ms"), ">= -1"),
    ("clients: grant gaps measured", ("precision", "gaps"), ""),
    ("service's log: lateness p99 (ms)", ("log_precision", "p99_ms"), "<= 2"),
    ("service's log: grants early", ("log_precision", "early"), "0"),
    ("service's log: earliest gap vs interval (ms)", ("log_precision", "earliest_ms"), ">= 0"),
    ("other processes' CPU meanwhile (cores)", "other_cores", f"<= {BUSY_WARN}"),
]
STORM = [
    ("cancel storm: all parked gone after (s)", "storm_drained_s", ""),
    ("cancel storm: worst /healthz (s)", "healthz_worst_during_storm_s", "<= 1"),
    ("next grant after the storm: late by (ms)", "next_grant_late_ms", "on schedule"),
    ("RSS after storm 1 / storm 2 (MiB)", ("rss_after_storm1_mib", "rss_after_storm2_mib"), ""),
    ("RSS growth, cycle 2 over cycle 1 (%)", "rss_growth_cycle2_pct", "<= 5"),
]


def busy_warning(values: Sequence[Optional[float]]) -> List[str]:
    """A warning line when other processes used more than BUSY_WARN cores during any of these figures."""
    worst = max((v for v in values if v is not None), default=0.0)
    if worst <= BUSY_WARN:
        return []
    return [f"  warning: other processes used up to {worst:.2f} cores while these figures were taken (see the "
            "'other processes' row): the machine was shared, so compare them with care or run again"]


def pick(result: Dict[str, Any], key: Any) -> Any:
    if isinstance(key, tuple) and key[0] in ("precision", "log_precision"):
        return result.get(key[0], {}).get(key[1])
    if isinstance(key, tuple):
        return " / ".join(fmt(result.get(k)) for k in key)
    return result.get(key)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def machine_line(results: Dict[str, Any]) -> str:
    m = results["machine"]
    return (f"machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, open files {m['nofile']:,}; "
            f"bench on CPython {m['python']}; service {m['service']} on {m['service_python']}")


def report(results: Dict[str, Any]) -> str:
    sizes = results["sizes"]
    width = 44
    lines = [machine_line(results), ""]
    lines.append("figure".ljust(width) + "".join(f"{s['parked']:>12,}" for s in sizes) + "   target")
    for label, key, target in TARGETS:
        lines.append(label.ljust(width) + "".join(f"{fmt(pick(s, key)):>12}" for s in sizes) + f"   {target}")
    stormed = [s for s in sizes if "storm_drained_s" in s]
    for size in stormed:
        lines.append("")
        lines.append(f"cancel storm with {size['parked']:,} parked")
        for label, key, target in STORM:
            lines.append(label.ljust(width) + f"{fmt(pick(size, key)):>12}   {target}")
    health = results.get("healthz", {})
    lines.append("")
    if health.get("requests_per_s"):
        lines.append(f"/healthz keep-alive ({health['wrk']}): {health['requests_per_s']:,.0f} requests/s, p99 {health['p99_ms']:.2f} ms"
                     f" (other processes meanwhile: {health['other_cores']:.2f} cores)")
    else:
        lines.append(f"/healthz keep-alive: skipped: {health.get('skipped')}")
    lines += busy_warning([s.get("other_cores") for s in sizes] + [health.get("other_cores")])
    return "\n".join(lines)


def _ratio(ours: Optional[float], theirs: Optional[float]) -> str:
    return f"{ours / theirs:.2f}x" if ours is not None and theirs else "-"


def peers_report(result: Dict[str, Any]) -> str:
    """The side-by-side table, with gateway-queue's figure divided by each other server's."""
    servers = result["servers"]
    o = result["options"]
    pinned = (f"each server pinned to CPU {o['server_cpu']}, the load (wrk, client processes) to CPU {o['client_cpu']}"
              if o["server_cpu"] is not None else "nothing pinned (--no-pin)")
    pythons = sorted({s["python"] for s in servers})
    lines = [
        f"side by side: {pinned}; {' and '.join(pythons)}",
        f"  throughput: wrk -t1 -c{o['wrk_connections']} -d{o['wrk_seconds']}s on GET /healthz (keep-alive), {o['runs']} "
        "runs per server, taken in turn",
        f"  accept:     {o['accept_count']:,} connections at {o['accept_rate']:,.0f}/s, each GET /healthz with Connection: close, "
        f"read to EOF; server CPU from /proc/PID/stat over the whole test; {o['runs']} runs, taken in turn",
        f"  parked:     {o['parked']:,} GET /?shard=N at {o['accept_rate']:,.0f}/s into a fresh server; MAX_CONCURRENCY=16, "
        f"IDENTIFY_INTERVAL={PARKED_INTERVAL:g} (16 granted, the rest stay parked)",
    ]
    lines += [f"  {s['name']}: {s.get('banner', '')}" for s in servers if s["name"] == "aiohttp"]
    lines += [f"  note: {note}" for note in result["notes"]]

    def wrk_run(i: int) -> Callable[[Dict[str, Any]], Optional[float]]:
        return lambda s: (s["wrk"][i].get("requests_per_s") if i < len(s["wrk"]) else None)

    def accept_run(i: int) -> Callable[[Dict[str, Any]], Optional[float]]:
        return lambda s: (s["accept"][i]["cpu_us_per_connection"] if i < len(s["accept"]) else None)

    def best(key: str) -> Callable[[Dict[str, Any]], Optional[float]]:
        return lambda s: (best_run(s) or {}).get(key)

    def parked(key: str) -> Callable[[Dict[str, Any]], Any]:
        return lambda s: s.get("parked", {}).get(key)

    def other_cores(s: Dict[str, Any]) -> float:
        runs = s["wrk"] + s["accept"] + ([s["parked"]] if "parked" in s else [])
        return max((run.get("other_cores") or 0.0 for run in runs), default=0.0)

    rows: List[Tuple[str, Callable[[Dict[str, Any]], Any], str]] = [
        (f"/healthz req/s, run {i + 1}", wrk_run(i), "higher") for i in range(o["runs"])
    ] + [
        ("/healthz req/s, best run", best("requests_per_s"), "higher"),
        ("/healthz p50 ms, best run", best("p50_ms"), "lower"),
        ("/healthz p99 ms, best run", best("p99_ms"), "lower"),
        ("/healthz CPU us/request, best run", best("cpu_us_per_request"), "lower"),
    ] + [
        (f"accept: CPU us/connection, run {i + 1}", accept_run(i), "lower") for i in range(o["runs"])
    ] + [
        ("accept: CPU us/connection, best run", lambda s: best_accept(s)["cpu_us_per_connection"], "lower"),
        ("accept: p99 connect to EOF ms, best", lambda s: best_accept(s)["request_p99_ms"], "lower"),
        ("accept: SYN drops, all runs", lambda s: sum(run["syn_drops"] for run in s["accept"]), ""),
        ("accept: slowest connect ms, all runs", lambda s: max(run["slowest_connect_ms"] or 0.0 for run in s["accept"]), ""),
        ("parked: CPU us/connection", parked("cpu_us_per_parked"), "lower"),
        ("parked: RSS bytes/request", parked("bytes_per_parked"), "lower"),
        ("parked: SYN drops", parked("syn_drops"), ""),
        ("parked: slowest connect, ms", parked("slowest_connect_ms"), ""),
        ("other processes' CPU, cores, max", other_cores, ""),
    ]
    names = [s["name"] for s in servers]
    width, column = 36, 15
    lines.append("")
    lines.append("figure".ljust(width) + "".join(f"{n:>{column}}" for n in names)
                 + "".join(f"{'gq/' + n.split()[0]:>{column}}" for n in names[1:]) + "   better")
    for label, get, better in rows:
        values = [get(s) for s in servers]
        cells = "".join(f"{fmt(v):>{column}}" for v in values)
        ratios = "".join(f"{(_ratio(values[0], v) if better else ''):>{column}}" for v in values[1:])
        lines.append(label.ljust(width) + cells + ratios + f"   {better}")
    bad = [f"{s['name']}: {run['non_2xx']} non-2xx, socket errors {run['socket_errors']}"
           for s in servers for run in s["wrk"] if run.get("non_2xx") or run.get("socket_errors", "none") != "none"]
    bad += [f"{s['name']}: accept test {run['errors']} errors, statuses {run['statuses']}"
            for s in servers for run in s["accept"] if run["errors"] or set(run["statuses"]) != {"200"}]
    bad += [f"{s['name']}: parked test {s['parked']['parked'] + s['parked']['granted']} of {s['parked']['connected']} "
            f"accounted for, errors {s['parked']['errors']}" for s in servers
            if "parked" in s and (s["parked"]["errors"] or s["parked"]["parked"] + s["parked"]["granted"] != s["parked"]["connected"])]
    skipped = sorted({run["skipped"] for s in servers for run in s["wrk"] if run.get("skipped")})
    lines += [f"  skipped /healthz throughput: {reason}" for reason in skipped]
    lines += [f"  check: {line}" for line in bad]
    lines += busy_warning([other_cores(s) for s in servers])
    lines.append("  gq/X is gateway-queue's figure divided by X's: for req/s above 1 means gateway-queue is faster, for a")
    lines.append("  cost (CPU, ms, bytes) below 1 means it is cheaper. Best run: the most req/s, or the least CPU.")
    return "\n".join(lines)


def ops_report(results: List[Dict[str, Any]]) -> str:
    """One row per view and figure, one column per (MAX_CONCURRENCY, parked) pair."""
    lines = ["operator views: one keep-alive connection, requests back to back, timed at the client (send to last byte);",
             f"IDENTIFY_INTERVAL={PARKED_INTERVAL:g} keeps the parked parked. Columns: MAX_CONCURRENCY / parked.", ""]
    width, column = 36, 24

    def heading(r: Dict[str, Any]) -> str:
        return f"{r['max_concurrency']} / {r['parked']:,}"

    lines.append("figure".ljust(width) + "".join(f"{heading(r):>{column}}"
                                                  for r in results))
    for view, repeats in OPS_REPEATS.items():
        cells = "".join(f"{'%.2f / %.2f / %.2f' % (c['p50_ms'], c['p99_ms'], c['max_ms']):>{column}}"
                        for c in (r["views"][view] for r in results))
        lines.append(f"{view} x{repeats}, p50/p99/max ms".ljust(width) + cells)
    for view in OPS_REPEATS:
        lines.append(f"{view}, bytes".ljust(width) + "".join(f"{r['views'][view]['bytes']:>{column},}" for r in results))
    lines.append("server CPU-s for all the above".ljust(width) + "".join(f"{r['cpu_s']:>{column}.2f}" for r in results))
    lines.append("server RSS MiB".ljust(width) + "".join(f"{r['rss_mib']:>{column}.1f}" for r in results))
    lines.append("other processes' CPU, cores".ljust(width) + "".join(f"{r['other_cores']:>{column}.2f}" for r in results))
    lines += busy_warning([r["other_cores"] for r in results])
    statuses = {s for r in results for c in r["views"].values() for s in c["statuses"]}
    if statuses != {200}:
        lines.append(f"  check: statuses seen {sorted(statuses)}")
    return "\n".join(lines)


def profile_report(result: Dict[str, Any]) -> str:
    lines = [f"profile: {result['py_spy']} at 250 Hz on gateway-queue; samples of a sleeping thread are left out (py-spy's "
             "default), so EpollSelector.select counts only its time on the CPU"]
    for phase, data in result["phases"].items():
        lines.append("")
        if "error" in data:
            lines.append(f"{phase}: {data['error']}")
            continue
        lines.append(f"{phase}: {data['samples']:,} samples (other processes meanwhile: {data['other_cores']:.2f} cores); "
                     "self time (% of samples)")
        lines += [f"  {share:5.1f}%  {frame}" for frame, share in data["self"]]
        lines.append("  inclusive, gateway_queue.py functions:")
        lines += [f"  {share:5.1f}%  {frame}" for frame, share in data["inclusive_service"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def descriptors_needed(args: argparse.Namespace, sizes: Sequence[int]) -> Tuple[int, str]:
    """The open files the largest step of this run needs in one process (the service's), and what that step is."""
    steps = []
    if args.soak:
        steps.append((args.soak_clients, f"--soak with {args.soak_clients:,} clients"))
    elif args.faults:
        steps.append((64, "--faults"))
    elif args.replicas:
        steps.append((math.ceil(max(sizes) / max(1, args.replicas)), f"--replicas {args.replicas} with {max(sizes):,} parked"))
    elif not (args.peers or args.ops or args.profile):
        steps.append((max(sizes), f"a run with {max(sizes):,} parked"))
    if args.peers:
        steps.append((max(args.peer_parked, args.wrk_connections), f"--peers with {args.peer_parked:,} parked"))
    if args.ops:
        steps.append((max(OPS_SIZES) + max(OPS_CONCURRENCIES), f"--ops with {max(OPS_SIZES):,} parked"))
    if args.profile:
        steps.append((args.wrk_connections, "--profile"))
    count, what = max(steps)
    return count + FD_MARGIN, what


def check_descriptors(needed: int, what: str) -> None:
    """Raises the soft RLIMIT_NOFILE to the hard one (children inherit it); BenchError naming what to raise if
    even the hard limit is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        suggest = math.ceil(needed * 1.25 / 1000) * 1000
        raise BenchError(f"too few open files: {what} needs about {needed:,} per process, and the limit here is {hard:,}; "
                         f"raise it (ulimit -n {suggest}, or docker run --ulimit nofile={suggest}:{suggest}) "
                         "or ask for fewer connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=NEEDS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--service", default=SERVICE, metavar="PATH",
                        help="the gateway_queue.py to measure (default: the one next to this script)")
    parser.add_argument("--python", default=sys.executable, metavar="PATH",
                        help="interpreter for the service and the peers (default: the one running this script)")
    parser.add_argument("--sizes", default="1000,5000,15000", help="parked-request counts to measure (comma-separated)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--no-storm", action="store_true", help="skip the cancel storm on the largest size")
    parser.add_argument("--peers", action="store_true", help="gateway-queue side by side with aiohttp and two asyncio floors")
    parser.add_argument("--ops", action="store_true", help="time /metrics, /status and /healthz with 1,000 and 15,000 parked")
    parser.add_argument("--profile", action="store_true", help="sample gateway-queue with py-spy under /healthz and accept load")
    parser.add_argument("--no-pin", action="store_true", help="--peers/--profile: do not pin the server and the load to CPUs")
    parser.add_argument("--wrk-connections", type=int, default=WRK_CONNECTIONS, help=f"--peers: wrk -c (default {WRK_CONNECTIONS})")
    parser.add_argument("--wrk-seconds", type=int, default=WRK_SECONDS, help=f"--peers: wrk -d (default {WRK_SECONDS})")
    parser.add_argument("--runs", type=int, default=RUNS,
                        help=f"--peers: runs of the throughput and the accept test per server (default {RUNS})")
    parser.add_argument("--accept-count", type=int, default=ACCEPT_COUNT,
                        help=f"--peers: connections in the paced accept test (default {ACCEPT_COUNT})")
    parser.add_argument("--accept-rate", type=float, default=ACCEPT_RATE,
                        help=f"--peers: connections per second, accept and parked tests (default {ACCEPT_RATE:g})")
    parser.add_argument("--peer-parked", type=int, default=PEER_PARKED,
                        help=f"--peers: parked requests for the memory figure (default {PEER_PARKED})")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each figure, wait up to SECONDS for a second in which other processes use under "
                        f"{QUIET_CORES:g} cores (for a shared machine; default 0: do not wait)")
    parser.add_argument("--cache-dir", default=CACHE_DIR, help=f"where the bench venv lives (default {CACHE_DIR})")
    parser.add_argument("--soak", type=float, metavar="SECONDS", help="instead: run the soak for SECONDS")
    parser.add_argument("--soak-clients", type=int, default=3000, help="concurrent soak clients (default 3000)")
    parser.add_argument("--faults", type=float, metavar="SECONDS", help="instead: run the fault injection for SECONDS")
    parser.add_argument("--replicas", type=int, metavar="N",
                        help="instead: N replicas on one redis-server, the largest of --sizes parked over them")
    parser.add_argument("--serve", choices=PEER_KINDS, help=argparse.SUPPRESS)  # internal: run one peer
    return parser.parse_args(argv)


def run(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> int:
    """Runs the modes asked for and prints their reports; BenchError for anything the operator must fix."""
    if not re.fullmatch(r"[0-9]+(,[0-9]+)*", args.sizes) or min(int(size) for size in args.sizes.split(",")) == 0:
        raise BenchError(f"--sizes wants positive counts separated by commas, not {args.sizes!r}")
    sizes = [int(size) for size in args.sizes.split(",")]
    if not os.path.isfile(args.service):
        raise BenchError(f"--service {args.service}: no such file")
    target = Target(os.path.abspath(args.service), args.python)
    Contention.wait_limit = args.wait_quiet
    check_descriptors(*descriptors_needed(args, sizes))
    python_version(target.python)  # fails early, with a message, for a bad --python
    command = " ".join([os.path.basename(sys.argv[0])] + list(argv if argv is not None else sys.argv[1:]))
    results: Dict[str, Any] = {"machine": machine(target), "command": command}
    if args.soak or args.faults:
        result = soak(target, args.soak, args.soak_clients) if args.soak else faults(target, args.faults)
        print(soak_report(result) if args.soak else faults_report(result))
        results.update(result)
    elif args.replicas:
        if args.replicas < 1:
            raise BenchError("--replicas wants at least 1")
        print(machine_line(results))
        print(f"measuring {args.replicas} replicas with {max(sizes):,} parked...", file=sys.stderr)
        results["replicas"] = measure_replicas(target, args.replicas, max(sizes))
        print(replicas_report(results["replicas"]))
    elif not (args.peers or args.ops or args.profile):
        results["sizes"] = []
        for size in sizes:
            print(f"measuring {size:,} parked requests...", file=sys.stderr)
            results["sizes"].append(measure_size(target, size, storm=not args.no_storm and size == max(sizes)))
        print("measuring /healthz throughput...", file=sys.stderr)
        results["healthz"] = healthz_throughput(target)
        print(report(results))
    else:
        server_cpu, client_cpu = pinning(not args.no_pin)
        options = PeerOptions(server_cpu, client_cpu, args.wrk_connections, args.wrk_seconds, args.runs,
                              args.accept_count, args.accept_rate, args.peer_parked)
        print(machine_line(results))
        if args.peers:
            print("side by side...", file=sys.stderr)
            results["peers"] = side_by_side(target, options, args.cache_dir)
            print("\n" + peers_report(results["peers"]))
        if args.ops:
            print("operator views...", file=sys.stderr)
            results["operator_views"] = operator_views(target)
            print("\n" + ops_report(results["operator_views"]))
        if args.profile:
            print("profile...", file=sys.stderr)
            results["profile"] = profile(target, options, args.cache_dir)
            print("\n" + profile_report(results["profile"]))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2, default=str)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve_peer(args.serve)
    started, busy = time.monotonic(), Contention()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds, so every server started is stopped
    try:
        code = run(args, argv)
    except BenchError as exc:
        print(f"bench_gateway_queue.py: {exc}", file=sys.stderr)
        return 2
    print(f"(took {time.monotonic() - started:.0f} s; other processes used {busy.cores():.2f} cores on average meanwhile)",
          file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
