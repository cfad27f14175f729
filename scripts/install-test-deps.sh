#!/usr/bin/env bash
# The system programs some tests check artifacts with (Debian packages): Chromium renders bench's HTML
# report, sshd serves the SSH device test. A no-op when both are there; otherwise apt-get (as root, or sudo).
set -euo pipefail
if command -v chromium >/dev/null && [ -x /usr/sbin/sshd ]; then
    exit 0
fi
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
echo "installing chromium and openssh-server (Debian packages the tests need)" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium openssh-server >/dev/null
