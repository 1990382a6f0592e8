#!/usr/bin/env bash
# Makes the local base image $KVBENTO_BASE_IMAGE once: a debootstrap'd Debian bookworm (minbase)
# with python3.11 and uv, imported with buildah. No registry is needed, so nothing is pulled.
# Later runs find the image in the cache and return at once; KVBENTO_REBUILD_BASE=1 remakes it.
set -euo pipefail
cd "$(dirname "$0")/../.."
source deploy/image/env.sh

if [ "${KVBENTO_REBUILD_BASE:-0}" != 1 ] && buildah inspect --type image "$KVBENTO_BASE_IMAGE" >/dev/null 2>&1; then
    echo "base image $KVBENTO_BASE_IMAGE: cached"
    exit 0
fi
UV_BIN="$(command -v .venv/bin/uv || command -v uv)" || { echo "need uv (pip install '.[image]')"; exit 1; }

rootfs="$KVBENTO_IMAGE_CACHE/rootfs"
rm -rf "$rootfs" "$rootfs.tar"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" "${KVBENTO_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# The package caches are dead weight in every image built on top.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log
tar -C "$rootfs" --numeric-owner -cf "$rootfs.tar" .

ctr="$(buildah from scratch)"
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
buildah add "$ctr" "$rootfs.tar" /
# bentoml's generated Dockerfile runs `command -v uv || pip install uv`; Debian's pip refuses to
# install into the system Python (PEP 668), so uv goes in here, copied from the host's pinned one.
buildah copy --chmod 0755 "$ctr" "$UV_BIN" /usr/local/bin/uv
# uv's bundled root store would not trust the TLS proxy's CA that the build mounts; read the
# system bundle instead (the file the build mounts over).
# UV_NO_CACHE: buildah has no BuildKit cache mounts, so uv's cache (~1.7 GB here) would stay in the
# install layer of every image built on top.
buildah config --env LANG=C.UTF-8 --env UV_SYSTEM_CERTS=1 --env UV_NO_CACHE=1 --cmd /bin/bash \
    --label org.opencontainers.image.description="kvbento base: debian bookworm minbase, python3.11, uv" \
    "$ctr"
buildah commit --rm "$ctr" "$KVBENTO_BASE_IMAGE"
trap - EXIT
rm -rf "$rootfs" "$rootfs.tar"
echo "base image $KVBENTO_BASE_IMAGE: built"
