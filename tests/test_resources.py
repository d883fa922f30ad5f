"""The memory estimate against XLA's own accounting of the compiled step, and the refusal."""

import jax
import numpy as np
import pytest

from sjc_jax import resources, sjc, testbed
from sjc_jax.testbed.core import make_denoiser


def _testbed(resolution, size, views):
    config = testbed.testbed_config(
        grid_resolution=resolution, image_size=size, testbed_views=8, views_per_step=views
    )
    images = np.random.default_rng(0).uniform(size=(8, size, size, 3)).astype(np.float32)
    denoiser = make_denoiser(images, np.arange(8) % 4, config)
    return config, denoiser


@pytest.mark.parametrize("resolution, size, views", [(24, 8, 1), (16, 16, 2)])
def test_estimate_brackets_xla_memory_analysis(resolution, size, views):
    """Within a factor 2 of the compiled step's arguments + temporaries (an independent
    measure), for a grid-dominated and a render-dominated step."""
    config, denoiser = _testbed(resolution, size, views)
    background = np.zeros((4, 4, 3), np.float32)
    shapes = jax.eval_shape(lambda: sjc.init_state(config, 3, background=background))
    compiled = sjc.make_step(config, denoiser).lower(shapes, denoiser.params).compile()
    analysis = compiled.memory_analysis()
    params = resources.tree_bytes(denoiser.params)
    measured = analysis.argument_size_in_bytes - params + analysis.temp_size_in_bytes
    estimate = resources.estimate(config, shapes, channels=3, image_size=size)
    assert estimate.state == resources.tree_bytes(shapes)
    assert 0.5 * measured <= estimate.total <= 2.0 * measured, (estimate, measured)


def test_refusal_is_one_line_naming_the_flags():
    needed = resources.MemoryEstimate(state=2000**3 * 4 * 3 * 4, step=10**9)
    with pytest.raises(ValueError) as err:
        resources.check_fits(needed, available=2**34, resolution=2000, where="host")
    message = str(err.value)
    assert "\n" not in message and "--grid-resolution 2000" in message
    assert "357.6 GiB" in message and "16.0 GiB is available" in message
    resources.check_fits(needed, available=None, resolution=2000, where="host")  # unknown


def test_available_memory_is_known_on_linux():
    available = resources.available_bytes()
    if jax.devices()[0].platform == "cpu" and not __import__("os").path.exists("/proc/meminfo"):
        pytest.skip("no /proc/meminfo")
    assert available is not None and available > 2**20
