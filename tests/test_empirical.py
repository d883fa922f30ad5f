"""Tests of the exact empirical denoiser against a brute-force float64 numpy reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from sjc_jax.diffusion.schedule import ddpm_sigmas
from sjc_jax.testbed.empirical import make_empirical_denoiser

M, H, C = 13, 6, 3


def reference_denoise(images, labels, z, sigma, label, num_labels=4):
    """Brute force in float64: softmax over the subset of -|z - y_i|^2 / (2 sigma^2)."""
    images = np.asarray(images, np.float64).reshape(len(images), -1)
    labels = np.asarray(labels)
    out = []
    for zb, sb, lb in zip(np.asarray(z, np.float64), sigma, label, strict=True):
        subset = labels == lb
        if not (0 <= lb < num_labels) or not subset.any():
            subset = np.ones_like(subset)
        y = images[subset]
        logits = -np.sum((zb.reshape(1, -1) - y) ** 2, axis=-1) / (2.0 * float(sb) ** 2)
        w = np.exp(logits - logits.max())
        out.append((w / w.sum()) @ y)
    return np.stack(out).reshape(np.shape(z))


def make_dataset():
    rng = np.random.default_rng(0)
    images = rng.uniform(0.0, 1.0, (M, H, H, C)).astype(np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 3], np.int32)  # label 3 has one image
    return images, labels


@pytest.fixture(scope="module")
def dataset():
    return make_dataset()


def noisy(images, labels, rng, sigma, label):
    """z = y + sigma n with y drawn from the label's subset."""
    idx = [rng.choice(np.flatnonzero(labels == lb)) for lb in label]
    return (images[idx] + sigma[:, None, None, None] * rng.normal(size=images[idx].shape)).astype(
        np.float32
    )


