# syntax=docker/dockerfile:1
# pingmesh-agent: probes other endpoints over RDMA (libibverbs) or UDP.
#
#   docker buildx build -f images/agent.Dockerfile --platform linux/amd64,linux/arm64 .
#
# The build stage runs on the builder's platform and cross-compiles to
# TARGETARCH against the target's libibverbs/librdmacm (Debian multiarch), so
# no emulation is needed. The `prebuilt` target copies a binary built outside
# Docker instead (Tilt's --local-build mode): target/tilt/<arch>/.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM --platform=$BUILDPLATFORM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
ARG TARGETARCH
ARG BUILDARCH
# Cargo features of pingmesh-agent; "rdma" (the default) links libibverbs.
ARG AGENT_FEATURES=rdma
COPY images/build-env.sh /usr/local/bin/build-env.sh
RUN build-env.sh install libibverbs-dev librdmacm-dev
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,id=pingmesh-target-${TARGETARCH},sharing=locked \
    . /usr/local/bin/build-env.sh \
    && cargo build --release --locked --target "${RUST_TARGET}" \
         -p pingmesh-agent --bin pingmesh-agent \
         --no-default-features --features "${AGENT_FEATURES}" \
    && install -D -m 0755 "target/${RUST_TARGET}/release/pingmesh-agent" /out/pingmesh-agent

# glibc userspace RDMA: libibverbs, librdmacm and the verbs providers
# (mlx5, bnxt_re, efa, rxe, ...), from the same Debian release as the build.
FROM debian:${DEBIAN_RELEASE}-slim AS runtime-base
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
         libibverbs1 librdmacm1 ibverbs-providers \
    && rm -rf /var/lib/apt/lists/*
LABEL org.opencontainers.image.title="pingmesh-agent" \
      org.opencontainers.image.description="PingMesh node agent: RDMA/UDP prober and responder" \
      org.opencontainers.image.source="https://github.com/pingmesh/pingmesh" \
      org.opencontainers.image.licenses="Apache-2.0"
# No USER: Linux grants the capabilities a pod adds (IPC_LOCK for RDMA memory
# registration, BPF/PERFMON for tracing) only to uid 0 in a container. The
# operator runs the agent as root with every other capability dropped; a
# UDP-only agent runs as any uid.
# Metrics/health and the UDP responder (both configurable).
EXPOSE 9402/tcp 9403/udp
ENTRYPOINT ["/usr/local/bin/pingmesh-agent"]

FROM runtime-base AS prebuilt
ARG TARGETARCH
COPY --chmod=0755 target/tilt/${TARGETARCH}/pingmesh-agent /usr/local/bin/pingmesh-agent

FROM runtime-base AS runtime
COPY --from=build /out/pingmesh-agent /usr/local/bin/pingmesh-agent
