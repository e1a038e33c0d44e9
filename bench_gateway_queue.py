"""Benchmark gateway_queue.py from outside, the way a fleet of shards loads it.

Starts the service as a separate process on loopback, spreads thousands of client connections over several worker
processes (one process may open at most RLIMIT_NOFILE files), and measures what an operator cares about: memory per
parked request, the accept burst, CPU while parked, grant precision, a cancel storm and /healthz throughput. It prints
a table; --json FILE writes the figures. It is a benchmark, not a test: CI does not run it.

    python3 bench_gateway_queue.py                       # sizes 1000, 5000, 15000 (about 3 minutes)
    python3 bench_gateway_queue.py --sizes 2000 --json out.json
    python3 bench_gateway_queue.py --soak 300                # thousands of misbehaving clients for 5 minutes
    python3 bench_gateway_queue.py --faults 120              # a flapping Discord while the budget is spent

Standard library only. Linux only (it reads /proc/<pid>).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import platform
import random
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
SERVICE = os.path.join(HERE, "gateway_queue.py")
CLIENTS_PER_PROCESS = 5000  # a process may open 20,000 files here; keep well below
MAX_CONCURRENCY = 16
INTERVAL = 5.1
ROUNDS = 6  # grant rounds watched for precision: 5 gaps per bucket


# ----------------------------------------------------------------------------------------------------------------
# The service under test
# ----------------------------------------------------------------------------------------------------------------


class Service:
    """gateway_queue.py in its own process, with its log collected and /proc read for RSS and CPU."""

    def __init__(self, **environ: str):
        env = {"PATH": os.environ.get("PATH", ""), "HOST": "127.0.0.1", "PORT": "0", **environ}
        self.proc = subprocess.Popen([sys.executable, SERVICE], env=env, stderr=subprocess.PIPE, text=True)
        self.log: List[str] = []
        for line in self.proc.stderr:  # the startup line names the bound port
            self.log.append(line)
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if match:
                break
        else:
            raise RuntimeError(f"service did not start: {self.log!r}")
        self.port = int(match.group(1))
        threading.Thread(target=self._drain, daemon=True).start()

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
        """User + system CPU seconds so far."""
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


# ----------------------------------------------------------------------------------------------------------------
# Client worker processes
# ----------------------------------------------------------------------------------------------------------------


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


class ClientWorker:
    """Runs in a child process: obeys commands from the pipe (load, answers, close)."""

    def __init__(self, pipe: Any, port: int):
        self.pipe = pipe
        self.port = port
        self.open: "set[ParkedClient]" = set()
        self.answers: List[Tuple[int, float, int]] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        commands: asyncio.Queue = asyncio.Queue()
        loop.add_reader(self.pipe.fileno(), lambda: commands.put_nowait(self.pipe.recv()))
        while True:
            command, argument = await commands.get()
            if command == "load":
                self.pipe.send(await self.load(argument))
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

    async def load(self, shards: Sequence[int]) -> Dict[str, Any]:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        results = await asyncio.gather(
            *(loop.create_connection(lambda s=s: ParkedClient(self, s), "127.0.0.1", self.port) for s in shards),
            return_exceptions=True,
        )
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
        for result in results:
            if not isinstance(result, BaseException):
                self.open.add(result[1])
        return {"connected": len(shards) - len(errors), "errors": errors[:5], "seconds": time.monotonic() - started}


def _worker_main(pipe: Any, port: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(ClientWorker(pipe, port).run())


class ClientPool:
    """Several worker processes, each holding up to CLIENTS_PER_PROCESS connections."""

    def __init__(self, port: int, processes: int):
        context = multiprocessing.get_context("fork")
        self.pipes = []
        self.procs = []
        for _ in range(processes):
            parent, child = context.Pipe()
            proc = context.Process(target=_worker_main, args=(child, port), daemon=True)
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)

    def ask(self, command: str, arguments: Optional[List[Any]] = None) -> List[Any]:
        for pipe, argument in zip(self.pipes, arguments or [None] * len(self.pipes)):
            pipe.send((command, argument))
        return [pipe.recv() for pipe in self.pipes]

    def load(self, shards: Sequence[int]) -> List[Dict[str, Any]]:
        parts = [list(shards[i :: len(self.pipes)]) for i in range(len(self.pipes))]
        return self.ask("load", parts)

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
# Measurements
# ----------------------------------------------------------------------------------------------------------------


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
        "p99_ms": 1000 * late[min(len(late) - 1, math.ceil(0.99 * len(late)) - 1)],
        "worst_ms": 1000 * late[-1],
        "earliest_ms": 1000 * late[0],
        "early": sum(1 for x in late if x < 0),
    }


def measure_size(count: int, rounds: int = ROUNDS, storm: bool = False) -> Dict[str, Any]:
    """Loads `count` parked requests into a fresh service and measures it; with storm, also the cancel storm and a
    second load-and-storm cycle."""
    service = Service(MAX_CONCURRENCY=str(MAX_CONCURRENCY), IDENTIFY_INTERVAL=str(INTERVAL))
    pool = ClientPool(service.port, max(1, math.ceil(count / CLIENTS_PER_PROCESS)))
    result: Dict[str, Any] = {"parked": count}
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
        result["grants"] = sum(1 for a in answers if a[2] == 200)
        if storm:
            result.update(cancel_storm(service, pool, answers, count))
        result["fds_end"] = service.fds()
    finally:
        pool.stop()
        result["exit_code"] = service.stop()
    return result


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


def healthz_throughput(seconds: int = 5) -> Dict[str, Any]:
    """Requests per second on /healthz with keep-alive, from wrk when installed."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return {"wrk": "not installed (apt-get install wrk)"}
    service = Service()
    try:
        time.sleep(0.3)
        out = subprocess.run([wrk, "-t1", "-c32", f"-d{seconds}s", "--latency", f"http://127.0.0.1:{service.port}/healthz"],
                             capture_output=True, text=True, timeout=seconds + 30).stdout
    finally:
        service.stop()
    rps = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    p99 = re.search(r"99%\s+([0-9.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    return {
        "wrk": "wrk -t1 -c32 -d%ds" % seconds,
        "requests_per_s": float(rps.group(1)) if rps else None,
        "p99_ms": float(p99.group(1)) * scale[p99.group(2)] if p99 else None,
    }


