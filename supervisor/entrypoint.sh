#!/bin/sh
# Container entry point for a capsule_actors supervisor.
#
#   docker run IMAGE                      -> capsule-actors run "$CAPSULE_APP" --state-dir "$CAPSULE_STATE_DIR"
#   docker run IMAGE --workers 4          -> the same, with these extra `run` flags
#   docker run IMAGE capsule-actors tasks -> any other command runs as given (exec), e.g. a shell
#
# The supervisor is exec'ed, not run as a child of this shell: it becomes the process that gets
# `docker stop`'s SIGTERM (from tini, PID 1, which forwards it), so the stop is graceful.
set -eu

: "${CAPSULE_STATE_DIR:=/var/lib/capsule}"
export CAPSULE_STATE_DIR

case "${1:-}" in
    "" | -*) ;;        # nothing, or flags for `capsule-actors run`
    *) exec "$@" ;;    # another command
esac

if [ -z "${CAPSULE_APP:-}" ]; then
    echo "entrypoint: set CAPSULE_APP to the app to run, as MODULE:APP (e.g. -e CAPSULE_APP=myapp.tasks:app)" >&2
    exit 64
fi

if [ ! -w "$CAPSULE_STATE_DIR" ] && [ -e "$CAPSULE_STATE_DIR" ]; then
    echo "entrypoint: state directory $CAPSULE_STATE_DIR is not writable by uid $(id -u);" \
         "chown it (a bind mount keeps the host's owner)" >&2
    exit 73
fi

exec capsule-actors run "$CAPSULE_APP" --state-dir "$CAPSULE_STATE_DIR" "$@"
