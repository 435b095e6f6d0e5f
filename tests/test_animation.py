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


def test_runner_frames_are_the_filmstrips_of_each_pass():
    """The frames drawn pass by pass, all probes in one overlay, are each probe's one-frame filmstrip."""
    import timm

    from lightning_attn import ProbeOptions, ProbeRunner, Probes

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    runner = ProbeRunner(vit, Probes(torch.rand(3, 3, 32, 32)), ProbeOptions(tile_size=16))
    runner.animate = True
    for step in (0, 5, 9):
        runner.run(step)
        with torch.no_grad():  # training moves the maps between passes
            vit.blocks[0].attn.qkv.weight.mul_(1.5)
    streams = runner.animations()
    assert sorted(streams) == [f"attention/rollout_evolution/probe_{i:02d}" for i in range(3)]
    display = runner.display()
    for i, stream in enumerate(streams.values()):
        expected = GifStream()
        for step, maps in runner.history:
            expected.append(filmstrip(display[i], maps[i : i + 1], [f"step {step}"], 32, "jet", 0.5))
        assert stream.to_bytes() == expected.to_bytes()
    runner.restart()
    assert runner.animations() == {}
