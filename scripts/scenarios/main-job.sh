# The main job's scenario (runs in the L1, or on a hardware-KVM host).
set -e
echo "== KVM: a tiny 64-bit guest through kvm-ioctls"
kvm-smoke
echo "== guest kernel: $(ls -la "$ASSETS/vmlinux" | awk '{print $5}') bytes"
