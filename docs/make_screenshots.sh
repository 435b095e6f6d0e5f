#!/usr/bin/env bash
# Regenerates docs/tensorboard_custom_scalars.png and docs/tensorboard_images.png: a short run of the example,
# TensorBoard on the loopback address only, and headless Chromium (Debian's `chromium`) screenshots of its
# custom-scalars tab and of its images tab (the grids there are stored as JPEG).
#   bash docs/make_screenshots.sh        (about a minute on 2 CPU cores; needs `chromium` on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
logs=$(mktemp -d)
profile=$(mktemp -d)
python examples/train_vit.py --epochs 8 --num-train 512 --num-val 64 --img-size 32 --patch-size 8 --depth 4 \
  --workers 0 --logdir "$logs" > "$logs/train.log" 2>&1
tensorboard --logdir "$logs" --host 127.0.0.1 --port 6006 > "$logs/tensorboard.log" 2>&1 &
tb_pid=$!
trap 'kill "$tb_pid" 2>/dev/null || true; rm -rf "$profile"' EXIT
for _ in $(seq 60); do  # wait until it serves
  curl -sf http://127.0.0.1:6006/ > /dev/null && break
  sleep 1
done
sleep 5  # let it load the event files
shoot() {  # shoot FILE URL
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --user-data-dir="$profile" \
    --screenshot="$1" --window-size=1400,1000 --virtual-time-budget=15000 "$2"
}
shoot docs/tensorboard_custom_scalars.png "http://127.0.0.1:6006/#custom_scalars"
shoot docs/tensorboard_images.png "http://127.0.0.1:6006/#images"
# the layers x steps picture of the rollout's entropy at the last step, as stored in the event file
python - "$logs" <<'PY'
import io
import sys
from pathlib import Path
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
(events,) = {p.parent for p in Path(sys.argv[1]).rglob("events.out.tfevents.*")}
acc = EventAccumulator(str(events), size_guidance={"images": 0})
acc.Reload()
stored = acc.Images("attention_layers_steps/entropy/rollout")[-1].encoded_image_string  # JPEG, as TensorBoard shows it
Image.open(io.BytesIO(stored)).save("docs/layers_steps_entropy_rollout.png")
PY
echo "wrote docs/tensorboard_custom_scalars.png, docs/tensorboard_images.png, docs/layers_steps_entropy_rollout.png from $logs"
