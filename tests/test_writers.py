import csv
import io

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from lightning_attn.writers import AttentionWriter, PNGWriter, TensorBoardWriter


def image(height=20, width=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_tensorboard_writer_round_trip(tmp_path):
    writer = TensorBoardWriter(SummaryWriter(str(tmp_path)))
    written = {step: image(seed=step) for step in range(6)}
    for step, pixels in written.items():
        writer.add_image("attention/raw", pixels, step=step)
        writer.add_scalar("attention/entropy", 0.1 * step, step=step)
    writer.add_image("attention/rollout", image(12, 40), step=2)
    writer.flush()
    writer.experiment.close()

    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert set(acc.Tags()["images"]) == {"attention/raw", "attention/rollout"}
    events = acc.Images("attention/raw")
    assert [e.step for e in events] == list(written)
    for e in events:
        assert (e.width, e.height) == (30, 20)
        decoded = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
        np.testing.assert_array_equal(decoded, written[e.step])
    (rollout,) = acc.Images("attention/rollout")
    assert (rollout.step, rollout.width, rollout.height) == (2, 40, 12)
    scalars = acc.Scalars("attention/entropy")
    assert [s.step for s in scalars] == list(written)
    np.testing.assert_allclose([s.value for s in scalars], [0.1 * s for s in written], rtol=1e-6)


def test_png_writer_files_and_scalars(tmp_path):
    directory = tmp_path / "nested" / "attention"
    writer = PNGWriter(directory)
    pixels = image(20, 30)
    writer.add_image("attention/raw/L0", pixels, step=12)
    path = directory / "attention__raw__L0_step0000012.png"
    assert writer.image_path("attention/raw/L0", 12) == path
    with Image.open(path) as saved:
        assert saved.size == (30, 20)
        np.testing.assert_array_equal(np.asarray(saved.convert("RGB")), pixels)

    writer.add_scalar("attention/entropy", 0.25, step=12)
    PNGWriter(directory).add_scalar("attention/entropy", 0.5, step=13)  # a second writer appends, no new header
    writer.flush()
    with (directory / "scalars.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["step", "tag", "value"], ["12", "attention/entropy", "0.25"], ["13", "attention/entropy", "0.5"]]


@pytest.mark.parametrize("writer_cls", [PNGWriter, lambda d: TensorBoardWriter(SummaryWriter(str(d)))])
@pytest.mark.parametrize(
    "bad", [np.zeros((3, 8, 8), np.uint8), np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8), [[0]]]
)
def test_writers_reject_images_that_are_not_hwc_uint8(tmp_path, writer_cls, bad):
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        writer_cls(tmp_path).add_image("attention/raw", bad, step=0)


def test_custom_writer_needs_only_image_and_scalar():
    class Collect(AttentionWriter):
        def __init__(self):
            self.records = []

        def add_image(self, tag, image, step):
            self.records.append((tag, image.shape, step))

        def add_scalar(self, tag, value, step):
            self.records.append((tag, value, step))

    writer = Collect()
    writer.add_image("a", image(), 1)
    writer.add_scalar("b", 0.5, 1)
    writer.flush()
    assert writer.records == [("a", (20, 30, 3), 1), ("b", 0.5, 1)]
    with pytest.raises(TypeError):
        type("Incomplete", (AttentionWriter,), {})()
