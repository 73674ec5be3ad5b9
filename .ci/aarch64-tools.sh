#!/usr/bin/env bash
# What `make test-aarch64` needs: Rust's aarch64 standard library, a cross
# linker and qemu-user (Debian's packages). Any failure fails CI: the NEON
# path runs on no CPU of the CI machine otherwise.
set -euo pipefail
rustup target add aarch64-unknown-linux-gnu
if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null
fi
qemu-aarch64 --version | head -1
