#!/usr/bin/env bash
# Regenerates docs/report_rollout.png and docs/report_patch_query.png: trains the example with its defaults
# (examples/train_vit.py: 6 epochs, 8 probes, TensorBoard logs and checkpoints in a temporary folder), builds its
# interactive report with `lightning-attn report` from the newest checkpoint (no model), prints the page's size, and
# takes headless Chromium (Debian's `chromium`) screenshots of two views of it, opened from disk.
#   bash docs/make_report_screenshots.sh   (the training is most of it: 26 min on a busy 2-core machine, a few on an
#   idle one; needs `chromium` on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
logs=$(mktemp -d)
profile=$(mktemp -d)
trap 'rm -rf "$logs" "$profile"' EXIT
python examples/train_vit.py --threads 1 --logdir "$logs" > /dev/null
lightning-attn report "$logs" -o "$logs/report.html"
shoot() {  # shoot FILE HASH
  chromium --headless --no-sandbox --disable-gpu --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$profile" \
    --screenshot="$1" --window-size=1280,1000 --virtual-time-budget=5000 "file://$logs/report.html$2"
}
# the last pass: the rollout of every layer up to the last, probe 2 (a triangle), the class query
shoot docs/report_rollout.png "#method=rollout&layer=3&probe=2&query=class&scale=relative"
# the same pass after a click on the patch at row 3, column 4: where it looks in the last layer, and per head
shoot docs/report_patch_query.png "#method=raw&layer=3&probe=2&query=28&scale=relative"
echo "wrote docs/report_rollout.png, docs/report_patch_query.png"
