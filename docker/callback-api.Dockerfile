# syntax=docker/dockerfile:1
# The callback API (`nubabel-callback-api`), with the Postgres migrations embedded (applied at
# startup). Build from the workspace root:
#   docker build -f docker/callback-api.Dockerfile -t ghcr.io/nubabel/callback-api:0.1.0 .
# The chart runs it with runAsUser 65532 (podSecurityContext) and a read-only root filesystem;
# it listens on 8080 (API, health, metrics).

# The base images, replaceable: scripts/build-images.sh builds these images where no registry
# is reachable, with a runtime base made from Debian's packages and the binary built on the host
# in place of the build stage.
ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p nubabel-callback-api --bin nubabel-callback-api \
    && install -D -m 0755 target/release/nubabel-callback-api /out/nubabel-callback-api

FROM ${RUNTIME_IMAGE}
COPY --from=build /out/nubabel-callback-api /usr/local/bin/nubabel-callback-api
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/nubabel-callback-api"]
