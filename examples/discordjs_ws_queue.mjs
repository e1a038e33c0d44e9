// gateway-queue for @discordjs/ws: every shard waits for the queue before it sends IDENTIFY.
//
// Fits @discordjs/ws 2.x (tested: 2.0.4 with @discordjs/rest 2.6.3 on Node 20), with either sharding strategy
// (the throttler always runs in the main thread). Run it as a bot:
//   DISCORD_TOKEN=... QUEUE_URL=http://gateway-queue/ node discordjs_ws_queue.mjs
// or import { queueThrottler } and pass `buildIdentifyThrottler: queueThrottler` to your own WebSocketManager.
//
// Environment: QUEUE_URL (default http://gateway-queue/) and QUEUE_AUTH_TOKEN, the queue's shared secret, sent as
// "Authorization: Bearer <secret>" (unset: no header). The queue itself calls it AUTH_TOKEN (its own, server-side
// secret); the bot's name says whose secret it is, next to DISCORD_TOKEN and any other AUTH_TOKEN in its environment.
//
// How long it waits: as long as the queue says; a parked request can take hours. Global fetch (undici) gives up on
// a response whose headers take over 300 s (headersTimeout), so the wait uses node:http / node:https, which have no
// timeout of their own, through an agent without keep-alive. Only connecting is limited (5 s). The library's abort
// signal (the shard closed or was destroyed) cancels the request, and the queue drops it at no cost.
//
// Retries: 503 (the queue restarting or full) and network errors (refused, reset, DNS, connect timeout) are retried
// after 1 s, doubling to 30 s, each wait drawn at random from its upper half, with one warning line per retry.
//
// A refusal (400, 401, 404, ...: a wrong QUEUE_URL or QUEUE_AUTH_TOKEN) cannot be fixed by retrying. When
// waitForIdentify simply rejects, @discordjs/ws 2.0.4 logs a debug line ("waitForIdentify threw an unknown error"),
// destroys the shard with recover: Resume and reconnects 500 ms later: about two gateway connections per second per
// shard, forever, and no error anyone sees. So on a refusal the throttler destroys the whole manager (every shard
// closes, nothing reconnects) and then reports the error the way the library reports its own fatal errors (bad
// token, disallowed intents): as the manager's `error` event (error, shardId). With no `error` listener it is thrown
// like any unhandled 'error' event: Node prints it and exits with status 1, e.g.
//   QueueRefusedError: gateway-queue refused shard 0: 401 {"message": "missing or wrong credentials: ..."}; check ...
// With a listener, the listener gets it and `manager.connect()` never settles (the shards are gone): a script that
// awaits it at top level and has nothing else to do then ends with Node's status 13 (unsettled top-level await).

import http from 'node:http';
import https from 'node:https';
import process from 'node:process';
import { setTimeout as sleep } from 'node:timers/promises';
import { pathToFileURL } from 'node:url';
import { REST } from '@discordjs/rest';
import { WebSocketManager, WebSocketShardEvents } from '@discordjs/ws';

export const QUEUE_URL = process.env.QUEUE_URL || 'http://gateway-queue/';
const QUEUE_AUTH_TOKEN = process.env.QUEUE_AUTH_TOKEN || undefined;

const CONNECT_TIMEOUT_MS = 5_000; // to reach the queue; the wait itself has no limit
const RETRY_FIRST_MS = 1_000; // first wait after a 503 or a network error, doubling per failure...
const RETRY_CAP_MS = 30_000; // ...up to this
const MAX_BODY_CHARS = 300; // of an error answer, for the message
const CLOSE_REASON = 'gateway-queue refused to queue this shard'; // a WebSocket close reason fits in 123 bytes
const HINTS = {
  400: "the shard id did not reach the queue as a number, or QUEUE_URL is not the queue's root",
  401: "check QUEUE_AUTH_TOKEN against the queue's AUTH_TOKEN",
  404: "QUEUE_URL must be the queue's root: it reserves /healthz, /metrics, /status and /release",
  405: "QUEUE_URL must be the queue's root: it reserves /healthz, /metrics, /status and /release",
};
const agents = { 'http:': new http.Agent({ keepAlive: false }), 'https:': new https.Agent({ keepAlive: false }) };

