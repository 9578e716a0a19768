#!/bin/sh
# Build environment for the images' Rust build stage. The build stage runs on
# the builder's own platform (BUILDPLATFORM) and cross-compiles to TARGETARCH,
# so a multi-arch `docker buildx build --platform linux/amd64,linux/arm64`
# needs no emulation.
#
#   build-env.sh install [DEBIAN_PACKAGE...]   install compilers and the target's
#                                              libraries (native or :arm64 / :amd64)
#   . build-env.sh                             export RUST_TARGET, linker, CC, pkg-config
#
# Needs TARGETARCH (amd64 | arm64) and BUILDARCH in the environment; BuildKit
# sets both as build arguments.
set -eu

case "${TARGETARCH:?TARGETARCH is not set}" in
  amd64) RUST_TARGET=x86_64-unknown-linux-gnu GNU_TRIPLET=x86_64-linux-gnu ;;
  arm64) RUST_TARGET=aarch64-unknown-linux-gnu GNU_TRIPLET=aarch64-linux-gnu ;;
  *)
    echo "build-env.sh: unsupported TARGETARCH ${TARGETARCH} (amd64 or arm64)" >&2
    exit 1
    ;;
esac
CROSS=0
if [ "${TARGETARCH}" != "${BUILDARCH:-${TARGETARCH}}" ]; then
  CROSS=1
fi
export RUST_TARGET

if [ "${1:-}" = install ]; then
  shift
  packages="clang libclang-dev pkg-config"
  if [ "${CROSS}" = 1 ]; then
    dpkg --add-architecture "${TARGETARCH}"
    # Debian spells the cross compiler's package with dashes: gcc-x86-64-linux-gnu.
    packages="${packages} gcc-$(echo "${GNU_TRIPLET}" | tr '_' '-') libc6-dev:${TARGETARCH}"
    for package in "$@"; do
      packages="${packages} ${package}:${TARGETARCH}"
    done
  else
    packages="${packages} $*"
  fi
  apt-get update -q
  # shellcheck disable=SC2086 # word splitting of the package list is intended
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends ${packages}
  rm -rf /var/lib/apt/lists/*
  rustup target add "${RUST_TARGET}"
  exit 0
fi

if [ "${CROSS}" = 1 ]; then
  target_env=$(echo "${RUST_TARGET}" | tr 'a-z-' 'A-Z_')
  target_lower=$(echo "${RUST_TARGET}" | tr '-' '_')
  export "CARGO_TARGET_${target_env}_LINKER=${GNU_TRIPLET}-gcc"
  export "CC_${target_lower}=${GNU_TRIPLET}-gcc"
  export "AR_${target_lower}=${GNU_TRIPLET}-ar"
  # pkg-config must find the target's .pc files (libibverbs:arm64), not the builder's.
  export PKG_CONFIG_ALLOW_CROSS=1
  export PKG_CONFIG_LIBDIR="/usr/lib/${GNU_TRIPLET}/pkgconfig:/usr/share/pkgconfig"
fi
