#!/usr/bin/env bash
# The quick start: builds cogmesh (release) and runs a small mesh on loopback for about half a
# minute, then stops it all:
#   - the control plane (`cogmesh control`);
#   - three simulated cognitive workloads of capacity 1, 2 and 4 (`cogmesh workload`), each behind
#     its own inbound sidecar that registers it with the control plane;
#   - one client sidecar (`cogmesh-proxy`) that learns the instances from the control plane and
#     balances with the cognitive strategy, using the load each workload reports.
# It drives a bounded burst of traffic through the client sidecar and shows where it went, what
# the control plane computed (`cogmesh routes`, `cogmesh status`) and what the sidecar measured.
# Pass --keep to leave the mesh running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v curl >/dev/null; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq curl >/dev/null
fi

# COGMESH_BIN=target/debug runs already built debug binaries instead.
BIN="${COGMESH_BIN:-target/release}"
[ -n "${COGMESH_BIN:-}" ] || cargo build --release --bins
CONTROL=127.0.0.1:7070 CLIENT=127.0.0.1:4140 ADMIN=127.0.0.1:4191
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM
wait_ready() { for _ in $(seq 100); do curl -fs "http://$1/ready" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "not ready: $1" >&2; return 1; }

COGMESH_LOG=warn "$BIN/cogmesh" control --listen "$CONTROL" --weight-interval-ms 500 & pids+=($!)
sleep 0.5
i=0
for capacity in 1 2 4; do
    i=$((i + 1))
    app="127.0.0.1:1808$i" sidecar="127.0.0.1:4143$i" admin="127.0.0.1:4192$i"
    COGMESH_LOG=warn "$BIN/cogmesh" workload --listen "$app" --name "reasoning-$i(cap $capacity)" \
        --capacity "$capacity" --service-time-ms 20 --service-time-dist exponential & pids+=($!)
    COGMESH_LOG=warn "$BIN/cogmesh-proxy" --listen "$sidecar" --admin "$admin" --upstream "$app" \
        --direction inbound --upstream-service local --control "$CONTROL" --service reasoning & pids+=($!)
    wait_ready "$admin"
done
COGMESH_LOG=warn "$BIN/cogmesh-proxy" --listen "$CLIENT" --admin "$ADMIN" --upstream-service reasoning \
    --control "$CONTROL" --service gateway & pids+=($!)
wait_ready "$ADMIN"
for _ in $(seq 100); do
    [ "$(curl -fs "http://$ADMIN/config" | grep -c '"address": "127.0.0.1:4143')" -ge 3 ] && break; sleep 0.1
done

echo; echo "== 1200 requests, 8 at a time, through the client sidecar http://$CLIENT/work =="
seq 1200 | xargs -P 8 -I{} curl -s -o /dev/null -D - "http://$CLIENT/work" \
    | tr -d '\r' | awk -F': ' 'tolower($1)=="x-served-by"{print $2} /^HTTP/{split($0, f, " "); s[f[2]]++} END{for (k in s) print "  status " k ": " s[k] " responses" > "/dev/stderr"}' \
    | sort | uniq -c
echo; echo "== what the control plane computed (cogmesh routes) =="
"$BIN/cogmesh" routes --control "$CONTROL"
echo; echo "== sidecars and their sync state (cogmesh status) =="
"$BIN/cogmesh" status --control "$CONTROL"
echo; echo "== what the client sidecar measured (http://$ADMIN/metrics) =="
curl -s "http://$ADMIN/metrics" | grep -E '^(request_total|response_total|endpoint_(picks_total|load|weight))' || true
echo; echo "== an unreachable endpoint gives a 502 that names it =="
COGMESH_LOG=error "$BIN/cogmesh-proxy" --listen 127.0.0.1:4150 --admin 127.0.0.1:4199 --upstream 127.0.0.1:9 & pids+=($!)
wait_ready 127.0.0.1:4199
curl -s -i http://127.0.0.1:4150/ | tr -d '\r'
if [ "${1:-}" = "--keep" ]; then echo; echo "mesh running; Ctrl-C stops it"; wait; fi
