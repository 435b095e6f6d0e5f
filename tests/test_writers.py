import csv
import io

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from lightning_attn.writers import AttentionWriter, PNGWriter, TensorBoardWriter, WriterSet, save_gif


def image(height=20, width=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_tensorboard_writer_round_trip(tmp_path):
    writer = TensorBoardWriter(SummaryWriter(str(tmp_path)), image_format="png")  # lossless: pixels come back
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

    # the PNG bytes are those SummaryWriter.add_image makes of the same pixels
    plain = SummaryWriter(str(tmp_path / "plain"))
    plain.add_image("attention/raw", written[0], global_step=0, dataformats="HWC")
    plain.close()
    reference = EventAccumulator(str(tmp_path / "plain"), size_guidance={"images": 0})
    reference.Reload()
    assert reference.Images("attention/raw")[0].encoded_image_string == events[0].encoded_image_string


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


def flat_frames(count, height=20, width=30):
    """Frames of distinct flat colours: few enough colours that GIF's palette keeps them exactly."""
    colours = np.random.default_rng(3).integers(0, 256, (count, 3), dtype=np.uint8)
    return [np.broadcast_to(c, (height, width, 3)).copy() for c in colours]


def test_save_gif_round_trip(tmp_path):
    frames = flat_frames(4)
    path = save_gif(frames, tmp_path / "nested" / "layer0.gif", duration_ms=120)
    assert path == tmp_path / "nested" / "layer0.gif"
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.n_frames == len(frames) and gif.size == (30, 20)
        assert gif.info["loop"] == 0
        for i, frame in enumerate(frames):
            gif.seek(i)
            assert gif.info["duration"] == 120
            np.testing.assert_array_equal(np.asarray(gif.convert("RGB")), frame)


def test_save_gif_detailed_frames_keep_count_and_size(tmp_path):
    frames = [image(24, 40, seed=s) for s in range(5)]
    with Image.open(save_gif(frames, tmp_path / "a.gif")) as gif:
        assert gif.n_frames == 5 and gif.size == (40, 24)


def test_save_gif_keeps_every_frame_and_its_duration(tmp_path):
    a, b = flat_frames(2)
    with Image.open(save_gif([a, a, b], tmp_path / "a.gif", duration_ms=100)) as gif:
        durations, pixels = [], []
        for i in range(gif.n_frames):
            gif.seek(i)
            durations.append(gif.info["duration"])
            pixels.append(np.asarray(gif.convert("RGB")))
    assert durations == [100, 100, 100]
    for got, want in zip(pixels, [a, a, b]):
        assert np.abs(got.astype(int) - want).max() <= 2


@pytest.mark.parametrize(
    ("frames", "kwargs", "match"),
    [
        ([], {}, "`frames` is empty"),
        ([image(20, 30), image(20, 31)], {}, "must all have one size"),
        ([np.zeros((8, 8), np.uint8)], {}, r"\(H, W, 3\) uint8"),
        ([image()], dict(duration_ms=0), "`duration_ms` must be a positive int"),
        ([image()], dict(duration_ms=0.5), "`duration_ms` must be a positive int"),
    ],
)
def test_save_gif_bad_arguments(tmp_path, frames, kwargs, match):
    with pytest.raises(ValueError, match=match):
        save_gif(frames, tmp_path / "a.gif", **kwargs)
    assert not (tmp_path / "a.gif").exists()


def test_tensorboard_jpeg_images_and_gif_animations_read_back(tmp_path):
    from lightning_attn.writers import encode_image

    writer = TensorBoardWriter(
        SummaryWriter(str(tmp_path)), image_format="jpeg", quality=90, directory=tmp_path / "gifs"
    )
    y, x = np.mgrid[0:40, 0:60]
    pixels = np.stack([x * 4, y * 6, 255 - x * 4], axis=-1).astype(np.uint8)  # smooth, like a heatmap
    writer.add_image("attention/raw", pixels, step=5)
    writer.add_animation("attention/evolution/probe_00", flat_frames(3, 20, 30), step=7)
    writer.flush()
    writer.experiment.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    (raw,) = acc.Images("attention/raw")
    assert (raw.step, raw.width, raw.height) == (5, 60, 40)
    assert raw.encoded_image_string == encode_image(pixels, "jpeg", 90)
    with Image.open(io.BytesIO(raw.encoded_image_string)) as decoded:
        assert decoded.format == "JPEG"
        # lossy, but close on a smooth image
        assert np.abs(np.asarray(decoded.convert("RGB")).astype(int) - pixels).mean() < 3
    (animation,) = acc.Images("attention/evolution/probe_00")
    assert animation.step == 7 and animation.encoded_image_string[:6] == b"GIF89a"
    assert (tmp_path / "gifs" / "attention__evolution__probe_00.gif").read_bytes() == animation.encoded_image_string


def test_writer_set_writes_the_whole_pass_to_healthy_writers_then_raises_the_first_error(tmp_path):
    class Broken(PNGWriter):
        def add_image(self, tag, image, step):
            raise OSError("disk full")

    both = WriterSet([Broken(tmp_path / "a"), PNGWriter(tmp_path / "b")])
    both.add_image("attention/raw", image(), step=1)
    both.add_image("attention/rollout", image(), step=1)  # the rest of the pass still reaches every writer
    with pytest.raises(RuntimeError, match="Broken.add_image failed: OSError: disk full"):
        both.flush()  # the end of the pass reports the first failure
    assert {p.name for p in (tmp_path / "b").iterdir()} == {
        "attention__raw_step0000001.png",
        "attention__rollout_step0000001.png",
    }
    both.flush()  # reported once


class _LookAlike:
    """A logger from another package (e.g. the standalone pytorch_lightning) that only quacks like one."""

    def __init__(self, experiment=None, log_dir=None):
        self.experiment, self.log_dir, self.metrics = experiment, log_dir, []

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))


