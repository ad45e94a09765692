# scenario.sh: runs inside the harness L1 (POSIX sh, busybox). Needs the
# `tun` module, the binaries vmm and vsock_echo, and the assets vmlinux and
# rootfs.ext4. VCPUS (default 2) picks the guest's vCPU count.
set -u
VCPUS=${VCPUS:-2}
truncate -s 1M /tmp/scratch.img
vsock_echo host-serve /tmp/v.sock 6000 &
ECHO=$!
vmm --kernel "$ASSETS/vmlinux" \
    --cmdline "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd root=/dev/vda ro rootfstype=ext4 init=/init" \
    --memory-mib 256 --vcpus "$VCPUS" \
    --drive "path=$ASSETS/rootfs.ext4,ro" --drive path=/tmp/scratch.img \
    --net tap=ktap0,mac=02:00:00:00:00:02 --vsock cid=3,uds=/tmp/v.sock \
    --rng --boot-timer --serial file:/tmp/serial.log &
VMM=$!
i=0
until ip link show ktap0 >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 300 ] && break; sleep 0.1; done
ip addr add 172.30.0.1/30 dev ktap0 && ip link set ktap0 up
i=0
until vsock_echo host-send /tmp/v.sock 5000 0 1 >/dev/null 2>&1; do
  i=$((i+1)); [ $i -gt 1500 ] && break; sleep 0.2
done
if vsock_echo host-send /tmp/v.sock 5000 16777216 4 > /tmp/host-send.log; then
  HOST_SEND=pass
else
  HOST_SEND=fail; cat /tmp/host-send.log
fi
# Tell the guest to go on; it listens on 5001 only once its own sends are done.
i=0
until vsock_echo host-send /tmp/v.sock 5001 0 1 >/dev/null 2>&1; do
  i=$((i+1)); [ $i -gt 1500 ] && break; sleep 0.2
done
wait $VMM
CODE=$?
kill $ECHO 2>/dev/null
# The guest tty turns "\n" into "\r\n".
tr -d '\r' < /tmp/serial.log > /tmp/serial.txt
cat /tmp/serial.txt
FAIL=0
expect() {
  if grep -qx "TEST: $1" /tmp/serial.txt; then echo "ok   $1"; else echo "FAIL $1"; FAIL=1; fi
}
expect "cpus=$VCPUS"
expect "hello=hello-from-vda"
expect "rng-bytes=32"
expect "rng=virtio_rng.0"
expect "vdb=written"
expect "vda=read-only"
expect "guest-initiated=pass"
expect "ping=pass"
expect "done"
if [ "$HOST_SEND" = pass ]; then echo "ok   host-initiated=pass"; else echo "FAIL host-initiated"; FAIL=1; fi
if [ "$(head -c 16 /tmp/scratch.img)" = written-by-guest ]; then echo "ok   scratch written"; else echo "FAIL scratch"; FAIL=1; fi
if [ "$CODE" = 0 ]; then echo "ok   vmm exit 0 after guest reboot"; else echo "FAIL vmm exit $CODE"; FAIL=1; fi
if [ -e /tmp/v.sock ]; then echo "FAIL vsock socket left behind"; FAIL=1; else echo "ok   vsock socket removed"; fi
# SIGTERM: a guest that never ends (no root device, no reboot on panic).
vmm --kernel "$ASSETS/vmlinux" --cmdline "console=ttyS0 panic=0 pci=off" --memory-mib 128 --serial null &
VMM=$!
sleep 3
kill -TERM $VMM
wait $VMM
CODE=$?
if [ "$CODE" = 143 ]; then echo "ok   SIGTERM exit 143"; else echo "FAIL SIGTERM exit $CODE"; FAIL=1; fi
exit $FAIL
