"""TensorBoard event files read back with TensorBoard's own reader (EventAccumulator)."""

from __future__ import annotations

import io

import numpy as np
import pytest

from sjc_jax.tensorboard import TensorBoardWriter

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _read(logdir):
    accumulator = event_accumulator.EventAccumulator(
        str(logdir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0}
    )
    return accumulator.Reload()


def test_scalars_and_images_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    preview = rng.random((6, 10, 3)).astype(np.float32)
    with TensorBoardWriter(tmp_path / "tb") as writer:
        for step in (1, 2, 3):
            writer.scalars(
                step,
                {"sigma": np.float32(0.5 * step), "finite": True, "label": np.int32(step % 4),
                 "note": "skipped", "vector": np.ones(3), "nan": float("nan")},
            )  # fmt: skip
        writer.image(3, "preview", preview)
        writer.image(3, "depth", np.zeros((4, 4)))
    events = _read(tmp_path / "tb")
    assert sorted(events.Tags()["scalars"]) == ["finite", "label", "sigma"]
    sigma = events.Scalars("sigma")
    assert [e.step for e in sigma] == [1, 2, 3]
    np.testing.assert_allclose([e.value for e in sigma], [0.5, 1.0, 1.5])
    assert [e.value for e in events.Scalars("label")] == [1, 2, 3]
    (image,) = events.Images("preview")
    assert (image.step, image.width, image.height) == (3, 10, 6)
    import imageio.v3 as imageio

    decoded = imageio.imread(io.BytesIO(image.encoded_image_string))
    from sjc_jax.export import to_uint8

    np.testing.assert_array_equal(decoded[..., :3], to_uint8(preview))
    assert events.Images("depth")[0].width == 4


def test_resume_purges_the_steps_after_the_checkpoint(tmp_path):
    with TensorBoardWriter(tmp_path) as writer:
        for step in range(1, 6):
            writer.scalars(step, {"x": step})
    with TensorBoardWriter(tmp_path, purge_step=3) as writer:  # resumed from step 3
        for step in range(3, 5):
            writer.scalars(step, {"x": 10 * step})
    values = {e.step: e.value for e in _read(tmp_path).Scalars("x")}
    assert values == {1: 1, 2: 2, 3: 30, 4: 40}


def test_bad_image_is_refused(tmp_path):
    with TensorBoardWriter(tmp_path) as writer, pytest.raises(ValueError, match="image"):
        writer.image(0, "x", np.zeros((2, 2, 2)))


def test_a_failing_writer_thread_stops_events_with_one_warning(tmp_path, capsys):
    """A full disk in tensorboardX's thread: no traceback, one warning, the run never blocks."""
    import errno

    import pytest

    from sjc_jax.tensorboard import TensorBoardWriter

    writer = TensorBoardWriter(tmp_path / "tb")
    events = writer._writer._get_file_writer().event_writer

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    events._ev_writer.write_event = full  # what the writer thread calls for each event
    worker = events._worker
    writer.scalars(1, {"loss": 1.0})
    worker.join(timeout=30)
    assert not worker.is_alive()
    with pytest.warns(UserWarning, match="TensorBoard events stopped: No space left on device"):
        for step in range(2, 2000):  # far more than the queue holds: must not block
            writer.scalars(step, {"loss": 1.0})
    writer.close()
    assert "Traceback" not in capsys.readouterr().err


def test_summary_writes_eval_scalars_and_hparams(tmp_path):
    evaluation = {
        "psnr": 30.5,
        "iou": 0.9,
        "psnr_per_camera": [1.0, 2.0],
        "mesh": {"chamfer": 0.03, "rule": "silhouette"},
    }
    config = {"lr": 0.2, "mesh_threshold": None, "aabb": ((0, 0, 0), (1, 1, 1)), "seed": 3}
    with TensorBoardWriter(tmp_path / "tb") as writer:
        writer.summary(600, config, evaluation)
    events = _read(tmp_path / "tb")
    assert sorted(events.Tags()["scalars"]) == ["eval/iou", "eval/mesh/chamfer", "eval/psnr"]
    (chamfer,) = events.Scalars("eval/mesh/chamfer")
    assert chamfer.step == 600 and abs(chamfer.value - 0.03) < 1e-7
    from tensorboard.plugins.hparams import plugin_data_pb2

    hparams = event_accumulator.EventAccumulator(str(tmp_path / "tb" / "hparams")).Reload()
    content = hparams.PluginTagToContent("hparams")
    info = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    values = info.session_start_info.hparams
    assert values["lr"].number_value == 0.2 and values["seed"].number_value == 3
    assert values["mesh_threshold"].string_value == "None"
