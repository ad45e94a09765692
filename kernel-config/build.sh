#!/usr/bin/env bash
# build.sh: build (or find in the cache) the Kindling guest kernel.
#
#   kernel-config/build.sh [--print-dir] [--force]
#
#   --print-dir  print only the artefact directory on stdout (building first
#                if needed); all progress goes to stderr.
#   --force      rebuild even if the cache already holds this configuration.
#
# Source: Debian's linux-source-6.1 package (/usr/src/linux-source-6.1.tar.xz).
# Config: `make tinyconfig` + microvm.config merged with the kernel's own
# scripts/kconfig/merge_config.sh + `make olddefconfig`, then checked against
# required.txt (check-config.sh) BEFORE the long compile.
#
# Cache: ${KINDLING_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kindling}/kernel/<key>/
# where <key> = sha256 over microvm.config, required.txt, this script and the
# installed linux-source-6.1 package version. The cache lives outside the
# checkout because CI builds from a fresh clone. An entry holds:
#   vmlinux   uncompressed ELF kernel (PVH entry note; what a VMM loads)
#   bzImage   compressed bootable image (LZ4)
#   config    the final .config
#   build.log full output of the configure and make steps
#   VERSION   kernel release, source package version, build seconds, ...
# Entries are built in a temporary directory next to them and renamed into
# place only when complete, so an interrupted build never leaves a partial
# entry. <cache>/kernel/current is a symlink to the entry the last run
# resolved to. Concurrent runs for the same key wait on a lock.
#
# Environment: KINDLING_CACHE (cache root), KINDLING_KERNEL_JOBS (make -j,
# default: nproc).
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly script_dir
readonly fragment="$script_dir/microvm.config"
readonly required="$script_dir/required.txt"
readonly checker="$script_dir/check-config.sh"
this_script="$script_dir/$(basename "${BASH_SOURCE[0]}")"
readonly this_script
readonly source_package=linux-source-6.1
readonly source_tarball=/usr/src/linux-source-6.1.tar.xz
# Debian packages the configure + compile steps need. lz4 compresses the
# bzImage; libelf-dev is for objtool (ORC unwinder); xz-utils unpacks the
# source tarball; libssl-dev for the host tools under certs/ and scripts/.
readonly build_packages=(build-essential flex bison bc libelf-dev libssl-dev lz4 xz-utils)
readonly cache_root="${KINDLING_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kindling}/kernel"
readonly artefacts=(vmlinux bzImage config build.log VERSION)
readonly min_free_mib=4096

print_dir=false
force=false

log() { echo "[kernel] $*" >&2; }

# die <what failed> <why> <what to do>
die() {
    echo "[kernel] error: $1" >&2
    [[ -n "${2:-}" ]] && echo "[kernel]   why: $2" >&2
    [[ -n "${3:-}" ]] && echo "[kernel]   fix: $3" >&2
    exit 1
}

usage() {
    sed -n '2,9p' "$this_script" | sed 's/^# \{0,1\}//' >&2
}

parse_args() {
    while [[ $# -gt 0 ]]; do
        case "$1" in
        --print-dir) print_dir=true ;;
        --force) force=true ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            usage
            die "unknown argument '$1'" "" "run $0 --help"
            ;;
        esac
        shift
    done
}

package_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

# install_packages <pkg>...: installs whichever of them are missing, running
# `apt-get update` once first.
install_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        package_installed "$pkg" || missing+=("$pkg")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    if [[ $(id -u) -ne 0 ]]; then
        die "missing build dependencies: ${missing[*]}" \
            "installing them needs root and this script runs as $(id -un)" \
            "sudo apt-get install ${missing[*]}  (then run $0 again)"
    fi
    log "installing missing packages: ${missing[*]}"
    if ! DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2; then
        die "apt-get update failed" "the Debian mirror is unreachable or the apt sources are broken" \
            "check /etc/apt/sources.list* and network access to the mirror"
    fi
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; then
        die "apt-get install ${missing[*]} failed" "see the apt output above" \
            "install them by hand: apt-get install ${missing[*]}"
    fi
}

