#!/bin/sh
# /init of the minidriver test guest: PID 1, run by busybox sh from the initramfs that
# minidriver/guestimages/testimage.py builds. The console lines starting "minidriver-guest: " are a
# contract that the integration tests parse; change them only together with the tests.
#
# PID 1 must never exit (the kernel would panic), so nothing here uses "set -e" and the
# script ends in an endless loop (the console shell, respawned). The builder puts into
# the initramfs: /bin/busybox, /bin/sh, /dev/console, the kernel modules under
# /lib/modules/ and their load order (dependencies first) in /etc/minidriver/modules.
#
# After "ready" the same file serves as the guest's helpers, run with an argument:
# "/init hotplug" (run by busybox uevent for every kernel uevent), "/init shell" (the
# console shell), "/init power-button" (run by acpid), "/init dirty-memory MIB".

PATH=/bin
export PATH

# The boot record: a text line in the sector at 32 MiB of the root disk (the builder
# writes count 0; see BOOT_RECORD_* in testimage.py).
REC_MAGIC=MINIDRIVER-BOOTREC-1
REC_OFFSET=33554432
REC_SECTOR=65536

# The console shell's prompt, alone at the start of a line; the state of the helpers.
PROMPT='minidriver-guest$ '
RUN=/run/minidriver

say() { echo "minidriver-guest: $*"; }

# late TEXT: a console line written after "ready", by whichever helper: it starts on a
# new line whatever is pending on the current one (the prompt, typed text, a command's
# output; the console may then show an empty line before it), in one write, and the
# prompt is shown again when the shell was waiting at it. One write through cat: the
# printf builtin writes a terminal a line at a time, so the prompt could follow the
# output of a command typed once the line was seen.
late() {
    p=
    [ -e "$RUN/prompt" ] && p=$PROMPT
    printf '\nminidriver-guest: %s\n%s' "$*" "$p" | cat >/dev/console
}

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

# uevent runs this once per kernel event, one at a time, in the kernel's order; a
# virtio disk's node is in devtmpfs before its "add" event is sent.
hotplug() {
    [ "$SUBSYSTEM" = block ] && [ "$DEVTYPE" = disk ] || return 0
    case $DEVNAME in vd*) ;; *) return 0 ;; esac
    case $ACTION in
    add) late "disk-added $DEVNAME $(size "$DEVNAME") $(kind "/dev/$DEVNAME")" ;;
    remove) late "disk-removed $DEVNAME" ;;
    esac
}

# The console shell: one line read, then run by this shell (so cd and variables last);
# "exit" or end of input ends it, and PID 1 starts another. ^C interrupts the command,
# not the shell (a trapped signal is reset to its default in the commands it runs),
# and ends the line the terminal echoed "^C" on, so that the prompt starts its own.
shell() {
    trap 'interrupted=1; echo' INT
    while :; do
        interrupted=
        : >"$RUN/prompt"
        printf '%s' "$PROMPT"
        if ! IFS= read -r line; then
            [ -n "$interrupted" ] && continue # ^C while reading: a new prompt
            echo                              # end of input (^D): the next shell's
            return 0                          # prompt starts a line of its own
        fi
        rm -f "$RUN/prompt"
        eval "$line"
    done
}

power_button() {
    if [ -e "$RUN/ignore-power-button" ]; then
        late "power-button, ignored"
        return 0
    fi
    late "power-button, powering off"
    sync
    poweroff -f
}

# dirty_memory MIB: rewrite MIB MiB of guest memory (a file in a tmpfs) without pause,
# so that a live migration keeps finding dirty pages. Not zeros: QEMU sends a zero page
# as a flag, not its bytes. Two random MiB take turns, so that every pass changes
# every page's content too (what QEMU's dirty-rate sampling counts).
dirty_memory() {
    mib=$1
    d=$RUN/dirty
    mkdir -p "$d"
    if ! mount -t tmpfs -o "size=$((mib + 3))m" dirty "$d" ||
        ! head -c 1048576 /dev/urandom >"$d/a" || ! head -c 1048576 /dev/urandom >"$d/b"; then
        late "mode error: dirty-memory cannot make its buffer"
        return 1
    fi
    while :; do
        for chunk in a b; do
            i=0
            while [ "$i" -lt "$mib" ]; do
                dd if="$d/$chunk" of="$d/buffer" bs=1048576 seek="$i" conv=notrunc 2>/dev/null
                i=$((i + 1))
            done
        done
    done
}

