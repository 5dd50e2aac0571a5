#!/usr/bin/env bash
# The quick start: builds cogmesh (release), starts three sample workloads and one cogmesh-proxy
# in front of them on loopback, sends a bounded burst of HTTP/1.1, HTTP/2 and gRPC-shaped
# traffic through the proxy, shows where it went and what the proxy measured, then stops
# everything. Pass --keep to leave the mesh running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v curl >/dev/null || { SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"; $SUDO apt-get update -qq && $SUDO apt-get install -y -qq curl >/dev/null; }

cargo build --release --bins
BIN=target/release
PROXY=127.0.0.1:4140 ADMIN=127.0.0.1:4191
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

upstreams=()
for i in 1 2 3; do
    addr="127.0.0.1:1808$i"
    COGMESH_LOG=warn "$BIN/cogmesh" workload --listen "$addr" --name "workload-$i" & pids+=($!)
    upstreams+=(--upstream "$addr")
done
COGMESH_LOG=info "$BIN/cogmesh-proxy" --listen "$PROXY" --admin "$ADMIN" "${upstreams[@]}" & pids+=($!)
for _ in $(seq 100); do curl -fs "http://$ADMIN/ready" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fs "http://$ADMIN/ready" >/dev/null || { echo "the proxy did not become ready"; exit 1; }

echo; echo "== 300 HTTP/1.1 requests through http://$PROXY (a third of them slow) =="
for i in $(seq 300); do
    path=/; [ $((i % 3)) -eq 0 ] && path="/sleep?ms=5"
    curl -s -o /dev/null -D - "http://$PROXY$path" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-served-by"{print $2}'
done | sort | uniq -c
echo; echo "== HTTP/2 (h2c) =="
curl -s --http2-prior-knowledge "http://$PROXY/headers"; echo
echo; echo "== an unreachable endpoint gives a 502 that names it =="
COGMESH_LOG=error "$BIN/cogmesh-proxy" --listen 127.0.0.1:4150 --admin 127.0.0.1:4192 --upstream 127.0.0.1:9 & pids+=($!)
for _ in $(seq 50); do curl -fs http://127.0.0.1:4192/ready >/dev/null 2>&1 && break; sleep 0.1; done
curl -s -i http://127.0.0.1:4150/ | tr -d '\r'
echo; echo "== what the proxy measured (http://$ADMIN/metrics) =="
curl -s "http://$ADMIN/metrics" | grep -E '^(request_total|response_total|tcp_open)' || true
echo; echo "== endpoint state (http://$ADMIN/config) =="
curl -s "http://$ADMIN/config" | python3 -c 'import json,sys; t=json.load(sys.stdin)["routing_table"]; [print(f"{e[\"address\"]}: requests={e[\"requests\"]} rtt_ewma_ms={e[\"rtt_ewma_ms\"]:.2f}") for s in t["services"] for e in s["endpoints"]]'
if [ "${1:-}" = "--keep" ]; then echo; echo "mesh running; Ctrl-C stops it"; wait; fi
