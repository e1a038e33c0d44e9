"""gateway-queue for discord.py: every shard waits for the queue before it sends IDENTIFY.

Fits discord.py 2.x (tested: 2.7.1 with aiohttp 3.14.5), on `AutoShardedClient` and on a plain `Client`, and
disnake 2.x and nextcord 2.x, which keep the same hook (`import disnake as discord`). Needs aiohttp, which all three
already depend on. Run it as a bot:  DISCORD_TOKEN=... QUEUE_URL=http://gateway-queue/ python3 discord_py_queue.py
or mix `GatewayQueueMixin` into your own client class.

Environment:
    QUEUE_URL          the queue, default http://gateway-queue/
    QUEUE_AUTH_TOKEN   the queue's shared secret, sent as "Authorization: Bearer <secret>"; unset: no header.
                       The queue itself calls it AUTH_TOKEN (its own, server-side secret); the bot's name says whose
                       secret it is, since a bot's environment also holds DISCORD_TOKEN and often other AUTH_TOKENs.

How long it waits: as long as the queue says. A parked request can take hours (1,000 shards at max_concurrency 1
need 85 minutes; an exhausted daily budget waits for Discord's reset), so the request has a connect timeout and no
total or read timeout (aiohttp's default would cut it at 300 s). Leaving is free: the queue drops a request whose
client hung up, and a retry rejoins the back of its bucket's line. The library has caps of its own around the hook
(DiscordWebSocket.from_client runs inside asyncio.wait_for): an AutoShardedClient's first connect of each shard gets
`shard_connect_timeout` (180 s by default; pass None, as below; disnake and nextcord fix it at 180 s), and a
re-identify after INVALID_SESSION or a lost session gets 60 s, as does every connect of a plain Client; neither of
those can be changed. When a cap fires, the hook is cancelled, the queue drops the request at no cost, the library
logs the TimeoutError and connects again, back of the line. On a plain Client's very first connect discord.py 2.7.1
instead fails with AttributeError ('NoneType' object has no attribute 'sequence'), which ends `run()` after 60 s.
So a process that runs one shard of many should be an AutoShardedClient(shard_ids=[n], shard_count=N), not a
Client(shard_id=n, shard_count=N).

Retries: 503 (the queue restarting or full) and network errors (refused, reset, DNS, connect timeout) are retried
after 1 s, doubling to 30 s, each wait drawn at random from its upper half, with one warning line per retry.

A refusal (400, 401, 404, ...: a wrong QUEUE_URL or QUEUE_AUTH_TOKEN) is a configuration error, and retrying cannot
fix it. Raising an ordinary exception from the hook does not stop an AutoShardedClient: its first connect of a shard
(`launch_shard`) catches every Exception, logs "Failed to connect for shard_id: N. Retrying..." with a traceback,
opens a new gateway connection 5 s later, and does so forever. So the hook raises `QueueRefused`, a SystemExit,
which no `except Exception` catches and asyncio lets out of the event loop: `run()` closes the client and the
process exits with status 1 after printing one line to stderr:
    gateway-queue refused shard 0: 401 {"message": "missing or wrong credentials: ..."}; check QUEUE_AUTH_TOKEN ...
The same happens on a plain Client and on a re-identify hours later. Catch QueueRefused around `start()` if the
process must live on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from typing import Any, Dict, Optional

import aiohttp
import discord  # disnake / nextcord: `import disnake as discord`, `import nextcord as discord`

QUEUE_URL = os.environ.get("QUEUE_URL") or "http://gateway-queue/"
QUEUE_AUTH_TOKEN = os.environ.get("QUEUE_AUTH_TOKEN") or None

CONNECT_TIMEOUT = 5.0  # seconds to reach the queue; the wait itself has no limit
RETRY_FIRST = 1.0  # first wait after a 503 or a network error, doubling per failure...
RETRY_CAP = 30.0  # ...up to this
HINTS = {  # what a refusal usually means
    400: "the shard id did not reach the queue as a number, or QUEUE_URL is not the queue's root",
    401: "check QUEUE_AUTH_TOKEN against the queue's AUTH_TOKEN",
    404: "QUEUE_URL must be the queue's root: it reserves /healthz, /metrics, /status and /release",
    405: "QUEUE_URL must be the queue's root: it reserves /healthz, /metrics, /status and /release",
}

log = logging.getLogger("gateway_queue.client")


class QueueRefused(SystemExit):
    """The queue refused a request for a reason a retry cannot fix. A SystemExit, so that the library stops."""


def queue_headers() -> Dict[str, str]:
    return {"Authorization": f"Bearer {QUEUE_AUTH_TOKEN}"} if QUEUE_AUTH_TOKEN else {}


async def wait_for_queue(shard_id: Optional[int]) -> None:
    """Returns when the queue lets `shard_id` identify (None, a plain Client without shard_id, means shard 0)."""
    shard = shard_id or 0
    timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT, sock_read=None)
    retry = RETRY_FIRST
    async with aiohttp.ClientSession(timeout=timeout, headers=queue_headers()) as session:
        while True:
            try:
                async with session.get(QUEUE_URL, params={"shard": str(shard)}) as response:
                    if response.status == 200:
                        return
                    body = (await response.text(errors="replace"))[:300].strip()
                    if response.status != 503:
                        hint = HINTS.get(response.status, "check QUEUE_URL and QUEUE_AUTH_TOKEN")
                        raise QueueRefused(f"gateway-queue refused shard {shard}: {response.status} {body}; {hint}")
                    problem = f"503 {body}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                problem = repr(error)
            wait = random.uniform(retry / 2, retry)
            log.warning("gateway-queue: shard %d: %s; retrying in %.1f s", shard, problem, wait)
            await asyncio.sleep(wait)
            retry = min(retry * 2, RETRY_CAP)


class GatewayQueueMixin:
    """Put it first among the bases: class Bot(GatewayQueueMixin, discord.AutoShardedClient)."""

    async def before_identify_hook(self, shard_id: Optional[int], *, initial: bool = False) -> None:
        # Replaces the library's own hook, which sleeps 5 s before every identify but a process's first.
        await wait_for_queue(shard_id)


class Bot(GatewayQueueMixin, discord.AutoShardedClient):
    """A sharded client that asks the queue; shard_count and shard_ids work as usual."""

    def __init__(self, **options: Any) -> None:
        # No 180 s cap on a shard's first connect. discord.py only: disnake's and nextcord's Client refuse the option.
        options.setdefault("shard_connect_timeout", None)
        super().__init__(**options)


if __name__ == "__main__":
    Bot(intents=discord.Intents.default()).run(os.environ["DISCORD_TOKEN"])