class _WandbLike(_LookAlike):
    def log_image(self, key, images, step=None, **kwargs):
        pass

    def log_video(self, key, videos, step=None, **kwargs):
        pass


class _MlflowClientLike:
    def log_image(self, run_id, image, artifact_file=None):
        self.logged = (run_id, image.shape, artifact_file)

    def log_artifact(self, run_id, local_path, artifact_path=None):
        pass


def test_writers_are_picked_by_what_each_logger_can_do(tmp_path):
    from lightning_attn.writers import MLflowWriter, WandbWriter, writers_for

    summary = SummaryWriter(str(tmp_path / "tb"))
    mlflow_like = _LookAlike(_MlflowClientLike())
    mlflow_like.run_id = "r1"
    loggers = [
        _LookAlike(summary, str(tmp_path / "tb")),
        _WandbLike(),
        mlflow_like,
        _LookAlike(None, str(tmp_path / "csv")),
    ]
    chosen = writers_for(loggers, tmp_path).writers
    assert [type(w) for w in chosen] == [TensorBoardWriter, WandbWriter, MLflowWriter, PNGWriter]
    assert chosen[3].directory == tmp_path / "csv" / "attention"
    # scalars reach each logger's own log_metrics at the given step
    WriterSet(chosen).add_scalars({"attention_entropy/raw/layer_00": 0.5}, step=3)
    assert all(lg.metrics == [(3, {"attention_entropy/raw/layer_00": 0.5})] for lg in loggers)
    # an mlflow older than 2.12.1 (no key/step): the image goes to an artifact file named by tag and step
    chosen[2].add_image("attention/raw", image(), step=3)
    assert mlflow_like.experiment.logged == ("r1", (20, 30, 3), "attention/attention__raw_step0000003.png")
    summary.close()


def test_no_logger_warns_and_writes_files(tmp_path):
    from lightning_attn.writers import writers_for

    with pytest.warns(RuntimeWarning, match="no logger in `trainer.loggers`"):
        (only,) = writers_for([], tmp_path).writers
    assert isinstance(only, PNGWriter) and only.directory == tmp_path / "attention" and only.logger is None


