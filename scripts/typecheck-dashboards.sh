#!/usr/bin/env bash
# Type-checks every Grafana dashboard in deploy/grafana/dashboards/ against the `Dashboard`
# type of @grafana/schema with `tsc --strict`: each JSON file becomes the initializer of a
# `const dashboard: Dashboard = ...` declaration, so a misspelt field, a wrong type or an
# unknown property is a compile error naming the file and line.
#
# The pinned tools (deploy/grafana/typecheck/package-lock.json) are installed with `npm ci`
# into .cache/grafana-typecheck (first run needs the npm registry; later runs are offline).
#
# Usage: scripts/typecheck-dashboards.sh [WORK_DIR]
#        (GANTRY_DASHBOARDS_DIR checks the dashboards of another directory.)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-${GANTRY_TYPECHECK_DIR:-$repo/.cache/grafana-typecheck}}
pins="$repo/deploy/grafana/typecheck"
dashboards=${GANTRY_DASHBOARDS_DIR:-$repo/deploy/grafana/dashboards}

command -v npm >/dev/null || { echo "typecheck-dashboards: npm (Node.js) is needed" >&2; exit 1; }
mkdir -p "$work"
want=$(cat "$pins/package.json" "$pins/package-lock.json" | sha256sum | cut -d' ' -f1)
stamp="$work/.gantry-stamp"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" || ! -x "$work/node_modules/.bin/tsc" ]]; then
    cp "$pins/package.json" "$pins/package-lock.json" "$work/"
    (cd "$work" && npm ci --no-audit --no-fund --loglevel=error)
    echo "$want" >"$stamp"
fi
cp "$pins/tsconfig.json" "$work/"
rm -rf "$work/generated"
mkdir -p "$work/generated"
count=0
for json in "$dashboards"/*.json; do
    name=$(basename "$json" .json)
    {
        echo "// Generated from $json by scripts/typecheck-dashboards.sh."
        echo 'import type { Dashboard } from "@grafana/schema";'
        printf 'const dashboard: Dashboard = '
        cat "$json"
        echo ';'
        echo 'export default dashboard;'
    } >"$work/generated/$name.ts"
    count=$((count + 1))
done
[[ $count -gt 0 ]] || { echo "typecheck-dashboards: no dashboards found" >&2; exit 1; }
(cd "$work" && node_modules/.bin/tsc -p tsconfig.json)
echo "typecheck-dashboards: $count dashboard(s) match @grafana/schema's Dashboard type (tsc --strict)"
