#!/usr/bin/env bash
# `make image`: builds the OCI image $KVBENTO_IMAGE (default kvbento:latest) from the bento with
# `bentoml containerize --backend buildah`. No Docker engine and no registry are needed: the
# tools come from apt, the base image from debootstrap (cached), the CPU torch wheel from pip.
# Expects .venv with the `image` extra and the tiny model (the Makefile target provides both).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=.venv/bin
TORCH_WHEEL=var/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl

deploy/image/tools.sh
source deploy/image/env.sh
deploy/image/base.sh

# The bento carries the CPU torch wheel (bentofile python.wheels): PyPI's torch is the CUDA build.
# pip finds it through its configured find-links here, else on the PyTorch CPU index.
if [ ! -f "$TORCH_WHEEL" ]; then
    "$BIN/pip" download -q --no-deps -d var/wheels "torch==2.13.0+cpu" \
        || "$BIN/pip" download -q --no-deps -d var/wheels \
            --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0+cpu"
fi
# The native kernels, prebuilt: the image has no C compiler (bentofile includes
# var/kernels/*.so; model/native.py looks there before building one).
"$BIN/python" -m model.native --build var/kernels >/dev/null
chmod -R a+rX var/kernels
# save_pretrained writes 0600 files; the image's user (and any uid Kubernetes picks) must read them.
chmod -R a+rX var/models/kvbento-tiny

# One bento at a time in the local store: each one carries the ~190 MB torch wheel.
"$BIN/bentoml" delete kvbento --yes >/dev/null 2>&1 || true
"$BIN/bentoml" build --output tag >/dev/null
"$BIN/bentoml" containerize kvbento:latest --backend buildah -t "$KVBENTO_IMAGE" \
    --opt "volume=$KVBENTO_HOST_CA:/etc/ssl/certs/ca-certificates.crt:ro"
# Each rebuild leaves the previous image untagged; drop those (layers a tagged image still uses,
# i.e. the build cache, stay).
podman image prune -f >/dev/null
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep -F "${KVBENTO_IMAGE%%:*}" || true
