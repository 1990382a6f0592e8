#!/usr/bin/env bash
# Installs buildah, podman, debootstrap and runc from apt when one is missing (one apt-get update).
set -euo pipefail
missing=()
for tool in buildah podman debootstrap runc; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
echo "installing ${missing[*]} (and uidmap, fuse-overlayfs) from apt"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
    buildah podman debootstrap runc uidmap fuse-overlayfs
