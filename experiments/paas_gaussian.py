"""What PAAS estimates, measured on Gaussian data where every score is known in closed form.

Data N(mu, s^2 I) in d dimensions has the exact denoiser D(z, sigma) = (s^2 z + sigma^2 mu) /
(s^2 + sigma^2). For a point x and each sigma this prints the Monte Carlo PAAS score
mean_n (D(x + sigma n) - x) / sigma^2 (n noise samples, Eq. 16 and Eq. 15), its standard error,
and the analytic scores of the data smoothed at sigma and at sqrt(2) sigma, plus the per-sample
variance of both estimators.

    python experiments/paas_gaussian.py [--s 0.5] [--dim 64] [--samples 4096]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from sjc_jax import estimators
from sjc_jax.diffusion.denoiser import Denoiser
from sjc_jax.diffusion.schedule import ddpm_sigmas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--s", type=float, default=0.5, help="data standard deviation")
    parser.add_argument("--dim", type=int, default=64, help="dimension (an 8 x 8 x 1 image)")
    parser.add_argument("--samples", type=int, default=4096, help="Monte Carlo noise samples")
    args = parser.parse_args()
    side = int(round(args.dim**0.5))
    mu = jnp.linspace(-1.0, 1.0, side * side).reshape(1, side, side, 1)
    x = jnp.zeros_like(mu) + 0.8
    s2 = args.s**2

    def apply(params, z, sigma, label):
        sig2 = sigma[:, None, None, None] ** 2
        return (s2 * z + sig2 * mu) / (s2 + sig2)

    print(
        f"Gaussian data, s = {args.s}, {args.samples} noise samples; scores projected on (mu - x)"
    )
    print("| sigma | PAAS Eq.16 | s.e. | PAAS Eq.15 | s.e. | score at sigma | at sqrt(2) sigma |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    direction = (mu - x) / jnp.linalg.norm(mu - x)

    denoiser = Denoiser(apply, None, ddpm_sigmas(), 1, side, "rgb", lambda images: images)

    def projected(key, sigma, var_red):
        estimate = estimators.sjc(guidance_scale=1.0, var_red=var_red, scale="sigma2")
        cotangent, _ = estimate(key, denoiser, None, x, jnp.array([sigma]), jnp.array([0]))
        return jnp.sum(direction * -cotangent)  # the estimator returns the descent direction

    for i, sigma in enumerate((0.1, 0.3, 1.0, 3.0)):
        keys = jax.random.split(jax.random.key(i), args.samples)
        cells = []
        for var_red in (True, False):
            per_sample = np.asarray(
                jax.vmap(lambda k, s=sigma, v=var_red: projected(k, s, v))(keys)
            )
            cells += [per_sample.mean(), per_sample.std() / np.sqrt(len(per_sample))]
        norm = float(jnp.linalg.norm(mu - x))
        at_sigma = norm / (s2 + sigma**2)
        at_sqrt2 = norm / (s2 + 2 * sigma**2)
        print(
            f"| {sigma} | {cells[0]:.4f} | {cells[1]:.1e} | {cells[2]:.4f} | {cells[3]:.1e} | "
            f"{at_sigma:.4f} | {at_sqrt2:.4f} |"
        )


if __name__ == "__main__":
    main()