def test_the_package_imports_without_wandb_or_mlflow():
    # the optional libraries are imported by their loggers, only when used
    import subprocess
    import sys

    code = (
        "import sys, lightning_attn.writers, lightning_attn; "
        "print(sorted(m for m in ('wandb', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class _Recorder(AttentionWriter):
    """Records which thread made each call, and can be told to fail or to wait."""

    thread_safe = True

    def __init__(self, fail_on: str | None = None, gate=None) -> None:
        self.calls: list[tuple[str, object, str]] = []
        self.fail_on, self.gate = fail_on, gate

    def _record(self, method, payload):
        import threading

        if self.gate is not None:
            self.gate.wait(5)
        if method == self.fail_on:
            raise OSError("disk full")
        self.calls.append((method, payload, threading.current_thread().name))

    def add_image(self, tag, image, step):
        self._record("add_image", (tag, step))

    def add_scalar(self, tag, value, step):
        self._record("add_scalar", (tag, value, step))

    def flush(self):
        self._record("flush", None)


def test_background_writer_writes_in_order_on_its_thread_and_drains():
    from lightning_attn.writers import BackgroundWriter

    inner = _Recorder()
    writer = BackgroundWriter(inner)
    metrics = {"a": 1.0}
    for step in range(3):
        writer.add_image("attention/raw", image(), step)
        writer.add_scalars(metrics, step)
        metrics["a"] += 1  # the caller goes on changing its dict: the writer kept a copy
        writer.flush()
    writer.drain()
    assert [c[:2] for c in inner.calls] == [
        call
        for step in range(3)
        for call in (("add_image", ("attention/raw", step)), ("add_scalar", ("a", 1.0 + step, step)), ("flush", None))
    ]
    assert {c[2] for c in inner.calls} == {"lightning-attn-writer"}
    writer.close()
    assert writer._thread is None
    writer.add_image("attention/raw", image(), 9)  # usable again after close: a new thread
    writer.close()
    assert inner.calls[-2][:2] == ("add_image", ("attention/raw", 9))


def test_background_writer_bounds_the_passes_waiting_and_reports_errors_on_the_callers_thread():
    import threading
    import time

    from lightning_attn.writers import BackgroundWriter

    gate = threading.Event()
    inner = _Recorder(gate=gate)
    writer = BackgroundWriter(inner, max_pending=1, settle=0)
    writer.add_scalar("a", 1.0, 0)
    writer.flush()  # taken by the worker, which waits at the gate
    time.sleep(0.1)
    writer.add_scalar("a", 2.0, 1)
    writer.flush()  # waits in the queue (1 pending)
    blocked = threading.Thread(target=lambda: (writer.add_scalar("a", 3.0, 2), writer.flush()))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive(), "a third pass waits while the queue is full"
    gate.set()
    blocked.join(5)
    writer.drain()
    assert [c[1][1] for c in inner.calls if c[0] == "add_scalar"] == [1.0, 2.0, 3.0]

    failing = BackgroundWriter(_Recorder(fail_on="add_image"), settle=0)
    failing.add_image("attention/raw", image(), 0)
    failing.add_scalar("a", 1.0, 0)
    failing.flush()
    with pytest.raises(RuntimeError, match="_Recorder.add_image failed: OSError: disk full"):
        failing.drain()
    assert [c[0] for c in failing.writer.calls] == ["add_scalar", "flush"], "the calls after a failure still ran"
    failing.drain()  # reported once
    failing.close()
    with pytest.raises(ValueError, match="max_pending"):
        BackgroundWriter(inner, max_pending=0)
    with pytest.raises(ValueError, match="settle"):
        BackgroundWriter(inner, settle=-1)


def test_background_writer_prepares_on_the_callers_thread_and_waits_for_a_quick_store():
    """A pass is prepared (encoded) by the caller and, on a quick destination, stored before flush returns: nothing
    is left to run beside the training steps. A slow destination is waited for `settle` seconds, not more, and
    still gets everything; a pass's error is raised at its own flush once it was stored within `settle`."""
    import threading
    import time

    from lightning_attn.writers import BackgroundWriter

    class Preparing(_Recorder):
        def prepare(self, method, *args):
            store = super().prepare(method, *args)
            prepared_on = threading.current_thread().name
            return lambda: (store(), self.calls.append(("prepared", method, prepared_on)))

    inner = Preparing()
    writer = BackgroundWriter(inner)
    writer.add_image("attention/raw", image(), 0)
    assert inner.calls == [], "prepared, not stored before flush"
    writer.flush()
    assert writer._queue is not None and writer._queue.unfinished_tasks == 0, "stored before flush returned"
    assert ("add_image", ("attention/raw", 0), "lightning-attn-writer") in inner.calls
    assert ("prepared", "add_image", threading.current_thread().name) in inner.calls
    writer.close()

    gate = threading.Event()
    slow = BackgroundWriter(_Recorder(gate=gate), settle=0.2)
    slow.add_scalar("a", 1.0, 0)
    start = time.monotonic()
    slow.flush()
    assert 0.15 < time.monotonic() - start < 2, "waited `settle`, then left the store to the thread"
    assert slow.writer.calls == []
    gate.set()
    slow.drain()
    assert [c[0] for c in slow.writer.calls] == ["add_scalar", "flush"], "nothing dropped"
    slow.close()

    failing = BackgroundWriter(_Recorder(fail_on="add_image"))
    failing.add_image("attention/raw", image(), 3)
    with pytest.raises(RuntimeError, match=r"add_image failed: OSError: disk full \(step 3\)"):
        failing.flush()
    failing.close()


def test_tensorboard_event_records_are_checksummed_in_c_with_tensorboards_values(tmp_path):
    """The writer's thread must not spend ~0.15 s per MiB of events in a pure-Python CRC holding the GIL: records
    are checksummed by google-crc32c, and every checksum is the one TensorBoard's own function computes."""
    import struct

    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
    from tensorboard.summary.writer import record_writer

    experiment = SummaryWriter(tmp_path)
    writer = TensorBoardWriter(experiment)
    assert record_writer.masked_crc32c is not masked_crc32c  # the C one is in place
    rng = np.random.default_rng(0)
    for step in range(3):
        writer.add_image("attention/raw", rng.integers(0, 255, (64, 96, 3), dtype=np.uint8), step)
        writer.add_scalar("attention_entropy/raw/layer_00", 0.5, step)
    writer.flush()
    experiment.close()
    (path,) = tmp_path.glob("events.out.tfevents.*")
    data, records, pos = path.read_bytes(), 0, 0
    while pos < len(data):  # uint64 length, uint32 masked crc of it, the record, uint32 masked crc of the record
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        body = data[pos + 12 : pos + 12 + length]
        (body_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        assert header_crc == masked_crc32c(header) and body_crc == masked_crc32c(body)
        pos, records = pos + 16 + length, records + 1
    assert records >= 7  # the file version, 3 images and 3 scalars
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("attention/raw")] == [0, 1, 2]
