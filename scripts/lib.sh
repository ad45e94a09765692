# Shared helpers for the scripts in this directory (sourced, not run).

# The cache root: expensive artefacts live here, outside the checkout, so a
# fresh clone (as CI uses) reuses them.
KINDLING_CACHE="${KINDLING_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kindling}"
export KINDLING_CACHE

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Seconds since the epoch with milliseconds, for phase timings.
now() { date +%s.%N; }
# elapsed START -> "12.34 s"
elapsed() { awk -v s="$1" -v e="$(now)" 'BEGIN { printf "%.2f s", e - s }'; }
