#!/usr/bin/env bash
# check-config.sh <path/to/.config>
#
# Verifies that every requirement in required.txt (next to this script, or
# the file named by $KINDLING_KERNEL_REQUIRED) holds in the given kernel
# .config. Prints each unmet requirement with what the .config has instead,
# then a one-line summary. Exit status: 0 all met, 1 some unmet, 2 usage or
# input error (missing file, malformed requirement line).
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly script_dir
readonly required_file="${KINDLING_KERNEL_REQUIRED:-$script_dir/required.txt}"

die() {
    echo "kernel-config: error: $*" >&2
    exit 2
}

if [[ $# -ne 1 || "$1" == -h || "$1" == --help ]]; then
    echo "usage: $0 <path/to/.config>" >&2
    echo "  Checks the .config against $required_file." >&2
    exit 2
fi
readonly config_file="$1"

[[ -f "$config_file" ]] || die "no such .config: $config_file (pass the final .config of a kernel build, e.g. \$(build.sh --print-dir)/config)"
[[ -f "$required_file" ]] || die "no such requirements file: $required_file"

# Load the .config into a map NAME -> value. `# CONFIG_X is not set` maps to
# "n", exactly as Kconfig reads it back.
declare -A actual=()
while IFS= read -r line || [[ -n "$line" ]]; do
    if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        actual["${BASH_REMATCH[1]}"]="${BASH_REMATCH[2]}"
    elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        actual["${BASH_REMATCH[1]}"]=n
    fi
done <"$config_file"

if [[ ${#actual[@]} -eq 0 ]]; then
    die "$config_file contains no CONFIG_ lines; is it a kernel .config?"
fi

passed=0
failed=0
line_no=0
while IFS= read -r line || [[ -n "$line" ]]; do
    line_no=$((line_no + 1))
    # Strip trailing whitespace (and a CR from files edited on Windows).
    line="${line%"${line##*[![:space:]]}"}"
    [[ -z "$line" || "$line" == \#* ]] && continue
    if [[ ! "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.+)$ ]]; then
        die "$required_file:$line_no: malformed requirement '$line' (expected CONFIG_NAME=value)"
    fi
    name="${BASH_REMATCH[1]}"
    want="${BASH_REMATCH[2]}"
    have="${actual[$name]-n}"
    if [[ "$have" == "$want" ]]; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        if [[ "$have" == n ]]; then
            echo "MISSING: $name=$want (the .config has it not set)"
        else
            echo "MISSING: $name=$want (the .config has $name=$have)"
        fi
    fi
done <"$required_file"

echo "kernel-config: $passed passed, $failed failed"
if [[ $failed -ne 0 ]]; then
    echo "kernel-config: fix kernel-config/microvm.config so Kconfig keeps these options" \
        "(look up each symbol's 'depends on' in the 6.1 Kconfig files, or use" \
        "'make menuconfig' and '/' to search)." >&2
    exit 1
fi
