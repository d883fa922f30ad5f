"""Training the learned known-answer model: labelled renders of known scenes, an optax loop.

Data: each scene (a built-in testbed name or an RGB grid file) rendered from the SJC training
camera distribution of the testbed preset (fixed fov 55 deg, the held-out cameras' fov) over a
plain background colour (no textured world: that would tell the model the pose), with the view
label of each camera. Loss: the epsilon MSE of DDPM at a uniform timestep. Condition dropout:
with probability ``uncond_prob`` both tokens are the null tokens (the unconditional model of
classifier-free guidance), with ``view_drop_prob`` only the view token is (the scene alone:
a run without view augmentation). An exponential moving average of the weights is what is
saved.

The training directory (``--out``)::

    train_config.json   the settings (and the command) of the training
    train.jsonl         one line per ``log_every`` steps: step, loss (mean since the last), lr,
                        seconds; at a checkpoint inside a window, a line ``{"step", "window"}``
                        with the window's losses so far (a resume from that checkpoint goes
                        on with them, so its log is the uninterrupted one's)
    loss.png            the curves of train.jsonl (loss, lr; `export.save_metrics_plot`)
    checkpoints/        orbax checkpoints of the whole state (`sjc_jax.checkpoint`)
    model/              the trained model directory (`sjc_jax.learned.model`), EMA weights
    .lock               the directory's lock while a training writes into it

Around the steps this is `sjc_jax.engine`, as for ``run`` and ``sweep``: the lock, the memory
check, checkpoints and their validated restore, stop requests (exit 130 with the ``--resume``
command) and the full disk (one line, the last good checkpoint kept).

Resume is exact: every random draw of step s comes from ``fold_in(key(seed), s)`` and the
renders are deterministic, so a resumed training computes the same steps bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sjc_jax import engine, export, files, interrupts, resources, rundir
from sjc_jax.engine import NonFiniteError
from sjc_jax.learned.data import file_sha256, render_scenes
from sjc_jax.learned.model import (
    MODEL_PREDICTIONS,
    VIEW_TOKENS,
    Architecture,
    init_params,
    make_unet,
    save_model,
    token_context,
    unet_output,
)
from sjc_jax.rundir import RunError

Array = jax.Array

TRAIN_CONFIG = "train_config.json"
LOG = "train.jsonl"
CHECKPOINTS = "checkpoints"
MODEL = "model"
LOSS_PLOT = "loss.png"
LOSS_WEIGHTINGS = ("uniform", "min_snr", "clipped_snr")
ENTRIES = (TRAIN_CONFIG, LOG, CHECKPOINTS, MODEL, LOSS_PLOT)
# The key of a train.jsonl line holding the losses of a window still open at a checkpoint.
WINDOW = "window"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of a training (the defaults made the committed model; see the README)."""

    scenes: tuple[str, ...] = ("duck", "house", "robot", "mug")
    steps: int = 4000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    uncond_prob: float = 0.1
    view_drop_prob: float = 0.1
    views_per_scene: int = 1000
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50
    architecture: Architecture = Architecture()
    # What the UNet predicts ("epsilon" or "v_prediction") and how the loss weighs timesteps
    # (`loss_weight`); docs/learned.md has the measurements behind the defaults.
    prediction_type: str = "v_prediction"
    loss_weighting: str = "clipped_snr"
    snr_gamma: float = 5.0

    def __post_init__(self):
        for name in ("steps", "batch_size", "views_per_scene", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.scenes:
            raise ValueError("scenes must name at least one scene")
        for name in ("uncond_prob", "view_drop_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1]")
        if self.uncond_prob + self.view_drop_prob > 1.0:
            raise ValueError("uncond_prob + view_drop_prob must be at most 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise ValueError(f"lr must be positive, got {self.lr}")
        if len(self.background) != 3:
            raise ValueError(f"background must be 3 numbers (RGB), got {self.background}")
        scene_names(self.scenes)  # unique names
        if self.prediction_type not in MODEL_PREDICTIONS:
            raise ValueError(
                f"prediction_type must be one of {MODEL_PREDICTIONS}, got {self.prediction_type!r}"
            )
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(
                f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}"
            )
        if not (self.snr_gamma > 0 and np.isfinite(self.snr_gamma)):
            raise ValueError(f"snr_gamma must be positive, got {self.snr_gamma}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        values = dict(values)
        values["scenes"] = tuple(values["scenes"])
        values["background"] = tuple(values["background"])
        values["architecture"] = Architecture.from_dict(values["architecture"])
        # Trainings recorded before these fields existed were epsilon MSE at uniform weight.
        values.setdefault("prediction_type", "epsilon")
        values.setdefault("loss_weighting", "uniform")
        return cls(**values)


def scene_names(specs: Sequence[str]) -> list[str]:
    """The token name of each scene spec: a built-in name as is, a grid file by its stem."""
    names = [Path(s).stem if str(s).endswith(".npz") else str(s) for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"scenes must have distinct names; {', '.join(dupes)} repeats")
    return names


def scene_records(specs: Sequence[str]) -> list[dict[str, Any]]:
    """``{"name", "source"[, "sha256"]}`` of each scene (what the model dir records)."""
    records = []
    for name, spec in zip(scene_names(specs), specs, strict=True):
        record = {"name": name, "source": str(spec)}
        if str(spec).endswith(".npz"):
            record["source"] = os.path.abspath(spec)
            record["sha256"] = file_sha256(spec)
        records.append(record)
    return records


def render_training_set(
    config: TrainConfig, *, log: Callable[[str], None] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images [M, H, W, 3], scene ids [M], view labels [M])`` of ``config``'s scenes
    (`sjc_jax.learned.data.render_scenes` with its settings)."""
    return render_scenes(
        config.scenes,
        views_per_scene=config.views_per_scene,
        image_size=config.architecture.image_size,
        background=config.background,
        seed=config.seed,
        log=log,
    )


def alphas_cumprod(sigmas: np.ndarray) -> np.ndarray:
    """DDPM's ``abar_t = 1 / (1 + sigma_t^2)`` of a VE table."""
    return (1.0 / (1.0 + np.square(np.asarray(sigmas, np.float64)))).astype(np.float32)


def prediction_target(prediction_type: str, images: Array, eps: Array, abar: Array) -> Array:
    """What the UNet learns to output for ``x = sqrt(abar) images + sqrt(1 - abar) eps``.

    ``images, eps [B, H, W, 3]``, ``abar`` broadcastable to them. ``"epsilon"``: eps;
    ``"v_prediction"``: ``v = sqrt(abar) eps - sqrt(1 - abar) images`` (Salimans & Ho 2022).
    """
    if prediction_type == "epsilon":
        return eps
    return jnp.sqrt(abar) * eps - jnp.sqrt(1.0 - abar) * images


def loss_weight(config: TrainConfig, abar: Array) -> Array:
    """The weight ``[B]`` of each image's prediction MSE at ``abar [B]``.

    In terms of the error of the clean image (the denoiser's error), the plain MSE
    (``"uniform"``) weighs it by SNR (epsilon) or SNR + 1 (v), ``SNR = abar / (1 - abar)``.
    ``"min_snr"`` makes that ``min(SNR, gamma)`` (Min-SNR, Hang et al. 2023): no level with a
    large SNR dominates, but the levels of SNR << 1 get almost no weight. ``"clipped_snr"``
    makes it ``clip(SNR, 1, gamma)``: Min-SNR's cap with the floor of 1 of Salimans & Ho's
    truncated SNR, so the top of the table keeps the weight v's plain MSE gives it.
    """
    if config.loss_weighting == "uniform":
        return jnp.ones_like(abar)
    snr = abar / (1.0 - abar)
    plain = snr if config.prediction_type == "epsilon" else snr + 1.0
    target = jnp.minimum(snr, config.snr_gamma)
    if config.loss_weighting == "clipped_snr":
        target = jnp.maximum(target, 1.0)
    return target / plain


def lr_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warm-up (at most half the steps) then cosine decay to 10 % of ``lr``."""
    warmup = min(config.warmup_steps, config.steps // 2)
    return optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, config.steps, config.lr * 0.1)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Adam on `lr_schedule`, gradients clipped at global norm 1."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr_schedule(config)))


def init_train_state(config: TrainConfig) -> dict[str, Any]:
    """``{"params", "ema", "opt_state", "step"}`` of a fresh training."""
    params = init_params(
        jax.random.fold_in(jax.random.key(config.seed), 10_000),
        config.architecture,
        len(config.scenes),
    )
    return {
        "params": params,
        "ema": jax.tree.map(jnp.copy, params),
        "opt_state": make_optimizer(config).init(params),
        "step": jnp.zeros((), jnp.int32),
    }


@functools.lru_cache(maxsize=4)
def make_train_step(config: TrainConfig):
    """The jitted ``(state, data) -> (state, loss)`` (state donated); one per config.

    ``data = {"images" [M, H, W, 3], "scene" [M], "view" [M]}`` lives on the device; the batch,
    timesteps, noise and dropout of step s come from ``fold_in(key(seed), s)``.
    """
    from sjc_jax.diffusion.schedule import sigmas_from_scheduler_config
    from sjc_jax.learned.model import SCHEDULER_CONFIG

    unet = make_unet(config.architecture)
    optimizer = make_optimizer(config)
    abar = jnp.asarray(alphas_cumprod(sigmas_from_scheduler_config(SCHEDULER_CONFIG)))
    num_t = int(abar.shape[0])
    patch = config.architecture.patch
    null_scene, null_view = len(config.scenes), len(VIEW_TOKENS)
    base_key = jax.random.key(config.seed)

    def loss_fn(params, images, scene, view, key):
        k_t, k_eps, k_drop = jax.random.split(key, 3)
        b = images.shape[0]
        t = jax.random.randint(k_t, (b,), 0, num_t)
        eps = jax.random.normal(k_eps, images.shape, jnp.float32)
        a = abar[t][:, None, None, None]
        x = jnp.sqrt(a) * images + jnp.sqrt(1.0 - a) * eps
        u = jax.random.uniform(k_drop, (b,))
        drop_both = u < config.uncond_prob
        drop_view = u < config.uncond_prob + config.view_drop_prob
        scene = jnp.where(drop_both, null_scene, scene)
        view = jnp.where(drop_view, null_view, view)
        context = token_context(params["tokens"], scene, view)
        pred = unet_output(unet, params["unet"], x, t, context, patch=patch)
        target = prediction_target(config.prediction_type, images, eps, a)
        per_image = jnp.mean(jnp.square(pred - target), axis=(1, 2, 3))
        weight = loss_weight(config, abar[t])
        return jnp.mean(weight * per_image)

    def step(state, data):
        key = jax.random.fold_in(base_key, state["step"])
        k_batch, k_loss = jax.random.split(key)
        index = jax.random.randint(k_batch, (config.batch_size,), 0, data["images"].shape[0])
        loss, grads = jax.value_and_grad(loss_fn)(
            state["params"],
            data["images"][index],
            data["scene"][index],
            data["view"][index],
            k_loss,
        )
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        count = state["step"].astype(jnp.float32)
        decay = jnp.minimum(config.ema_decay, (1.0 + count) / (10.0 + count))
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params)
        new = {"params": params, "ema": ema, "opt_state": opt_state, "step": state["step"] + 1}
        return new, loss

    return jax.jit(step, donate_argnums=0)


def _storable(state: dict[str, Any]) -> dict[str, Any]:
    """The state with the optimiser's state as a dict of its leaves (optax's empty named tuples
    are not trees orbax can describe)."""
    leaves = jax.tree.leaves(state["opt_state"])
    return {**state, "opt_state": {f"{i:04d}": leaf for i, leaf in enumerate(leaves)}}


def _from_storable(like: dict[str, Any], stored: dict[str, Any]) -> dict[str, Any]:
    treedef = jax.tree.structure(like["opt_state"])
    leaves = [stored["opt_state"][k] for k in sorted(stored["opt_state"])]
    return {**stored, "opt_state": jax.tree.unflatten(treedef, leaves)}


def _check_out(out: Path, resume: bool, *, locked: bool = False) -> None:
    """``out`` can take a new training (missing or empty but for a lock) or holds one.

    ``locked``: this process holds ``out``'s lock (the check is repeated under it)."""
    if resume:
        if not (out / TRAIN_CONFIG).is_file():
            raise RunError(f"--resume {out}: not a training directory (no {TRAIN_CONFIG})")
    elif out.exists() and (not out.is_dir() or any(p.name != rundir.LOCK for p in out.iterdir())):
        raise RunError(f"--out {out} exists and is not empty; give a new directory or --resume")
    if not locked:
        rundir.check_free(out)


def check_before_training(config: TrainConfig, model_out: str | os.PathLike | None) -> None:
    """Refuse in one line, before anything is rendered or written, what would fail later.

    A ``model_out`` that exists and is not a model directory (`save_model` would refuse it only
    after the whole training), and a training set that cannot fit in the host's memory (the
    renders ``[scenes x views_per_scene, H, W, 3]`` float32 are held on the host and on the
    device at once; `engine.check_memory`).

    Raises:
      ValueError: one line.
    """
    from sjc_jax.learned.model import is_model_dir

    if model_out is not None:
        path = Path(model_out).expanduser()
        if path.exists() and not is_model_dir(path):
            raise ValueError(
                f"--model-out {path} exists and is not a model directory; refusing to replace it"
            )
    size = config.architecture.image_size
    needed = 2 * len(config.scenes) * config.views_per_scene * size * size * 3 * 4
    engine.check_memory(
        resources.MemoryEstimate(state=0, step=0, build=needed),
        refusal=lambda needed, available: (
            f"the training set needs {needed / 2**30:.1f} GiB ({len(config.scenes)} scenes x "
            f"{config.views_per_scene} views at {size} x {size}) but "
            f"{available / 2**30:.1f} GiB is available; lower --views-per-scene"
        ),
    )


def _plot_loss(out: Path, history: list[dict[str, Any]]) -> None:
    """loss.png of the records so far (none yet before the first ``log_every`` steps)."""
    if history:
        export.save_metrics_plot(out / LOSS_PLOT, history, keys=("loss", "lr"))


def _planned_config(
    config: TrainConfig | None, out: Path, *, resume: bool, steps: int | None, command: str | None
) -> tuple[TrainConfig, str | None]:
    """The training's config and command (a resume's from ``out``); checks, writes nothing."""
    _check_out(out, resume)
    if resume:
        try:
            saved = json.loads((out / TRAIN_CONFIG).read_text())
            config = TrainConfig.from_dict(saved["config"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise RunError(f"cannot read {str(out / TRAIN_CONFIG)!r}: {err}") from None
        command = command or saved.get("command")
        if steps is not None:
            config = dataclasses.replace(config, steps=steps)
    elif config is None:
        raise ValueError("train needs a config (or resume)")
    return config, command


def train(
    config: TrainConfig | None,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    steps: int | None = None,
    model_out: str | os.PathLike | None = None,
    command: str | None = None,
    progress: bool = True,
    stop: interrupts.StopRequest | None = None,
    stop_after: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train (or resume training) into ``out``; returns a summary dict.

    Everything around the steps is `sjc_jax.engine`'s, as for a run: the checks, the memory
    check and the training set's renders before anything is written (Ctrl-C there stops at
    once), the directory's lock, checkpoints and their validated restore, stop requests and the
    full disk.

    Args:
      config: the settings (None with ``resume``: the directory's own).
      out: the training directory (module docstring); new or empty unless ``resume``.
      resume: continue from the newest usable checkpoint of ``out``.
      steps: with ``resume``, extend the training to this many steps.
      model_out: where the model directory goes (default ``out/model``).
      command: the command line, recorded in the model.
      progress: show the progress (a tqdm bar on a terminal, plain lines elsewhere).
      stop: a `StopRequest` (its handlers installed by the caller); None installs SIGINT and
        SIGTERM handlers for the call. A request ends the step in flight, checkpoints it and
        raises `engine.Interrupted`.
      stop_after: end after this many steps of this call (checkpointed; for tests).
      log: receives progress lines (and, on resume, the step it resumed at).

    Raises:
      RunError: the directory or settings are unsuitable (nothing was written), or
        `engine.Interrupted`, `engine.NonFiniteError`, `engine.DiskFullError` (resumable).
      ValueError: a bad scene (nothing was written).
    """
    out = Path(out)
    with interrupts.handling(stop) as stop:

        def plan() -> tuple:
            from sjc_jax.testbed import load_scene
            from sjc_jax.testbed.scenes import list_scenes

            planned, cmd = _planned_config(config, out, resume=resume, steps=steps, command=command)
            for spec in planned.scenes:  # an unknown scene or missing file is one line
                if spec not in list_scenes():
                    load_scene(spec)
            check_before_training(planned, model_out)
            records = scene_records(planned.scenes)
            t0 = time.perf_counter()
            training_set = render_training_set(planned, log=log)
            return planned, cmd, records, training_set, time.perf_counter() - t0

        config, command, records, training_set, render_seconds = engine.prepare(
            plan, stop, out, resume=resume, command="train-model"
        )
        with engine.owned(
            out, ckpt_dir=out / CHECKPOINTS, marker=TRAIN_CONFIG, command="train-model"
        ):
            # Checked again under the lock: another training may have started here meanwhile.
            _check_out(out, resume, locked=True)
            return _train_locked(
                config,
                out,
                resume=resume,
                model_out=Path(model_out) if model_out is not None else out / MODEL,
                command=command,
                records=records,
                training_set=training_set,
                render_seconds=render_seconds,
                progress=progress,
                stop=stop,
                stop_after=stop_after,
                log=log,
            )


def _train_locked(
    config: TrainConfig,
    out: Path,
    *,
    resume: bool,
    model_out: Path,
    command: str | None,
    records: list[dict[str, Any]],
    training_set: tuple[np.ndarray, np.ndarray, np.ndarray],
    render_seconds: float,
    progress: bool,
    stop: interrupts.StopRequest,
    stop_after: int | None,
    log: Callable[[str], None] | None,
) -> dict[str, Any]:
    """`train` once the directory is validated and locked."""
    files.write_json(out / TRAIN_CONFIG, {"config": config.to_dict(), "command": command})
    images, scene_ids, views = training_set
    data = {
        "images": jnp.asarray(images),
        "scene": jnp.asarray(scene_ids),
        "view": jnp.asarray(views),
    }
    state = init_train_state(config)
    checkpoints = engine.Checkpoints(
        out / CHECKPOINTS,
        keep=2,
        step_of=lambda state: int(state["step"]),
        finite_part=lambda state: state["params"],
        to_disk=_storable,
        from_disk=_from_storable,
    )
    if resume:
        state = checkpoints.restore(state)
        if log is not None:
            log(engine.resumed_line(int(state["step"])))
    start = int(state["step"])
    log_path = out / LOG
    rundir.truncate_metrics(log_path, start)  # the records after the restored step go
    logged = rundir.read_metrics(log_path)
    history = [record for record in logged if WINDOW not in record]
    # The losses of the window open at the restored step (its mean is logged when it closes);
    # taken back into the loop, the line goes.
    losses: list[float] = []
    if logged and logged[-1]["step"] == start and WINDOW in logged[-1]:
        losses = [float(loss) for loss in logged[-1][WINDOW]]
        rundir.truncate_metrics(log_path, start - 1)
    train_step = make_train_step(config)

    def step_fn(state, data):
        state, loss = train_step(state, data)
        return state, {"loss": loss}

    end = config.steps if stop_after is None else min(config.steps, start + stop_after)
    schedule = lr_schedule(config)
    bar = engine.progress(total=config.steps, initial=start, desc="train-model", enabled=progress)
    t_loop = time.perf_counter()

    def save(state) -> None:
        if losses:  # before the checkpoint: a resume from it finds them
            log_file.write(json.dumps({"step": int(state["step"]), WINDOW: losses}) + "\n")
            log_file.flush()
        checkpoints.save(state)
        _plot_loss(out, history)

    try:
        with (
            engine.stopping(stop, out, "train-model"),
            checkpoints,
            open(log_path, "a") as log_file,
        ):

            def on_metrics(fetched: list[dict[str, Any]]) -> None:
                for record in fetched:
                    losses.append(record["loss"])
                    step = record["step"]
                    if step % config.log_every and step != config.steps:
                        continue
                    mean = float(np.mean(np.asarray(losses, np.float32)))
                    losses.clear()
                    if not np.isfinite(mean):
                        raise NonFiniteError(
                            f"the training loss became {mean} at step {step}; "
                            f"{checkpoints.last_good()} (lower --lr)"
                        )
                    line = {
                        "step": step,
                        "loss": mean,
                        "lr": float(schedule(step - 1)),
                        "seconds": round(time.perf_counter() - t_loop, 3),
                    }
                    log_file.write(json.dumps(line) + "\n")
                    log_file.flush()
                    history.append(line)
                    bar.set_postfix(loss=f"{mean:.4f}")

            state = engine.run_loop(
                step_fn,
                state,
                data,
                end=end,
                log_every=config.log_every,
                checkpoint_every=config.checkpoint_every,
                save=save,
                on_metrics=on_metrics,
                bar=bar,
                should_stop=lambda: stop.requested,
                start=start,
            )
    finally:
        bar.close()
    step = int(state["step"])
    loop_seconds = time.perf_counter() - t_loop
    summary = {
        "steps": step,
        "out": str(out),
        "render_seconds": round(render_seconds, 1),
        "train_seconds": round(loop_seconds, 1),
        "final_loss": history[-1]["loss"] if history else None,
        **({"resumed_from": start} if resume else {}),
    }
    if step < config.steps:
        return {**summary, "finished": False}
    ema = jax.tree.map(np.asarray, state["ema"])
    training = {
        "command": command,
        "seed": config.seed,
        "steps": config.steps,
        "config": config.to_dict(),
        "images": int(images.shape[0]),
        "final_loss": summary["final_loss"],
    }
    save_model(
        model_out,
        architecture=config.architecture,
        params=ema,
        scenes=records,
        background=config.background,
        training=training,
        prediction_type=config.prediction_type,
    )
    return {**summary, "model": str(model_out), "finished": True}
