"""The learned known-answer model: its directory, its denoiser, its training, a lift with it."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sjc_jax import models, rundir
from sjc_jax.diffusion.denoiser import NEGATIVE, UNCONDITIONAL, vp_coefficients
from sjc_jax.diffusion.tiny import _random_params
from sjc_jax.learned import model as lm
from sjc_jax.learned import train as lt

# Two levels, patch 2, attention at the lowest: exercises every block kind and the renames.
TINY = lm.Architecture(
    image_size=16, patch=2, block_out_channels=(32, 32), attention_levels=1, token_dim=32
)
SCENES = [{"name": "duck", "source": "duck"}, {"name": "mug", "source": "mug"}]


def _random_model_params(architecture: lm.Architecture, num_scenes: int, seed: int = 0):
    unet = lm.make_unet(architecture)
    shapes = jax.eval_shape(unet.init_weights, jax.random.key(0))
    rng = np.random.default_rng(seed + 100)
    d = architecture.token_dim
    return {
        "unet": _random_params(shapes, seed),
        "tokens": {
            "scene": rng.standard_normal((num_scenes + 1, d)).astype(np.float32),
            "view": rng.standard_normal((len(lm.VIEW_TOKENS) + 1, d)).astype(np.float32),
        },
    }


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("learned") / "model"
    params = _random_model_params(TINY, len(SCENES))
    lm.save_model(
        path,
        architecture=TINY,
        params=params,
        scenes=SCENES,
        background=(1, 1, 1),
        training={"command": "test"},
    )
    return path, params


def test_patchify_is_inverted_by_unpatchify():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    folded = lm.patchify(x, 2)
    assert folded.shape == (2, 4, 4, 12)
    np.testing.assert_array_equal(folded[0, 1, 2, 3:6], x[0, 2, 5])  # (i, j) = (0, 1)
    np.testing.assert_array_equal(lm.unpatchify(folded, 2), x)


def test_model_dir_loads_through_the_model_kind(tiny_dir):
    path, params = tiny_dir
    assert lm.is_model_dir(path) and not lm.is_model_dir(path / "unet")
    assert models.kind_of(str(path)).name == "learned"
    assert models.kind_of("learned").name == "learned"
    model = lm.load_model(path)
    assert model.scenes == ("duck", "mug")
    from flax.traverse_util import flatten_dict

    saved, loaded = flatten_dict(params["unet"]), flatten_dict(model.unet_params)
    assert saved.keys() == loaded.keys()
    for key in saved:
        np.testing.assert_array_equal(np.asarray(loaded[key]), saved[key])
    np.testing.assert_array_equal(np.asarray(model.tokens["scene"]), params["tokens"]["scene"])
    config = json.loads((path / "unet" / "config.json").read_text())
    assert config["in_channels"] == 12 and config["sample_size"] == 8


def test_unknown_prompt_and_broken_dir_are_one_line(tiny_dir, tmp_path):
    path, _ = tiny_dir
    model = lm.load_model(path)
    with pytest.raises(ValueError, match="knows the scenes duck, mug"):
        lm.make_denoiser(model, "teapot")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / lm.MARKER).write_text(json.dumps({"kind": lm.KIND, "format": lm.FORMAT}))
    with pytest.raises(ValueError, match="lacks scheduler") as err:
        lm.load_model(broken)
    assert "\n" not in str(err.value)


def test_torch_unet_computes_the_same_function(tiny_dir):
    """diffusers' torch UNet2DConditionModel reads the saved weights and agrees."""
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel

    path, _ = tiny_dir
    model = lm.load_model(path)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 16, 16, 3)).astype(np.float32)
    t = np.array([5, 300, 900])
    context = rng.standard_normal((3, 2, 32)).astype(np.float32)
    ours = lm.unet_output(
        model.unet,
        model.unet_params,
        jnp.asarray(x),
        jnp.asarray(t),
        jnp.asarray(context),
        patch=2,
    )
    reference = UNet2DConditionModel.from_pretrained(path / "unet").eval()
    folded = np.asarray(lm.patchify(jnp.asarray(x), 2)).transpose(0, 3, 1, 2)
    with torch.no_grad():
        out = reference(
            torch.from_numpy(folded.copy()), torch.from_numpy(t), torch.from_numpy(context)
        )
    theirs = lm.unpatchify(jnp.asarray(out.sample.numpy().transpose(0, 2, 3, 1)), 2)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoiser_equals_diffusers_torch_unet_and_scheduler(tmp_path, prediction_type):
    """D of a saved model equals diffusers' torch UNet followed by its DDPMScheduler's own
    conversion to the clean sample (``pred_original_sample``), on the same weights."""
    torch = pytest.importorskip("torch")
    from diffusers import DDPMScheduler, UNet2DConditionModel

    params = _random_model_params(TINY, len(SCENES), seed=3)
    path = tmp_path / "model"
    lm.save_model(
        path,
        architecture=TINY,
        params=params,
        scenes=SCENES,
        background=(1, 1, 1),
        training={"command": "test"},
        prediction_type=prediction_type,
    )
    model = lm.load_model(path)
    assert model.prediction_type == prediction_type
    denoiser = lm.make_denoiser(model, "duck")
    t = np.array([20, 450, 900])
    sigma = model.sigmas[t]
    y = np.random.default_rng(4).uniform(size=(3, 16, 16, 3)).astype(np.float32)
    z = y + sigma[:, None, None, None] * np.random.default_rng(5).standard_normal(y.shape)
    labels = np.array([0, 1, 3])
    ours = denoiser.apply(denoiser.params, jnp.asarray(z), jnp.asarray(sigma), jnp.asarray(labels))

    unet = UNet2DConditionModel.from_pretrained(path / "unet").eval()
    scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
    assert scheduler.config.prediction_type == prediction_type
    x = (z / np.sqrt(1.0 + np.square(sigma))[:, None, None, None]).astype(np.float32)
    context = np.asarray(denoiser.params["cond"])[labels]
    folded = np.asarray(lm.patchify(jnp.asarray(x), 2)).transpose(0, 3, 1, 2)
    with torch.no_grad():
        out = unet(torch.from_numpy(folded.copy()), torch.from_numpy(t), torch.from_numpy(context))
    output = np.asarray(lm.unpatchify(jnp.asarray(out.sample.numpy().transpose(0, 2, 3, 1)), 2))
    theirs = []
    for i in range(3):
        step = scheduler.step(
            torch.from_numpy(output[i : i + 1].transpose(0, 3, 1, 2).copy()),
            int(t[i]),
            torch.from_numpy(x[i : i + 1].transpose(0, 3, 1, 2).copy()),
        )
        theirs.append(step.pred_original_sample.numpy().transpose(0, 2, 3, 1)[0])
    np.testing.assert_allclose(np.asarray(ours), np.stack(theirs), atol=5e-5 * (1 + sigma.max()))


