#!/usr/bin/env bash
# Regenerates docs/site_front_page.png and docs/site_api_page.png: builds the documentation site with
# `mkdocs build --strict`, serves it on the loopback address only and takes headless Chromium (Debian's
# `chromium`) screenshots of its front page and of the API page of ProbeRunner.
#   bash docs/make_site_screenshots.sh     (6 s on 2 CPU cores; needs `pip install -e ".[docs]"` and `chromium` on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
site=$(mktemp -d)
profile=$(mktemp -d)
port=8765
mkdocs build --strict --quiet --site-dir "$site"
python -m http.server "$port" --bind 127.0.0.1 --directory "$site" > /dev/null 2>&1 &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true; rm -rf "$site" "$profile"' EXIT
for _ in $(seq 30); do  # wait until it serves
  curl -sf "http://127.0.0.1:$port/" > /dev/null && break
  sleep 0.5
done
shoot() {  # shoot FILE URL
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$profile" \
    --screenshot="$1" --window-size=1280,900 --virtual-time-budget=5000 "$2"
}
shoot docs/site_front_page.png "http://127.0.0.1:$port/"
shoot docs/site_api_page.png "http://127.0.0.1:$port/api/runner/"
echo "wrote docs/site_front_page.png, docs/site_api_page.png"
