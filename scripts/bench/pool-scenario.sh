# The pool benchmark's scenario (busybox sh, in the L1 of the nested harness
# or directly on a hardware-KVM host; loopback only). scripts/bench-pool.sh
# prepends SAMPLES, JOBS, POOL_SIZE and MEMORY_MIB and runs it.
#
# One orchestrator and one host agent with one pool of POOL_SIZE VMs:
#   1. warm latency, SAMPLES times: wait until every VM of the pool is idle
#      (the agent's metrics), submit a one-line job with the client CLI
#      (`orchestrator submit --follow`), time the first log line at the
#      client, the job's end at the client, and the pool being full again;
#   2. throughput: JOBS jobs at once, first submit to last job end.
# VM boot and teardown times come from the host agent's log (per VM).
set -u
HC=host-credential-0123456789abcdef
CC=client-credential-0123456789abcdef
export KINDLING_SERVER=http://127.0.0.1:8080 KINDLING_CLIENT_CREDENTIAL=$CC
W=/tmp/bench
mkdir -p $W && cd $W || exit 1

# Wall-clock time with microseconds (busybox date has no %N).
ts() { adjtimex | awk '/tv_sec/ { s = $2 } /tv_usec/ { u = $2 } END { printf "%d.%06d\n", s, u }'; }
diff_s() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f\n", b - a }'; }
die() {
    echo "bench: $*"
    echo "--- host-agent log (tail) ---"; agent_log | tail -30
    exit 1
}
agent_log() { tr -d '\033' < $W/agent.log | sed 's/\[[0-9;]*m//g'; }
idle_count() {
    timeout 10 wget -q -O - http://127.0.0.1:9100/metrics 2>/dev/null |
        sed -n 's/^kindling_host_agent_vms{pool="bench",state="idle"} //p'
}
pool_full() { [ "$(idle_count)" = "$POOL_SIZE" ]; }
wait_full() {
    i=0
    while ! pool_full; do
        i=$((i + 1))
        [ $i -gt 3000 ] && die "the pool did not fill up"
        sleep 0.05
    done
}
# stats: numbers on stdin -> "median min max count"
stats() {
    sort -n | awk '{ a[NR] = $1 }
        END {
            if (NR == 0) { print "- - - 0"; exit }
            m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
            printf "%.3f %.3f %.3f %d\n", m, a[1], a[NR], NR
        }'
}
row() { # LABEL "median min max n" [UNIT]
    set -- "$1" $2
    printf '%-44s %9s %9s %9s %5s\n' "$1" "$2" "$3" "$4" "$5"
}
# Per-VM times (seconds) from the agent's log lines KEY=<ms>, lines FROM..TO.
log_ms() { agent_log | sed -n "$2,$3p" | sed -n "s/.* $1=\([0-9]*\).*/\1/p" | awk '{ printf "%.3f\n", $1 / 1000 }'; }
log_lines() { wc -l < $W/agent.log; }
# Seconds of the (UTC) day: of a wall-clock time, and of the first log line
# on stdin matching PATTERN (tracing's RFC 3339 timestamps).
day_s() { awk -v t="$1" 'BEGIN { printf "%.6f\n", t - int(t / 86400) * 86400 }'; }
log_day_s() {
    grep -- "$1" | head -1 |
        sed -n 's/^[0-9-]*T\([0-9]*\):\([0-9]*\):\([0-9.]*\)Z.*/\1 \2 \3/p' |
        awk '{ printf "%.6f\n", $1 * 3600 + $2 * 60 + $3 }'
}

cat > $W/agent.toml <<EOF
host_id = "bench-host"
state_dir = "$W/state"
vmm = "$(command -v vmm)"
metrics_listen = "127.0.0.1:9100"
[orchestrator]
url = "http://127.0.0.1:8080"
host_credential = "$HC"
[limits]
vcpus = $POOL_SIZE
memory_mib = $((POOL_SIZE * MEMORY_MIB))
[[pool]]
name = "bench"
labels = ["linux"]
size = $POOL_SIZE
vcpus = 1
memory_mib = $MEMORY_MIB
kernel = "$ASSETS/vmlinux"
image = "$ASSETS/minimal.erofs"
EOF
cat > $W/hello.yaml <<EOF
name: first-line
runs-on: [linux]
steps:
  - run: echo first-line
EOF

orchestrator serve --listen 127.0.0.1:8080 --archive $W/archive \
    --host-credential $HC --client-credential $CC > $W/orch.log 2>&1 &
RUST_LOG=info host-agent serve --config $W/agent.toml > $W/agent.log 2>&1 &
AGENT=$!
t=$(ts)
wait_full
echo "pool of $POOL_SIZE warm after $(diff_s $t $(ts)) s"

