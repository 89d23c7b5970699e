# syntax=docker/dockerfile:1
#
# moemesh images: `moemesh` (the ENTRYPOINT) and `moectl` in
# /usr/local/bin, run as the non-root user 65532, with no shell needed at
# run time (the CPU image has none). Two targets:
#
#   docker build --target cpu  -t moemesh:latest .   # distroless: coordinators, routers, CPU expert nodes
#   docker build --target cuda -t moemesh:cuda .     # CUDA 13 runtime: expert nodes with --device cuda
#
# The cuda feature builds without a CUDA toolkit: cudarc finds the driver,
# cuBLAS and NVRTC at run time, in the CUDA runtime image (the libraries)
# and through the NVIDIA container toolkit (the driver).

ARG RUST_IMAGE=rust:1.95-bookworm

FROM ${RUST_IMAGE} AS build-base
# No line tables (the release profile keeps them for local profiling): a
# smaller image and a faster build.
ENV CARGO_PROFILE_RELEASE_DEBUG=0 \
    CARGO_INCREMENTAL=0
WORKDIR /src
COPY . .

# The cache mounts keep downloaded crates and build output from one build
# to the next; since target/ is a cache mount, the binaries are copied out
# in the same step.
FROM build-base AS build-cpu
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=moemesh-target-cpu \
    cargo build --release --locked -p moemesh -p moectl \
    && mkdir -p /out \
    && cp target/release/moemesh target/release/moectl /out/

# One build for both binaries: moectl shares moemesh's crates (with the
# cuda feature on, which it never uses) rather than compiling them twice.
FROM build-base AS build-cuda
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=moemesh-target-cuda \
    cargo build --release --locked -p moemesh -p moectl --features moemesh/cuda \
    && mkdir -p /out \
    && cp target/release/moemesh target/release/moectl /out/

# CUDA 13.0's runtime libraries (cuBLAS, NVRTC) on Ubuntu 24.04; the
# machine needs an NVIDIA driver of the 580 series or newer.
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04 AS cuda
COPY --from=build-cuda /out/moemesh /out/moectl /usr/local/bin/
# Numeric, so that the kubelet can check runAsNonRoot against it.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/moemesh"]

# glibc, libgcc and CA certificates, nothing more: all the binaries need.
# Last, so that a plain `docker build .` makes this image.
FROM gcr.io/distroless/cc-debian12:nonroot AS cpu
COPY --from=build-cpu /out/moemesh /out/moectl /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/moemesh"]
