# syntax=docker/dockerfile:1
#
# Container image of the spegel binary, as the Helm chart in charts/spegel runs it.
#
#   docker build -t ghcr.io/spegel-rs/spegel:dev .
#
# Keep target/ out of the build context (a .dockerignore with `target` does it); it is large
# and not needed.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
# containerd's gRPC API is compiled from .proto files by containerd-client's build script;
# spegel-ebpf's build script compiles its eBPF programs with clang against libbpf's headers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler clang libbpf-dev linux-libc-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
ARG SPEGEL_COMMIT=unknown
ENV SPEGEL_COMMIT=${SPEGEL_COMMIT}
# Only the daemon is built; the cache mounts keep the registry and build artefacts between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    SPEGEL_RUSTC="$(rustc --version)" cargo build --release --locked -p spegel --bin spegel \
    && cp target/release/spegel /spegel

# glibc and libgcc only (the binary links nothing else); the default user is root, which
# Spegel needs to use the containerd socket, read its content store and write hosts.toml.
FROM gcr.io/distroless/cc-debian12
COPY --from=builder /spegel /spegel
USER root:root
ENTRYPOINT ["/spegel"]
