//! Nested end-to-end tests of guest networking: real taps, real nftables,
//! real network namespaces inside the L1, real VMs.
//!
//! Inside the L1 a namespace `inet` plays the internet (203.0.113.0/24, an
//! HTTP server on .10 and a DNS responder on .53, both outside every
//! forbidden range), and a namespace `lan` holds listeners on private and
//! link-local addresses (10.x, 172.16.x, 192.168.x, 169.254.169.254) that
//! the L1 routes to, so without the policy a VM would reach them through
//! plain forwarding. The L1 itself runs listeners standing for the host's
//! services (SSH, orchestrator, agent metrics). Every listener is first
//! proven to answer (from the L1, which the VM policy does not govern),
//! then the job's attempts must all fail and every listener's log must
//! stay empty.

use std::time::Duration;

use harness::e2e::{self, FLEET_HELPERS, Facts, SHELL_HELPERS, field};
use harness::{Scenario, Status};

/// L1 modules for taps, veths, nftables, conntrack (and its per-VM
/// connection count; ctnetlink, for the `conntrack` tool) and NAT.
const MODULES: &[&str] = &[
    "tun",
    "veth",
    "nf_tables",
    "nf_conntrack",
    "nf_conntrack_netlink",
    "nf_nat",
    "nft_ct",
    "nf_conncount",
    "nft_connlimit",
    "nft_nat",
    "nft_masq",
    "nft_chain_nat",
];

/// Helpers of both scenarios, after [`SHELL_HELPERS`] (and
/// [`FLEET_HELPERS`]).
const NET_HELPERS: &str = r#"
# iproute2's ip (busybox sh would run its own applet, which lacks netns).
ip() { /usr/local/bin/ip "$@"; }
# net_state: what VMs could have left on the host's network, as fields.
net_state() {
    echo taps=$(ip -o link | grep -c ' kdl') \
        addrs=$(ip -o addr | grep -c '198\.18\.') routes=$(ip route | grep -c '198\.18\.') \
        table=$(nft list tables | grep -c kindling) \
        elements=$(for m in "set inet kindling vm_sources" "map inet kindling vm_policy" \
            "map inet kindling vm_ct_limit"; do nft list $m 2>/dev/null; done | grep -o '"kdl[0-9]*"' | wc -l)
}
"#;

/// Sets up the internet and lan namespaces and the host listeners; defines
/// `run_job` and `leftovers`.
const SETUP: &str = r#"
W=/tmp/net; mkdir -p $W/www && cd $W || exit 1

# --- the "internet" ------------------------------------------------------
ip netns add inet || die "ip netns add"
ip link add up0 type veth peer name ieth netns inet || die "veth"
ip addr add 203.0.113.1/24 dev up0 && ip link set up0 up
ip -n inet addr add 203.0.113.10/24 dev ieth
ip -n inet addr add 203.0.113.53/24 dev ieth
ip -n inet link set lo up && ip -n inet link set ieth up
ip -n inet route add default via 203.0.113.1
head -c 1048576 /dev/urandom > $W/www/blob
fact blob sha=$(sha256sum $W/www/blob | cut -d' ' -f1)
ip netns exec inet busybox httpd -p 203.0.113.10:80 -h $W/www || die httpd
ip netns exec inet netlab dns 203.0.113.53:53 files.example.test=203.0.113.10 &

# --- a private "lan" the L1 routes to ------------------------------------
ip netns add lan
ip link add lan0 type veth peer name leth netns lan
ip addr add 10.99.0.1/24 dev lan0 && ip link set lan0 up
ip -n lan addr add 10.99.0.2/24 dev leth
ip -n lan link set lo up && ip -n lan link set leth up
ip -n lan route add default via 10.99.0.1
LAN="10.1.2.3 172.16.5.5 192.168.1.5 169.254.169.254"
for a in $LAN; do
    ip -n lan addr add $a/32 dev lo
    ip route add $a/32 via 10.99.0.2
done
ip netns exec lan netlab listen $W/lan.log 10.1.2.3:80 172.16.5.5:80 192.168.1.5:80 169.254.169.254:80 &
# --- the host's own services ---------------------------------------------
netlab listen $W/host.log 0.0.0.0:22 0.0.0.0:8080 0.0.0.0:9100 &
sleep 1

