#!/usr/bin/env bash
# PostgreSQL server binaries for `lockgate up` and the team-stack tests (tests/test_team_stack.py):
# Debian's `postgresql` package. A no-op when initdb is already there (PATH or /usr/lib/postgresql/*/bin).
# Needs root (CI runs as root on a fresh machine); otherwise prints the command to run.
set -euo pipefail

if command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "PostgreSQL is not installed; run as root: apt-get update && apt-get install -y postgresql" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# The package's own cluster is not needed (lockgate initdb's its own under LOCKGATE_HOME):
# policy-rc.d keeps apt from starting the system service.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get install -y -qq --no-install-recommends postgresql >/dev/null
echo "installed: $(ls -d /usr/lib/postgresql/*/bin)"
