#!/bin/sh
# banger first boot: install and enable an SSH server through the guest's
# own package manager, once. banger-first-boot.service runs this while the
# marker /var/lib/banger/first-boot-pending exists; the marker is removed
# only when sshd is installed and enabled, so a failed attempt is retried
# at the next boot. The status file holds pending, running, done or
# failed; banger-vsock-agent reports it with the end of the log.
#
# Every path can be moved with an environment variable (BANGER_ROOT
# prefixes them all), so tests run this against a fake root.
set -uf

ROOT="${BANGER_ROOT:-}"
OS_RELEASE="${BANGER_OS_RELEASE:-$ROOT/etc/os-release}"
STATE_DIR="${BANGER_STATE_DIR:-$ROOT/var/lib/banger}"
MARKER="${BANGER_FIRST_BOOT_MARKER:-$STATE_DIR/first-boot-pending}"
STATUS="${BANGER_FIRST_BOOT_STATUS:-$STATE_DIR/first-boot-status}"
LOG="${BANGER_FIRST_BOOT_LOG:-$ROOT/var/log/banger-first-boot.log}"

mkdir -p "$STATE_DIR" "$(dirname "$LOG")" || exit 1
exec >>"$LOG" 2>&1

log() {
	echo "banger-first-boot: $*"
}

set_status() {
	echo "$1" >"$STATUS.tmp" && mv -f "$STATUS.tmp" "$STATUS"
}

fail() {
	log "error: $*"
	set_status failed
	exit 1
}

# os_release_value KEY prints KEY's value from the os-release file, without
# quotes. The file is parsed, never sourced.
os_release_value() {
	sed -n "s/^$1=//p" "$OS_RELEASE" | head -n 1 | sed -e 's/^"\(.*\)"$/\1/' -e "s/^'\(.*\)'\$/\1/"
}

# family ID prints the package manager family of an os-release ID, or
# nothing for an ID this script does not know.
family() {
	case "$1" in
	debian | ubuntu | kali | raspbian | linuxmint | pop) echo apt ;;
	alpine) echo apk ;;
	fedora | rhel | centos | rocky | almalinux) echo dnf ;;
	arch | archlinux | manjaro) echo pacman ;;
	opensuse* | suse) echo zypper ;;
	esac
}

sshd_present() {
	for p in /usr/sbin/sshd /usr/bin/sshd /sbin/sshd; do
		[ -x "$ROOT$p" ] && return 0
	done
	return 1
}

install_sshd() {
	case "$1" in
	apt)
		# Fail fast without a way out: a VM with its network cut must not
		# wait minutes for apt to give up.
		apt-get -o Acquire::Retries=0 -o Acquire::http::Timeout=15 update || return 1
		DEBIAN_FRONTEND=noninteractive apt-get install -y openssh-server
		;;
	apk) apk add --no-cache openssh-server ;;
	dnf)
		if command -v dnf >/dev/null 2>&1; then
			dnf install -y openssh-server
		else
			yum install -y openssh-server
		fi
		;;
	pacman) pacman -Sy --noconfirm --needed openssh ;;
	zypper) zypper --non-interactive install openssh ;;
	*) return 1 ;;
	esac
}

# enable_sshd FAMILY enables and starts the SSH service: ssh.service on the
# Debian family, sshd elsewhere; OpenRC when there is no systemctl. Under
# banger's own PID 1 (BANGER_INIT=banger), which starts sshd itself, there
# is nothing to enable.
enable_sshd() {
	if [ "${BANGER_INIT:-}" = banger ]; then
		log "banger's init starts sshd: nothing to enable"
		return 0
	fi
	unit=sshd
	[ "$1" = apt ] && unit=ssh
	if command -v systemctl >/dev/null 2>&1; then
		systemctl enable --now "$unit"
	elif command -v rc-update >/dev/null 2>&1; then
		rc-update add sshd default && rc-service sshd start
	else
		log "neither systemctl nor rc-update found"
		return 1
	fi
}

main() {
	log "starting at $(date -u +%Y-%m-%dT%H:%M:%SZ 2>/dev/null)"
	set_status running
	[ -r "$OS_RELEASE" ] || [ -n "${BANGER_OS_RELEASE:-}" ] || OS_RELEASE="$ROOT/usr/lib/os-release"
	[ -r "$OS_RELEASE" ] || fail "no os-release file ($OS_RELEASE)"

	id=$(os_release_value ID)
	fam=$(family "$id")
	if [ -z "$fam" ]; then
		for like in $(os_release_value ID_LIKE); do
			fam=$(family "$like")
			[ -n "$fam" ] && break
		done
	fi
	[ -n "$fam" ] || fail "unsupported distribution: ID=$id ID_LIKE=$(os_release_value ID_LIKE); install an SSH server yourself, then remove $MARKER"
	log "distribution $id, package manager $fam"

	if sshd_present; then
		log "sshd is already installed: skipping the install"
	else
		install_sshd "$fam" || fail "installing the SSH server with $fam failed"
	fi
	enable_sshd "$fam" || fail "enabling the SSH service failed"

	rm -f "$MARKER" || fail "cannot remove $MARKER"
	set_status "done"
	log "done"
}

main "$@"