# Every listener answers (from the L1 itself, outside the VM policy).
for a in $LAN; do nc -w 3 $a 80 </dev/null || die "control: $a:80 unreachable from the L1"; done
for p in 22 8080 9100; do nc -w 3 203.0.113.1 $p </dev/null || die "control: host :$p"; done
wget -q -O /dev/null http://203.0.113.10/blob || die "control: http from the L1"
fact controls lan=$(wc -l < $W/lan.log) host=$(wc -l < $W/host.log)
: > $W/lan.log; : > $W/host.log

# run_job NAME FILE [ARGS...]: host-agent run with NAT networking.
run_job() {
    name=$1; file=$2; shift 2
    host-agent run $file --vmm $(command -v vmm) --kernel $ASSETS/vmlinux \
        --image $ASSETS/minimal.erofs --memory-mib 256 --state-dir $W/state-$name \
        --network nat --dns 203.0.113.53 "$@" > $W/$name.out 2>&1
    rc=$?
    sed "s/^/[$name] /" $W/$name.out
    fact job name=$name rc=$rc
}
# leftovers WHEN: what a VM could have left on the host, at WHEN.
leftovers() { fact leftovers when=$1 $(net_state); }
"#;

/// The daemon path: `orchestrator serve` + `host-agent serve` with a NAT
/// pool of two VMs.
const DAEMON: &str = r#"
W=/tmp/net2; mkdir -p $W/jobs && cd $W || exit 1
warm() { idle n 2; }
state() {
    fact state when=$1 $(net_state) vmms=$(live_vmms) dirs=$(ls $W/state/vms 2>/dev/null | wc -l)
}
start_fleet 180 warm <<EOF
[network]
dns = "203.0.113.53"
[[pool]]
name = "n"
labels = ["linux"]
size = 2
vcpus = 1
memory_mib = 160
kernel = "$ASSETS/vmlinux"
image = "$ASSETS/minimal.erofs"
network = "nat"
EOF
state warm

# --- two VMs at once cannot reach each other ------------------------------
cat > $W/jobs/a.yaml <<'EOF'
name: listener
runs-on: [linux]
steps:
  - run: |
      me=$(ip -4 addr show eth0 | sed -n 's/.*inet \([0-9.]*\).*/\1/p')
      timeout 25 nc -l -p 7000 > /tmp/got &
      sleep 1
      echo "listening at $me"
      wait
      if grep -q hello-from-b /tmp/got; then echo "listener GOT a connection"; else echo "listener saw nothing"; fi
EOF
submit a
wait_for 60 "job a listening" grep -q "listening at" $W/jobs/a.out || die "job a never listened"
A=$(sed -n 's/^listening at //p' $W/jobs/a.out)
fact a addr=$A
cat > $W/jobs/b.yaml <<EOF
name: prober
runs-on: [linux]
steps:
  - run: |
      me=\$(ip -4 addr show eth0 | sed -n 's/.*inet \([0-9.]*\).*/\1/p')
      nc -l -p 7001 > /dev/null &
      sleep 1
      if nc -w 3 \$me 7001 < /dev/null; then echo "control own-listener ok at \$me"; fi
      if echo hello-from-b | nc -w 3 $A 7000; then echo "probe REACHED $A"; else echo "probe blocked $A"; fi
      if ping -c 1 -W 2 $A > /dev/null 2>&1; then echo "ping REACHED $A"; else echo "ping blocked $A"; fi
EOF
orchestrator submit $W/jobs/b.yaml --follow > $W/jobs/b.out 2>&1; echo "b rc=$?"
cat $W/jobs/b.out
wait_for 60 "job a ended" ended a || die "job a never ended"
cat $W/jobs/a.out $W/jobs/a.err

