#!/usr/bin/env bash
# Fetch the Linux guest the tests and benchmarks boot: Debian's cloud kernel (the package
# linux-image-cloud-amd64 currently depends on) and busybox-static, with `apt-get download` (no root needed, nothing
# installed on the host), unpacked into OUT:
#   OUT/vmlinuz           the bzImage
#   OUT/config            its kernel configuration
#   OUT/version           the package version, e.g. 6.1.0-57-cloud-amd64 6.1.192-3
#   OUT/modules/*.ko      virtio, virtio_ring, virtio_mmio, virtio_blk (modules in Debian's config)
#   OUT/busybox           the static busybox the initramfs is made of (scripts/linux-guest/make_initramfs.py)
# These are Debian's binaries: they are cached, never committed.
set -euo pipefail
out=${1:?usage: fetch-kernel.sh OUT}
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || {
  echo "fetching the Linux guest needs apt-get and dpkg-deb (Debian 12)" >&2; exit 1; }
tmp=$out.tmp
rm -rf "$tmp" && mkdir -p "$tmp"

resolve() {  # the versioned package a Debian meta-package depends on
  apt-cache depends "$1" 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -1
}
download() {  # apt-get download; an outdated package list (the candidate gone from the mirror) is refreshed as root
  (cd "$tmp" && apt-get download -q "$@" 2>/dev/null) || {
    [ "$(id -u)" = 0 ] || { echo "apt-get download $* failed; run as root so the package lists can be updated" >&2; exit 1; }
    apt-get -o DPkg::Lock::Timeout=600 update -qq && (cd "$tmp" && apt-get download -q "$@"); }
}
kernel_pkg=$(resolve linux-image-cloud-amd64)
if [ -z "$kernel_pkg" ]; then
  [ "$(id -u)" = 0 ] && apt-get -o DPkg::Lock::Timeout=600 update -qq
  kernel_pkg=$(resolve linux-image-cloud-amd64)
fi
[ -n "$kernel_pkg" ] || { echo "apt-cache knows no linux-image-cloud-amd64 (is this Debian 12 with its main archive?)" >&2; exit 1; }
download "$kernel_pkg" busybox-static
dpkg-deb -x "$tmp"/linux-image-*.deb "$tmp/kernel"
dpkg-deb -x "$tmp"/busybox-static_*.deb "$tmp/busybox"
mkdir -p "$tmp/out/modules"
cp "$tmp"/kernel/boot/vmlinuz-* "$tmp/out/vmlinuz"
cp "$tmp"/kernel/boot/config-* "$tmp/out/config"
for m in virtio virtio_ring virtio_mmio virtio_blk; do
  find "$tmp/kernel/lib/modules" -name "$m.ko" -exec cp {} "$tmp/out/modules/" \;
  [ -e "$tmp/out/modules/$m.ko" ] || { echo "$kernel_pkg has no $m.ko" >&2; exit 1; }
done
cp "$tmp/busybox/bin/busybox" "$tmp/out/busybox"
echo "${kernel_pkg#linux-image-} $(dpkg-deb -f "$tmp"/linux-image-*.deb Version)" > "$tmp/out/version"
rm -rf "$out" && mv "$tmp/out" "$out" && rm -rf "$tmp"
echo "Linux guest: $(cat "$out/version") in $out"
