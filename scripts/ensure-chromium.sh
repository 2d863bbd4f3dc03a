#!/usr/bin/env bash
# The playground test drives Debian's chromium through Playwright (Playwright's own browser download is not
# reachable from CI). Install it when missing; if that is impossible the test skips and says what is missing.
set -uo pipefail
if [ -x /usr/bin/chromium ]; then exit 0; fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "ensure-chromium: not root and no sudo: the playground browser test will skip" >&2; exit 0; fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium; } >/tmp/sglora-chromium-install.log 2>&1; then
  echo "ensure-chromium: apt-get install chromium failed (see /tmp/sglora-chromium-install.log): the playground browser test will skip" >&2
fi
exit 0
