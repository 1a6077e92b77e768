# Sourced by the launchers: run a command, or with DRY_RUN=1 print its plan and memory instead.
#   require VAR "what it is"      a required setting (in a dry run: reported, not fatal)
#   launch MODEL_TAG CMD ARGS...   exec CMD, or tools/estimate_memory.py --plan for DRY_RUN=1
LAUNCH_TOOLS=$(cd "$(dirname "${BASH_SOURCE[0]}")/../tools" && pwd)

dry_run() { [[ -n "${DRY_RUN:-}" && "${DRY_RUN}" != 0 ]]; }

require() {
    local name=$1 what=$2
    if [[ -z "${!name:-}" ]]; then
        if dry_run; then
            echo "dry run: $name is not set (a real run needs it: $what)"
            printf -v "$name" '%s' "<$name unset>"
        else
            echo "error: set $name to $what" >&2
            exit 2
        fi
    fi
}

launch() {
    local model=$1
    shift
    if dry_run; then
        exec python "$LAUNCH_TOOLS/estimate_memory.py" --plan --model "$model" -- "$@"
    fi
    exec "$@"
}
