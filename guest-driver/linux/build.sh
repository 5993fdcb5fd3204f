#!/bin/sh
# Build everything the Linux test guest needs from the Debian packages that
# are installed (apt resolves the version; nothing here names one):
#
#   apt-get install -y linux-image-cloud-amd64 linux-headers-cloud-amd64 cpio
#
# Usage: guest-driver/linux/build.sh [OUT]       (OUT: target/linux-guest)
#
# Writes, in OUT:
#   module/virtio_cache_flush.ko   the driver, built with W=1; any compiler
#                                  warning fails the build
#   module/pvflush_selftest.ko     calls the driver's exported API at load
#   initramfs/                     /init (the static test program), dev/,
#                                  lib/modules/{*.ko, load.order}
#   initramfs.cpio                 that tree as a newc archive
#   guest.env                      KVER=, KERNEL=, INITRD= for the VMM
# Exit status 2 with one line on stderr when the packages are missing.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=${1:-$ROOT/target/linux-guest}
INSTALL="apt-get install -y linux-image-cloud-amd64 linux-headers-cloud-amd64 cpio"

# The installed cloud kernel that also has its headers: the newest one.
KVER=
for image in /boot/vmlinuz-*-cloud-amd64; do
	[ -e "$image" ] || continue
	ver=${image#/boot/vmlinuz-}
	[ -d "/lib/modules/$ver/build" ] && KVER=$ver
done
if [ -z "$KVER" ]; then
	echo "no Debian cloud kernel with headers installed; run: $INSTALL" >&2
	exit 2
fi
for tool in cpio cc make; do
	if ! command -v $tool >/dev/null; then
		echo "$tool missing; run: $INSTALL" >&2
		exit 2
	fi
done
KERNEL=/boot/vmlinuz-$KVER
CONFIG=/boot/config-$KVER
MODDIR=/lib/modules/$KVER

rm -rf "$OUT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)	# kbuild needs M= absolute
mkdir -p "$OUT/src" "$OUT/initramfs/dev" "$OUT/initramfs/lib/modules"

# The module, out of tree, in a copy so the source folder stays clean.
cp -r "$HERE/module" "$HERE/include" "$OUT/src/"
make -s -C "$MODDIR/build" M="$OUT/src/module" W=1 modules \
	>"$OUT/module-build.log" 2>&1 || {
	cat "$OUT/module-build.log" >&2
	exit 1
}
if grep -E 'warning:|error:' "$OUT/module-build.log" >&2; then
	echo "the module must build without warnings (W=1)" >&2
	exit 1
fi
mkdir -p "$OUT/module"
cp "$OUT/src/module/virtio_cache_flush.ko" "$OUT/src/module/pvflush_selftest.ko" \
	"$OUT/module/"
# Debug info is 9/10 of the file; the guest unpacks every byte (~6 s/MB).
strip --strip-debug "$OUT/module/"*.ko

# The test program is /init: no shell, no busybox; it loads the modules.
cc -static -O2 -Wall -Wextra -Werror -I"$HERE/include" \
	-o "$OUT/initramfs/init" "$HERE/test/pvflush_test.c"
strip "$OUT/initramfs/init"

# Debian's virtio core, ring and MMIO transport, where they are modules
# (dependency order); nothing where they are built in.
: >"$OUT/initramfs/lib/modules/load.order"
# virtio_ring.ko is built by CONFIG_VIRTIO too.
for m in VIRTIO:virtio_ring VIRTIO:virtio VIRTIO_MMIO:virtio_mmio; do
	opt=${m%%:*}
	name=${m#*:}
	case $(grep "^CONFIG_$opt=" "$CONFIG" || true) in
	*=m)
		src=$(find "$MODDIR/kernel/drivers/virtio" -name "$name.ko*" | head -n 1)
		case $src in
		*.ko) cp "$src" "$OUT/initramfs/lib/modules/$name.ko" ;;
		*.ko.xz) xz -dc "$src" >"$OUT/initramfs/lib/modules/$name.ko" ;;
		*.ko.zst) zstd -dcq "$src" >"$OUT/initramfs/lib/modules/$name.ko" ;;
		*) echo "$name.ko not found under $MODDIR" >&2; exit 1 ;;
		esac
		echo "$name.ko" >>"$OUT/initramfs/lib/modules/load.order"
		;;
	*=y) ;;
	*) echo "CONFIG_$opt is not set in $CONFIG: no virtio-mmio" >&2; exit 1 ;;
	esac
done
# Without Debian's signatures: strip rewrites each file from its sections,
# leaving out the signature appended after them. Checking one (SHA-256 and
# RSA, interpreted in ring 0 on a host without VMX/SVM) took 35-60 s per
# module, against 5 s for our unsigned driver. This kernel loads unsigned
# modules (CONFIG_MODULE_SIG_FORCE is off, or our own driver could not load
# either); it notes the taint once.
for ko in "$OUT/initramfs/lib/modules/"*.ko; do
	strip --strip-debug "$ko"
	if tail -c 28 "$ko" | grep -q 'Module signature appended'; then
		echo "$ko: the signature survived strip" >&2
		exit 1
	fi
done
cp "$OUT/module/virtio_cache_flush.ko" "$OUT/initramfs/lib/modules/"
echo virtio_cache_flush.ko >>"$OUT/initramfs/lib/modules/load.order"
# Loaded by the test program itself, late: it exercises the exported calls.
cp "$OUT/module/pvflush_selftest.ko" "$OUT/initramfs/lib/modules/"

(cd "$OUT/initramfs" && find . | LC_ALL=C sort |
	cpio -o -H newc -R 0:0 --quiet) >"$OUT/initramfs.cpio"

cat >"$OUT/guest.env" <<EOF
KVER=$KVER
KERNEL=$KERNEL
INITRD=$OUT/initramfs.cpio
EOF
echo "built for $KVER: $OUT/initramfs.cpio ($(wc -c <"$OUT/initramfs.cpio") bytes)"
