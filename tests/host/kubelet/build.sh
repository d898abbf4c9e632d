#!/usr/bin/env bash
# Build the real kubelet and the kubelet's own device-manager test binary (with our
# devicemanager_test.go inside it) from Debian's `kubernetes` source package, offline, with
# Debian's Go, in GOPATH mode. Output is cached in $CACHE (default
# /var/cache/hotplug-monitor/kubelet):
#   kubelet-<source version>                     the kubelet binary (level 2)
#   devicemanager-<source version>-<hash>.test   the device manager's tests plus ours (level 1)
# keyed by the source version and the sha256 of our Go test file: a run rebuilds only what the
# key says changed (and Go's own build cache, GOCACHE, lives under $CACHE too).
#
# Usage: build.sh [kubelet|devicemanager|all]  (default all). Prints the paths it built or found.
set -euo pipefail
what="${1:-all}"
here="$(cd "$(dirname "$0")" && pwd)"
CACHE="${HOTPLUG_KUBELET_CACHE:-/var/cache/hotplug-monitor/kubelet}"
test_go="$here/devicemanager_test.go"
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9

# The deb-src lists for the machine's own mirror and suites, kept apart from the system's apt
# configuration (the image has deb822 .sources files; a classic sources.list is handled too).
A="$CACHE/apt"
mkdir -p "$A/lists/partial" "$A/parts" "$A/dl"
if [ -f /etc/apt/sources.list.d/debian.sources ]; then
  sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources >"$A/parts/src.sources"
else
  grep -h '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /' >"$A/parts/src.list"
fi
APT=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$A/parts" -o "Dir::State::Lists=$A/lists")
if [ ! -f "$A/version" ] || [ -n "$(find "$A/version" -mmin +1440)" ]; then
  apt-get "${APT[@]}" update -qq
  apt-cache "${APT[@]}" showsrc kubernetes | awk '/^Version:/ {print $2; exit}' >"$A/version"
fi
version="$(cat "$A/version")"
[ -n "$version" ] || { echo "build.sh: no kubernetes source package found" >&2; exit 1; }
safe="${version//[^A-Za-z0-9.+-]/_}"
B="$CACHE/src-$safe"
k8s="$B/gopath/src/k8s.io/kubernetes"

fetch() {
  [ -d "$k8s/pkg/kubelet/cm/devicemanager" ] && return 0
  rm -rf "$B" && mkdir -p "$B/gopath/src/k8s.io"
  (cd "$A/dl" && rm -f ./* && apt-get "${APT[@]}" source -qq --download-only "kubernetes=$version")
  tar xzf "$A"/dl/kubernetes_*.orig.tar.gz -C "$B"
  local top
  top="$(find "$B" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes*' | head -n1)"
  mv "$top" "$k8s"
}

export GO111MODULE=off CGO_ENABLED=0 GOPATH="$B/gopath" GOCACHE="$CACHE/go-build" GOFLAGS=-mod=
kubelet_bin="$CACHE/kubelet-$safe"
if [ "$what" = all ] || [ "$what" = kubelet ]; then
  if [ ! -x "$kubelet_bin" ]; then
    fetch
    (cd "$k8s" && go build -o "$kubelet_bin.tmp" ./cmd/kubelet)
    mv "$kubelet_bin.tmp" "$kubelet_bin"
  fi
  echo "$kubelet_bin"
fi
if [ "$what" = all ] || [ "$what" = devicemanager ]; then
  hash="$(sha256sum "$test_go" | cut -c1-16)"
  dm_bin="$CACHE/devicemanager-$safe-$hash.test"
  if [ ! -x "$dm_bin" ]; then
    fetch
    cp "$test_go" "$k8s/pkg/kubelet/cm/devicemanager/zz_hotplug_monitor_test.go"
    (cd "$k8s" && go test -c -o "$dm_bin.tmp" ./pkg/kubelet/cm/devicemanager)
    mv "$dm_bin.tmp" "$dm_bin"
    # Older binaries of other hashes are of no further use.
    find "$CACHE" -maxdepth 1 -name "devicemanager-$safe-*.test" ! -name "$(basename "$dm_bin")" -delete
  fi
  echo "$dm_bin"
fi
