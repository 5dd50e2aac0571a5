#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind, for cogmesh-proxy and its peers side by
# side: a figure that stays the same however busy the machine is, unlike the wall-clock
# benchmarks, so a change on the request path can be weighed on a shared machine, and the work
# each proxy does per request compared where wall-clock runs disagree by ±20 %.
#
#   bench/setup.sh && cargo build --release -p cogmesh-proxy
#   bench/instructions.sh                        # cogmesh as it starts by default, HAProxy, nginx
#   bench/instructions.sh --otlp-endpoint http://127.0.0.1:9 --otlp-protocol http \
#       --trace-sampling-ratio 0.01              # any extra cogmesh-proxy flags
#   PROXIES=cogmesh PROTOCOLS=h2c bench/instructions.sh   # a subset
#   COUNT=syscalls WORKERS=2 bench/instructions.sh        # system calls per request instead
#   KEEP=/tmp/calls bench/instructions.sh        # keep the callgrind (or strace) files, for
#                                                # callgrind_annotate: where the instructions go
#   LOAD=closed CONNECTIONS=64 COUNT=syscalls bench/instructions.sh   # as in the throughput runs
#
# One nginx upstream (1 KiB body, an HTTP/1.1 and an h2c listener) and, in turn, each proxy with
# one worker in front of it under `valgrind --tool=callgrind`; oha sends 1000 and then, in a
# second run of a fresh proxy, 5000 requests over 4 connections (CONNECTIONS=N for more). The
# difference of the two totals over 4000 is the cost of one request, start-up and shutdown
# cancelled out. Each proxy speaks to the upstream as in proxy-bench: HTTP/1.1 in → HTTP/1.1
# out; h2c in → h2c out for cogmesh and HAProxy, h2c in → HTTP/1.1 out for nginx (its proxy
# module speaks HTTP/1.x only). Ports are
# picked at run time on 127.0.0.1; everything started is stopped on exit. Spans sent to an address
# nobody listens on are counted as failed exports, which still includes building and encoding them.
#
# COUNT=syscalls counts system calls per request instead (`strace -f -c`), with the load of
# proxy-bench's latency runs: open loop at 1000 requests/s over 16 connections (1 and 5 s). Each
# call costs about as much as a few thousand instructions, and a wake-up of another thread shows
# as a `write` to its event fd and an `epoll_wait` more; WORKERS=N gives each proxy N workers
# (cogmesh --workers, HAProxy nbthread, nginx worker_processes). LOAD=closed makes that load a
# closed loop over CONNECTIONS connections (as proxy-bench's throughput runs, which strace slows).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${COGMESH_BIN:-$REPO/target/release/cogmesh-proxy}"
OHA="$REPO/.tools/bin/oha"
PROXIES="${PROXIES:-cogmesh,haproxy,nginx}"
PROTOCOLS="${PROTOCOLS:-h1,h2c}"
COUNT="${COUNT:-instructions}"
WORKERS="${WORKERS:-1}"
CONNECTIONS="${CONNECTIONS:-4}"
LOAD="${LOAD:-open}"
case "$COUNT" in
instructions) COUNTER=valgrind ;;
syscalls) COUNTER=strace ;;
*) echo "instructions.sh: COUNT is instructions or syscalls, not $COUNT" >&2; exit 1 ;;
esac
if [ "$COUNT" = instructions ] && [ "$WORKERS" != 1 ]; then
    echo "instructions.sh: instructions are counted with one worker (WORKERS=N is for COUNT=syscalls)" >&2
    exit 1
fi
for tool in "$COUNTER" nginx curl python3 "$OHA" "$BIN"; do
    command -v "$tool" >/dev/null || { echo "instructions.sh: $tool is missing (bench/setup.sh, cargo build --release)" >&2; exit 1; }
done
if [[ ",$PROXIES," == *,haproxy,* ]] && ! command -v haproxy >/dev/null; then
    echo "instructions.sh: haproxy is missing (bench/setup.sh)" >&2
    exit 1
