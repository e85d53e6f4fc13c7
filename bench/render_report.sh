#!/usr/bin/env bash
# Render a report.html in headless Chromium and save a screenshot, to check the page by eye.
#   bench/render_report.sh outputs/runs/<date>/<time>/report.html [shot.png]
# Needs Debian's `chromium` package (apt-get install chromium). The page is self-contained, so
# --no-network-like flags are not needed; any request it made would show as a broken image.
set -euo pipefail
page="$(realpath "${1:?usage: bench/render_report.sh <report.html> [screenshot.png]}")"
shot="${2:-${page%.html}.png}"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1200,2200 \
  --screenshot="$shot" "file://$page" 2>/dev/null
echo "$shot"
