#!/bin/sh
# banger guest network bootstrap. Distribution kernels have no
# CONFIG_IP_PNP, so banger passes the address the VM was given on the
# kernel command line and this script applies it with iproute2:
#
#   banger.ip=<addr>/<prefix>  banger.gw=<addr>  banger.dns=<addr>[,<addr>]
#   banger.hostname=<name>     banger.mac=<mac> (optional: which interface)
#
# The interface is the one whose MAC is banger.mac, or else the first
# Ethernet interface that is not loopback. It waits for the interface to
# appear (virtio_net may still be loading). Every path can be moved with an
# environment variable (BANGER_ROOT prefixes them all) for tests.
set -uf

ROOT="${BANGER_ROOT:-}"
CMDLINE="${BANGER_CMDLINE:-$ROOT/proc/cmdline}"
SYS_NET="${BANGER_SYS_NET:-$ROOT/sys/class/net}"
RESOLV="${BANGER_RESOLV_CONF:-$ROOT/etc/resolv.conf}"
HOSTNAME_FILE="${BANGER_HOSTNAME_FILE:-$ROOT/etc/hostname}"
HOSTS="${BANGER_HOSTS_FILE:-$ROOT/etc/hosts}"
WAIT="${BANGER_NET_WAIT:-30}"

log() {
	echo "banger-network: $*" >&2
}

die() {
	log "error: $*"
	exit 1
}

ip_addr="" gw="" dns="" host="" mac=""
cmdline=""
read -r cmdline <"$CMDLINE" || [ -n "$cmdline" ] || die "cannot read $CMDLINE"
for word in $cmdline; do
	case "$word" in
	banger.ip=*) ip_addr="${word#banger.ip=}" ;;
	banger.gw=*) gw="${word#banger.gw=}" ;;
	banger.dns=*) dns="${word#banger.dns=}" ;;
	banger.hostname=*) host="${word#banger.hostname=}" ;;
	banger.mac=*) mac="${word#banger.mac=}" ;;
	esac
done

if [ -z "$ip_addr" ]; then
	log "no banger.ip= on the kernel command line: nothing to do"
	exit 0
fi

# Refuse anything that is not plainly an address, a name or a MAC: these
# values end up in files and command arguments.
case "$ip_addr" in
*/*) ;;
*) die "banger.ip=$ip_addr has no /prefix" ;;
esac
case "$ip_addr$gw" in *[!0-9a-fA-F.:/]*) die "bad address in banger.ip=$ip_addr banger.gw=$gw" ;; esac
case "$dns" in *[!0-9a-fA-F.:,]*) die "bad banger.dns=$dns" ;; esac
case "$host" in *[!A-Za-z0-9.-]* | -*) die "bad banger.hostname=$host" ;; esac
case "$mac" in *[!0-9a-fA-F:]*) die "bad banger.mac=$mac" ;; esac
mac=$(echo "$mac" | tr 'A-F' 'a-f')

# find_iface prints the interface to configure, if it is there yet.
find_iface() {
	set +f
	set -- "$SYS_NET"/*
	set -f
	for dev in "$@"; do
		[ -e "$dev" ] || continue
		name="${dev##*/}"
		[ "$name" = lo ] && continue
		# ARPHRD_ETHER is 1.
		[ "$(cat "$dev/type" 2>/dev/null)" = 1 ] || continue
		if [ -n "$mac" ]; then
			addr=$(tr 'A-F' 'a-f' <"$dev/address" 2>/dev/null)
			[ "$addr" = "$mac" ] || continue
		fi
		echo "$name"
		return 0
	done
	return 1
}

iface=""
waited=0
while ! iface=$(find_iface); do
	[ "$waited" -ge "$WAIT" ] && die "no Ethernet interface${mac:+ with MAC $mac} after ${WAIT}s"
	sleep 1
	waited=$((waited + 1))
done
log "configuring $iface: $ip_addr via ${gw:-none}"

ip link set dev lo up || die "ip link set lo up failed"
ip link set dev "$iface" up || die "ip link set $iface up failed"
# replace, not add: a restart of the unit must not fail on an existing
# address or route.
ip addr replace "$ip_addr" dev "$iface" || die "ip addr $ip_addr on $iface failed"
if [ -n "$gw" ]; then
	ip route replace default via "$gw" dev "$iface" || die "default route via $gw failed"
fi

if [ -n "$dns" ]; then
	# A symlink here belongs to a resolver daemon (systemd-resolved's stub):
	# replace it with a plain file that names banger's servers.
	[ -L "$RESOLV" ] && rm -f "$RESOLV"
	{
		echo "# written by banger-network from the kernel command line"
		echo "$dns" | tr ',' '\n' | while read -r server; do
			[ -n "$server" ] && echo "nameserver $server"
		done
	} >"$RESOLV.banger.tmp" || die "writing $RESOLV failed"
	mv -f "$RESOLV.banger.tmp" "$RESOLV" || die "writing $RESOLV failed"
fi

if [ -n "$host" ]; then
	echo "$host" >"$HOSTNAME_FILE" || die "writing $HOSTNAME_FILE failed"
	if command -v hostname >/dev/null 2>&1; then
		hostname "$host" || die "hostname $host failed"
	else
		echo "$host" >"$ROOT/proc/sys/kernel/hostname" || die "setting the hostname failed"
	fi
	if [ -f "$HOSTS" ] && ! grep -q "[[:space:]]$host\$" "$HOSTS"; then
		echo "127.0.1.1	$host" >>"$HOSTS"
	fi
fi
log "done"