# --- kill -9 of the agent, then the start-up clean-up ---------------------
wait_for 180 "the pool replaced" warm || die "the pool was not replaced"
state before-crash
# Frozen VMMs stand for wedged ones, so that the clean-up has processes to
# kill as well as taps and rules.
freeze_vmms
kill -9 $AGENT; wait $AGENT 2>/dev/null; sleep 0.5
state crashed
host-agent cleanup --config $W/agent.toml; echo "cleanup rc=$?"
state after-cleanup
rmdir /sys/fs/cgroup/wedged
# --- a restart, then a clean stop ------------------------------------------
start_agent
wait_for 180 "the pool after the restart" warm || die "no pool after the restart"
state restarted
kill -TERM $AGENT; wait $AGENT
state stopped
"#;

/// A NAT pool whose VMs may have 16 connections open: a job opens 30 to a
/// server on the "internet", which sees 16 of them established. The job
/// ends with them open, so its VM is destroyed with 16 established
/// connections that no FIN ever closes: their host conntrack entries must
/// go with it, and the next VM (maybe on the same tap) opens its own 16.
const CONNTRACK: &str = r#"
W=/tmp/net3; mkdir -p $W/jobs $W/www && cd $W || exit 1
ip netns add inet || die "ip netns add"
ip link add up0 type veth peer name ieth netns inet || die "veth"
ip addr add 203.0.113.1/24 dev up0 && ip link set up0 up
ip -n inet addr add 203.0.113.10/24 dev ieth
ip -n inet link set lo up && ip -n inet link set ieth up
ip -n inet route add default via 203.0.113.1
echo hi > $W/www/index.html
ip netns exec inet busybox httpd -p 203.0.113.10:80 -h $W/www || die httpd
# Connections to the server in state ESTABLISHED, as the server sees them.
established() { ip netns exec inet cat /proc/net/tcp | awk '$2 ~ /:0050$/ && $4 == "01"' | wc -l; }
# The host's conntrack entries of connections to the server, in any state.
tracked() { conntrack -L -f ipv4 -p tcp -d 203.0.113.10 --dport 80 2>/dev/null | wc -l; }
warm() { idle n 1; }
start_fleet 180 warm <<EOF
[network]
dns = "203.0.113.10"
[[pool]]
name = "n"
labels = ["linux"]
size = 1
vcpus = 1
memory_mib = 160
kernel = "$ASSETS/vmlinux"
image = "$ASSETS/minimal.erofs"
network = "nat"
conntrack_limit = 16
EOF
cat > $W/jobs/c.yaml <<'EOF'
name: conns
runs-on: [linux]
steps:
  - run: |
      for i in $(seq 1 30); do ( sleep 25 | nc 203.0.113.10 80 ) > /dev/null 2>&1 & done
      echo "opened 30"
      sleep 15
EOF
submit c
wait_for 90 "job c opened its connections" grep -q "opened 30" $W/jobs/c.out || die "job c never opened"
sleep 8
fact conns established=$(established)
fact tracked when=running entries=$(tracked)
wait_for 120 "job c ended" ended c || die "job c never ended"
cat $W/jobs/c.out $W/jobs/c.err
fact c rc=$(cat $W/jobs/c.rc)
wait_for 180 "the pool replaced" warm || die "the pool was not replaced"
fact tracked when=after-teardown entries=$(tracked)
cp $W/jobs/c.yaml $W/jobs/c2.yaml
submit c2
wait_for 90 "job c2 opened its connections" grep -q "opened 30" $W/jobs/c2.out || die "job c2 never opened"
sleep 8
fact tracked when=next-vm entries=$(tracked)
wait_for 120 "job c2 ended" ended c2 || die "job c2 never ended"
fact c2 rc=$(cat $W/jobs/c2.rc)
"#;

fn scenario(name: &str, script: &str, jobs: &[(&str, &str)]) -> Scenario {
    let bins = [
        "vmm",
        "host-agent",
        "kindling-jailer",
        "netlab",
        "orchestrator",
        "/usr/sbin/nft",
        "/usr/sbin/ip",
        "/usr/sbin/conntrack",
    ];
    let mut sc = e2e::scenario(name, script, Duration::from_secs(600), &bins, jobs).unwrap();
    sc.modules = MODULES.iter().map(|m| m.to_string()).collect();
    sc
}

