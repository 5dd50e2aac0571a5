#!/usr/bin/env bash
# The README's first command: builds cogmesh (release) and runs `cogmesh demo` — the local mesh of
# deploy/local/mesh.yaml (control plane, 13 replicas of 5 services, each behind its own sidecar)
# under a load pattern (warm-up, a mixed-priority burst, a slow replica, a killed replica) with a
# live view and a summary; everything stops at the end. Arguments go to `cogmesh demo`, e.g.
# `./scripts/demo.sh --duration 30s` or `--environment production`.
set -euo pipefail
cd "$(dirname "$0")/.."
# COGMESH_BIN=target/debug runs already built debug binaries instead.
BIN="${COGMESH_BIN:-target/release}"
[ -n "${COGMESH_BIN:-}" ] || cargo build --release --bins
exec "$BIN/cogmesh" demo deploy/local/mesh.yaml "$@"