/** The queue refused a request for a reason a retry cannot fix. */
export class QueueRefusedError extends Error {
  name = 'QueueRefusedError';
}

/** One request to the queue: resolves to { status, body } whenever an answer comes, rejects on network errors. */
export function queueRequest(method, url, signal) {
  const headers = QUEUE_AUTH_TOKEN ? { Authorization: `Bearer ${QUEUE_AUTH_TOKEN}` } : {};
  const { request } = url.protocol === 'https:' ? https : http;
  return new Promise((resolve, reject) => {
    const req = request(url, { method, headers, signal, agent: agents[url.protocol] }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk) => { body = (body + chunk).slice(0, MAX_BODY_CHARS); });
      res.on('end', () => resolve({ status: res.statusCode, body }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.on('socket', (socket) => {
      if (!socket.connecting) return;
      const timer = setTimeout(() => req.destroy(new Error('connect timeout')), CONNECT_TIMEOUT_MS);
      socket.once('connect', () => clearTimeout(timer));
      socket.once('close', () => clearTimeout(timer));
    });
    req.end();
  });
}

/** Resolves when the queue lets `shardId` identify; rejects with QueueRefusedError, or when `signal` aborts. */
export async function waitForQueue(shardId, signal) {
  const url = new URL(QUEUE_URL);
  url.searchParams.set('shard', String(shardId));
  let retry = RETRY_FIRST_MS;
  for (;;) {
    let problem;
    try {
      const { status, body } = await queueRequest('GET', url, signal);
      if (status === 200) return;
      if (status !== 503) {
        const hint = HINTS[status] ?? 'check QUEUE_URL and QUEUE_AUTH_TOKEN';
        throw new QueueRefusedError(`gateway-queue refused shard ${shardId}: ${status} ${body.trim()}; ${hint}`);
      }
      problem = `503 ${body}`;
    } catch (error) {
      if (signal.aborted || error instanceof QueueRefusedError) throw error;
      problem = error.code ?? error.message;
    }
    const wait = retry / 2 + (Math.random() * retry) / 2;
    console.warn(`gateway-queue: shard ${shardId}: ${problem}; retrying in ${(wait / 1000).toFixed(1)} s`);
    await sleep(wait, undefined, { signal });
    retry = Math.min(retry * 2, RETRY_CAP_MS);
  }
}

/** Stops every shard of `manager`, then reports `error` as the library reports a fatal error of its own. */
export async function failManager(manager, error, shardId) {
  await manager.destroy({ reason: CLOSE_REASON, code: 1000 });
  if (manager.listenerCount(WebSocketShardEvents.Error) > 0) manager.emit(WebSocketShardEvents.Error, error, shardId);
  else process.nextTick(() => { throw error; });
}

/** Rethrows a wait's error once the shard's signal has aborted, so that the library takes its quiet path. */
async function afterAbort(signal, error) {
  if (!signal.aborted) await new Promise((resolve) => signal.addEventListener('abort', resolve, { once: true }));
  throw error;
}

/** buildIdentifyThrottler for WebSocketManager: every shard asks the queue. */
export function queueThrottler(manager) {
  let failed = false;
  return {
    async waitForIdentify(shardId, signal) {
      try {
        await waitForQueue(shardId, signal);
      } catch (error) {
        if (error instanceof QueueRefusedError && !failed) {
          failed = true;
          await failManager(manager, error, shardId); // closes this shard too, which aborts `signal`
        }
        await afterAbort(signal, error);
      }
    },
  };
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const token = process.env.DISCORD_TOKEN;
  const intents = 1; // GatewayIntentBits.Guilds
  const rest = new REST({ version: '10' }).setToken(token);
  const manager = new WebSocketManager({ token, intents, rest, buildIdentifyThrottler: queueThrottler });
  manager.on(WebSocketShardEvents.Ready, (data, shardId) => console.log(`shard ${shardId} ready`));
  await manager.connect();
}
