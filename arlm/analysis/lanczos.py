"""Matrix-free top singular values: Golub–Kahan–Lanczos bidiagonalisation with full reorthogonalisation.

An operator A: R^n → R^m is given only by `matvec(v) = A v` and `rmatvec(u) = Aᵀ u` (for
Jacobians: one jvp and one vjp). After `steps` iterations the bidiagonal B_steps has singular
values that converge to A's largest ones from below (exact once steps ≥ rank A), at the cost of
2·steps operator applications and O(steps·(m+n)) memory, never materialising A.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def _orthogonalise(x_N: Array, basis_KxN: Array) -> Array:
    """x minus its projection on the rows of basis (zero rows are ignored); twice, for stability."""
    for _ in range(2):
        x_N = x_N - basis_KxN.T @ (basis_KxN @ x_N)
    return x_N


def _unit_or_fresh(x_N: Array, norm: Array, tol: Array, key: Array, basis_KxN: Array) -> tuple[Array, Array]:
    """x/‖x‖, or (when ‖x‖ ≤ tol: an invariant subspace was found) a random unit vector orthogonal to the
    basis with the recorded norm set to 0, so the iteration carries on into the rest of the space."""
    fresh = _orthogonalise(jax.random.normal(key, x_N.shape, x_N.dtype), basis_KxN)
    fresh = fresh / jnp.linalg.norm(fresh)
    small = norm <= tol
    unit = jnp.where(small, fresh, x_N / jnp.where(small, 1.0, norm))
    return unit, jnp.where(small, 0.0, norm)


def top_singular_values(matvec: Callable[[Array], Array], rmatvec: Callable[[Array], Array], n_in: int,
                        n_out: int, *, k: int, steps: int, key: Array,
                        rtol: float = 1e-6) -> tuple[Array, Array]:
    """The k largest singular values of A [k] (descending) and their right singular vectors [k, n_in].

    `steps` is capped at min(n_in, n_out); with steps = min(n_in, n_out) the result is exact up to
    rounding. A handful more steps than k (e.g. 3k + 10) usually resolves the top few to 1e-4.
    """
    steps = int(min(steps, n_in, n_out))
    if not 1 <= k <= steps:
        raise ValueError(f"need 1 ≤ k ≤ steps = {steps}, got k = {k}")
    dtype = jnp.float32
    key, k0 = jax.random.split(key)
    v0 = jax.random.normal(k0, (n_in,), dtype)
    V = jnp.zeros((steps + 1, n_in), dtype).at[0].set(v0 / jnp.linalg.norm(v0))
    U = jnp.zeros((steps, n_out), dtype)
    alphas = jnp.zeros((steps,), dtype)
    betas = jnp.zeros((steps,), dtype)

    def body(j, carry):
        U, V, alphas, betas, scale = carry
        ka, kb = jax.random.split(jax.random.fold_in(key, j))
        u = matvec(V[j]) - jnp.where(j > 0, betas[j - 1], 0.0) * U[j - 1]
        u = _orthogonalise(u, U)
        alpha = jnp.linalg.norm(u)
        scale = jnp.maximum(scale, alpha)
        u, alpha = _unit_or_fresh(u, alpha, rtol * scale, ka, U)
        U = U.at[j].set(u)
        w = _orthogonalise(rmatvec(u) - alpha * V[j], V)
        beta = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, beta)
        w, beta = _unit_or_fresh(w, beta, rtol * scale, kb, V)
        return U, V.at[j + 1].set(w), alphas.at[j].set(alpha), betas.at[j].set(beta), scale

    U, V, alphas, betas, _ = jax.lax.fori_loop(0, steps, body, (U, V, alphas, betas, jnp.zeros((), dtype)))
    B = jnp.diag(alphas) + jnp.diag(betas[:-1], 1)          # A V_m = U_m B_m
    _, sigma, Wt = jnp.linalg.svd(B)
    right_KxN = Wt[:k] @ V[:steps]
    return sigma[:k], right_KxN