class MatchesReferenceTest(chex.TestCase):
    """jit and no-jit both match the float64 brute force, for chunk sizes that do and do not
    divide M, at levels from the table's bottom to its top, with mixed labels in one batch."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(1, 4, 5, 13, 100)
    def test_matches_float64_reference(self, chunk_size):
        images, labels = make_dataset()
        denoiser = make_empirical_denoiser(images, labels, chunk_size=chunk_size)
        apply = self.variant(denoiser.apply)
        rng = np.random.default_rng(1)
        label = np.array([0, 1, 2, 3, 0, 2], np.int32)
        for level in [0.05, 0.3, 1.0, 3.0, 14.6]:
            sigma = level * rng.uniform(0.8, 1.2, len(label)).astype(np.float32)
            z = noisy(images, labels, rng, sigma, label)
            got = apply(denoiser.params, jnp.asarray(z), jnp.asarray(sigma), jnp.asarray(label))
            chex.assert_shape(got, z.shape)
            chex.assert_type(got, jnp.float32)
            want = reference_denoise(images, labels, z, sigma, label)
            np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, err_msg=f"sigma {level}")


def test_matches_reference_on_random_z_with_mixed_sigmas(dataset):
    """z not near the set, several levels in one batch (logit gaps of order 1 exercise the sum)."""
    images, labels = dataset
    denoiser = make_empirical_denoiser(images, labels, chunk_size=3)
    rng = np.random.default_rng(2)
    label = np.array([0, 1, 2, 3, 1, 0], np.int32)
    sigma = np.array([0.4, 0.8, 1.6, 2.0, 5.0, 50.0], np.float32)
    z = rng.uniform(0.0, 1.0, (6, H, H, C)).astype(np.float32)
    got = jax.jit(denoiser.apply)(denoiser.params, z, sigma, label)
    want = reference_denoise(images, labels, z, sigma, label)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
    # The result is a genuine mixture here, not one image: the test can tell weights apart.
    dist = np.abs(want[0][None] - images[labels == 0]).max(axis=(1, 2, 3))
    assert dist.min() > 1e-2


def test_small_sigma_gives_nearest_image_of_subset(dataset):
    images, labels = dataset
    denoiser = make_empirical_denoiser(images, labels, chunk_size=4)
    rng = np.random.default_rng(3)
    label = np.array([0, 1, 2, 3], np.int32)
    z = rng.uniform(0.0, 1.0, (4, H, H, C)).astype(np.float32)
    for level in [1e-3, 1e-8, 1e-30, 0.0]:
        sigma = np.full(4, level, np.float32)
        got = np.asarray(denoiser.apply(denoiser.params, z, sigma, label))
        assert np.all(np.isfinite(got))
        for b, lb in enumerate(label):
            subset = images[labels == lb]
            nearest = subset[np.argmin(np.sum((subset - z[b]) ** 2, axis=(1, 2, 3)))]
            np.testing.assert_allclose(got[b], nearest, atol=1e-6)
            # ...which is not the nearest image of the whole set for at least one label.
    whole = np.argmin(np.sum((images[None] - z[:, None]) ** 2, axis=(2, 3, 4)), axis=1)
    assert np.any(labels[whole] != label)


def test_large_sigma_gives_subset_mean(dataset):
    images, labels = dataset
    denoiser = make_empirical_denoiser(images, labels, chunk_size=5)
    rng = np.random.default_rng(4)
    label = np.array([0, 1, 2, 3], np.int32)
    for level in [1e4, 1e8, 1e30, np.inf]:
        sigma = np.full(4, level, np.float32)
        z = rng.uniform(0.0, 1.0, (4, H, H, C)).astype(np.float32)
        got = np.asarray(denoiser.apply(denoiser.params, z, sigma, label))
        for b, lb in enumerate(label):
            np.testing.assert_allclose(got[b], images[labels == lb].mean(0), atol=1e-5)


def test_finite_for_extreme_inputs(dataset):
    images, labels = dataset
    denoiser = make_empirical_denoiser(images, labels, chunk_size=4)
    rng = np.random.default_rng(5)
    label = np.array([0, 1, 2, 3, 0, 1], np.int32)
    sigma = np.array([1e-20, 1e-6, 1e3, 1e6, 1e12, 1e-3], np.float32)
    z = noisy(images, labels, rng, np.minimum(sigma, 1e12), label)
    got = np.asarray(jax.jit(denoiser.apply)(denoiser.params, z, sigma, label))
    assert np.all(np.isfinite(got))
    assert got.min() >= -1e-5 and got.max() <= 1 + 1e-5  # a convex combination of the images


def test_empty_and_out_of_range_labels_use_whole_set(dataset):
    images, labels = dataset
    no_threes = labels != 3
    denoiser = make_empirical_denoiser(images[no_threes], labels[no_threes], chunk_size=5)
    rng = np.random.default_rng(6)
    z = rng.uniform(0.0, 1.0, (4, H, H, C)).astype(np.float32)
    sigma = np.full(4, 0.7, np.float32)
    label = np.array([3, -1, 4, 1000], np.int32)
    got = np.asarray(denoiser.apply(denoiser.params, z, sigma, label))
    want = reference_denoise(images[no_threes], labels[no_threes], z, sigma, label)
    np.testing.assert_allclose(got, want, atol=2e-5)
    whole = reference_denoise(images[no_threes], np.zeros(M - 1, np.int32), z, sigma, [0] * 4)
    np.testing.assert_allclose(got, whole, atol=2e-5)


def test_denoiser_fields_and_defaults(dataset):
    images, labels = dataset
    denoiser = make_empirical_denoiser(images, labels)
    assert denoiser.channels == C and denoiser.resolution == H
    assert denoiser.feature_space == "rgb"
    np.testing.assert_array_equal(denoiser.sigmas, ddpm_sigmas())
    decoded = np.asarray(denoiser.decode(jnp.asarray(images * 3 - 1)))
    assert decoded.min() == 0.0 and decoded.max() == 1.0
    # The set lives in params (passed to jit as arguments), not in the function's closure.
    leaves = jax.tree_util.tree_leaves(denoiser.params)
    assert sum(leaf.size for leaf in leaves) >= images.size
    assert denoiser.apply.__closure__ is None


def test_jit_compiles_once_for_new_params(dataset):
    images, labels = dataset
    first = make_empirical_denoiser(images, labels, chunk_size=4)
    second = make_empirical_denoiser(images[::-1].copy(), labels[::-1].copy(), chunk_size=4)
    apply = jax.jit(chex.assert_max_traces(first.apply, n=1))
    z = jnp.zeros((2, H, H, C))
    sigma = jnp.ones(2)
    label = jnp.array([0, 1], jnp.int32)
    out_first = apply(first.params, z, sigma, label)
    out_second = apply(second.params, z, sigma, label)  # same shapes: no retrace
    np.testing.assert_allclose(out_first, out_second, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"images": np.zeros((3, 4, 4))}, "images"),
        ({"images": np.zeros((3, 4, 5, 3))}, "square"),
        ({"images": np.full((3, 4, 4, 3), np.nan)}, "finite"),
        ({"labels": np.array([0, 1])}, "labels"),
        ({"labels": np.array([0, 1, 4])}, "labels"),
        ({"labels": np.array([0.0, 1.0, 2.0])}, "labels"),
        ({"num_labels": 0}, "num_labels"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"feature_space": "xyz"}, "feature_space"),
        ({"feature_space": "sd-latent"}, "C = 4"),
        ({"sigmas": np.array([2.0, 1.0])}, "sigmas"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"images": np.zeros((3, 4, 4, 3)), "labels": np.array([0, 1, 2])}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        make_empirical_denoiser(args.pop("images"), args.pop("labels"), **args)


def test_sd_latent_needs_decode():
    images = np.zeros((2, 4, 4, 4))
    with pytest.raises(ValueError, match="decode"):
        make_empirical_denoiser(images, [0, 1], feature_space="sd-latent")
    denoiser = make_empirical_denoiser(
        images, [0, 1], feature_space="sd-latent", decode=lambda x: x[..., :3]
    )
    assert denoiser.channels == 4 and denoiser.feature_space == "sd-latent"


def test_z_of_wrong_size_is_rejected(dataset):
    images, labels = dataset
    denoiser = make_empirical_denoiser(images, labels)
    with pytest.raises(ValueError, match="image set"):
        denoiser.apply(denoiser.params, jnp.zeros((1, H + 1, H + 1, C)), jnp.ones(1), jnp.zeros(1))
