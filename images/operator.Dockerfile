# syntax=docker/dockerfile:1
# pingmesh-operator: the reconciler and mesh controller (`pingmesh-operator run`).
#
#   docker buildx build -f images/operator.Dockerfile --platform linux/amd64,linux/arm64 .
#
# The build stage runs on the builder's platform and cross-compiles to
# TARGETARCH (no emulation). The `prebuilt` target copies a binary built
# outside Docker instead (Tilt's --local-build mode): target/tilt/<arch>/.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM --platform=$BUILDPLATFORM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
ARG TARGETARCH
ARG BUILDARCH
COPY images/build-env.sh /usr/local/bin/build-env.sh
RUN build-env.sh install
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,id=pingmesh-target-${TARGETARCH},sharing=locked \
    . /usr/local/bin/build-env.sh \
    && cargo build --release --locked --target "${RUST_TARGET}" \
         -p pingmesh-operator --bin pingmesh-operator \
    && install -D -m 0755 "target/${RUST_TARGET}/release/pingmesh-operator" /out/pingmesh-operator

# glibc, libgcc and CA certificates, no shell, uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime-base
LABEL org.opencontainers.image.title="pingmesh-operator" \
      org.opencontainers.image.description="PingMesh operator: PingMesh reconciler and mesh controller" \
      org.opencontainers.image.source="https://github.com/pingmesh/pingmesh" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 65532:65532
# gRPC for agents, HTTP for the JSON API, /metrics, /livez and /readyz.
EXPOSE 9400 9401
ENTRYPOINT ["/usr/local/bin/pingmesh-operator"]
CMD ["run"]

FROM runtime-base AS prebuilt
ARG TARGETARCH
COPY --chmod=0755 target/tilt/${TARGETARCH}/pingmesh-operator /usr/local/bin/pingmesh-operator

FROM runtime-base AS runtime
COPY --from=build /out/pingmesh-operator /usr/local/bin/pingmesh-operator
