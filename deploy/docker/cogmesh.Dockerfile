# The control-plane image: `cogmesh` (control plane, operator CLI, sample workload).
# Build from the repository root:
#   docker build -f deploy/docker/cogmesh.Dockerfile -t ghcr.io/cogmesh/cogmesh:0.1.0 .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p cogmesh-control --bin cogmesh

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/cogmesh /usr/local/bin/cogmesh
USER 65532:65532
EXPOSE 7070 7071
ENTRYPOINT ["/usr/local/bin/cogmesh"]
