#!/usr/bin/env bash
# Opens a generated HTML page in headless Chromium (Debian's, installed by
# scripts/services/chromium.sh when missing) and checks what a reader would see: the page
# loads, no script error is logged, and the rendered DOM holds each given text.
# Usage: scripts/check-page.sh PAGE [TEXT...]    e.g. scripts/check-page.sh x.html '<svg' 'class="violation"'
# Exit status: 0 all found; 1 a text missing, a script error, or Chromium failed.
set -euo pipefail
page="${1:?usage: check-page.sh PAGE [TEXT...]}"
shift
[[ -f "$page" ]] || { echo "check-page.sh: no page $page" >&2; exit 1; }
chromium="$(bash "$(dirname "$0")/services/chromium.sh" start)"
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
dom="$profile/dom.html"
log="$profile/chromium.log"
if ! timeout 120 "$chromium" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --enable-logging=stderr --v=0 --user-data-dir="$profile/user" \
  --dump-dom "file://$(realpath "$page")" >"$dom" 2>"$log"; then
  tail -n 20 "$log" >&2
  echo "check-page.sh: chromium failed on $page" >&2
  exit 1
fi
if grep -E 'CONSOLE.*(Uncaught|Error)' "$log" >&2; then
  echo "check-page.sh: $page logged a script error" >&2
  exit 1
fi
for text in "$@"; do
  grep -qF -- "$text" "$dom" || { echo "check-page.sh: $page: '$text' not in the rendered page" >&2; exit 1; }
done
echo "check-page.sh: $page renders with $(grep -o '<svg' "$dom" | wc -l) chart(s); found: $*"