# --- 1. warm latency ---------------------------------------------------------
from=$(($(log_lines) + 1))
: > $W/first_log; : > $W/assigned; : > $W/job_end; : > $W/refill
: > $W/to_server; : > $W/to_agent; : > $W/to_client; : > $W/cli_start
for k in $(seq 1 $SAMPLES); do
    wait_full
    sleep 0.5
    t0=$(ts)
    orchestrator submit $W/hello.yaml --follow 2> $W/s$k.err |
        { IFS= read -r line; ts > $W/s$k.first; echo "$line" > $W/s$k.line; cat > /dev/null; }
    t_end=$(ts)
    wait_full
    t_full=$(ts)
    grep -qx first-line $W/s$k.line || die "sample $k: first line was '$(cat $W/s$k.line)'"
    grep -q "succeeded" $W/s$k.err || die "sample $k did not succeed: $(cat $W/s$k.err)"
    diff_s $t0 "$(cat $W/s$k.first)" >> $W/first_log
    diff_s $t0 $t_end >> $W/job_end
    diff_s $t_end $t_full >> $W/refill
    id=$(sed -n 's/^\[kindling\] submitted job //p' $W/s$k.err)
    orchestrator status "$id" > $W/s$k.json
    sub=$(sed -n 's/^  "submitted_at_ms": \([0-9]*\).*/\1/p' $W/s$k.json)
    asg=$(sed -n 's/^  "assigned_at_ms": \([0-9]*\).*/\1/p' $W/s$k.json)
    awk -v a="$sub" -v b="$asg" 'BEGIN { printf "%.3f\n", (b - a) / 1000 }' >> $W/assigned
    # Where the time goes: client start and submit, orchestrator to host
    # agent (long poll answered), host agent to the client's first line.
    t_sub=$(log_day_s "job submitted job_id=$id" < $W/orch.log)
    t_acq=$(agent_log | log_day_s "job acquired.* job=$id")
    d0=$(day_s $t0)
    d1=$(day_s "$(cat $W/s$k.first)")
    awk -v a="$d0" -v b="$t_sub" 'BEGIN { printf "%.3f\n", b - a }' >> $W/to_server
    awk -v a="$t_sub" -v b="$t_acq" 'BEGIN { printf "%.3f\n", b - a }' >> $W/to_agent
    awk -v a="$t_acq" -v b="$d1" 'BEGIN { printf "%.3f\n", b - a }' >> $W/to_client
    t=$(ts); orchestrator --version > /dev/null; diff_s $t $(ts) >> $W/cli_start
    echo "sample $k: first log line $(tail -1 $W/first_log) s, job end $(tail -1 $W/job_end) s, pool full again $(tail -1 $W/refill) s later"
done
to=$(log_lines)

# --- 2. throughput -------------------------------------------------------------
wait_full
cat > $W/t.yaml <<EOF
name: throughput
runs-on: [linux]
steps:
  - run: echo one job; uname -r
EOF
t0=$(ts)
for i in $(seq 1 $JOBS); do
    ( orchestrator submit $W/t.yaml --follow > /dev/null 2>&1; echo $? > $W/t$i.rc ) &
done
i=0
while [ "$(ls $W | grep -c '^t[0-9]*\.rc$')" -lt "$JOBS" ]; do
    i=$((i + 1))
    [ $i -gt 12000 ] && die "the throughput jobs did not end"
    sleep 0.1
done
t_all=$(ts)
ok=$(cat $W/t*.rc | grep -c '^0$')
span=$(diff_s $t0 $t_all)

kill -TERM $AGENT
wait $AGENT

# --- report --------------------------------------------------------------------
first=$(stats < $W/first_log)
boot=$(log_ms boot_ms $from $to | stats)
echo
echo "kindling pool benchmark: one host, pool of $POOL_SIZE x (1 vCPU, $MEMORY_MIB MiB), minimal image"
printf '%-44s %9s %9s %9s %5s\n' "seconds" median min max n
row "submit -> first log line (client, warm)" "$first"
row "  client start + submit (-> orchestrator)" "$(stats < $W/to_server)"
row "  orchestrator -> host agent (job acquired)" "$(stats < $W/to_agent)"
row "  host agent -> first line at the client" "$(stats < $W/to_client)"
row "  (orchestrator submitted -> assigned)" "$(stats < $W/assigned)"
row "  (client CLI start alone: --version)" "$(stats < $W/cli_start)"
row "submit -> job end (client, warm)" "$(stats < $W/job_end)"
row "job end -> replacement VM ready (client)" "$(stats < $W/refill)"
row "VM boot: VMM start -> runner Hello" "$boot"
row "VM teardown: kill, reap, rm, deregister" "$(log_ms teardown_ms $from $to | stats)"
jpm=$(awk -v n="$ok" -v s="$span" 'BEGIN { printf "%.1f", n * 60 / s }')
echo "throughput: $ok of $JOBS jobs succeeded in $span s = $jpm jobs/min"
ratio=$(awk -v f="${first%% *}" -v b="${boot%% *}" 'BEGIN { printf "%.1f", 100 * f / b }')
verdict=$(awk -v r="$ratio" 'BEGIN { print (r < 5) ? "met" : "MISSED" }')
echo "first log line / VM boot (medians): $ratio % (target < 5 %: $verdict)"
echo "@ bench first_log=${first%% *} boot=${boot%% *} ratio_pct=$ratio jobs_per_min=$jpm"
[ "$ok" = "$JOBS" ] || exit 1
