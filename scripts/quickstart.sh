#!/usr/bin/env bash
# The quick start behind `make run`: local Daytona API + SQLite + example leases + the daemon in the
# foreground. Ctrl-C stops the daemon and the local API. State lives in .leasectl/ (delete it to
# start over). Run `. .leasectl/env` in another terminal to point leasectl at the same setup.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE="$PWD/.leasectl"
BIN="$PWD/.venv/bin"
PORT="${LEASECTL_QUICKSTART_PORT:-3986}"
mkdir -p "$STATE"
chmod 700 "$STATE"

# A local key for the local API, made once and kept out of argv (ps shows argv).
if [ ! -s "$STATE/api-key" ]; then
  (umask 077 && "$BIN/python" -c 'import secrets; print(secrets.token_urlsafe(24))' > "$STATE/api-key")
fi
DAYTONA_API_KEY="$(cat "$STATE/api-key")"
export DAYTONA_API_KEY
export DAYTONA_API_URL="http://127.0.0.1:${PORT}/api"
export LEASECTL_DATABASE_URL="sqlite:///${STATE}/leasectl.db"
export LEASECTL_CONTROLLER__RECONCILE_INTERVAL_SECONDS="${LEASECTL_CONTROLLER__RECONCILE_INTERVAL_SECONDS:-5}"
export LEASECTL_CONTROLLER__GC_INTERVAL_SECONDS="${LEASECTL_CONTROLLER__GC_INTERVAL_SECONDS:-30}"
export LEASECTL_EXEC__POLL_INTERVAL_SECONDS="${LEASECTL_EXEC__POLL_INTERVAL_SECONDS:-1}"

umask 077
# Everything the daemon runs with, so `leasectl doctor` / `plan` in another terminal see the same.
cat > "$STATE/env" <<ENV
export DAYTONA_API_KEY="\$(cat '$STATE/api-key')"   # the local API's key lives in $STATE/api-key
export DAYTONA_API_URL='$DAYTONA_API_URL'
export LEASECTL_DATABASE_URL='$LEASECTL_DATABASE_URL'
export LEASECTL_CONTROLLER__RECONCILE_INTERVAL_SECONDS='$LEASECTL_CONTROLLER__RECONCILE_INTERVAL_SECONDS'
export LEASECTL_CONTROLLER__GC_INTERVAL_SECONDS='$LEASECTL_CONTROLLER__GC_INTERVAL_SECONDS'
export LEASECTL_EXEC__POLL_INTERVAL_SECONDS='$LEASECTL_EXEC__POLL_INTERVAL_SECONDS'
ENV

# LOCAL_DAYTONA_ARGS passes flags to the local API, e.g. "--quota 2" (see docs/local-daytona.md).
# shellcheck disable=SC2086  # word splitting of the flags is the point
"$BIN/leasectl" local-daytona --port "$PORT" --state-dir "$STATE/daytona" ${LOCAL_DAYTONA_ARGS:-} \
  >"$STATE/local-daytona.log" 2>&1 &
emulator=$!
cleanup() {
  kill -TERM "$emulator" 2>/dev/null || true
  wait "$emulator" 2>/dev/null || true
}
trap cleanup EXIT

# Wait for the local API (up to 30 s).
for _ in $(seq 1 60); do
  if "$BIN/python" - "$DAYTONA_API_URL" <<'PY' 2>/dev/null; then break; fi
import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(sys.argv[1] + "/sandbox", timeout=1)
except urllib.error.HTTPError:
    sys.exit(0)  # 401 without a key: the server answers
sys.exit(0)
PY
  if ! kill -0 "$emulator" 2>/dev/null; then
    echo "the local Daytona API did not start; see $STATE/local-daytona.log" >&2
    exit 1
  fi
  sleep 0.5
done

echo "local Daytona API: $DAYTONA_API_URL (log: $STATE/local-daytona.log)"
# The examples are applied only to a new database or when the file changed since the last time:
# a restart must not revert what the operator changed with SQL or `leasectl apply`.
EXAMPLES=examples/leases.yaml
STAMP="$STATE/examples.sha256"
new_db=no
[ -s "$STATE/leasectl.db" ] || new_db=yes
"$BIN/leasectl" db upgrade
digest="$(sha256sum "$EXAMPLES" | cut -d' ' -f1)"
if [ "$new_db" = yes ]; then
  echo "new database: applying $EXAMPLES"
  "$BIN/leasectl" apply -f "$EXAMPLES"
elif [ "$(cat "$STAMP" 2>/dev/null)" != "$digest" ]; then
  echo "$EXAMPLES changed since it was last applied: applying it"
  "$BIN/leasectl" apply -f "$EXAMPLES"
else
  echo "existing database, $EXAMPLES unchanged: not applied (your edits stay; delete .leasectl/ to start over)"
fi
echo "$digest" > "$STAMP"
echo
echo "Starting the daemon. In another terminal:  . .leasectl/env && .venv/bin/leasectl get"
echo "Metrics: http://127.0.0.1:9464/metrics   Ctrl-C stops everything."
echo
"$BIN/leasectl" run
