#!/usr/bin/env bash
# Install hotplug-monitor as a systemd service, from this checkout; or remove it (--uninstall).
# docs/operating.md: "Running under systemd".
set -euo pipefail

usage() {
  cat <<'EOF'
usage: ./install.sh [--root DIR] [--python PYTHON] [--with ADAPTER[,ADAPTER...]]
       ./install.sh --uninstall [--root DIR]

Installs hotplug-monitor as a systemd service (run as root):
  /opt/hotplug-monitor/                      a virtual environment with the daemon and its libraries
  /usr/local/bin/hotplug-monitor             the command (a link into it)
  /usr/local/lib/systemd/system/             hotplug-monitor.service and hotplug-monitor.socket
  /usr/local/lib/sysusers.d/                 the hotplug-monitor group (who may reserve) and
                                             hotplug-monitor-read (who may only read)
  /usr/local/lib/systemd/catalog/            the journal's explanations of its entries
  /usr/local/share/doc/hotplug-monitor/      README.md, which the units and entries point to,
                                             and the manual it links (docs/)
  /usr/local/share/man/man8/hotplug-monitor.8  the man page, hotplug-monitor(8)
then creates the groups, updates the journal catalog and reloads systemd. It starts nothing.

  --root DIR        install under DIR instead of /, for an image or a check; the system is
                    left alone (no groups, catalog or reload), and the files name their final
                    paths, so they work once DIR is the root
  --python PYTHON   the interpreter for the virtual environment (default /usr/bin/python3). The
                    service cannot see /home, /root or /tmp, so it must live elsewhere.
  --with ADAPTERS   also the libraries and units of these adapters (comma-separated):
                    exporter  Prometheus exporter: hotplug-monitor-exporter.service and its
                              user, in the read-only group
                    kubelet   Kubernetes device plugin: hotplug-monitor-kubelet-plugin.service
                    nomad     Nomad device plugin's libraries (Nomad starts it: no unit)
  --uninstall       stop and disable the units, and remove every path above (the adapters'
                    too); the state (/var/lib/hotplug-monitor), the config
                    (/etc/hotplug-monitor) and the groups and users are left
EOF
}

fail() {
  echo "install.sh: error: $*" >&2
  exit 1
}

root=""
python=/usr/bin/python3
adapters=
uninstall=
while [ $# -gt 0 ]; do
  case "$1" in
    --root) [ $# -ge 2 ] || fail "--root needs a directory"; root="${2%/}"; shift 2 ;;
    --root=*) root="${1#--root=}"; root="${root%/}"; shift ;;
    --python) [ $# -ge 2 ] || fail "--python needs an interpreter"; python="$2"; shift 2 ;;
    --python=*) python="${1#--python=}"; shift ;;
    --with) [ $# -ge 2 ] || fail "--with needs adapters"; adapters="$2"; shift 2 ;;
    --with=*) adapters="${1#--with=}"; shift ;;
    --uninstall) uninstall=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; fail "unknown argument: $1" ;;
  esac
done

source="$(cd "$(dirname "$0")" && pwd)"
# Where each thing goes: written once, for installing and for --uninstall.
venv=/opt/hotplug-monitor
bin=/usr/local/bin/hotplug-monitor
units=/usr/local/lib/systemd/system
sysusers=/usr/local/lib/sysusers.d
catalog=/usr/local/lib/systemd/catalog
doc=/usr/local/share/doc/hotplug-monitor
man=/usr/local/share/man/man8/hotplug-monitor.8

