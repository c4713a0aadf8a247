# syntax=docker/dockerfile:1
# A stand-in for node:22-bookworm-slim made from Debian's archive (Debian 12's own node and
# npm), for the npm stage of docker/opencode-sidecar.Dockerfile when scripts/build-images.sh
# builds it. That stage only runs `npm install --ignore-scripts`, so Debian's older node serves.

ARG DEBIAN_IMAGE=localhost/nubabel-base/debian:bookworm-slim

FROM ${DEBIAN_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates nodejs npm \
    && rm -rf /var/lib/apt/lists/*
