// gateway-queue in lease mode for @discordjs/ws: the bucket stays held until the shard reports READY.
//
// Fits what discordjs_ws_queue.mjs fits (@discordjs/ws 2.x, tested 2.0.4) and needs that file beside it. Run it
// as a bot, as that one:  DISCORD_TOKEN=... QUEUE_URL=http://gateway-queue/ node discordjs_ws_queue_lease.mjs
//
// Why: Discord never says whether its 5 s run from one IDENTIFY or from the READY that answered it. In lease mode
// the queue grants a bucket to one shard and holds it until that shard says how its IDENTIFY ended, with
//   POST /release?shard=N&outcome=ready|invalid_session|closed    (same Authorization; 200 JSON, 4xx JSON otherwise)
// and spaces the bucket's next grant from there.
//
// When it releases (the manager re-emits each shard's events with the shard id last):
//   ready    WebSocketShardEvents.Ready (data, shardId)
//   closed   WebSocketShardEvents.Closed (code, shardId) before READY, or the shard asks the queue again while its
//            grant is unreleased. @discordjs/ws reports INVALID_SESSION only as a Debug text line ("Invalid
//            session; will attempt to resume: false"), then closes the connection, so it is reported as `closed`.
// A queue with LEASE_TIMEOUT unset answers 404; an older one (gateway-queue 1.0, twilight's) queues a POST /release
// like any other request: parked, then granted, which costs a slot of the bucket and, with DISCORD_TOKEN, a session
// start. Either answer turns releases off, with one warning. Where the library tells nothing (the process dies or hangs between the grant and READY, a release that never
// arrives), the queue's LEASE_TIMEOUT ends the lease. A failed release never stops the shard: it is retried twice,
// then logged, and the bot goes on.
//
// What a refused request shows, and how long a wait may take: as in discordjs_ws_queue.mjs.

import process from 'node:process';
import { setTimeout as sleep } from 'node:timers/promises';
import { pathToFileURL } from 'node:url';
import { REST } from '@discordjs/rest';
import { WebSocketManager, WebSocketShardEvents } from '@discordjs/ws';
import { QUEUE_URL, queueRequest, queueThrottler } from './discordjs_ws_queue.mjs';

const RELEASE_TIMEOUT_MS = 10_000; // per release attempt, connect to answer
const RELEASE_ATTEMPTS = 3; // a lost release costs the bucket LEASE_TIMEOUT, so it is worth two more tries...
const RELEASE_RETRY_MS = 1_000; // ...1 s, then 2 s apart
const GRANT_MARK = 'free to connect'; // an old queue queues POST /release like any request, and grants it
let releasing = true; // false once the queue has shown that it has no lease mode

/** Tells the queue how shard's IDENTIFY ended. Never rejects: the lease times out on the queue's side anyway. */
export async function release(shardId, outcome) {
  const url = new URL('release', QUEUE_URL);
  url.searchParams.set('shard', String(shardId));
  url.searchParams.set('outcome', outcome);
  let problem;
  for (let attempt = 0; attempt < RELEASE_ATTEMPTS; attempt++) {
    try {
      const { status, body } = await queueRequest('POST', url, AbortSignal.timeout(RELEASE_TIMEOUT_MS));
      if ((status === 200 && body.includes(GRANT_MARK)) || status === 404) {
        const why = status === 404 ? `404 ${body.trim()}` : 'it granted the release like a queue request, which cost a slot';
        releasing = false;
        console.warn(`gateway-queue: ${QUEUE_URL} is not in lease mode (${why}); no more releases: use discordjs_ws_queue.mjs with it`);
        return;
      }
      if (status === 200) return;
      problem = `${status} ${body.trim()}`;
      if (status !== 503) break; // a 409 will not change: this shard holds no lease (it timed out, or was never granted)
    } catch (error) {
      problem = error.code ?? error.message;
    }
    if (attempt + 1 < RELEASE_ATTEMPTS) await sleep(RELEASE_RETRY_MS * 2 ** attempt);
  }
  console.warn(`gateway-queue: release of shard ${shardId} (${outcome}) failed: ${problem}`);
}

/** buildIdentifyThrottler for WebSocketManager: every shard asks the queue and releases its bucket at READY. */
export function queueLeaseThrottler(manager) {
  const leased = new Set(); // shards granted by the queue and not released yet
  const releaseIfLeased = (shardId, outcome) => {
    if (leased.delete(shardId) && releasing) void release(shardId, outcome);
  };
  manager.on(WebSocketShardEvents.Ready, (data, shardId) => releaseIfLeased(shardId, 'ready'));
  manager.on(WebSocketShardEvents.Closed, (code, shardId) => releaseIfLeased(shardId, 'closed'));
  const throttler = queueThrottler(manager);
  return {
    async waitForIdentify(shardId, signal) {
      releaseIfLeased(shardId, 'closed'); // the previous grant never reached READY
      await throttler.waitForIdentify(shardId, signal);
      leased.add(shardId);
    },
  };
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const token = process.env.DISCORD_TOKEN;
  const intents = 1; // GatewayIntentBits.Guilds
  const rest = new REST({ version: '10' }).setToken(token);
  const manager = new WebSocketManager({ token, intents, rest, buildIdentifyThrottler: queueLeaseThrottler });
  manager.on(WebSocketShardEvents.Ready, (data, shardId) => console.log(`shard ${shardId} ready`));
  await manager.connect();
}
