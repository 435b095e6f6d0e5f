"""The incremental GIF encoder against Pillow's decoder and its own one-shot encoder."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from lightning_attn.animation import GifStream
from lightning_attn.render import filmstrip


def _frames(count: int = 4) -> list[np.ndarray]:
    """Heatmap overlays like the callback's: a smooth image under a jet map that moves from frame to frame."""
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 6, generator=g), size=(48, 48), mode="bilinear")[0]
    out = []
    for t in range(count):
        heat = torch.zeros(1, 4, 4)
        heat[0, t % 4, (t * 3) % 4] = 1.0
        out.append(filmstrip(image, heat + 0.1 * torch.rand(1, 4, 4, generator=g), [f"step {t}"], 64, "jet", 0.5))
    return out


def _decode(data: bytes) -> tuple[list[np.ndarray], list[int], Image.Image]:
    image = Image.open(io.BytesIO(data))
    frames = [np.asarray(f.convert("RGB")).astype(int) for f in ImageSequence.Iterator(image)]
    durations = []
    for i in range(image.n_frames):
        image.seek(i)
        durations.append(image.info["duration"])
    return frames, durations, image


@pytest.mark.parametrize("duration", [40, 500])
def test_stream_decodes_to_its_frames_as_closely_as_pillows_own_gif(duration):
    frames = _frames()
    stream = GifStream()
    for frame in frames:
        stream.append(frame)  # one at a time, as the callback does pass by pass
    decoded, durations, image = _decode(stream.to_bytes(duration))
    assert image.n_frames == len(frames) and image.info["loop"] == 0
    assert durations == [duration] * len(frames)
    assert image.size == (frames[0].shape[1], frames[0].shape[0])
    # Pillow's one-shot GIF (median-cut palette per frame) as the reference for how close 256 colours get
    pil = io.BytesIO()
    first, *rest = (Image.fromarray(f) for f in frames)
    first.save(pil, format="GIF", save_all=True, append_images=rest, duration=duration, loop=0)
    reference, _, _ = _decode(pil.getvalue())
    for got, ref, want in zip(decoded, reference, frames):
        ours, theirs = np.abs(got - want).mean(), np.abs(ref - want).mean()
        assert ours <= max(2 * theirs, 3.0), (ours, theirs)
    # each frame is its own picture, not the first one repeated
    assert np.abs(decoded[0] - decoded[1]).mean() > 1


def test_stream_refuses_frames_of_another_size_or_type():
    stream = GifStream()
    with pytest.raises(ValueError, match="at least one frame"):
        stream.to_bytes()
    stream.append(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="one size"):
        stream.append(np.zeros((8, 9, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        stream.append(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="duration_ms"):
        stream.to_bytes(0)
    assert len(stream) == 1 and stream.nbytes > 0