source_version() {
    dpkg-query -W -f='${Version}' "$source_package"
}

# The cache key: sha256 over the inputs that determine the artefacts. Each
# input is labelled so that moving bytes between files changes the key.
cache_key() {
    local version="$1"
    {
        printf 'microvm.config\n'
        sha256sum <"$fragment"
        printf 'required.txt\n'
        sha256sum <"$required"
        printf 'build.sh\n'
        sha256sum <"$this_script"
        printf '%s %s\n' "$source_package" "$version"
    } | sha256sum | cut -d' ' -f1
}

entry_complete() {
    local dir="$1" f
    [[ -d "$dir" ]] || return 1
    for f in "${artefacts[@]}"; do
        [[ -s "$dir/$f" ]] || return 1
    done
}

# Points <cache>/kernel/current at the entry (relative link, atomic rename).
update_current_link() {
    local key="$1" tmp_link="$cache_root/.current.$$"
    ln -sfn "$key" "$tmp_link"
    mv -T "$tmp_link" "$cache_root/current"
}

report_entry() {
    local dir="$1"
    if $print_dir; then
        printf '%s\n' "$dir"
    else
        echo "kernel artefacts: $dir"
        echo "  vmlinux: $dir/vmlinux"
        echo "  bzImage: $dir/bzImage"
        echo "  config:  $dir/config"
        sed 's/^/  /' "$dir/VERSION"
    fi
}

format_duration() {
    local s="$1"
    printf '%dm%02ds' $((s / 60)) $((s % 60))
}

# Objects compiled so far, counted from kbuild's short log ("  CC  foo.o").
objects_in_log() {
    grep -cE '^  (CC|AS)  ' "$log_file" 2>/dev/null || true
}

# Objects the newest previous build compiled, for a rough progress total.
previous_object_count() {
    local version_file="$cache_root/current/VERSION"
    [[ -f "$version_file" ]] || return 0
    sed -n 's/^objects_compiled=//p' "$version_file"
}

# Runs make in its own session (so an interrupt can stop the whole job tree)
# with its output going to the log, and prints one status line periodically.
make_pid=""
stop_make() {
    if [[ -n "$make_pid" ]] && kill -0 "$make_pid" 2>/dev/null; then
        kill -TERM -- "-$make_pid" 2>/dev/null || true
        wait "$make_pid" 2>/dev/null || true
    fi
}

run_make_with_progress() {
    local src="$1" jobs="$2" started="$3"
    local expected interval now count rc=0 eol
    expected="$(previous_object_count)"
    # In place on a terminal, one line per 30 s in logs (CI).
    if [[ -t 2 ]]; then interval=2 eol='   \r'; else interval=30 eol='\n'; fi

    setsid make -C "$src" -j"$jobs" vmlinux bzImage >>"$log_file" 2>&1 &
    make_pid=$!
    while kill -0 "$make_pid" 2>/dev/null; do
        sleep "$interval" &
        wait $! || true
        kill -0 "$make_pid" 2>/dev/null || break
        now=$(date +%s)
        count=$(objects_in_log)
        printf "[kernel] compiling: %s objects%s, %s elapsed$eol" \
            "$count" "${expected:+ of ~$expected}" "$(format_duration $((now - started)))" >&2
    done
    wait "$make_pid" || rc=$?
    make_pid=""
    [[ -t 2 ]] && printf '\n' >&2
    return "$rc"
}

fail_with_log() {
    local what="$1" hint="$2"
    echo "[kernel] ---- last 40 lines of $log_file ----" >&2
    tail -n 40 "$log_file" >&2 || true
    echo "[kernel] ----" >&2
    die "$what" "see the log excerpt above (full log: $log_file)" "$hint"
}

