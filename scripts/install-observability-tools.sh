#!/usr/bin/env bash
# Installs the tools the observability tests run for real: Debian's `prometheus` (the server
# and `promtool`) and `chromium` (headless, for the status page), plus the pinned npm tools
# that type-check the Grafana dashboards (scripts/typecheck-dashboards.sh). Idempotent: with
# everything present it only checks versions. Installing Debian packages needs root (CI and
# the development machines run as root); elsewhere it says what to install.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
missing=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
command -v chromium >/dev/null || missing+=(chromium)
command -v npm >/dev/null || missing+=(npm)
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "install-observability-tools: missing ${missing[*]}; install them (Debian: apt-get install ${missing[*]})" >&2
        exit 1
    fi
    echo "install-observability-tools: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
"$repo/scripts/typecheck-dashboards.sh" >/dev/null
echo "install-observability-tools: ready: $(prometheus --version 2>&1 | head -1); $(chromium --version 2>/dev/null); node $(node --version)"