def test_loss_weights_and_targets_match_their_formulas():
    abar = jnp.array([0.999, 0.5, 0.01])
    snr = np.asarray(abar) / (1 - np.asarray(abar))
    images = jnp.full((3, 1, 1, 1), 0.25)
    eps = jnp.full((3, 1, 1, 1), -2.0)
    a = abar[:, None, None, None]
    for prediction, plain in (("epsilon", snr), ("v_prediction", snr + 1)):
        config = lt.TrainConfig(prediction_type=prediction, loss_weighting="min_snr", snr_gamma=5)
        np.testing.assert_allclose(lt.loss_weight(config, abar), np.minimum(snr, 5) / plain, 1e-6)
        clipped = lt.TrainConfig(prediction_type=prediction, loss_weighting="clipped_snr")
        np.testing.assert_allclose(
            lt.loss_weight(clipped, abar), np.clip(snr, 1, 5) / plain, rtol=1e-6
        )
        uniform = lt.TrainConfig(prediction_type=prediction, loss_weighting="uniform")
        np.testing.assert_array_equal(lt.loss_weight(uniform, abar), np.ones(3))
    np.testing.assert_array_equal(lt.prediction_target("epsilon", images, eps, a), eps)
    v = np.sqrt(np.asarray(abar)) * -2.0 - np.sqrt(1 - np.asarray(abar)) * 0.25
    np.testing.assert_allclose(
        lt.prediction_target("v_prediction", images, eps, a)[:, 0, 0, 0], v, rtol=1e-6
    )
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        lt.TrainConfig(prediction_type="sample")
    with pytest.raises(ValueError, match="loss_weighting must be one of"):
        lt.TrainConfig(loss_weighting="snr")
    # A training recorded before these settings existed resumes as what it was.
    old = lt.TrainConfig().to_dict()
    del old["prediction_type"], old["loss_weighting"]
    restored = lt.TrainConfig.from_dict(old)
    assert (restored.prediction_type, restored.loss_weighting) == ("epsilon", "uniform")


