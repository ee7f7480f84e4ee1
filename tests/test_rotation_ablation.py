"""experiments/rotation_ablation.py: each variant takes out exactly its part, then restores it."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))

import bench_jax
import rotation_ablation as A

from oftjax import orthogonal


def _flops(variant=None):
  def build():
    runners, _ = bench_jax.build_jax_runners(256, 64, 16, 64, ["oft"], log=lambda *a: None)
    return runners["oft"].stats["flops"]

  if variant is None:
    return build()
  with A._swapped(*A.VARIANTS[variant]):
    return build()


def test_each_variant_removes_its_part_and_the_original_comes_back():
  originals = (orthogonal.orthogonal_blocks, orthogonal.rotate)
  shipped = _flops()
  no_neumann, no_rotation = _flops("oft_no_neumann"), _flops("oft_no_rotation")
  assert (orthogonal.orthogonal_blocks, orthogonal.rotate) == originals
  # Neumann powers are [r, b, b] products; the rotation is [tokens, r, b] x [r, b, b].
  assert no_neumann < shipped and no_rotation < shipped and no_rotation != no_neumann
  assert _flops() == shipped