# Warn (do not fail) about fragment lines Kconfig did not keep: they are
# either hidden by an unmet dependency or renamed. required.txt decides
# what is fatal.
warn_dropped_fragment_lines() {
    local config="$1" line dropped=0
    while IFS= read -r line; do
        [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+=|#\ CONFIG_[A-Za-z0-9_]+\ is\ not\ set$) ]] || continue
        if ! grep -qxF -- "$line" "$config"; then
            log "warning: fragment line not in final .config: $line"
            dropped=$((dropped + 1))
        fi
    done <"$fragment"
    [[ $dropped -eq 0 ]] || log "warning: $dropped fragment line(s) dropped by Kconfig (see above)"
}

# State of the build in progress, for the exit/interrupt handlers.
work_dir=""
log_file=""

# Exit handler while a build runs: stop make, drop the half-built tree. The
# log stays at $log_file (outside the work dir) for diagnosis.
abandon_build() {
    stop_make
    if [[ -n "$work_dir" ]]; then
        rm -rf "$work_dir"
        log "build abandoned; its log is kept at $log_file"
    fi
}

# Removes work dirs left by killed builds: every one of this key (we hold
# its lock) and those of other keys whose builder process is gone.
remove_stale_build_dirs() {
    local key="$1" dir pid
    for dir in "$cache_root"/.build-*; do
        [[ -d "$dir" ]] || continue
        pid="${dir##*.}"
        if [[ "$dir" == "$cache_root/.build-$key".* ]] || ! kill -0 "$pid" 2>/dev/null; then
            log "removing the leftover of an interrupted build: $dir"
            rm -rf "$dir"
        fi
    done
}

# configure_kernel <src>: tinyconfig, merge the fragment, olddefconfig.
# Chained with && because `set -e` does not apply inside a `||` context.
configure_kernel() {
    local src="$1"
    echo "== make tinyconfig" &&
        make -C "$src" tinyconfig &&
        echo "== merge_config.sh -m .config microvm.config" &&
        (cd "$src" && ./scripts/kconfig/merge_config.sh -m .config "$fragment") &&
        echo "== make olddefconfig" &&
        make -C "$src" olddefconfig
}

build_entry() {
    local key="$1" version="$2" key_dir="$3"
    local jobs="${KINDLING_KERNEL_JOBS:-$(nproc)}"
    local src out started free_mib
    work_dir="$cache_root/.build-$key.$$"
    log_file="$cache_root/build-$key.log"
    src="$work_dir/linux"
    out="$work_dir/out"

    install_packages "${build_packages[@]}"
    [[ -f "$source_tarball" ]] || die "$source_tarball is missing" \
        "the $source_package package is installed but its tarball is gone" \
        "apt-get install --reinstall $source_package"

    free_mib=$(df -Pm "$cache_root" | awk 'NR == 2 { print $4 }')
    if [[ -n "$free_mib" && "$free_mib" -lt $min_free_mib ]]; then
        die "not enough disk space in $cache_root (${free_mib} MiB free)" \
            "unpacking and building Linux needs about ${min_free_mib} MiB" \
            "free some space or point KINDLING_CACHE at a larger filesystem"
    fi

    remove_stale_build_dirs "$key"
    mkdir -p "$src" "$out"
    : >"$log_file"
    trap abandon_build EXIT
    trap 'log "interrupted"; exit 130' INT TERM

    started=$(date +%s)
    log "cache miss: building Linux $version (key ${key:0:16}...)"
    log "build dir: $work_dir"
    log "full log:  $log_file"

    log "unpacking $source_tarball"
    if ! tar -xJf "$source_tarball" -C "$src" --strip-components=1 >>"$log_file" 2>&1; then
        fail_with_log "unpacking $source_tarball failed" \
            "check disk space, then apt-get install --reinstall $source_package"
    fi

    # Fixed build identity so `uname -v` does not name the builder's host.
    export KBUILD_BUILD_USER=kindling KBUILD_BUILD_HOST=kindling

    log "configuring: tinyconfig + microvm.config + olddefconfig"
    if ! configure_kernel "$src" >>"$log_file" 2>&1; then
        fail_with_log "configuring the kernel failed" \
            "fix the error shown above (usually in kernel-config/microvm.config)"
    fi

    warn_dropped_fragment_lines "$src/.config"

    log "checking the merged .config against required.txt"
    if ! "$checker" "$src/.config" >&2; then
        die "the merged .config lacks options from required.txt (listed above)" \
            "microvm.config no longer yields them: a dependency is unmet or a symbol was renamed" \
            "fix kernel-config/microvm.config (see each symbol's 'depends on' in the 6.1 Kconfig), then rerun"
    fi

    log "compiling vmlinux + bzImage with make -j$jobs (typically 7-10 min on 2 cores)"
    echo "== make -j$jobs vmlinux bzImage" >>"$log_file"
    if ! run_make_with_progress "$src" "$jobs" "$started"; then
        fail_with_log "compiling the kernel failed" \
            "if the error is in an option we enabled, adjust microvm.config; if a host tool is missing, install it; then rerun"
    fi

    local seconds objects release
    seconds=$(($(date +%s) - started))
    objects=$(objects_in_log)
    release=$(cat "$src/include/config/kernel.release")
    cp "$src/vmlinux" "$out/vmlinux"
    cp "$src/arch/x86/boot/bzImage" "$out/bzImage"
    cp "$src/.config" "$out/config"
    {
        echo "kernel_release=$release"
        echo "source_package=$source_package"
        echo "source_version=$version"
        echo "build_seconds=$seconds"
        echo "objects_compiled=$objects"
        echo "built_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "compiler=$(gcc --version | head -n 1)"
        echo "cache_key=$key"
    } >"$out/VERSION"
    mv "$log_file" "$out/build.log"
    log_file="$out/build.log"

    # Publish: rename the finished directory into place (same filesystem, so
    # atomic). With --force the old entry of this key is moved aside first.
    if [[ -e "$key_dir" ]]; then
        mv -T "$key_dir" "$work_dir/previous"
    fi
    mv -T "$out" "$key_dir"
    update_current_link "$key"

    trap - EXIT INT TERM
    rm -rf "$work_dir"
    work_dir=""
    log "built $release in $(format_duration "$seconds") ($objects objects)"
}

main() {
    parse_args "$@"

    # The source package version is part of the cache key, so it is needed
    # even on a cache hit; the other build dependencies only on a miss.
    install_packages "$source_package"
    local version key key_dir
    version=$(source_version)
    key=$(cache_key "$version")
    key_dir="$cache_root/$key"

    if ! $force && entry_complete "$key_dir"; then
        update_current_link "$key"
        $print_dir || log "cache hit (key ${key:0:16}...)"
        report_entry "$key_dir"
        return 0
    fi

    mkdir -p "$cache_root" || die "cannot create the cache directory $cache_root" \
        "the parent is not writable" "set KINDLING_CACHE to a writable directory"

    # One build per key at a time; a second run waits, then finds the entry.
    exec {lock_fd}>"$cache_root/.lock-$key"
    if ! flock -n "$lock_fd"; then
        log "another build of this kernel is running; waiting for it"
        flock "$lock_fd"
    fi
    if ! $force && entry_complete "$key_dir"; then
        update_current_link "$key"
        log "cache hit after waiting (key ${key:0:16}...)"
        report_entry "$key_dir"
        return 0
    fi
    if [[ -d "$key_dir" ]] && ! $force; then
        log "cache entry $key_dir is incomplete; rebuilding it"
    fi

    build_entry "$key" "$version" "$key_dir"
    report_entry "$key_dir"
}

main "$@"