def test_exact_twin_is_the_posterior_mean_of_the_training_renders(tiny_dir):
    """The exact denoiser of a learned model: its scene's renders of the view label for a
    condition, every scene's renders for the unconditional prediction (the null tokens')."""
    from sjc_jax import learned
    from sjc_jax.diffusion.denoiser import UNCONDITIONAL

    path, _ = tiny_dir
    model = lm.load_model(path)
    rng = np.random.default_rng(6)
    images = rng.uniform(size=(12, 16, 16, 3)).astype(np.float32)
    scene_ids = np.array([0, 1] * 6)
    views = np.array([0, 0, 1, 1, 2, 2, 3, 3, 0, 1, 2, 3])
    config = learned.learned_config(model=str(path), prompt="mug")
    den = learned.exact_denoiser(model, "mug", config, training_set=(images, scene_ids, views))
    z = jnp.asarray(rng.uniform(size=(2, 16, 16, 3)).astype(np.float32))
    sigma = jnp.full((2,), 0.5)
    d = np.asarray(den.apply(den.params, z, sigma, jnp.array([0, UNCONDITIONAL])))

    def posterior_mean(zi, subset):
        y = images[subset].astype(np.float64)
        logits = -np.sum(np.square(np.asarray(zi, np.float64) - y), axis=(1, 2, 3)) / (2 * 0.25)
        w = np.exp(logits - logits.max())
        return np.tensordot(w / w.sum(), y, axes=1)

    mug_front = (scene_ids == 1) & (views == 0)
    np.testing.assert_allclose(d[0], posterior_mean(z[0], mug_front), atol=1e-5)
    np.testing.assert_allclose(d[1], posterior_mean(z[1], np.ones(12, bool)), atol=1e-5)


def test_halves_and_guidance_match_a_hand_computation(tiny_dir):
    from sjc_jax import estimators

    path, params = tiny_dir
    model = lm.load_model(path)
    denoiser = lm.make_denoiser(model, "mug")
    z = jax.random.uniform(jax.random.key(2), (4, 16, 16, 3))
    sigma = jnp.asarray(model.sigmas[np.array([30, 100, 400, 999])])
    labels = jnp.array([0, 2, UNCONDITIONAL, NEGATIVE])
    d = denoiser.apply(denoiser.params, z, sigma, labels)

    scene, view = params["tokens"]["scene"], params["tokens"]["view"]
    contexts = np.stack(
        [
            np.stack([scene[1], view[0]]),  # mug, front
            np.stack([scene[1], view[2]]),  # mug, back
            np.stack([scene[2], view[4]]),  # null scene, null view
            np.stack([scene[2], view[4]]),  # the negative is the unconditional
        ]
    )
    x = z * vp_coefficients(sigma)[0][:, None, None, None]
    t = jnp.array([30, 100, 400, 999])
    eps = lm.unet_output(model.unet, model.unet_params, x, t, jnp.asarray(contexts), patch=2)
    expected = z - sigma[:, None, None, None] * eps
    np.testing.assert_allclose(np.asarray(d), np.asarray(expected), atol=1e-5)

    # Guidance: the estimators' combination (one call of both halves) equals the hand formula.
    w = 7.5
    guided = estimators.guided(denoiser, denoiser.params, z[None, :2], sigma[:2], labels[:2], w)
    uncond = z[:2] - sigma[:2, None, None, None] * lm.unet_output(
        model.unet, model.unet_params, x[:2], t[:2], jnp.asarray(contexts[2:]), patch=2
    )
    hand = uncond + w * (expected[:2] - uncond)
    np.testing.assert_allclose(np.asarray(guided[0]), np.asarray(hand), atol=1e-4)

    # Without view augmentation every label is the scene alone (the null view token).
    plain = lm.make_denoiser(model, "mug", view_augmentation=False)
    np.testing.assert_array_equal(
        np.asarray(plain.params["cond"]), np.broadcast_to(np.stack([scene[1], view[4]]), (4, 2, 32))
    )


def test_janus_score_is_zero_for_the_truth_and_one_for_a_mirrored_front():
    from sjc_jax.testbed.core import janus_score, mirror_pairs
    from sjc_jax.testbed.scenes import heldout_cameras

    cameras, labels = heldout_cameras(image_size=8)
    pairs = mirror_pairs(cameras, labels)
    assert len(pairs) == int(np.sum(np.asarray(labels) == 2)) > 0
    truth = np.random.default_rng(0).uniform(size=(16, 8, 8, 3))
    assert janus_score(truth, truth, pairs)["janus"] == 0.0
    janus = truth.copy()
    for i, j in pairs:
        janus[i] = truth[j][:, ::-1]
    assert janus_score(janus, truth, pairs)["janus"] == pytest.approx(1.0)


