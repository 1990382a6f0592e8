# Sourced by the image scripts: where the image tooling keeps its state, and how buildah/podman
# are told about it. Nothing here runs a build.
#
# The cache lives outside the repository (default ~/.cache/kvbento/image) so a fresh clone in CI
# reuses the debootstrap base image and the layer store of the previous build.
KVBENTO_IMAGE_CACHE="${KVBENTO_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kvbento/image}"
# overlay is fast on ext4/xfs; set KVBENTO_STORAGE_DRIVER=vfs where overlay mounts are refused.
KVBENTO_STORAGE_DRIVER="${KVBENTO_STORAGE_DRIVER:-overlay}"
KVBENTO_IMAGE="${KVBENTO_IMAGE:-kvbento:latest}"
# The local base image: Debian bookworm + python3.11 + uv, made by deploy/image/base.sh.
KVBENTO_BASE_IMAGE="${KVBENTO_BASE_IMAGE:-localhost/kvbento-base:bookworm}"
# The host CA bundle: mounted into build steps only (this network's TLS proxy CA is only there).
KVBENTO_HOST_CA="${KVBENTO_HOST_CA:-/etc/ssl/certs/ca-certificates.crt}"

mkdir -p "$KVBENTO_IMAGE_CACHE"
cat > "$KVBENTO_IMAGE_CACHE/storage.conf" <<CONF
[storage]
driver = "$KVBENTO_STORAGE_DRIVER"
graphroot = "$KVBENTO_IMAGE_CACHE/storage"
runroot = "$KVBENTO_IMAGE_CACHE/run"
CONF
export CONTAINERS_STORAGE_CONF="$KVBENTO_IMAGE_CACHE/storage.conf"
# No daemon and no user namespaces here: build steps run chrooted, which this machine allows.
export BUILDAH_ISOLATION=chroot
# Keep intermediate layers: a rebuild with unchanged requirements skips the package install.
export BUILDAH_LAYERS=true

# podman as this machine allows it: runc (crun fails here), cgroupfs (no systemd), host network.
kvbento_podman() {
    podman --cgroup-manager cgroupfs --runtime runc "$@"
}
