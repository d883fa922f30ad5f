"""Bad input, tried as a new user would: one line on stderr, exit 2, and nothing written.

The cases of issue 22's list (sizes past the memory check, validation that came after ``--out``
was created, grid files whose header lies, wrong types in a config file, train-model's flags,
names too long for the file system) through `sjc_jax.cli.main` at tiny sizes. "Nothing
written": the ``--out`` directory does not exist afterwards.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

from sjc_jax import cli
from sjc_jax.grid import init_grid
from sjc_jax.grid_io import save_grid_file

TINY = [
    "--model", "testbed", "--steps", "2", "--grid-resolution", "16", "--testbed-views", "8",
    "--video-frames", "2", "--testbed-eval-views", "1", "--num-previews", "1", "--no-progress",
]  # fmt: skip


def _one_line_exit_2(argv, capsys, match: str) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("sjc_jax: error:"), err
    assert match in err, err
    return err


def _grid_file(path: Path, **arrays) -> Path:
    grid = init_grid(jax.random.key(0), resolution=4, channels=3, background_resolution=2)
    save_grid_file(path, grid, feature_space="rgb")
    if arrays:
        with np.load(path) as data:
            values = {k: data[k] for k in data.files}
        values.update(arrays)
        np.savez(path, **values)
    return path


def _lying_grid_file(path: Path) -> Path:
    """A valid grid file whose density header claims a 40000^3 array (the file stays small)."""
    _grid_file(path)
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (40000, 40000, 40000)}
    )
    members["density.npy"] = header.getvalue() + bytes(4096)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


RUN_CASES = {
    "image size past memory": (["--image-size", "100000"], "the run needs at least"),
    "vanishing step ratio": (["--step-ratio", "1e-30"], "the run needs at least"),
    "a million noise samples": (["--noise-samples", "1000000"], "the run needs at least"),
    "grid past memory": (["--grid-resolution", "2000"], "the run needs at least"),
    "image set past memory": (["--testbed-views", "100000000"], "to build the model"),
    "t_max past the table": (["--t-max", "5000"], "t_max"),
    "t_max of 20 digits": (["--t-max", "99999999999999999999"], "t_max must be an integer"),
    "nfsd switch of 20 digits": (
        ["--estimator", "nfsd", "--nfsd-switch-timestep", "99999999999999999999"],
        "nfsd_switch_timestep must be an integer",
    ),
    "nfsd switch past the table": (
        ["--estimator", "nfsd", "--nfsd-switch-timestep", "5000"],
        "switch_timestep must lie in",
    ),
}


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_run_refuses_before_creating_out(case, tmp_path, capsys):
    flags, match = RUN_CASES[case]
    out = tmp_path / "out"
    _one_line_exit_2(["run", "--out", str(out), *TINY, *flags], capsys, match)
    assert not out.exists()


def test_bad_scene_files_are_refused_before_out(tmp_path, capsys):
    cases = {
        "lying header": (_lying_grid_file(tmp_path / "big.npz"), "claims shape (40000, 40000"),
        "text file": (tmp_path / "text.npz", "not an .npz archive"),
        "NaN density": (
            _grid_file(tmp_path / "nan.npz", density=np.full((4, 4, 4), np.nan, np.float32)),
            "non-finite",
        ),
    }
    (tmp_path / "text.npz").write_text("a plain text file\n")
    for name, (scene, match) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        _one_line_exit_2(["run", "--out", str(out), *TINY, "--scene", str(scene)], capsys, match)
        assert not out.exists(), name
        sweep = tmp_path / f"sweep-{name.replace(' ', '-')}"
        argv = ["sweep", "--out", str(sweep), *TINY, "--scenes", f"duck,{scene}"]
        _one_line_exit_2(argv, capsys, match)
        assert not sweep.exists(), name


@pytest.mark.parametrize(
    "values, match",
    [
        ({"model": {"model": 5}}, "config field 'model' (model) must be a string, got 5"),
        ({"model": {"model": None}}, "config field 'model' (model) must be a string, got null"),
        ({"model": {"prompt": ["a", "duck"]}}, "'prompt' (model) must be a string"),
        ({"run": {"steps": "30"}}, "'steps' (run) must be an integer"),
        ({"score": {"var_red": 1}}, "'var_red' (score) must be true or false"),
        ({"render": {"image_size": 1.5}}, "'image_size' (render) must be an integer or null"),
    ],
)
def test_wrong_types_in_a_config_file_name_the_field(values, match, tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    out = tmp_path / "out"
    _one_line_exit_2(["run", "--out", str(out), "--config", str(path)], capsys, match)
    assert not out.exists()
    sweep = tmp_path / "sweep"
    _one_line_exit_2(["sweep", "--out", str(sweep), "--config", str(path)], capsys, match)
    assert not sweep.exists()


def test_a_resumed_config_json_with_a_wrong_type_names_the_field(tmp_path, capsys):
    from sjc_jax import testbed

    out = tmp_path / "run"
    out.mkdir()
    config = testbed.testbed_config(steps=2).to_dict()
    config["optimizer"]["lr"] = "fast"
    (out / "config.json").write_text(json.dumps(config))
    _one_line_exit_2(["run", "--resume", str(out)], capsys, "'lr' (optimizer) must be a number")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_metrics_that_are_not_text_name_the_file(tmp_path):
    from sjc_jax import rundir

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n\xff\n')
    with pytest.raises(rundir.RunError, match="metrics.jsonl. is not UTF-8 text"):
        rundir.read_metrics(path)


def test_an_out_name_too_long_for_the_file_system_is_bad_input(tmp_path, capsys):
    out = tmp_path / ("x" * 300)
    _one_line_exit_2(["run", "--out", str(out), *TINY], capsys, "longer than 255 bytes")
    assert list(tmp_path.iterdir()) == []


def test_sweep_sizes_are_refused_before_out(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--out", str(out), *TINY]
    _one_line_exit_2([*argv, "--grid-resolution", "2000"], capsys, "the run needs at least")
    _one_line_exit_2([*argv, "--seeds", "0-30000000"], capsys, "more than 65536 seeds")
    _one_line_exit_2([*argv, "--scenes", "duck,nonexistent"], capsys, "scene must be one of")
    assert not out.exists()


def test_train_model_refuses_before_out(tmp_path, capsys):
    out = tmp_path / "train"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cases = [
        (["--views-per-scene", "100000000"], "the training set needs"),
        (["--background", "0.5,0.5,nan"], "--background must be numbers in [0, 1]"),
        (["--seed", "-1"], "--seed must lie in [0, 2**32)"),
        (["--model-out", str(foreign)], "is not a model directory"),
    ]
    for flags, match in cases:
        _one_line_exit_2(["train-model", "--out", str(out), *flags], capsys, match)
        assert not out.exists(), flags
    assert (foreign / "notes.txt").read_text() == "mine"


def test_a_learned_background_of_two_values_is_one_line():
    from sjc_jax.learned.data import plain_background

    with pytest.raises(ValueError, match="3 finite numbers"):
        plain_background([0.5, 0.5])


def test_train_model_checkpoints_before_its_first_log_line(tmp_path):
    """A checkpoint before the first ``log_every`` steps (no record yet) writes no loss plot
    and goes on (it ended the training with "records is empty" before)."""
    from sjc_jax.learned import model as lm
    from sjc_jax.learned import train as lt

    tiny = lm.Architecture(
        image_size=16, patch=2, block_out_channels=(32, 32), attention_levels=1, token_dim=32
    )
    config = lt.TrainConfig(
        scenes=("duck",), steps=2, batch_size=2, warmup_steps=1, views_per_scene=2,
        checkpoint_every=1, log_every=4, architecture=tiny,
    )  # fmt: skip
    summary = lt.train(config, tmp_path / "t", progress=False)
    assert summary["finished"] and (tmp_path / "t" / lt.LOSS_PLOT).is_file()