def machine() -> Dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[1]}


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


def soak(seconds: float, actors: int, processes: int = 3) -> Dict[str, Any]:
    """Runs the soak and returns its figures."""
    service = Service(MAX_CONCURRENCY="16", IDENTIFY_INTERVAL=str(SOAK_INTERVAL), LOG_LEVEL="DEBUG")
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


def faults(seconds: float, shards: int = 12, total: int = 6, window: float = 15.0) -> Dict[str, Any]:
    """Runs the fault injection: the first 75% of the time Discord flaps, then it answers properly."""

    fake = FlakyDiscord(total, window, seed=7)
    service = Service(DISCORD_TOKEN="fault.injection.token", DISCORD_API_URL=fake.url, LOG_LEVEL="DEBUG")
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
    ("grant lateness p99 (ms)", ("precision", "p99_ms"), "<= 2"),
    ("grant lateness worst (ms)", ("precision", "worst_ms"), "<= 10"),
    ("grants early", ("precision", "early"), "0"),
    ("earliest gap vs interval (ms)", ("precision", "earliest_ms"), ">= 0"),
    ("grant gaps measured", ("precision", "gaps"), ""),
]
STORM = [
    ("cancel storm: all parked gone after (s)", "storm_drained_s", ""),
    ("cancel storm: worst /healthz (s)", "healthz_worst_during_storm_s", "<= 1"),
    ("next grant after the storm: late by (ms)", "next_grant_late_ms", "on schedule"),
    ("RSS after storm 1 / storm 2 (MiB)", ("rss_after_storm1_mib", "rss_after_storm2_mib"), ""),
    ("RSS growth, cycle 2 over cycle 1 (%)", "rss_growth_cycle2_pct", "<= 5"),
]


def pick(result: Dict[str, Any], key: Any) -> Any:
    if isinstance(key, tuple) and key[0] == "precision":
        return result.get("precision", {}).get(key[1])
    if isinstance(key, tuple):
        return " / ".join(fmt(result.get(k)) for k in key)
    return result.get(key)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def report(results: Dict[str, Any]) -> str:
    sizes = results["sizes"]
    width = 44
    lines = [f"machine: {results['machine']}", ""]
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
        lines.append(f"/healthz keep-alive ({health['wrk']}): {health['requests_per_s']:,.0f} requests/s, p99 {health['p99_ms']:.2f} ms")
    else:
        lines.append(f"/healthz keep-alive: {health.get('wrk')}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,5000,15000", help="parked-request counts to measure (comma-separated)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--no-storm", action="store_true", help="skip the cancel storm on the largest size")
    parser.add_argument("--soak", type=float, metavar="SECONDS", help="instead: run the soak for SECONDS")
    parser.add_argument("--soak-clients", type=int, default=3000, help="concurrent soak clients (default 3000)")
    parser.add_argument("--faults", type=float, metavar="SECONDS", help="instead: run the fault injection for SECONDS")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.soak or args.faults:
        result = soak(args.soak, args.soak_clients) if args.soak else faults(args.faults)
        print(soak_report(result) if args.soak else faults_report(result))
        if args.json:
            with open(args.json, "w") as out:
                json.dump({"machine": machine(), **result}, out, indent=2, default=str)
        return 0
    results: Dict[str, Any] = {"machine": machine(), "command": " ".join([os.path.basename(sys.argv[0])] + list(argv or sys.argv[1:])),
                               "sizes": []}
    for size in sizes:
        print(f"measuring {size:,} parked requests...", file=sys.stderr)
        results["sizes"].append(measure_size(size, storm=not args.no_storm and size == max(sizes)))
    print("measuring /healthz throughput...", file=sys.stderr)
    results["healthz"] = healthz_throughput()
    print(report(results))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
