# syntax=docker/dockerfile:1
# A stand-in for gcr.io/distroless/cc-debian12:nonroot made from Debian's archive, the runtime
# base of the Rust images when scripts/build-images.sh builds them: the packages distroless
# takes from Debian for its cc image (base-files, netbase, tzdata, glibc, libgcc, libgomp,
# libstdc++, libssl), unpacked without their maintainer scripts, the CA bundle, and the same
# users (root, nobody, nonroot 65532). No shell, no package manager.

ARG DEBIAN_IMAGE=localhost/nubabel-base/debian:bookworm-slim

FROM ${DEBIAN_IMAGE} AS unpack
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && mkdir -p /rootfs && install -d -o _apt /debs \
    && cd /debs \
    && apt-get download base-files netbase tzdata libc6 libgcc-s1 libgomp1 libstdc++6 libssl3 \
    && for deb in *.deb; do dpkg-deb -x "$deb" /rootfs; done \
    && rm -rf /rootfs/usr/share/doc /rootfs/usr/share/man /rootfs/usr/share/lintian \
    && install -D -m 0644 /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/ca-certificates.crt \
    && printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
         'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
         'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >/rootfs/etc/passwd \
    && printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'nonroot:x:65532:' >/rootfs/etc/group \
    && install -d -m 1777 /rootfs/tmp \
    && install -d -m 0700 /rootfs/root \
    && install -d -o 65532 -g 65532 -m 0700 /rootfs/home/nonroot

FROM scratch
COPY --from=unpack /rootfs /
ENV PATH=/usr/local/bin:/usr/bin:/bin \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
WORKDIR /home/nonroot
