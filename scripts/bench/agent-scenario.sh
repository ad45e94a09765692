# The L1 side of scripts/bench-agent.sh (busybox sh, run by the harness).
#
# Needs on PATH: vmm, host-agent, fake-host. Assets: vmlinux, bare.erofs,
# minimal.erofs, debian.erofs, job.yaml. RUNS is set by the caller.
#
# Per run it boots, each in a fresh VM:
#   bare     the VMM with bare.erofs, whose /init writes boot-timer mark
#            0x01 and resets: VMM start -> init (from the VMM's log)
#   IMAGE/ha `host-agent run job.yaml`: its summary gives VMM start ->
#            Hello, Hello -> Ready, job -> first log chunk, teardown
#   IMAGE/fh the VMM driven by `fake-host` (no host agent, no jail): VMM
#            start -> the agent's vsock connection (it sends Hello at once),
#            from the VMM's log like the bare init's mark; the job's last
#            step writes mark 0xff as its last action, fake-host sends
#            Shutdown after JobFinished, and the guest powers itself off:
#            last step end -> VMM exit, both from the VMM's log
# and prints one `BENCH key=value ...` line per VM.
set -u
RUNS=${RUNS:-3}
MEMORY_MIB=256
# Must match host-agent's BASE_CMDLINE (host-agent/src/vm.rs), init aside.
CMDLINE="console=ttyS0 reboot=k panic=1 pci=off quiet root=/dev/vda ro rootfstype=erofs"
W=/tmp/bench
mkdir -p "$W"

# host-agent takes images only as regular files; the debian image is a
# disk in the L1, so copy it to tmpfs (all debian runs use the copy).
cat "$ASSETS/debian.erofs" > /tmp/debian.erofs || exit 1

# vmm_direct DIR IMAGE INIT: boots the VMM as host-agent would, logs in DIR.
vmm_direct() {
    vmm --kernel "$ASSETS/vmlinux" --cmdline "$CMDLINE init=$3" \
        --vcpus 1 --memory-mib "$MEMORY_MIB" --drive "path=$2,ro" \
        --vsock "cid=3,uds=$1/vsock.sock" --rng \
        --serial "file:$1/serial.log" --boot-timer 2>"$1/vmm.log"
}

# stamp_ms LOG PATTERN: the VMM timestamp (ms) of the first line matching.
stamp_ms() {
    grep -m1 "$2" "$1" | sed -n 's/^\[vmm +\([0-9.]*\)ms.*/\1/p'
}

# mark_ms LOG VALUE: when the guest wrote boot-timer mark VALUE, in ms.
mark_ms() {
    grep -m1 "guest mark $2 at" "$1" | sed -n 's/.* at \([0-9]*\) us .*/\1/p' |
        awk '{ printf "%.1f", $1 / 1000 }'
}

# summary_ms LOG LABEL: a host-agent summary value ("LABEL   1.234 s") in ms.
summary_ms() {
    grep -m1 -- "$2" "$1" | awk '$NF == "s" { printf "%.1f", $(NF - 1) * 1000; ok = 1 }
                                 END { if (!ok) print "NA" }'
}

diff_ms() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "") print "NA"; else printf "%.1f", b - a }'
}

bare() {
    d="$W/bare-$1"
    mkdir -p "$d"
    vmm_direct "$d" "$ASSETS/bare.erofs" /init
    rc=$?
    echo "BENCH image=bare run=$1 rc=$rc init_ms=$(mark_ms "$d/vmm.log" 0x01)" \
        "stop_ms=$(stamp_ms "$d/vmm.log" 'VM stopped')"
}

via_host_agent() {
    log="$W/$1-ha-$3.log"
    host-agent run "$ASSETS/job.yaml" --vmm "$(command -v vmm)" \
        --kernel "$ASSETS/vmlinux" --image "$2" \
        --vcpus 1 --memory-mib "$MEMORY_MIB" >"$log" 2>&1
    rc=$?
    [ "$rc" = 0 ] || { echo "host-agent run failed ($rc):"; cat "$log"; }
    echo "BENCH image=$1 run=$3 rc=$rc" \
        "hello_ms=$(summary_ms "$log" 'VMM start -> agent Hello')" \
        "ready_ms=$(summary_ms "$log" 'Hello -> Ready')" \
        "first_log_ms=$(summary_ms "$log" 'job -> first log chunk')" \
        "run_ms=$(summary_ms "$log" 'job -> job finished')" \
        "teardown_ms=$(summary_ms "$log" 'teardown')"
}

via_fake_host() {
    d="$W/$1-fh-$3"
    mkdir -p "$d"
    fake-host --listen "$d/vsock.sock_10000" --spec "$ASSETS/job.yaml" >"$d/fake-host.log" 2>&1 &
    fh=$!
    i=0
    while [ ! -S "$d/vsock.sock_10000" ] && [ "$i" -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
    vmm_direct "$d" "$2" /sbin/runner-agent
    rc=$?
    wait "$fh"
    fhrc=$?
    [ "$rc" = 0 ] && [ "$fhrc" = 0 ] || {
        echo "fake-host run failed (vmm $rc, fake-host $fhrc):"
        cat "$d/fake-host.log" "$d/vmm.log"
    }
    last=$(mark_ms "$d/vmm.log" 0xff)
    stop=$(stamp_ms "$d/vmm.log" 'VM stopped')
    echo "BENCH image=$1 run=$3 rc=$rc fake_host_rc=$fhrc last_step_end_ms=$last" \
        "stop_ms=$stop exit_ms=$(diff_ms "$last" "$stop")" \
        "connect_ms=$(stamp_ms "$d/vmm.log" 'first guest connection')"
}

run=1
while [ "$run" -le "$RUNS" ]; do
    echo "== run $run of $RUNS"
    bare "$run"
    for image in minimal debian; do
        case $image in
        minimal) path="$ASSETS/minimal.erofs" ;;
        debian) path=/tmp/debian.erofs ;;
        esac
        via_host_agent "$image" "$path" "$run"
        via_fake_host "$image" "$path" "$run"
    done
    run=$((run + 1))
done
