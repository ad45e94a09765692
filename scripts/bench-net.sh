#!/bin/sh
# bench-net.sh [RUNS]: guest-to-"internet" throughput and connection latency
# through a tap, our VMM vs Firecracker (when ../shared/peers/firecracker
# exists), same kernel, same rootfs, same tap and host path (forwarding +
# masquerade to a network namespace playing the internet), in the nested
# harness. The guest (init is a shell script) downloads a 32 MiB file over
# HTTP and then fetches a small file 20 times (each a new TCP connection),
# timing both with /proc/uptime, and reboots. Prints one table and the
# ratios. From the repository root: sh scripts/bench-net.sh 3
set -eu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${1:-3}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
KERNEL_DIR=$(bash "$ROOT/kernel-config/build.sh" --print-dir)
PEER="${FIRECRACKER:-$ROOT/../shared/peers/firecracker}"
cd "$ROOT"
cargo build --release -p vmm --bin vmm
cargo build --release -p harness
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/root/bin" "$WORK/root/dev" "$WORK/root/proc" "$WORK/root/sys" "$WORK/root/tmp"
cp "$(command -v busybox)" "$WORK/root/bin/busybox"
cat > "$WORK/root/init" <<'EOF'
#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
now() { $B cut -d' ' -f1 /proc/uptime; }
t0=$(now)
$B wget -q -O /dev/null http://203.0.113.10/big || echo "NETBENCH-ERROR big"
t1=$(now)
n=0
while [ $n -lt 20 ]; do
  $B wget -q -O /dev/null http://203.0.113.10/small || echo "NETBENCH-ERROR small"
  n=$((n + 1))
done
t2=$(now)
echo "NETBENCH $t0 $t1 $t2"
$B reboot -f
EOF
chmod 755 "$WORK/root/init"
truncate -s 16M "$WORK/rootfs.ext4"
mkfs.ext4 -q -d "$WORK/root" "$WORK/rootfs.ext4"
cat > "$WORK/scenario.sh" <<EOF
RUNS=$RUNS
EOF
cat >> "$WORK/scenario.sh" <<'EOF'
set -u
ip() { /usr/local/bin/ip "$@"; }
BIG=$((32 * 1024 * 1024))
mkdir -p /tmp/www
head -c $BIG /dev/zero > /tmp/www/big
echo small > /tmp/www/small
ip netns add inet
ip link add up0 type veth peer name ieth netns inet
ip addr add 203.0.113.1/24 dev up0 && ip link set up0 up
ip -n inet addr add 203.0.113.10/24 dev ieth
ip -n inet link set lo up && ip -n inet link set ieth up
ip -n inet route add default via 203.0.113.1
ip netns exec inet busybox httpd -p 203.0.113.10:80 -h /tmp/www
echo 1 > /proc/sys/net/ipv4/ip_forward
nft -f - <<NFT
table inet netbench {
  chain post { type nat hook postrouting priority srcnat; ip saddr 198.18.0.0/30 oifname != "kdlb" masquerade; }
}
NFT
mk_tap() {
  ip link del kdlb 2>/dev/null
  ip tuntap add kdlb mode tap && ip addr add 198.18.0.1/30 dev kdlb && ip link set kdlb up
}
IPARG="ip=198.18.0.2::198.18.0.1:255.255.255.252::eth0:off"
CMDLINE="console=ttyS0 reboot=k panic=1 pci=off quiet root=/dev/vda ro init=/init $IPARG"
# A run that has not ended after 120 s (a stalled download) is killed and
# recorded as an error rather than holding the harness for its whole timeout.
record() { grep -q 'NETBENCH [0-9]' "$1" || echo "NETBENCH-ERROR no result (killed after 120 s?) ($1)"; sed -n 's/.*NETBENCH \([0-9.]*\) \([0-9.]*\) \([0-9.]*\).*/\1 \2 \3/p' "$1" | tail -1 >> "$2"; grep NETBENCH-ERROR "$1" || true; }
: > /tmp/ours; : > /tmp/fc
cat > /tmp/fc.json <<JSON
{"boot-source": {"kernel_image_path": "$ASSETS/vmlinux", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off quiet init=/init $IPARG"},
 "drives": [{"drive_id": "rootfs", "path_on_host": "$ASSETS/rootfs.ext4", "is_root_device": true, "is_read_only": true}],
 "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "kdlb", "guest_mac": "02:6b:64:00:00:00"}],
 "machine-config": {"vcpu_count": 1, "mem_size_mib": 128}}
JSON
for i in $(seq 1 "$RUNS"); do
  mk_tap
  timeout 120 vmm --kernel "$ASSETS/vmlinux" --cmdline "$CMDLINE" --memory-mib 128 --vcpus 1 \
      --drive "path=$ASSETS/rootfs.ext4,ro" --net tap=kdlb,mac=02:6b:64:00:00:00 \
      --serial stdout > /tmp/ours.out 2> /tmp/ours.err
  record /tmp/ours.out /tmp/ours
  if command -v firecracker > /dev/null; then
    mk_tap
    timeout 120 firecracker --no-api --config-file /tmp/fc.json > /tmp/fc.out 2>&1
    record /tmp/fc.out /tmp/fc
  fi
done
median() { sort -n | awk '{a[NR]=$1} END {if (NR==0) print "-"; else if (NR%2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2}'; }
tput() { awk -v b=$BIG '{ if ($2 > $1) printf "%.2f\n", b / ($2 - $1) / 1048576 }' "$1" | median; }
lat() { awk '{ printf "%.1f\n", ($3 - $2) / 20 * 1000 }' "$1" | median; }
OT=$(tput /tmp/ours); FT=$(tput /tmp/fc); OL=$(lat /tmp/ours); FL=$(lat /tmp/fc)
echo
echo "guest -> internet over a tap, $RUNS runs each, medians (L2 in an L1 under QEMU TCG)"
echo "| metric                                   | ours  | firecracker |"
echo "|------------------------------------------|-------|-------------|"
echo "| HTTP download of 32 MiB (MiB/s)          | $OT | $FT |"
echo "| new TCP connection + tiny GET (ms each)  | $OL | $FL |"
if [ "$FT" != "-" ]; then
  echo "$OT $FT $OL $FL" | awk '{printf "ratio ours/firecracker: throughput %.2f (higher is better), latency %.2f (lower is better)\n", $1/$2, $3/$4}'
else
  echo "firecracker not available: no ratio"
fi
echo "raw ours (t0 t1 t2): $(tr '\n' ' ' < /tmp/ours)"
echo "raw firecracker (t0 t1 t2): $(tr '\n' ' ' < /tmp/fc)"
EOF
set -- --bin "$TARGET/release/vmm" --bin /usr/sbin/nft --bin /usr/sbin/ip
if [ -x "$PEER" ]; then set -- "$@" --bin "$PEER"; else echo "no Firecracker at $PEER: ours only" >&2; fi
for m in tun veth nf_tables nf_conntrack nf_nat nft_nat nft_masq nft_chain_nat nf_conncount nft_connlimit; do set -- "$@" --module "$m"; done
"$TARGET/release/harness" run --name net-bench --script "$WORK/scenario.sh" "$@" \
  --asset "$KERNEL_DIR/vmlinux" --asset "$WORK/rootfs.ext4" --timeout 900
