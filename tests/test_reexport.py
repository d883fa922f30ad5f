"""``python -m sjc_jax export RUN_DIR``: a finished run's final/ written again from its grid."""

from __future__ import annotations

import json

import pytest
from test_cli import TINY_TESTBED, assert_one_line_error, run_cli

from sjc_jax import cli

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
# ffmpeg is spawned with fork+exec; JAX's at-fork warning does not apply.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("reexport") / "run"
    args = ["run", "--out", str(out), *TINY_TESTBED, "--grid-resolution", "16"]
    assert cli.main(args) == 0
    return out


def test_a_run_writes_its_mesh_rule_and_evaluation_to_tensorboard(finished):
    mesh = json.loads((finished / "final" / "mesh.json").read_text())
    assert mesh["rule"] == "silhouette" or mesh["faces"] == 0
    evaluation = json.loads((finished / "final" / "eval.json").read_text())
    assert evaluation["mesh"]["level"] == mesh["level"]
    events = event_accumulator.EventAccumulator(str(finished / "tensorboard"))
    tags = events.Reload().Tags()["scalars"]
    assert {"eval/psnr", "eval/iou", "eval/mesh/level", "eval/mesh/faces"} <= set(tags)
    assert [e.step for e in events.Scalars("eval/psnr")] == [3]
    assert abs(events.Scalars("eval/psnr")[0].value - evaluation["psnr"]) < 1e-4
    assert (finished / "tensorboard" / "hparams").is_dir()


def test_export_writes_final_again_with_a_given_level(finished, capsys):
    config = (finished / "config.json").read_text()
    view = (finished / "final" / "view.png").read_bytes()
    before = json.loads((finished / "final" / "eval.json").read_text())
    (finished / "final" / "index.html").unlink()
    assert cli.main(["export", str(finished), "--mesh-threshold", "0.5"]) == 0
    summary = json.loads(capsys.readouterr().out)
    final = finished / "final"
    mesh = json.loads((final / "mesh.json").read_text())
    assert (mesh["rule"], mesh["level"]) == ("given", 0.5) and summary["mesh"] == mesh
    after = json.loads((final / "eval.json").read_text())
    assert after["mesh"]["level"] == 0.5 and after["psnr"] == before["psnr"]  # same grid
    assert (final / "view.png").read_bytes() == view  # the same grid renders the same view
    assert (final / "index.html").is_file() and (final / "turntable.mp4").is_file()
    assert (finished / "config.json").read_text() == config  # the run's own files untouched
    assert not [p for p in finished.iterdir() if p.name.startswith(("final.", ".lock"))]


@pytest.mark.parametrize(
    "args, match",
    [
        (["export", "{tmp}/nowhere"], "is not a run directory"),
        (["export", "{tmp}"], "has no config.json"),
        (["export", "{run}", "--mesh-threshold", "-1"], "must be a positive finite density"),
        (["export", "{run}", "--mesh-threshold", "x"], "invalid float value"),
    ],
)
def test_bad_input_is_one_line(finished, tmp_path, args, match):
    args = [a.format(tmp=tmp_path, run=finished) for a in args]
    assert_one_line_error(run_cli(*args), match=match)


def test_an_unfinished_run_is_refused(finished, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((finished / "config.json").read_text())
    assert_one_line_error(run_cli("export", str(unfinished)), match="has not finished")
