#!/usr/bin/env bash
# Installs the Debian packages the project builds with, then configures and
# compiles it into ./build. Safe to run again: it only does what is missing.
#   tools/bootstrap.sh [BUILD_DIR] [extra meson options...]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
shift || true

packages=(g++ meson ninja-build pkg-config libopenblas-dev catch2 nlohmann-json3-dev libpcre2-dev
          libcli11-dev libfmt-dev libsentencepiece-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

[ -f "$build/build.ninja" ] || meson setup "$build" "$@"  # buildtype: release by default (meson.build)
ninja -C "$build"
