#!/usr/bin/env bash
# build.sh: build (or find in the cache) a Kindling guest root image.
#
#   guest-image/build.sh [minimal|debian] [--print-path] [--force] [--prune]
#
#   minimal       busybox (static) + the runner agent as init; a few MiB (default)
#   debian        Debian 12 minbase + bash, git, curl, ca-certificates,
#                 build-essential, docker.io, iproute2; the runner agent as init
#   --print-path  print only the image path on stdout (building first if
#                 needed); all progress goes to stderr
#   --force       rebuild even if the cache holds this image
#   --prune       afterwards, delete this profile's other cache entries
#                 (older keys; make sure no VM pool still points at them)
#
# Output: a read-only erofs image (lz4hc-compressed, size a multiple of
# 4096) plus manifest.json (profile, sizes, packages, build time, key), in
#   ${KINDLING_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kindling}/images/<profile>-<key>/
# with <profile>-current a symlink to the newest entry. <key> = sha256 over
# this script, the stripped runner-agent binary, the erofs-utils version and
# the profile's inputs (busybox-static version; or debootstrap version,
# mirror, suite and package list). A debian entry is not rebuilt when the
# mirror publishes updates (a point release): use --force to refresh it.
#
# Why erofs rather than ext4 or squashfs: the base image is shared read-only
# by every VM, and erofs is read-only by design (no journal, nothing to
# replay or corrupt, no accidental rw mount); it is compressed (the debian
# tree: ~1 GiB as files, ~1.1 GiB as ext4, about half that as erofs lz4);
# it builds in seconds from a directory without root-only loop mounts; and
# its lz4 decompression is cheap and page-cache friendly (fixed-size
# physical clusters, in-place decompression), which squashfs's larger
# blocks and slower codecs are not. The kernel config has CONFIG_EROFS_FS
# with lz4; writes go to the per-VM overlay layer the runner agent builds.
#
# The runner agent is built here with
#   RUSTFLAGS="-C target-feature=+crt-static" cargo build --release \
#       --target x86_64-unknown-linux-gnu -p runner-agent
# (output under $CARGO_TARGET_DIR or <repo>/target), checked to be static,
# and installed stripped of debug info as /sbin/runner-agent, with
# /sbin/init and /init pointing at it.
#
# Entries are built in a temporary directory next to them and renamed into
# place when complete; concurrent builds of the same key wait on a lock.
#
# Environment: KINDLING_CACHE (cache root), KINDLING_DEBIAN_MIRROR (mirror
# URI; default: the bookworm mirror in /etc/apt/sources.list.d/*.sources or
# /etc/apt/sources.list, else http://deb.debian.org/debian),
# SOURCE_DATE_EPOCH (timestamp of every file in the image; default fixed).
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly script_dir
repo_root="$(cd "$script_dir/.." && pwd)"
readonly repo_root
this_script="$script_dir/$(basename "${BASH_SOURCE[0]}")"
readonly this_script
readonly cache_root="${KINDLING_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kindling}/images"
readonly rust_target=x86_64-unknown-linux-gnu
readonly debian_suite=bookworm
readonly debian_include=bash,git,curl,ca-certificates,build-essential,docker.io,iproute2
readonly default_mirror=http://deb.debian.org/debian
# Every file of the image gets this timestamp (2024-01-01T00:00:00Z) unless
# SOURCE_DATE_EPOCH says otherwise: same inputs, same minimal image bytes.
readonly image_epoch="${SOURCE_DATE_EPOCH:-1704067200}"
readonly compressor=lz4hc

profile=minimal
print_path=false
force=false
prune=false

log() { echo "[image] $*" >&2; }

# die <what failed> <why> <what to do>
die() {
    echo "[image] error: $1" >&2
    [[ -n "${2:-}" ]] && echo "[image]   why: $2" >&2
    [[ -n "${3:-}" ]] && echo "[image]   fix: $3" >&2
    exit 1
}

usage() {
    sed -n '2,14p' "$this_script" | sed 's/^# \{0,1\}//' >&2
}

parse_args() {
    while [[ $# -gt 0 ]]; do
        case "$1" in
        minimal | debian) profile="$1" ;;
        --print-path) print_path=true ;;
        --force) force=true ;;
        --prune) prune=true ;;
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