if [ -n "$uninstall" ]; then
  [ -z "$adapters" ] || fail "--uninstall removes every adapter: drop --with"
  [ -n "$root" ] || [ "$(id -u)" -eq 0 ] || fail "run as root (or with --root DIR)"
  installed_units=()
  for unit in "$root$units"/hotplug-monitor*.service "$root$units"/hotplug-monitor*.socket; do
    if [ -e "$unit" ]; then installed_units+=("$(basename "$unit")"); fi
  done
  if [ -z "$root" ] && [ -d /run/systemd/system ] && [ ${#installed_units[@]} -gt 0 ]; then
    systemctl disable --now "${installed_units[@]}"
  fi
  rm -rf "$root$venv" "$root$doc"
  rm -f "$root$bin" "$root$man" "$root$catalog/hotplug-monitor.catalog" \
    "$root$sysusers"/hotplug-monitor*.conf "${installed_units[@]/#/$root$units/}"
  if [ -n "$root" ]; then
    echo "removed hotplug-monitor from under $root"
    exit 0
  fi
  journalctl --update-catalog
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
  fi
  echo "removed hotplug-monitor; left for you: /var/lib/hotplug-monitor (leases), /etc/hotplug-monitor (config), its groups and users"
  exit 0
fi

# Each adapter is a pip extra of the same name, with its units in systemd/ if it has any.
extras=""
for adapter in ${adapters//,/ }; do
  case "$adapter" in
    exporter|kubelet|nomad) extras="${extras:+$extras,}$adapter" ;;
    *) fail "unknown adapter: $adapter (known: exporter, kubelet, nomad)" ;;
  esac
done

[ -n "$root" ] || [ "$(id -u)" -eq 0 ] || fail "run as root (or with --root DIR to stage the files)"
command -v "$python" >/dev/null || fail "no interpreter $python (apt-get install python3-venv)"
python="$(command -v "$python")"
# The interpreter the venv links to must be visible to the service (ProtectHome, PrivateTmp).
case "$(readlink -f "$python")" in
  /home/*|/root/*|/tmp/*|/var/tmp/*|/run/user/*)
    fail "$python lives where the service cannot see it (ProtectHome=, PrivateTmp=); use --python /usr/bin/python3" ;;
esac
"$python" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
  || fail "$python is not Python 3.11 or later with venv (apt-get install python3-venv)"

# A fresh environment each time: an upgrade replaces, never half-merges.
rm -rf "$root$venv"
"$python" -m venv "$root$venv"
"$root$venv/bin/pip" install --quiet --disable-pip-version-check --no-warn-script-location \
  "$source${extras:+[$extras]}"
# The man page is written by the parser that --help prints (monitor/cli/manpage.py).
install -d "$root${man%/*}"
"$root$venv/bin/python" -m monitor.cli.manpage >"$root$man"
chmod 0644 "$root$man"
if [ -n "$root" ]; then
  # A venv's scripts name it by absolute path (shebangs, activate): make that the final one.
  grep -rlIZ -- "$root$venv" "$root$venv/bin" "$root$venv/pyvenv.cfg" \
    | xargs -0 -r sed -i "s|$root$venv|$venv|g"
fi

install -d "$root${bin%/*}"
ln -sfn "$venv/bin/hotplug-monitor" "$root$bin"
install -D -m 0644 -t "$root$units" \
  "$source/systemd/hotplug-monitor.service" "$source/systemd/hotplug-monitor.socket"
install -D -m 0644 "$source/systemd/hotplug-monitor.sysusers" "$root$sysusers/hotplug-monitor.conf"
install -D -m 0644 -t "$root$catalog" "$source/systemd/hotplug-monitor.catalog"
for adapter in ${extras//,/ }; do
  for unit in "$source/systemd/hotplug-monitor-$adapter"*.service; do
    if [ -e "$unit" ]; then install -D -m 0644 -t "$root$units" "$unit"; fi
  done
  for users in "$source/systemd/hotplug-monitor-$adapter"*.sysusers; do
    if [ -e "$users" ]; then
      install -D -m 0644 "$users" "$root$sysusers/$(basename "${users%.sysusers}").conf"
    fi
  done
done
install -D -m 0644 -t "$root$doc" "$source/README.md"
install -D -m 0644 -t "$root$doc/docs" "$source"/docs/*.md

if [ -n "$root" ]; then
  echo "installed hotplug-monitor under $root"
  exit 0
fi

systemd-sysusers "$sysusers"/hotplug-monitor*.conf
# Earlier versions put the exporter's user in the full group; it needs only the read-only one.
if id -nG hotplug-monitor-exporter 2>/dev/null | tr ' ' '\n' | grep -qx hotplug-monitor; then
  gpasswd -d hotplug-monitor-exporter hotplug-monitor >/dev/null
fi
journalctl --update-catalog
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi

cat <<EOF
installed hotplug-monitor $("$venv/bin/hotplug-monitor" --version | cut -d' ' -f2) in $venv
next:
  hotplug-monitor serve    # in the foreground, logging here; Ctrl-C stops it
  systemctl enable --now hotplug-monitor.socket hotplug-monitor.service    # or: as a service
  usermod -aG hotplug-monitor USER    # who may reserve devices (they log in again after)
  usermod -aG hotplug-monitor-read USER    # or: who may only read devices, leases and stats
  hotplug-monitor devices
  man hotplug-monitor    # every command and option; the manual: $doc/README.md
EOF