fi

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "${KEEP:-}" ]; then
        mkdir -p "$KEEP"
        cp "$WORK/$COUNT".* "$KEEP"/ 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# nginx takes h2c as a listen parameter before 1.25.1 and as a directive from then on.
NGINX_VERSION=$(nginx -v 2>&1 | sed -n 's|.*nginx/\([0-9.]*\).*|\1|p')
h2c_listen() {
    if [ "$(printf '%s\n1.25.1\n' "$NGINX_VERSION" | sort -V | head -1)" = "1.25.1" ]; then
        echo "listen 127.0.0.1:$1; http2 on;"
    else
        echo "listen 127.0.0.1:$1 http2;"
    fi
}
# nginx's configuration up to its servers: $1 names its files, $2 is its worker count.
nginx_preamble() {
    local master=off
    [ "$2" -gt 1 ] && master=on
    cat <<EOF
worker_processes $2;
daemon off;
master_process $master;
pid $WORK/$1.pid;
error_log $WORK/$1.err;
events { worker_connections 1024; }
http {
  access_log off;
  keepalive_requests 10000000;
  client_body_temp_path $WORK;
  proxy_temp_path $WORK;
  fastcgi_temp_path $WORK;
  uwsgi_temp_path $WORK;
  scgi_temp_path $WORK;
EOF
}

UP_H1=$(free_port)
UP_H2C=$(free_port)
head -c 1024 /dev/zero | tr '\0' 'x' > "$WORK/body"
{
    nginx_preamble upstream 1
    echo "  server { listen 127.0.0.1:$UP_H1; location / { root $WORK; try_files /body =404; } }"
    echo "  server { $(h2c_listen "$UP_H2C") location / { root $WORK; try_files /body =404; } }"
    echo "}"
} > "$WORK/upstream.conf"
nginx -c "$WORK/upstream.conf" &
PIDS+=($!)

# The command line of proxy $1 for protocol $2 listening on port $3 (admin on $4, cogmesh only).
proxy_command() {
    local up=$UP_H1
    # nginx proxies over HTTP/1.x only; cogmesh too when its flags say --protocol=http1.
    [ "$2" = h2c ] && [ "$1" != nginx ] && { [ "$1" != cogmesh ] || [ "$COGMESH_UPSTREAM" != http1 ]; } &&
        up=$UP_H2C
    case "$1" in
    cogmesh)
        echo "$BIN --listen 127.0.0.1:$3 --upstream 127.0.0.1:$up --admin 127.0.0.1:$4 --workers $WORKERS ${EXTRA[*]}"
        ;;
    haproxy)
        local h2=""
        [ "$2" = h2c ] && h2=" proto h2"
        cat > "$WORK/haproxy.cfg" <<EOF
global
    nbthread $WORKERS
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    http-reuse always
frontend bench
    bind 127.0.0.1:$3$h2
    default_backend upstream
backend upstream
    server up1 127.0.0.1:$up$h2
EOF
        echo "haproxy -db -f $WORK/haproxy.cfg"
        ;;
    nginx)
        local listen="listen 127.0.0.1:$3;"
        [ "$2" = h2c ] && listen=$(h2c_listen "$3")
        {
            nginx_preamble proxy "$WORKERS"
            echo "  upstream backend { server 127.0.0.1:$up; keepalive 16; }"
            echo "  server { $listen location / { proxy_pass http://backend; proxy_http_version 1.1;"
            echo "    proxy_set_header Connection \"\"; } }"
            echo "}"
        } > "$WORK/proxy.conf"
        echo "nginx -c $WORK/proxy.conf"
        ;;
    esac
}