package_version() {
    dpkg-query -W -f='${Version}' "$1"
}

# install_packages <pkg>...: installs whichever of them are missing.
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
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 ||
        die "apt-get update failed" "the Debian mirror is unreachable or the apt sources are broken" \
            "check /etc/apt/sources.list* and network access to the mirror"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 ||
        die "apt-get install ${missing[*]} failed" "see the apt output above" \
            "install them by hand: apt-get install ${missing[*]}"
}

# The Debian mirror: $KINDLING_DEBIAN_MIRROR, else the first apt source
# serving the suite, else deb.debian.org.
debian_mirror() {
    if [[ -n "${KINDLING_DEBIAN_MIRROR:-}" ]]; then
        printf '%s\n' "$KINDLING_DEBIAN_MIRROR"
        return
    fi
    local found=""
    local sources=(/etc/apt/sources.list.d/*.sources)
    if [[ -e "${sources[0]}" ]]; then
        # deb822 stanzas: the URIs of a stanza whose Suites list the suite.
        found=$(awk -v suite="$debian_suite" '
            BEGIN { RS = ""; FS = "\n" }
            {
                uris = ""; ok = 0
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^URIs:/) { uris = $i; sub(/^URIs:[ \t]*/, "", uris) }
                    if ($i ~ /^Suites:/) {
                        n = split(substr($i, 8), s, /[ \t]+/)
                        for (j = 1; j <= n; j++) if (s[j] == suite) ok = 1
                    }
                }
                if (ok && uris != "") { split(uris, u, /[ \t]+/); print u[1]; exit }
            }' "${sources[@]}")
    fi
    if [[ -z "$found" ]]; then
        local lists=(/etc/apt/sources.list /etc/apt/sources.list.d/*.list)
        found=$(awk -v suite="$debian_suite" '
            $1 == "deb" {
                i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                if ($(i + 1) == suite) { print $i; exit }
            }' "${lists[@]}" 2>/dev/null || true)
    fi
    printf '%s\n' "${found:-$default_mirror}"
}

# Builds the static runner agent; prints the binary's path.
build_agent() {
    local target_dir="${CARGO_TARGET_DIR:-$repo_root/target}"
    [[ "$target_dir" = /* ]] || target_dir="$repo_root/$target_dir"
    local binary="$target_dir/$rust_target/release/runner-agent"
    command -v cargo >/dev/null ||
        die "cargo is not installed" "the runner agent is built from source" "install Rust 1.95 (rustup)"
    log "building the runner agent (static, release)"
    if ! (cd "$repo_root" && RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release --target "$rust_target" -p runner-agent) >&2; then
        die "building the runner agent failed" "see the cargo output above" "fix the build, then rerun"
    fi
    [[ -x "$binary" ]] || die "no runner agent at $binary" \
        "cargo succeeded but the binary is not where expected" "check CARGO_TARGET_DIR"
    local linkage
    linkage=$(ldd "$binary" 2>&1 || true)
    if ! grep -qE "not a dynamic executable|statically linked" <<<"$linkage"; then
        die "the runner agent is dynamically linked" "ldd says: $linkage" \
            "build with RUSTFLAGS=\"-C target-feature=+crt-static\""
    fi
    printf '%s\n' "$binary"
}

# cache_key <agent sha256> [<mirror>]: sha256 over every input of the image.
cache_key() {
    local agent_sha="$1" mirror="${2:-}"
    {
        printf 'build.sh\n'
        sha256sum <"$this_script"
        printf 'profile %s\n' "$profile"
        printf 'runner-agent %s\n' "$agent_sha"
        printf 'erofs-utils %s\n' "$(package_version erofs-utils)"
        printf 'compressor %s epoch %s\n' "$compressor" "$image_epoch"
        case "$profile" in
        minimal) printf 'busybox-static %s\n' "$(package_version busybox-static)" ;;
        debian)
            printf 'debootstrap %s\n' "$(package_version debootstrap)"
            printf 'mirror %s suite %s include %s\n' "$mirror" "$debian_suite" "$debian_include"
            ;;
        esac
    } | sha256sum | cut -d' ' -f1
}

entry_complete() {
    [[ -s "$1/rootfs.erofs" && -s "$1/manifest.json" ]]
}

report_entry() {
    local dir="$1"
    if $print_path; then
        printf '%s\n' "$dir/rootfs.erofs"
    else
        echo "image:    $dir/rootfs.erofs"
        echo "manifest: $dir/manifest.json"
        grep -E '"(profile|size_bytes|tree_bytes|build_seconds|package_count)"' "$dir/manifest.json" |
            sed 's/^ */  /; s/,$//'
    fi
}

