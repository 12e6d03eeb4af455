#!/usr/bin/env bash
# Build the test image and run the whole suite (.ci/run) in it.
#
#   tests/container/run.sh [ENGINE]        # ENGINE: podman (default if found) or docker
#   tests/container/run.sh podman -k mount # extra arguments go to pytest
#
# Needs a container engine that may give the container /dev/fuse and
# CAP_SYS_ADMIN (rootful podman or docker). Exit status: that of the tests.
# Extra engine options: $IDSFS_BUILD_OPTS for the build, $IDSFS_RUN_OPTS for
# the run (word-split), e.g. a CA bundle for pip behind a TLS-inspecting proxy:
#   IDSFS_RUN_OPTS="-v /etc/ssl/certs/ca-certificates.crt:/host-ca.crt:ro -e PIP_CERT=/host-ca.crt"
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"

engine="${1:-}"
if [ -z "$engine" ]; then
    engine="$(command -v podman || command -v docker || true)"
    [ -n "$engine" ] || { echo "run.sh: neither podman nor docker is installed" >&2; exit 2; }
else
    shift
fi
image="${IDSFS_TEST_IMAGE:-idsfs-tests}"

ignore=()
if [ "$(basename "$engine")" = podman ]; then
    # docker finds Containerfile.dockerignore by itself, podman is told
    ignore=(--ignorefile "$here/Containerfile.dockerignore")
fi
# shellcheck disable=SC2086
"$engine" build ${IDSFS_BUILD_OPTS:-} "${ignore[@]}" -t "$image" -f "$here/Containerfile" "$root"

cmd=(bash .ci/run)
if [ "$#" -gt 0 ]; then
    # set the machine up, then pytest with the given arguments
    cmd=(bash -c 'bash .ci/setup && .venv/bin/python -m pytest "$@"' pytest "$@")
fi

# --init: a real PID 1 reaps the background daemons the tests start and stop
# shellcheck disable=SC2086
exec "$engine" run --rm --init ${IDSFS_RUN_OPTS:-} \
    --device /dev/fuse \
    --cap-add SYS_ADMIN \
    --security-opt seccomp=unconfined \
    --security-opt apparmor=unconfined \
    "$image" "${cmd[@]}"
