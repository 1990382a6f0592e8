#!/usr/bin/env bash
# `make image-test`: smoke-tests the built image (see smoke.py) against the same storage the
# build used.
set -euo pipefail
cd "$(dirname "$0")/../.."
source deploy/image/env.sh
exec python3 deploy/image/smoke.py
