#!/usr/bin/env bash
# Debian's Chromium for the browser tests of the HTML reports: not a service, a program
# the tests run headless. Usage: chromium.sh start|stop|status
#   start   install the Debian package chromium with apt-get when missing; print its path
#   stop    nothing to stop (the tests start and end each browser themselves)
#   status  print the path and exit 0 when installed, exit 3 when not
# Environment: CHATPROOF_CHROMIUM (the binary, /usr/bin/chromium).
set -euo pipefail
SCRIPT_NAME="chromium.sh"
# shellcheck source=scripts/services/common.sh
source "$(dirname "$0")/common.sh"

BINARY="${CHATPROOF_CHROMIUM:-/usr/bin/chromium}"

install_chromium() {
  [[ -x "$BINARY" ]] && return 0
  apt_install chromium
  [[ -x "$BINARY" ]] || die "$BINARY is still missing after installing chromium"
}

case "${1:-}" in
  start)
    install_chromium
    say "$("$BINARY" --version 2>/dev/null || echo chromium)"
    echo "$BINARY"
    ;;
  stop) ;;
  status)
    if [[ -x "$BINARY" ]]; then
      echo "$BINARY"
    else
      say "not installed"
      exit 3
    fi
    ;;
  *) die "usage: $0 start|stop|status" ;;
esac
