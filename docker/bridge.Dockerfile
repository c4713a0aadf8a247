# syntax=docker/dockerfile:1
# The event bridge (`nubabel-bridge`), the second container of every sidecar pod. Build from the
# workspace root:
#   docker build -f docker/bridge.Dockerfile -t ghcr.io/nubabel/bridge:0.1.0 .
# The operator's pod spec gives it no command, so the entrypoint is the bridge itself; the pod
# runs as user 10001 (RUN_AS_USER in operator/src/controller/sidecar/build.rs), the same user
# set here, and the bridge listens on 8081 (readiness, metrics, and the workspace routes the
# operator calls). It runs git to fetch conversations' repositories, so its runtime is Debian
# with git rather than distroless.

# The base images, replaceable: scripts/build-images.sh builds these images where no registry
# is reachable, with a runtime base made from Debian's packages and the binary built on the host
# in place of the build stage.
ARG RUST_IMAGE=rust:1.95-bookworm
ARG DEBIAN_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p nubabel-bridge --bin nubabel-bridge \
    && install -D -m 0755 target/release/nubabel-bridge /out/nubabel-bridge

FROM ${DEBIAN_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates git \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/nubabel-bridge /usr/local/bin/nubabel-bridge
USER 10001:10001
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/nubabel-bridge"]