# meta KEY: the value of KEY in the config drive's "meta" (Nova's instance metadata;
# meta_data.json is one line of JSON), empty when absent.
meta() {
    sed -n "s/.*\"meta\": *{[^}]*\"$1\": *\"\([^\"]*\)\".*/\1/p" "$md" | head -n 1
}

case ${1-} in
hotplug) hotplug; exit 0 ;;
shell) shell; exit 0 ;;
power-button) power_button; exit 0 ;;
dirty-memory) dirty_memory "$2"; exit 1 ;;
esac

# The console log is kept across boots, and the last one may have ended with the shell's
# prompt pending: "up" starts on a line of its own whatever came before (the log may then
# show an empty line before it).
echo
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

mkdir -p "$RUN"
dirty_mib=
if [ -n "$cfg" ]; then
    mkdir -p /mnt/config
    if mount -t "$cfgtype" -o ro "$cfg" /mnt/config; then
        md=/mnt/config/openstack/latest/meta_data.json
        uuid=$(sed -n 's/.*"uuid" *: *"\([^"]*\)".*/\1/p' "$md" | head -n 1)
        host=$(sed -n 's/.*"hostname" *: *"\([^"]*\)".*/\1/p' "$md" | head -n 1)
        say "config-drive uuid=$uuid hostname=$host"
        # Modes for the tests of later work, from the instance's metadata.
        case $(meta minidriver_guest_ignore_power_button) in
        '' | 0) ;;
        1)
            : >"$RUN/ignore-power-button"
            say "mode ignore-power-button"
            ;;
        *) say "mode error: minidriver_guest_ignore_power_button must be 0 or 1" ;;
        esac
        dirty_mib=$(meta minidriver_guest_dirty_memory_mb)
        case $dirty_mib in
        '' | 0) dirty_mib= ;;
        *[!0-9]*)
            say "mode error: minidriver_guest_dirty_memory_mb must be a number of MiB"
            dirty_mib=
            ;;
        *)
            # Leave 16 MiB to the rest of the guest: the buffer is never paged out.
            avail=$(sed -n 's/^MemAvailable: *\([0-9]*\) kB$/\1/p' /proc/meminfo)
            if [ $((dirty_mib + 2 + 16)) -gt $((avail / 1024)) ]; then
                say "mode error: dirty-memory $dirty_mib MiB is more than this guest can" \
                    "spare ($((avail / 1024)) MiB available)"
                dirty_mib=
            else
                say "mode dirty-memory $dirty_mib"
            fi
            ;;
        esac
    else
        say "config-drive error: cannot mount $cfg"
    fi
fi

# ACPI power button: busybox acpid reads /dev/input/event* (button + evdev modules) and
# runs CONFDIR/PWRF/00000080, a name compiled into acpid.
mkdir -p /etc/acpi/PWRF
printf '#!/bin/sh\nexec /init power-button\n' >/etc/acpi/PWRF/00000080
chmod 0755 /etc/acpi/PWRF/00000080
acpid -c /etc/acpi -l /dev/null || say "error: acpid did not start"

# Disks that come and go from now on: busybox uevent listens on the kernel's netlink
# socket and runs the helper for each event in turn, so an add and its remove are
# reported in order (the kernel's hotplug helper would run them at once, and polling
# /sys/block could miss a short-lived disk).
uevent /init hotplug </dev/null >/dev/null 2>&1 &
# "ready" only once it listens (its uevent socket, netlink protocol 15, is bound), or a
# disk attached just after "ready" could go unseen; bounded, as the wait for disks.
n=0
while [ "$n" -lt 50 ] &&
    ! awk -v pid=$! '$2 == 15 && $3 == pid { f = 1 } END { exit !f }' /proc/net/netlink; do
    usleep 20000
    n=$((n + 1))
done
[ "$n" -lt 50 ] || say "error: uevent does not listen: disks added later go unreported"

[ -z "$dirty_mib" ] || /init dirty-memory "$dirty_mib" </dev/null >/dev/null 2>&1 &

say ready

# The console shell on the serial port, its controlling terminal (^C reaches the
# command it runs); another after it exits.
while :; do
    setsid -c /init shell <>/dev/ttyS0 >&0 2>&0
    sleep 1
done
