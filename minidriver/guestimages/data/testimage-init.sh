#!/bin/sh
# /init of the minidriver test guest: PID 1, run by busybox sh from the initramfs that
# minidriver/guestimages/testimage.py builds. The console lines starting "minidriver-guest: " are a
# contract that the integration tests parse; change them only together with the tests.
#
# PID 1 must never exit (the kernel would panic), so nothing here uses "set -e" and the
# script ends in an endless sleep. The builder puts into the initramfs: /bin/busybox,
# /bin/sh, /dev/console, the kernel modules under /lib/modules/ and their load order
# (dependencies first) in /etc/minidriver/modules.

PATH=/bin
export PATH

# The boot record: a text line in the sector at 32 MiB of the root disk (the builder
# writes count 0; see BOOT_RECORD_* in testimage.py).
REC_MAGIC=MINIDRIVER-BOOTREC-1
REC_OFFSET=33554432
REC_SECTOR=65536

say() { echo "minidriver-guest: $*"; }

say up

/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

while read -r mod; do
    [ -n "$mod" ] || continue
    insmod "/lib/modules/$mod.ko" || say "error: insmod $mod failed"
done </etc/minidriver/modules

# virtio-blk and libata probe while insmod runs, so the disks normally exist already;
# wait a little (bounded) in case one is late.
n=0
while [ "$n" -lt 30 ]; do
    set -- /sys/block/vd*
    [ -e "$1" ] && break
    usleep 100000
    n=$((n + 1))
done

# size DEV: its size in bytes.
size() { echo $(($(cat "/sys/class/block/${1##*/}/size") * 512)); }

# rd DEV OFFSET COUNT: COUNT bytes of DEV at byte OFFSET, NUL bytes dropped (busybox has
# no blkid, so file systems are recognised by their magic bytes). Nothing when the
# device is too small: busybox dd would otherwise skip past its end byte by byte.
rd() {
    [ "$(($2 + $3))" -le "$(size "$1")" ] || return 0
    dd if="$1" bs=1 skip="$2" count="$3" 2>/dev/null | tr -d '\000'
}

kind() {
    if [ "$(rd "$1" "$REC_OFFSET" 20)" = "$REC_MAGIC" ]; then
        echo root
    elif [ "$(rd "$1" 4086 10)" = SWAPSPACE2 ]; then
        echo swap
    elif [ "$(rd "$1" 1080 2 | od -An -tx1 | tr -d ' \n')" = 53ef ]; then
        echo ext4
    elif [ "$(rd "$1" 32769 5)" = CD001 ]; then
        echo iso9660
    elif [ "$(rd "$1" 54 3)" = FAT ] || [ "$(rd "$1" 82 3)" = FAT ]; then
        echo vfat
    else
        echo blank
    fi
}

# label DEV KIND: the volume label, trailing blanks cut, in lower case (labels are ASCII;
# busybox tr may be built without character classes).
# shellcheck disable=SC2018,SC2019
label() {
    case $2 in
    iso9660) rd "$1" 32808 32 ;;
    vfat) if [ "$(rd "$1" 82 5)" = FAT32 ]; then rd "$1" 71 11; else rd "$1" 43 11; fi ;;
    esac | sed 's/ *$//' | tr 'A-Z' 'a-z'
}

root=
cfg=
cfgtype=
for dev in /sys/block/sr*; do
    [ -e "$dev" ] || continue
    dev=/dev/${dev##*/}
    if [ -z "$cfg" ] && [ "$(rd "$dev" 32769 5)" = CD001 ] &&
        [ "$(label "$dev" iso9660)" = config-2 ]; then
        cfg=$dev
        cfgtype=iso9660
    fi
done
for sys in /sys/block/vd*; do
    [ -e "$sys" ] || continue
    name=${sys##*/}
    dev=/dev/$name
    k=$(kind "$dev")
    say "disk $name $(size "$dev") $k"
    case $k in
    root) [ -n "$root" ] || root=$dev ;;
    iso9660 | vfat)
        if [ -z "$cfg" ] && [ "$(label "$dev" "$k")" = config-2 ]; then
            cfg=$dev
            cfgtype=$k
        fi
        ;;
    esac
done

if [ -n "$root" ]; then
    count=$(rd "$root" "$REC_OFFSET" 64 |
        sed -n "1s/^$REC_MAGIC count=0*\([0-9][0-9]*\)\$/\1/p")
    count=$((${count:-0} + 1))
    printf '%s count=%010d\n' "$REC_MAGIC" "$count" |
        dd of="$root" bs=512 seek="$REC_SECTOR" count=1 conv=sync,notrunc 2>/dev/null
    sync
    say "boot-count $count"
else
    say "boot-count error: no disk carries the boot record"
fi

if [ -n "$cfg" ]; then
    mkdir -p /mnt/config
    if mount -t "$cfgtype" -o ro "$cfg" /mnt/config; then
        md=/mnt/config/openstack/latest/meta_data.json
        uuid=$(sed -n 's/.*"uuid" *: *"\([^"]*\)".*/\1/p' "$md" | head -n 1)
        host=$(sed -n 's/.*"hostname" *: *"\([^"]*\)".*/\1/p' "$md" | head -n 1)
        say "config-drive uuid=$uuid hostname=$host"
    else
        say "config-drive error: cannot mount $cfg"
    fi
fi

# ACPI power button: busybox acpid reads /dev/input/event* (button + evdev modules) and
# runs CONFDIR/PWRF/00000080, a name compiled into acpid.
mkdir -p /etc/acpi/PWRF
cat >/etc/acpi/PWRF/00000080 <<'EOF'
#!/bin/sh
echo "minidriver-guest: power-button, powering off" >/dev/console
sync
poweroff -f
EOF
chmod 0755 /etc/acpi/PWRF/00000080
acpid -c /etc/acpi -l /dev/null || say "error: acpid did not start"

say ready

while :; do
    sleep 3600
done