const FETCH_AND_PROBE: &str = r#"name: net
runs-on: [linux]
steps:
  - name: dns and fetch
    run: |
      echo "resolv: $(grep nameserver /etc/resolv.conf)"
      wget -q -O /tmp/blob http://files.example.test/blob
      echo "fetched sha=$(sha256sum /tmp/blob | cut -d' ' -f1)"
  - name: forbidden destinations
    run: |
      gw=$(grep nameserver /etc/resolv.conf | head -1 | cut -d' ' -f2)
      for t in 10.1.2.3:80 172.16.5.5:80 192.168.1.5:80 169.254.169.254:80 \
               $gw:22 $gw:8080 $gw:9100 203.0.113.1:22 203.0.113.1:8080 203.0.113.1:9100; do
        if nc -w 3 ${t%:*} ${t#*:} </dev/null; then echo "probe REACHED $t"; else echo "probe blocked $t"; fi
      done
"#;

/// The rate limit of the throughput test, bytes per second to the guest.
const RX_LIMIT: u64 = 128 * 1024;

const LIMITED: &str = r#"name: limited
runs-on: [linux]
steps:
  - name: timed download
    run: |
      t0=$(cut -d' ' -f1 /proc/uptime)
      wget -q -O /tmp/blob http://203.0.113.10/blob
      t1=$(cut -d' ' -f1 /proc/uptime)
      echo "rate bytes=$(wc -c < /tmp/blob) start=$t0 end=$t1"
"#;

const NO_NETWORK: &str = r#"name: offline
runs-on: [linux]
network: false
steps:
  - name: interfaces
    run: |
      echo "interfaces: $(ls /sys/class/net | tr '\n' ' ')"
"#;

#[test]
fn a_job_fetches_through_nat_and_dns_and_reaches_nothing_forbidden() {
    let body = r#"
run_job fetch $ASSETS/fetch.yaml
leftovers after-job
fact listeners lan=$(wc -l < $W/lan.log) host=$(wc -l < $W/host.log)
cat $W/lan.log $W/host.log
run_job offline $ASSETS/offline.yaml
leftovers after-offline
run_job limited $ASSETS/limited.yaml --rx-bytes-per-sec RX_LIMIT
"#
    .replace("RX_LIMIT", &RX_LIMIT.to_string());
    let sc = scenario(
        "net-fetch",
        &format!("{SHELL_HELPERS}{NET_HELPERS}{SETUP}\n{body}"),
        &[
            ("fetch.yaml", FETCH_AND_PROBE),
            ("offline.yaml", NO_NETWORK),
            ("limited.yaml", LIMITED),
        ],
    );
    let out = harness::run(&sc).unwrap();
    let o = &out.output;
    assert_eq!(out.status, Status::Exited(0), "{}\n{o}", out.report());
    let f = Facts::parse(o);
    assert_eq!(
        f.lines("controls"),
        ["lan=4 host=3"],
        "listeners must answer the L1:\n{o}"
    );
    assert_eq!(
        f.lines("job"),
        ["name=fetch rc=0", "name=offline rc=0", "name=limited rc=0"],
        "{o}"
    );
    let blob = f.value("blob", "sha");
    assert!(o.contains(&format!("fetched sha={blob}")), "{o}");
    assert!(o.contains("resolv: nameserver 198.18.0.1"), "{o}");
    let blocked = o.lines().filter(|l| l.contains("probe blocked")).count();
    assert_eq!(
        blocked, 10,
        "every forbidden destination must be blocked:\n{o}"
    );
    assert!(!o.contains("probe REACHED"), "{o}");
    assert_eq!(
        f.lines("listeners"),
        ["lan=0 host=0"],
        "a listener saw traffic:\n{o}"
    );
    for when in ["after-job", "after-offline"] {
        assert_eq!(
            f.after("leftovers", "when", when),
            Some("taps=0 addrs=0 routes=0 table=0 elements=0"),
            "{o}"
        );
    }
    // The rate-limited download: payload throughput within 10 % of the
    // limit (the limit counts frame bytes: headers are ~4 % of 1514-byte
    // frames, next to nothing of 64 KiB GSO ones; the initial burst adds
    // ~6 %).
    let rate = o
        .lines()
        .find_map(|l| l.split_once("rate ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("no rate line:\n{o}"));
    let num = |k: &str| field(rate, k).unwrap().parse::<f64>().unwrap();
    let throughput = num("bytes") / (num("end") - num("start"));
    let ratio = throughput / RX_LIMIT as f64;
    println!("rate-limited download: {throughput:.0} B/s, {ratio:.3} of the limit");
    assert!(
        (0.9..=1.1).contains(&ratio),
        "throughput {throughput:.0} B/s vs limit {RX_LIMIT}: ratio {ratio:.3}\n{o}"
    );
    let interfaces = o
        .lines()
        .find(|l| l.contains("interfaces: "))
        .unwrap_or_else(|| panic!("no interfaces line:\n{o}"));
    assert!(interfaces.contains(" lo"), "{interfaces}");
    assert!(
        !interfaces.contains("eth"),
        "the no-network VM has a NIC: {interfaces}"
    );
}

#[test]
fn two_vms_cannot_reach_each_other_and_a_crashed_agent_leaves_nothing_after_clean_up() {
    let script = format!("{SHELL_HELPERS}{FLEET_HELPERS}{NET_HELPERS}{DAEMON}");
    let out = harness::run(&scenario("net-daemon", &script, &[])).unwrap();
    let o = &out.output;
    assert_eq!(out.status, Status::Exited(0), "{}\n{o}", out.report());
    let f = Facts::parse(o);
    let state = |when: &str| {
        f.after("state", "when", when)
            .unwrap_or_else(|| panic!("no state {when}:\n{o}"))
    };
    let running = "taps=2 addrs=2 routes=2 table=1 elements=6 vmms=2 dirs=2";
    assert_eq!(state("warm"), running, "{o}");
    // Two VMs at once: a listens, b probes it and fails, a saw nothing.
    let a = f.value("a", "addr");
    assert!(a.starts_with("198.18.0."), "{o}");
    assert!(o.contains("control own-listener ok at 198.18.0."), "{o}");
    assert!(o.contains(&format!("probe blocked {a}")), "{o}");
    assert!(o.contains(&format!("ping blocked {a}")), "{o}");
    assert!(!o.contains("REACHED"), "{o}");
    assert!(o.contains("listener saw nothing"), "{o}");
    assert!(o.contains("b rc=0"), "{o}");
    // kill -9 leaves VMMs, taps and rules; the clean-up removes them all.
    assert_eq!(state("before-crash"), running, "{o}");
    assert_eq!(
        state("crashed"),
        running,
        "the crash must leave something to clean:\n{o}"
    );
    assert!(o.contains("cleanup rc=0"), "{o}");
    assert!(
        o.contains("removed 2 VMM process(es), 2 VM director(ies), 2 tap(s)"),
        "{o}"
    );
    let nothing = "taps=0 addrs=0 routes=0 table=0 elements=0 vmms=0 dirs=0";
    assert_eq!(state("after-cleanup"), nothing, "{o}");
    assert_eq!(state("restarted"), running, "{o}");
    assert_eq!(state("stopped"), nothing, "{o}");
}

#[test]
fn a_vm_cannot_keep_more_connections_than_its_pools_conntrack_limit() {
    let script = format!("{SHELL_HELPERS}{FLEET_HELPERS}{NET_HELPERS}{CONNTRACK}");
    let out = harness::run(&scenario("net-conntrack", &script, &[])).unwrap();
    let o = &out.output;
    assert_eq!(out.status, Status::Exited(0), "{}\n{o}", out.report());
    let f = Facts::parse(o);
    assert_eq!(f.lines("conns"), ["established=16"], "{o}");
    assert_eq!(f.lines("c"), ["rc=0"], "{o}");
    assert_eq!(
        f.lines("tracked"),
        [
            "when=running entries=16",
            "when=after-teardown entries=0",
            "when=next-vm entries=16",
        ],
        "a destroyed VM's conntrack entries go with it: {o}"
    );
    assert_eq!(f.lines("c2"), ["rc=0"], "{o}");
}
