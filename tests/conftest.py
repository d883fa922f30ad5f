import os

# Tests never download: huggingface_hub reads this when first imported (below this line).
os.environ["HF_HUB_OFFLINE"] = "1"

# Command-line runs started by tests never write the user's compilation cache (the tests that
# need one give their own directory). Measured: a session-wide cache made the suite slower
# (541 s vs 506 s idle, same tests): writing executables costs more than tests share.
os.environ["SJC_JAX_COMPILE_CACHE"] = "0"

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _converted_weights_cache(tmp_path_factory):
    """Converted PyTorch weights are cached in a temporary directory, never in the user's."""
    os.environ["SJC_JAX_CACHE"] = str(tmp_path_factory.mktemp("sjc_jax_cache"))


@pytest.fixture(scope="session")
def tiny_sd_eps(tmp_path_factory):
    """A tiny random Flax SD pipeline (epsilon prediction) on disk."""
    from sjc_jax.diffusion.tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd_eps"), seed=0)


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory):
    """The same weights as `tiny_sd_eps`, declared v-prediction."""
    from sjc_jax.diffusion.tiny import write_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny_sd_v")
    return write_tiny_pipeline(path, seed=0, prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sd_torch(tmp_path_factory):
    """A tiny random SD pipeline with PyTorch safetensors only (skipped without torch)."""
    pytest.importorskip("torch")
    from sjc_jax.diffusion.tiny import write_tiny_pipeline

    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd_torch"), seed=0, torch_only=True)
