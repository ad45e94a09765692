# Boot-cycle benchmark, run inside the harness L1 (busybox sh). Assets:
# vmlinux, rootfs.ext4; binaries: vmm and, when available, firecracker.
# RUNS (default 5) cycles each. Prints one table.
RUNS=${RUNS:-5}
CMDLINE="console=ttyS0 reboot=k panic=1 pci=off quiet root=/dev/vda ro init=/init"
now() { cut -d' ' -f1 /proc/uptime; }
median() { sort -n | awk '{a[NR]=$1} END {if (NR==0) print "-"; else if (NR%2) print a[(NR+1)/2]; else printf "%.3f\n", (a[NR/2]+a[NR/2+1])/2}'; }
# One VMM cycle; $1 = 1 to record it.
ours() {
  t0=$(now)
  vmm --kernel "$ASSETS/vmlinux" --cmdline "$CMDLINE" --memory-mib 128 --vcpus 1 \
      --drive "path=$ASSETS/rootfs.ext4,ro" --boot-timer --serial null 2> /tmp/vmm.log
  t1=$(now)
  [ "$1" = 1 ] || return 0
  echo "$t0 $t1" | awk '{printf "%.3f\n", $2-$1}' >> /tmp/ours.cycle
  sed -n 's/.*+\([0-9.]*\)ms INFO\] vCPU 0: first KVM_RUN.*/\1/p' /tmp/vmm.log >> /tmp/ours.kvmrun
  sed -n 's/.*boot-timer: guest mark 0x7b at [0-9]* us (\([0-9.]*\) ms).*/\1/p' /tmp/vmm.log >> /tmp/ours.init
  sed -n 's/.*RSS outside guest RAM): \([0-9]*\) KiB.*/\1/p' /tmp/vmm.log >> /tmp/ours.rss
}
# One Firecracker cycle (same kernel, rootfs, memory, vCPUs); $1 as above.
fc() {
  t0=$(now)
  firecracker --no-api --config-file /tmp/fc.json > /dev/null 2>&1
  t1=$(now)
  [ "$1" = 1 ] && echo "$t0 $t1" | awk '{printf "%.3f\n", $2-$1}' >> /tmp/fc.cycle
  return 0
}
: > /tmp/ours.cycle; : > /tmp/ours.kvmrun; : > /tmp/ours.init; : > /tmp/ours.rss; : > /tmp/fc.cycle
HAVE_FC=
if command -v firecracker >/dev/null; then
  HAVE_FC=1
  cat > /tmp/fc.json <<JSON
{"boot-source": {"kernel_image_path": "$ASSETS/vmlinux", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off quiet init=/init"},
 "drives": [{"drive_id": "rootfs", "path_on_host": "$ASSETS/rootfs.ext4", "is_root_device": true, "is_read_only": true}],
 "machine-config": {"vcpu_count": 1, "mem_size_mib": 128}}
JSON
fi
# A cycle of each first, not counted: it reads the kernel and the rootfs
# into the L1's page cache (whoever ran first paid for both before). Then
# the two alternate, so that drift in the L1 (its own boot settling, other
# work on the machine) is shared.
ours 0
[ -n "$HAVE_FC" ] && fc 0
for i in $(seq 1 "$RUNS"); do
  ours 1
  [ -n "$HAVE_FC" ] && fc 1
done
OURS=$(median < /tmp/ours.cycle)
FC=$(median < /tmp/fc.cycle)
echo
echo "boot cycle benchmark, $RUNS runs each, medians (L1 under QEMU TCG)"
echo "| metric                                  | ours        | firecracker |"
echo "|-----------------------------------------|-------------|-------------|"
echo "| VMM start to first KVM_RUN (ms)          | $(median < /tmp/ours.kvmrun) | - |"
echo "| VMM start to init boot-timer mark (ms)   | $(median < /tmp/ours.init) | - |"
echo "| VMM start to exit after reboot -f (s)    | $OURS | $FC |"
echo "| VMM RSS outside guest RAM (KiB)          | $(median < /tmp/ours.rss) | - |"
if [ "$FC" != "-" ]; then
  echo "$OURS $FC" | awk '{printf "ratio ours/firecracker (cycle): %.2f\n", $1/$2}'
else
  echo "firecracker not available: no ratio"
fi
echo "raw ours: $(tr '\n' ' ' < /tmp/ours.cycle)"
echo "raw firecracker: $(tr '\n' ' ' < /tmp/fc.cycle)"
