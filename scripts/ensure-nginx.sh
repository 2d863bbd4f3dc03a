#!/usr/bin/env bash
# tests/test_replicas.py puts nginx (deploy/nginx/sglora.conf) in front of two API replicas when an nginx binary is
# installed. Install Debian's nginx-light when missing; if that is impossible the nginx parts skip and say so.
set -uo pipefail
if command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; then exit 0; fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "ensure-nginx: not root and no sudo: the nginx parts of the replica tests will skip" >&2; exit 0; fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq nginx-light; } >/tmp/sglora-nginx-install.log 2>&1; then
  echo "ensure-nginx: apt-get install nginx-light failed (see /tmp/sglora-nginx-install.log): nginx parts will skip" >&2
fi
# The tests run their own nginx (own config, free port); a system nginx the package may have started is left alone.
exit 0