# prune_entries <key>: removes this profile's entries other than <key>.
prune_entries() {
    local keep="$cache_root/$profile-$1" dir
    for dir in "$cache_root/$profile"-*; do
        [[ -d "$dir" && ! -L "$dir" && "$dir" != "$keep" ]] || continue
        log "pruning $(basename "$dir")"
        rm -rf --one-file-system "$dir"
        rm -f "$cache_root/.lock-$(basename "$dir")"
    done
}

update_current_link() {
    local name="$profile-$1" tmp_link="$cache_root/.current-$profile.$$"
    ln -sfn "$name" "$tmp_link"
    mv -T "$tmp_link" "$cache_root/$profile-current"
}

format_duration() {
    printf '%dm%02ds' $(($1 / 60)) $(($1 % 60))
}

# populate_minimal <root>: busybox, its applet links, the files init needs.
populate_minimal() {
    local root="$1" applet
    log "assembling the minimal tree (busybox $(package_version busybox-static))"
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,dev,proc,sys,run,tmp,root,var/tmp,mnt}
    chmod 1777 "$root/tmp" "$root/var/tmp"
    chmod 0700 "$root/root"
    install -m 0755 /bin/busybox "$root/bin/busybox"
    # Absolute links resolve inside the guest's root.
    while read -r applet; do
        [[ -n "$applet" && ! -e "$root/$applet" && ! -L "$root/$applet" ]] || continue
        ln -s /bin/busybox "$root/$applet"
    done < <("$root/bin/busybox" --list-full)
    cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
    cat >"$root/etc/group" <<'EOF'
root:x:0:
tty:x:5:
nogroup:x:65534:
EOF
    write_common_etc "$root" "kindling-minimal"
}

# populate_debian <root> <mirror>: debootstrap, then trim caches and logs.
populate_debian() {
    local root="$1" mirror="$2" log_file="$3"
    local started interval eol pid rc=0 last
    log "debootstrap --variant=minbase --include=$debian_include $debian_suite from $mirror"
    log "full log: $log_file"
    if [[ -t 2 ]]; then interval=2 eol='   \r'; else interval=15 eol='\n'; fi
    started=$(date +%s)
    debootstrap --variant=minbase --include="$debian_include" \
        "$debian_suite" "$root" "$mirror" >"$log_file" 2>&1 &
    pid=$!
    debootstrap_pid=$pid
    while kill -0 "$pid" 2>/dev/null; do
        sleep "$interval" &
        wait $! || true
        kill -0 "$pid" 2>/dev/null || break
        last=$(grep -E '^[IW]: ' "$log_file" | tail -n 1 | cut -c1-70 || true)
        printf "[image] debootstrap: %s (%s elapsed)$eol" \
            "${last:-starting}" "$(format_duration $(($(date +%s) - started)))" >&2
    done
    wait "$pid" || rc=$?
    debootstrap_pid=""
    [[ -t 2 ]] && printf '\n' >&2
    if [[ $rc -ne 0 ]]; then
        echo "[image] ---- last 30 lines of $log_file ----" >&2
        tail -n 30 "$log_file" >&2 || true
        die "debootstrap failed (exit $rc)" "see the log excerpt above" \
            "check network access to $mirror (or set KINDLING_DEBIAN_MIRROR), then rerun"
    fi
    log "debootstrap done in $(format_duration $(($(date +%s) - started)))"
    # Caches, logs and the builder's resolver settings do not belong in a
    # shared image (the agent writes resolv.conf from ip= at boot).
    find "$root/var/cache/apt/archives" -name '*.deb' -delete
    find "$root/var/lib/apt/lists" -type f -delete
    find "$root/var/log" -type f -delete
    rm -f "$root/etc/resolv.conf"
    : >"$root/etc/resolv.conf"
    write_common_etc "$root" "kindling-debian"
}

