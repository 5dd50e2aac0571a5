#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind: a figure that stays the same however
# busy the machine is, unlike the wall-clock benchmarks, so a change on the request path can be
# weighed on a shared machine.
#
#   bench/setup.sh && cargo build --release -p cogmesh-proxy
#   bench/instructions.sh                        # the proxy as it starts by default
#   bench/instructions.sh --otlp-endpoint http://127.0.0.1:9 --otlp-protocol http \
#       --trace-sampling-ratio 0.01              # any extra cogmesh-proxy flags
#
# One nginx upstream (1 KiB body) and one cogmesh-proxy worker in front of it under
# `valgrind --tool=callgrind`; oha sends 1000 and then, in a second run, 5000 HTTP/1.1 requests
# over 4 connections. The difference of the two totals over 4000 is the cost of one request,
# start-up and shutdown cancelled out. Ports are picked at run time on 127.0.0.1; everything
# started is stopped on exit. Spans sent to an address nobody listens on are counted as failed
# exports, which still includes building and encoding them.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${COGMESH_BIN:-$REPO/target/release/cogmesh-proxy}"
OHA="$REPO/.tools/bin/oha"
for tool in valgrind nginx curl python3 "$OHA" "$BIN"; do
    command -v "$tool" >/dev/null || { echo "instructions.sh: $tool is missing (bench/setup.sh, cargo build --release)" >&2; exit 1; }
done

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

UPSTREAM=$(free_port)
head -c 1024 /dev/zero | tr '\0' 'x' > "$WORK/body"
cat > "$WORK/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $WORK;
  proxy_temp_path $WORK;
  fastcgi_temp_path $WORK;
  uwsgi_temp_path $WORK;
  scgi_temp_path $WORK;
  server { listen 127.0.0.1:$UPSTREAM; location / { root $WORK; try_files /body =404; } }
}
EOF
nginx -c "$WORK/nginx.conf" &
PIDS+=($!)

# Total instructions of one proxy run serving $1 requests.
count() {
    local listen admin out="$WORK/callgrind.$1"
    listen=$(free_port)
    admin=$(free_port)
    valgrind --tool=callgrind --callgrind-out-file="$out" "$BIN" --listen "127.0.0.1:$listen" \
        --upstream "127.0.0.1:$UPSTREAM" --admin "127.0.0.1:$admin" --workers 1 "${EXTRA[@]}" \
        >"$WORK/proxy.$1.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    for _ in $(seq 300); do
        curl -sf -o /dev/null "http://127.0.0.1:$admin/ready" && break
        sleep 0.2
    done
    "$OHA" --no-tui -n "$1" -c 4 "http://127.0.0.1:$listen/" >/dev/null
    sleep 0.5
    kill -TERM "$pid"
    wait "$pid" || true
    grep -m1 '^summary:' "$out" | awk '{print $2}'
}

EXTRA=("$@")
small=$(count 1000)
large=$(count 5000)
echo "cogmesh-proxy ${EXTRA[*]:-(defaults)}: $(( (large - small) / 4000 )) instructions per request (callgrind totals $small for 1000 requests, $large for 5000)"
