"""Pure math: packing layout, Cayley, Cayley–Neumann error law, rotation, COFT, gradients."""

import chex
from hypothesis import given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

import oftjax
from oftjax import orthogonal

SETTINGS = settings(max_examples=25, deadline=None)


def random_skew(seed, block_size, norm, batch=3):
  """Skew-symmetric blocks with spectral norm exactly `norm`."""
  rng = np.random.default_rng(seed)
  a = rng.standard_normal((batch, block_size, block_size))
  q = a - np.swapaxes(a, -1, -2)
  q /= np.linalg.norm(q, ord=2, axis=(-2, -1), keepdims=True)
  return jnp.asarray(q * norm, jnp.float32)


def test_packing_is_row_major_upper_triangle():
  b = 5
  packed = jnp.arange(1, orthogonal.num_packed(b) + 1, dtype=jnp.float32)
  q = np.asarray(oftjax.skew_symmetric(packed, b))
  rows, cols = np.triu_indices(b, k=1)
  np.testing.assert_array_equal(q[rows, cols], np.arange(1, 11))
  np.testing.assert_array_equal(q, -q.T)
  assert q[0, 1] == 1 and q[0, 2] == 2 and q[1, 2] == 5
  np.testing.assert_array_equal(oftjax.orthogonal.pack_skew_symmetric(jnp.asarray(q)), packed)


def test_wrong_packed_length_names_the_fix():
  with pytest.raises(ValueError, match="block size 4 needs 6"):
    oftjax.skew_symmetric(jnp.zeros((2, 5)), 4)


@SETTINGS
@given(b=st.sampled_from([2, 4, 8, 16, 32]), norm=st.floats(0.0, 10.0), seed=st.integers(0, 99))
def test_cayley_is_orthogonal_up_to_norm_10(b, norm, seed):
  r = oftjax.cayley(random_skew(seed, b, norm))
  assert float(oftjax.orthogonality_error(r)) <= 1e-5
  chex.assert_trees_all_close(jnp.linalg.det(r), jnp.ones(3), atol=1e-4)


@SETTINGS
@given(
  b=st.sampled_from([2, 4, 8, 16]),
  norm=st.floats(0.0, 0.95),
  n=st.integers(2, 8),
  seed=st.integers(0, 99),
)
def test_cayley_neumann_error_follows_even_odd_law(b, norm, n, seed):
  q = random_skew(seed, b, norm)
  err = float(oftjax.orthogonality_error(oftjax.cayley_neumann(q, n)))
  qn = np.asarray(q, np.float64)
  p = np.linalg.matrix_power
  residual = -p(qn, 2 * n - 2) if n % 2 == 0 else -2 * p(qn, n - 1) + p(qn, 2 * n - 2)
  bound = norm ** (2 * n - 2) if n % 2 == 0 else 2 * norm ** (n - 1) + norm ** (2 * n - 2)
  assert err <= bound + 2e-6
  assert abs(err - np.abs(residual).max()) <= 2e-6


def test_cayley_neumann_converges_to_cayley():
  q = random_skew(0, 8, 0.3)
  gaps = [float(jnp.abs(oftjax.cayley_neumann(q, n) - oftjax.cayley(q)).max()) for n in (4, 8, 16)]
  assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-6


def test_rotate_equals_block_diagonal_matmul_and_keeps_dtype():
  blocks = oftjax.cayley(random_skew(1, 4, 0.7, batch=6))
  x = jax.random.normal(jax.random.key(0), (2, 3, 24))
  dense = oftjax.orthogonal.block_diagonal(blocks)
  chex.assert_trees_all_close(oftjax.rotate(x, blocks), x @ dense, atol=1e-6)
  y16 = oftjax.rotate(x.astype(jnp.bfloat16), blocks)
  chex.assert_type(y16, jnp.bfloat16)
  shared = oftjax.rotate(x, blocks[:1])
  chex.assert_trees_all_close(
    shared, x @ oftjax.orthogonal.block_diagonal(blocks[:1], 6), atol=1e-6
  )


def test_rotate_rejects_width_not_divisible():
  with pytest.raises(ValueError, match="not divisible by the block size 4"):
    oftjax.rotate(jnp.zeros((2, 10)), jnp.zeros((2, 4, 4)))


def test_coft_projects_into_ball_and_keeps_small_blocks():
  packed = jnp.stack([jnp.full((6,), 1e-6), jnp.full((6,), 1.0)])
  out = oftjax.project_coft(packed, 4, eps=0.1)
  chex.assert_trees_all_close(out[0], packed[0])
  frob = float(jnp.linalg.norm(oftjax.skew_symmetric(out[1], 4)))
  assert abs(frob - 0.1 / np.sqrt(2)) < 1e-6


@pytest.mark.parametrize("param", ["cayley_neumann", "cayley"])
def test_blocks_are_jit_vmap_and_grad_safe(param):
  packed = 0.1 * jax.random.normal(jax.random.key(3), (3, orthogonal.num_packed(4)))
  x = jax.random.normal(jax.random.key(4), (5, 12))

  def f(p):
    return oftjax.rotate(x, orthogonal.orthogonal_blocks(p, 4, param, 6))

  check_grads(f, (packed,), order=1, modes=["rev"], atol=5e-2, rtol=5e-2)
  chex.assert_trees_all_close(jax.jit(f)(packed), f(packed), atol=1e-6)
  batched = jax.vmap(lambda p: orthogonal.orthogonal_blocks(p, 4, param, 6))(packed[None])
  chex.assert_shape(batched, (1, 3, 4, 4))


def test_identity_at_zero():
  r = orthogonal.orthogonal_blocks(jnp.zeros((2, 6)), 4)
  np.testing.assert_array_equal(np.asarray(r), np.broadcast_to(np.eye(4), (2, 4, 4)))


def test_spectral_norm_equals_the_largest_singular_value():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(20, 16, 16)).astype(np.float32)
  u, _ = np.linalg.qr(rng.normal(size=(16, 16)))
  w, _ = np.linalg.qr(rng.normal(size=(16, 16)))
  close = (u * np.r_[1.0, 0.999, np.linspace(0.9, 0.1, 14)]) @ w.T  # sigma_2 = 0.999 sigma_1
  cases = [
    x,
    x - np.swapaxes(x, -1, -2),
    rng.normal(size=(3, 6, 9)),
    close[None],
    np.zeros((2, 8, 8)),
  ]
  for a in cases:
    a = np.asarray(a, np.float32)
    want = np.linalg.norm(a.astype(np.float64), ord=2, axis=(-2, -1))
    got = np.asarray(jax.jit(orthogonal.spectral_norm)(a))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-30)