# write_common_etc <root> <id>: hostname, hosts, and an os-release note.
write_common_etc() {
    local root="$1" id="$2"
    echo "kindling" >"$root/etc/hostname"
    cat >"$root/etc/hosts" <<'EOF'
127.0.0.1	localhost
::1	localhost ip6-localhost ip6-loopback
127.0.1.1	kindling
EOF
    [[ -e "$root/etc/os-release" ]] || cat >"$root/etc/os-release" <<EOF
NAME="Kindling guest"
ID=$id
PRETTY_NAME="Kindling guest ($id)"
EOF
    echo "$id" >"$root/etc/kindling-image"
}

# install_agent <root> <stripped binary>: /sbin/runner-agent as init.
install_agent() {
    local root="$1" binary="$2"
    mkdir -p "$root/sbin"
    install -m 0755 "$binary" "$root/sbin/runner-agent"
    ln -sfn runner-agent "$root/sbin/init"
    ln -sfn sbin/runner-agent "$root/init"
    mkdir -p "$root"/{dev,proc,sys,run,tmp}
}

# make_image <root> <image> <key>: erofs, lz4hc, fixed timestamps and UUID,
# padded to a multiple of 4096 bytes.
make_image() {
    local root="$1" image="$2" key="$3" size uuid
    uuid="${key:0:8}-${key:8:4}-${key:12:4}-${key:16:4}-${key:20:12}"
    log "mkfs.erofs -z$compressor ($(du -sh "$root" | cut -f1) tree)"
    if ! mkfs.erofs "-z$compressor" "-T$image_epoch" "-U$uuid" "$image" "$root" >"$image.log" 2>&1; then
        cat "$image.log" >&2
        die "mkfs.erofs failed" "see its output above" "check disk space in $cache_root"
    fi
    rm -f "$image.log"
    size=$(stat -c %s "$image")
    if ((size % 4096 != 0)); then
        truncate -s $(((size + 4095) / 4096 * 4096)) "$image"
    fi
}

# write_manifest <root> <out dir> <key> <agent sha> <seconds> [<mirror>]
write_manifest() {
    local root="$1" out="$2" key="$3" agent_sha="$4" seconds="$5" mirror="${6:-}"
    local size tree packages count
    size=$(stat -c %s "$out/rootfs.erofs")
    tree=$(du -sb "$root" | cut -f1)
    case "$profile" in
    minimal) packages=$(printf 'busybox-static %s\n' "$(package_version busybox-static)") ;;
    debian)
        packages=$(dpkg-query --admindir="$root/var/lib/dpkg" -W \
            -f='${db:Status-Abbrev}|${Package} ${Version}\n' | awk -F'|' '$1 ~ /^ii/ { print $2 }')
        ;;
    esac
    count=$(grep -c . <<<"$packages")
    {
        printf '{\n'
        printf '  "profile": "%s",\n' "$profile"
        printf '  "image": "rootfs.erofs",\n'
        printf '  "format": "erofs",\n'
        printf '  "compression": "%s",\n' "$compressor"
        printf '  "size_bytes": %s,\n' "$size"
        printf '  "tree_bytes": %s,\n' "$tree"
        printf '  "build_seconds": %s,\n' "$seconds"
        printf '  "built_at": "%s",\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
        printf '  "cache_key": "%s",\n' "$key"
        printf '  "runner_agent_sha256": "%s",\n' "$agent_sha"
        printf '  "init": "/sbin/runner-agent",\n'
        printf '  "kernel_cmdline": "root=/dev/vda ro rootfstype=erofs init=/sbin/runner-agent",\n'
        printf '  "mkfs_erofs": "%s",\n' "$(package_version erofs-utils)"
        if [[ "$profile" == debian ]]; then
            printf '  "suite": "%s",\n' "$debian_suite"
            printf '  "mirror": "%s",\n' "$mirror"
            printf '  "included": "%s",\n' "$debian_include"
        fi
        printf '  "package_count": %s,\n' "$count"
        printf '  "packages": [\n'
        awk 'NF { printf "%s    {\"name\": \"%s\", \"version\": \"%s\"}", (n++ ? ",\n" : ""), $1, $2 }
             END { print "" }' <<<"$packages"
        printf '  ]\n'
        printf '}\n'
    } >"$out/manifest.json"
}

