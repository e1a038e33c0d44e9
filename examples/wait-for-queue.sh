#!/bin/sh
# wait-for-queue.sh SHARD_ID: returns when gateway-queue lets shard SHARD_ID identify. For shell entrypoints and
# for languages without a recipe of their own:   ./wait-for-queue.sh 42 && exec ./my-shard --shard 42
#
# Needs curl 7.76 or newer (--fail-with-body; on older curl use --fail, which drops the error's body). Tested with
# curl 7.88.1 under dash and bash.
# Environment: QUEUE_URL (default http://gateway-queue/) and QUEUE_AUTH_TOKEN, the queue's shared secret, sent as
# "Authorization: Bearer <secret>" (unset: no header). The queue itself calls it AUTH_TOKEN (its own, server-side
# secret); the client's name says whose secret it is, next to DISCORD_TOKEN and other AUTH_TOKENs.
#
# How long it waits: as long as the queue says. There is no --max-time, since a parked request can wait for hours
# (and a timeout followed by a retry would rejoin the back of the line); only connecting is limited (5 s).
#
# Retries: --retry retries a timeout and a 408, 429, 500, 502, 503 or 504, but not a refused connection: that needs
# --retry-connrefused (the queue restarting, or not up yet). A DNS failure (6), an empty reply (52) and a reset
# (56), e.g. the queue killed while a request was parked, are not retried by curl at all; the loop below retries
# them. --retry-all-errors is not used: with --fail it would retry a 401 or a 400 forever, which no retry can fix.
#
# Output, all on stderr (stdout stays empty): the queue's answer as one JSON line ({"message": "You're free to
# connect now! :)"} when granted), after curl's "curl: (22) The requested URL returned error: 401" when refused. Exit status: 0 granted. 22 refused (400, 401, 404, ...: a wrong QUEUE_URL or QUEUE_AUTH_TOKEN;
# the JSON line says which). 2 no shard id given. Anything else is curl's own exit code once its retries are spent
# (7 refused, 28 connect timeout).
set -u

shard=${1:?usage: wait-for-queue.sh SHARD_ID}
url=${QUEUE_URL:-http://gateway-queue/}
connect_timeout=5  # seconds to reach the queue; the wait itself has no limit
retries=1000       # curl's retries per attempt, 2 s apart: a queue down for half an hour
retry_delay=2

wait_once() {
  # The secret goes through a config line on stdin, so it does not show in `ps`.
  if [ -n "${QUEUE_AUTH_TOKEN:-}" ]; then
    printf 'header = "Authorization: Bearer %s"\n' "$QUEUE_AUTH_TOKEN"
  fi | curl --config - --get --data-urlencode "shard=$shard" "$url" \
      --silent --show-error --fail-with-body --write-out '\n' --connect-timeout "$connect_timeout" \
      --retry "$retries" --retry-delay "$retry_delay" --retry-connrefused >&2
}

while :; do
  wait_once
  status=$?
  case $status in
    6 | 52 | 56) sleep "$retry_delay" ;;  # see above: curl does not retry these
    *) exit "$status" ;;
  esac
done
