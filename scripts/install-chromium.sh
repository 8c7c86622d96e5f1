#!/usr/bin/env bash
# Makes sure headless Chromium is at /usr/bin/chromium (tests/status_page.rs drives it).
# Installs Debian's chromium package when it is absent; does nothing when present. Run as
# root (or with sudo available) on a Debian machine.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then exit 0; fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "install-chromium: needs root (or sudo) to apt-get -o DPkg::Lock::Timeout=300 install chromium" >&2; exit 1; }
  SUDO="sudo"
fi
echo "install-chromium: installing chromium (Debian package)" >&2
$SUDO apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null
# With its recommended packages (fonts-liberation among them) and DejaVu, which the page
# names, so text renders in screenshots on a bare machine.
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq chromium fonts-dejavu-core >/dev/null
if [ ! -x /usr/bin/chromium ]; then
  echo "install-chromium: apt-get finished but /usr/bin/chromium is missing" >&2
  exit 1
fi
/usr/bin/chromium --version >&2 || true
