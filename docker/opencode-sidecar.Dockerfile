# syntax=docker/dockerfile:1
# The OpenCode sidecar image: OpenCode's server binary with git, bash and ripgrep, plugins baked
# in (never installed at start), running as a non-root user. Needs no build context:
#   docker build -f docker/opencode-sidecar.Dockerfile -t ghcr.io/nubabel/opencode:1.18.33 docker
#
# What the operator's pod spec (operator/src/controller/sidecar/build.rs) relies on:
#   - `opencode` on PATH (the opencode container's command) and `mkdir` (the prepare-data init
#     container's command);
#   - user and group 10001 (RUN_AS_USER), owning /data, where the data volume is mounted
#     (DATA_MOUNT; HOME and XDG_* point below it, /data/workspace is the working directory);
#   - plugins under /opt/opencode/plugins (the operator's --plugin-dir), so a plugin named in an
#     OpencodeSidecar resolves to file:///opt/opencode/plugins/node_modules/<name>;
#   - `pyright-langserver` on PATH (with node), which OpenCode starts for fleets with `lsp: true`;
#   - port 4096 (OPENCODE_PORT).

ARG OPENCODE_VERSION=1.18.33
ARG OH_MY_OPENCODE_VERSION=4.19.4
ARG PYRIGHT_VERSION=1.1.414
# The base images, replaceable: scripts/build-images.sh builds this image where no registry is
# reachable, from Debian's archive (Debian's own node and npm for the npm stage).
ARG NODE_IMAGE=node:22-bookworm-slim
ARG DEBIAN_IMAGE=debian:bookworm-slim

FROM ${NODE_IMAGE} AS npm
ARG OPENCODE_VERSION
ARG OH_MY_OPENCODE_VERSION
ARG PYRIGHT_VERSION
ARG TARGETARCH
WORKDIR /build
# opencode-ai carries one prebuilt executable per platform as an optional dependency.
RUN npm install --no-audit --no-fund --ignore-scripts "opencode-ai@${OPENCODE_VERSION}" \
    && case "${TARGETARCH:-amd64}" in \
         amd64) platform=linux-x64 ;; \
         arm64) platform=linux-arm64 ;; \
         *) echo "unsupported architecture ${TARGETARCH}" >&2; exit 1 ;; \
       esac \
    && install -D -m 0755 "node_modules/opencode-${platform}/bin/opencode" /out/opencode
# Plugins: installed here, loaded by OpenCode from the file:// URL the operator writes.
RUN npm install --no-audit --no-fund --ignore-scripts --prefix /opt/opencode/plugins \
        "oh-my-opencode@${OH_MY_OPENCODE_VERSION}"
# Language servers OpenCode finds on PATH when a fleet sets `lsp: true`.
RUN npm install --no-audit --no-fund --ignore-scripts --prefix /opt/opencode/lsp \
        "pyright@${PYRIGHT_VERSION}"

FROM ${DEBIAN_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends bash ca-certificates git nodejs ripgrep \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 opencode \
    && useradd --uid 10001 --gid 10001 --home-dir /data/home --no-create-home \
         --shell /bin/bash opencode \
    && install -d -o 10001 -g 10001 -m 0770 /data
COPY --from=npm /out/opencode /usr/local/bin/opencode
COPY --from=npm /opt/opencode/plugins /opt/opencode/plugins
COPY --from=npm /opt/opencode/lsp /opt/opencode/lsp
RUN ln -s /opt/opencode/lsp/node_modules/.bin/pyright-langserver /usr/local/bin/pyright-langserver \
    && ln -s /opt/opencode/lsp/node_modules/.bin/pyright /usr/local/bin/pyright
# The same settings the operator sets, so the image also runs offline on its own.
ENV HOME=/data/home \
    XDG_DATA_HOME=/data/xdg/data \
    XDG_CONFIG_HOME=/data/xdg/config \
    XDG_CACHE_HOME=/data/xdg/cache \
    XDG_STATE_HOME=/data/xdg/state \
    OPENCODE_DISABLE_AUTOUPDATE=1 \
    OPENCODE_DISABLE_MODELS_FETCH=1 \
    OPENCODE_DISABLE_LSP_DOWNLOAD=1 \
    OPENCODE_DISABLE_SHARE=1
USER 10001:10001
WORKDIR /data
EXPOSE 4096
ENTRYPOINT ["opencode"]
CMD ["serve", "--port", "4096", "--hostname", "0.0.0.0"]
