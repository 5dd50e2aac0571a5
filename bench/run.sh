#!/usr/bin/env bash
# Installs what the bench needs (first time only), builds the proxy and the bench in release mode,
# and runs it. Arguments go to proxy-bench, e.g. `bench/run.sh --quick`.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bench/setup.sh
cargo build --release -p cogmesh-proxy -p cogmesh-bench
exec target/release/proxy-bench "$@"
