#!/usr/bin/env bash
# Install the Debian packages a test or benchmark needs but pip cannot provide, when missing:
#   ./scripts/system-deps.sh chromium   # the ROI page test renders its charts in headless Chromium
#   ./scripts/system-deps.sh wrk        # the load benchmark's generator
# Needs root and apt-get; otherwise it says what to install and exits 0 (the test then skips,
# or fails under CI=1, naming the missing package).
set -euo pipefail

missing=()
for package in "$@"; do
  command -v "$package" >/dev/null 2>&1 || missing+=("$package")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ "$(id -u)" != "0" ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: missing ${missing[*]}: install with your package manager (Debian: apt-get install -y ${missing[*]})" >&2
  exit 0
fi
echo "system-deps: installing ${missing[*]} (apt-get)"
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y "${missing[@]}" >/dev/null 2>&1; then
  apt-get update >/dev/null 2>&1 || true
  apt-get install -y "${missing[@]}" >/dev/null 2>&1 \
    || echo "system-deps: apt-get could not install ${missing[*]}" >&2
fi
