#!/usr/bin/env bash
# The cache tests talk to a real Redis on 127.0.0.1:6379. Start an in-memory one if none answers.
set -euo pipefail
if redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; then exit 0; fi
if ! command -v redis-server >/dev/null; then
  echo "redis-server not found: install it (apt-get install redis-server)" >&2; exit 1
fi
redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
  --dir /tmp --logfile /tmp/sglora-test-redis.log
for _ in $(seq 50); do
  redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG && exit 0
  sleep 0.1
done
echo "redis did not answer on 127.0.0.1:6379" >&2; exit 1
