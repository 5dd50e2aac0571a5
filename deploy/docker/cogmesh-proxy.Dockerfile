# The sidecar image: cogmesh-proxy, which is also the init container (`cogmesh-proxy init`
# installs the iptables rules, so the image carries iptables).
# Build from the repository root:
#   docker build -f deploy/docker/cogmesh-proxy.Dockerfile -t ghcr.io/cogmesh/cogmesh-proxy:0.1.0 .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p cogmesh-proxy --bin cogmesh-proxy

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/cogmesh-proxy /usr/local/bin/cogmesh-proxy
# The uid the iptables rules skip (`cogmesh-proxy init --proxy-uid`, `cogmesh inject`).
USER 2102:2102
EXPOSE 4140 4143 4191
ENTRYPOINT ["/usr/local/bin/cogmesh-proxy"]
