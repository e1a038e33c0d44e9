"""gateway-queue in lease mode for discord.py: the bucket stays held until the shard reports READY.

Fits what discord_py_queue.py fits (discord.py 2.x, tested 2.7.1; disnake and nextcord with `import disnake as
discord` in both files) and needs that file beside it. Run it as a bot, as that one:
    DISCORD_TOKEN=... QUEUE_URL=http://gateway-queue/ python3 discord_py_queue_lease.py

Why: Discord never says whether its 5 s run from one IDENTIFY or from the READY that answered it. In lease mode the
queue grants a bucket to one shard and holds it until that shard says how its IDENTIFY ended, with
    POST /release?shard=N&outcome=ready|invalid_session|closed     (same Authorization; 200 JSON, 4xx JSON otherwise)
and spaces the bucket's next grant from there.

When it releases (every event below is dispatched by the library for each shard):
    ready    READY was parsed: `on_shard_connect(shard_id)` on an AutoShardedClient, `on_connect` on a plain Client.
             (on_shard_ready / on_ready come later, after the guilds have streamed in.)
    closed   the connection ended before READY: `on_shard_disconnect` / `on_disconnect`, or the hook is called again
             for a shard whose grant was never released. discord.py hands INVALID_SESSION to no event (only to
             `on_socket_raw_receive` with enable_debug_events=True), so an invalid session is reported as `closed`.
A queue with LEASE_TIMEOUT unset answers 404; an older one (gateway-queue 1.0, twilight's) queues a POST /release
like any other request: parked, then granted, which costs a slot of the bucket and, with DISCORD_TOKEN, a session
start. Either answer turns releases off, with one warning. Where the library tells nothing (the process dies or hangs between the grant and READY, a release that never
arrives), the queue's LEASE_TIMEOUT ends the lease. A failed release never stops the shard: it is retried twice,
then logged, and the bot goes on.

What a refused request shows, and how long a wait may take: as in discord_py_queue.py (QueueRefused, exit status 1).
"""

from __future__ import annotations

import asyncio
import logging
import os
import urllib.parse
from typing import Any, Optional, Set

import aiohttp
import discord

from discord_py_queue import QUEUE_URL, GatewayQueueMixin, queue_headers, wait_for_queue

RELEASE_URL = urllib.parse.urljoin(QUEUE_URL, "release")
RELEASE_TIMEOUT = 10.0  # seconds per release attempt, connect to answer
RELEASE_ATTEMPTS = 3  # a lost release costs the bucket LEASE_TIMEOUT, so it is worth two more tries...
RELEASE_RETRY = 1.0  # ...1 s, then 2 s apart

GRANT_MARK = "free to connect"  # an old queue queues POST /release like any request, and grants it

log = logging.getLogger("gateway_queue.client")
releasing = True  # False once the queue has shown that it has no lease mode


def _stop_releasing(why: str) -> None:
    global releasing
    releasing = False
    log.warning("gateway-queue: %s is not in lease mode (%s); no more releases: use discord_py_queue.py with it",
                QUEUE_URL, why)


async def release(shard: int, outcome: str) -> None:
    """Tells the queue how shard's IDENTIFY ended. Never raises: the lease times out on the queue's side anyway."""
    timeout = aiohttp.ClientTimeout(total=RELEASE_TIMEOUT)
    params = {"shard": str(shard), "outcome": outcome}
    for attempt in range(RELEASE_ATTEMPTS):
        try:
            async with aiohttp.ClientSession(timeout=timeout, headers=queue_headers()) as session:
                async with session.post(RELEASE_URL, params=params) as response:
                    body = (await response.text(errors="replace"))[:300].strip()
                    if response.status == 200 and GRANT_MARK in body:
                        _stop_releasing("it granted the release like a queue request, which cost a slot")
                    elif response.status == 404:
                        _stop_releasing(f"404 {body}")
                    if response.status in (200, 404):
                        return
                    problem = f"{response.status} {body}"
                    if response.status != 503:
                        break  # a 409 will not change: this shard holds no lease (it timed out, or was never granted)
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            problem = repr(error)
        if attempt + 1 < RELEASE_ATTEMPTS:
            await asyncio.sleep(RELEASE_RETRY * 2**attempt)
    log.warning("gateway-queue: release of shard %d (%s) failed: %s", shard, outcome, problem)


class GatewayQueueLeaseMixin(GatewayQueueMixin):
    """Put it first among the bases: class Bot(GatewayQueueLeaseMixin, discord.AutoShardedClient)."""

    def __init__(self, *args: Any, **options: Any) -> None:
        self._leased: Set[int] = set()  # shards granted by the queue and not released yet
        self._releases: Set[asyncio.Task] = set()  # keeps each release task alive until it is done
        super().__init__(*args, **options)

    async def before_identify_hook(self, shard_id: Optional[int], *, initial: bool = False) -> None:
        shard = shard_id or 0
        self._release(shard, "closed")  # the previous grant never reached READY
        await wait_for_queue(shard)
        self._leased.add(shard)

    def dispatch(self, event: str, /, *args: Any, **kwargs: Any) -> None:
        super().dispatch(event, *args, **kwargs)
        sharded = isinstance(self, discord.AutoShardedClient)
        if sharded and event in ("shard_connect", "shard_disconnect"):
            self._release(args[0], "ready" if event == "shard_connect" else "closed")
        elif not sharded and event in ("connect", "disconnect"):
            self._release(getattr(self, "shard_id", None) or 0, "ready" if event == "connect" else "closed")

    def _release(self, shard: int, outcome: str) -> None:
        if shard in self._leased and releasing:
            self._leased.discard(shard)
            task = asyncio.get_running_loop().create_task(release(shard, outcome))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)


class Bot(GatewayQueueLeaseMixin, discord.AutoShardedClient):
    """A sharded client that asks the queue and releases its bucket at READY."""

    def __init__(self, **options: Any) -> None:
        # No 180 s cap on a shard's first connect. discord.py only: disnake's and nextcord's Client refuse the option.
        options.setdefault("shard_connect_timeout", None)
        super().__init__(**options)


if __name__ == "__main__":
    Bot(intents=discord.Intents.default()).run(os.environ["DISCORD_TOKEN"])
