# Shared by the ci/ scripts (sourced): `log` with the calling script's prefix, `as_root`.
# The caller sets `log_prefix` before sourcing.

log() { printf '%s: %s\n' "${log_prefix:-ci}" "$*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
    else log "need root to run: $*"; exit 1
    fi
}