def _train_config(**overrides):
    values = dict(
        scenes=("duck",),
        steps=16,
        batch_size=8,
        lr=3e-3,
        warmup_steps=2,
        views_per_scene=16,
        checkpoint_every=4,
        log_every=4,
        architecture=TINY,
    )
    return lt.TrainConfig(**{**values, **overrides})


def test_training_lowers_the_loss_and_resumes_exactly(tmp_path):
    config = _train_config()
    whole = lt.train(config, tmp_path / "whole", progress=False)
    log = rundir.read_metrics(tmp_path / "whole" / lt.LOG)
    assert [r["step"] for r in log] == [4, 8, 12, 16]
    assert log[-1]["loss"] < 0.8 * log[0]["loss"], log
    assert whole["finished"] and (tmp_path / "whole" / lt.LOSS_PLOT).is_file()

    part = lt.train(config, tmp_path / "part", progress=False, stop_after=6)
    assert not part["finished"] and not (tmp_path / "part" / lt.MODEL).exists()
    done = lt.train(None, tmp_path / "part", resume=True, progress=False)
    assert done["finished"]
    # Every loss mean is the uninterrupted run's, the window cut by the stop at step 6 too (its
    # losses were recorded with the checkpoint and taken back by the resume).
    resumed = rundir.read_metrics(tmp_path / "part" / lt.LOG)
    assert [r["step"] for r in resumed] == [4, 8, 12, 16]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in log]
    a = lm.load_model(tmp_path / "whole" / lt.MODEL)
    b = lm.load_model(tmp_path / "part" / lt.MODEL)
    for x, y in zip(jax.tree.leaves(a.unet_params), jax.tree.leaves(b.unet_params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(a.tokens["view"]), np.asarray(b.tokens["view"]))
    meta = json.loads((tmp_path / "part" / lt.MODEL / lm.MARKER).read_text())
    assert meta["scenes"] == [{"name": "duck", "source": "duck"}]
    assert meta["training"]["steps"] == 16


def test_training_refuses_a_used_directory_and_a_missing_scene_file(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        lt.train(_train_config(), tmp_path / "used", progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        lt.train(
            _train_config(scenes=("duck", str(tmp_path / "no.npz"))),
            tmp_path / "new",
            progress=False,
        )
    assert not (tmp_path / "new").exists()


def test_a_short_lift_with_the_committed_model_raises_psnr_and_iou():
    """The committed model (no training, no network) lifts the duck: clearly better than the
    starting grid after 80 steps, through the model kind's preset and the normal step."""
    from sjc_jax import learned, sjc

    config = learned.learned_config(prompt="duck", steps=80)
    model = models.build_model(config)
    state = sjc.init_state(config, 3, background=model.background)
    before = model.evaluate(state.grid)
    step = sjc.make_step(config, model.denoiser)
    for _ in range(config.run.steps):
        state, _ = step(state, model.denoiser.params)
    after = model.evaluate(state.grid)
    assert after["psnr"] > before["psnr"] + 3.0, (before["psnr"], after["psnr"])
    # Set from the v-prediction model under the first preset (IoU 0.298 -> 0.425 after the 80
    # steps); it holds under the sigmoid preset too.
    assert after["iou"] > before["iou"] + 0.08, (before["iou"], after["iou"])
    assert 0.0 <= after["janus"] <= 1.0


def test_train_model_command_line_errors_are_one_line(tmp_path, capsys):
    from sjc_jax import cli

    cases = [
        (["--out", str(tmp_path / "a"), "--scenes", "teapot"], "scene must be one of"),
        (["--out", str(tmp_path / "b"), "--background", "1,x,1"], "--background must be R,G,B"),
        (["--resume", str(tmp_path / "c"), "--scenes", "duck"], "only --steps can change"),
        (["--resume", str(tmp_path / "d")], "not a training directory"),
        ([], "train-model needs --out DIR"),
    ]
    for argv, match in cases:
        assert cli.main(["train-model", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and len(err.splitlines()) == 1, err
    assert not any(tmp_path.iterdir())


def test_exact_denoiser_flag_is_refused_for_other_kinds(tmp_path, capsys):
    from sjc_jax import cli

    out = tmp_path / "run"
    argv = ["run", "--model", "testbed", "--exact-denoiser", "--steps", "2", "--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--exact-denoiser applies to learned models" in err and len(err.splitlines()) == 1
    assert not out.exists()
