#!/bin/sh
# build-rootfs.sh OUT.ext4 VSOCK_ECHO: the end-to-end test guest's root file
# system: busybox (from the busybox-static package), the static vsock_echo
# tool and guest-init as /init, in a 32 MiB ext4 image.
set -eu
OUT=$1
VSOCK_ECHO=$2
HERE=$(cd "$(dirname "$0")" && pwd)
BUSYBOX=$(command -v busybox)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK"/bin "$WORK"/proc "$WORK"/sys "$WORK"/dev "$WORK"/etc "$WORK"/tmp
cp "$BUSYBOX" "$WORK"/bin/busybox
for applet in $("$BUSYBOX" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$WORK/bin/$applet"
done
cp "$VSOCK_ECHO" "$WORK"/bin/vsock_echo
cp "$HERE"/guest-init "$WORK"/init
chmod 755 "$WORK"/init
echo hello-from-vda > "$WORK"/etc/hello
rm -f "$OUT"
truncate -s 32M "$OUT"
mkfs.ext4 -q -d "$WORK" "$OUT"