# Total instructions (or system calls) of proxy $1 serving $3 requests of protocol $2.
count() {
    local listen admin out="$WORK/$COUNT.$1.$2.$3" client=() counter load
    listen=$(free_port)
    admin=$(free_port)
    [ "$2" = h2c ] && client=(--http2)
    if [ "$COUNT" = instructions ]; then
        counter=(valgrind --tool=callgrind --callgrind-out-file="$out")
        load=(-c "$CONNECTIONS")
    else
        counter=(strace -f -c -o "$out")
        load=(-c 16 -q 1000 --latency-correction)
        [ "$LOAD" = closed ] && load=(-c "$CONNECTIONS")
    fi
    # shellcheck disable=SC2046 # the command line is split on purpose
    "${counter[@]}" $(proxy_command "$1" "$2" "$listen" "$admin") >"$WORK/proxy.$1.$2.$3.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    # Counted only once a request through the proxy gets a 200: a proxy answering 502 does other work.
    local status=""
    for _ in $(seq 300); do
        status=$(curl -s -o /dev/null -w '%{http_code}' "${client[@]/--http2/--http2-prior-knowledge}" \
            "http://127.0.0.1:$listen/" || true)
        [ "$status" = 200 ] && break
        sleep 0.2
    done
    if [ "$status" != 200 ]; then
        echo "instructions.sh: $1 ($2) answered ${status:-nothing} instead of 200; its log:" >&2
        tail -5 "$WORK/proxy.$1.$2.$3.log" >&2
        exit 1
    fi
    "$OHA" --no-tui -n "$3" "${load[@]}" "${client[@]}" "http://127.0.0.1:$listen/" >/dev/null
    sleep 0.5
    if [ "$COUNT" = instructions ]; then
        kill -TERM "$pid"
    else
        # The proxy is strace's child; strace writes its table once the proxy is gone.
        pkill -TERM -P "$pid"
    fi
    wait "$pid" || true
    if [ "$COUNT" = instructions ]; then
        grep -m1 '^summary:' "$out" | awk '{print $2}'
    else
        awk '$NF == "total" { print $4 }' "$out"
    fi
}

EXTRA=("$@")
# With --protocol=http1, cogmesh speaks HTTP/1.1 to the upstream's HTTP/1.1 listener, as nginx does.
COGMESH_UPSTREAM=""
previous=""
for arg in "$@"; do
    case "$arg" in --protocol=*) COGMESH_UPSTREAM=${arg#--protocol=} ;; esac
    [ "$previous" = --protocol ] && COGMESH_UPSTREAM=$arg
    previous=$arg
done
if [ "$COUNT" = instructions ]; then
    echo "Instructions per request (callgrind, closed loop over $CONNECTIONS connections; totals of 5000" \
        "and 1000 requests subtracted, over 4000)"
else
    LOAD_TEXT="open loop 1000/s, 16 connections"
    [ "$LOAD" = closed ] && LOAD_TEXT="closed loop, $CONNECTIONS connections"
    echo "System calls per request (strace -f -c; $LOAD_TEXT; totals of 5000 and" \
        "1000 requests subtracted, over 4000); $WORKERS worker(s) each"
fi
echo "cogmesh-proxy flags: ${EXTRA[*]:-(defaults)}; nginx $NGINX_VERSION; $(haproxy -v 2>/dev/null | head -1 | cut -d' ' -f1-3)"
printf '%-6s %-9s %14s %14s\n' proto proxy "$COUNT" "cogmesh÷peer"
for proto in ${PROTOCOLS//,/ }; do
    mine=""
    for proxy in ${PROXIES//,/ }; do
        small=$(count "$proxy" "$proto" 1000)
        large=$(count "$proxy" "$proto" 5000)
        per=$(python3 -c "print(round(($large - $small) / 4000, 2 if '$COUNT' == 'syscalls' else None))")
        ratio=""
        if [ "$proxy" = cogmesh ]; then
            mine=$per
        elif [ -n "$mine" ]; then
            ratio=$(python3 -c "print(f'{$mine / $per:.2f}')")
        fi
        printf '%-6s %-9s %14s %14s\n' "$proto" "$proxy" "$per" "$ratio"
    done
done