# State of the build in progress, for the exit handler.
work_dir=""
debootstrap_pid=""

abandon_build() {
    if [[ -n "$debootstrap_pid" ]]; then
        kill "$debootstrap_pid" 2>/dev/null || true
        wait "$debootstrap_pid" 2>/dev/null || true
    fi
    if [[ -n "$work_dir" ]]; then
        # debootstrap may leave its mounts (proc, sys) in the tree.
        grep -o " $work_dir/[^ ]*" /proc/mounts 2>/dev/null | sort -r |
            while read -r mnt; do umount -l "$mnt" 2>/dev/null || true; done
        rm -rf --one-file-system "$work_dir"
        log "build abandoned"
    fi
}

main() {
    parse_args "$@"
    local packages=(erofs-utils binutils)
    case "$profile" in
    minimal) packages+=(busybox-static) ;;
    debian) packages+=(debootstrap) ;;
    esac
    install_packages "${packages[@]}"
    if [[ "$profile" == debian && $(id -u) -ne 0 ]]; then
        die "the debian image needs root" "debootstrap chroots and creates root-owned files" \
            "run as root (sudo $0 debian)"
    fi

    mkdir -p "$cache_root" || die "cannot create $cache_root" "the parent is not writable" \
        "set KINDLING_CACHE to a writable directory"
    local agent stripped agent_sha mirror="" key entry
    agent=$(build_agent)
    stripped="$cache_root/.runner-agent.$$"
    strip --strip-debug -o "$stripped" "$agent"
    agent_sha=$(sha256sum <"$stripped" | cut -d' ' -f1)
    [[ "$profile" == debian ]] && mirror=$(debian_mirror)
    key=$(cache_key "$agent_sha" "$mirror")
    entry="$cache_root/$profile-$key"

    exec {lock_fd}>"$cache_root/.lock-$profile-$key"
    if ! flock -n "$lock_fd"; then
        log "another build of this image is running; waiting for it"
        flock "$lock_fd"
    fi
    if ! $force && entry_complete "$entry"; then
        rm -f "$stripped"
        update_current_link "$key"
        $print_path || log "cache hit ($profile, key ${key:0:16}...)"
        if $prune; then prune_entries "$key"; fi
        report_entry "$entry"
        return 0
    fi

    local started root out seconds
    started=$(date +%s)
    work_dir="$cache_root/.build-$profile-$key.$$"
    root="$work_dir/rootfs"
    out="$work_dir/out"
    trap abandon_build EXIT
    trap 'log "interrupted"; exit 130' INT TERM
    mkdir -p "$root" "$out"
    mv "$stripped" "$work_dir/runner-agent"
    log "cache miss: building the $profile image (key ${key:0:16}...)"

    case "$profile" in
    minimal) populate_minimal "$root" ;;
    debian) populate_debian "$root" "$mirror" "$work_dir/debootstrap.log" ;;
    esac
    install_agent "$root" "$work_dir/runner-agent"
    make_image "$root" "$out/rootfs.erofs" "$key"
    seconds=$(($(date +%s) - started))
    write_manifest "$root" "$out" "$key" "$agent_sha" "$seconds" "$mirror"
    [[ -f "$work_dir/debootstrap.log" ]] && cp "$work_dir/debootstrap.log" "$out/"

    # Publish atomically (same filesystem). With --force the old entry of
    # this key is moved aside first and removed with the work directory.
    if [[ -e "$entry" ]]; then
        mv -T "$entry" "$work_dir/previous"
    fi
    mv -T "$out" "$entry"
    update_current_link "$key"
    trap - EXIT INT TERM
    rm -rf --one-file-system "$work_dir"
    work_dir=""
    log "built the $profile image in $(format_duration "$seconds"): $(stat -c %s "$entry/rootfs.erofs") bytes"
    if $prune; then prune_entries "$key"; fi
    report_entry "$entry"
}

main "$@"
