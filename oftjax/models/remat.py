"""Rematerialisation (gradient checkpointing) of decoder layers, by named policy.

A policy says which of a layer's intermediate values the backward pass keeps and which
it recomputes from the layer's input. Keeping less lowers the activation memory of a
train step (the compiled step's temp bytes) for some recomputation.

References: `jax.checkpoint` and `jax.checkpoint_policies`
(https://docs.jax.dev/en/latest/gradient-checkpointing.html); MaxText's `remat_policy`.
"""

from __future__ import annotations

import flax.linen as nn
import jax

# name -> what the backward pass keeps of each layer (everything else is recomputed).
POLICIES = {
  "none": "everything (no rematerialisation)",
  "full": "only the layer's input: the whole layer is recomputed",
  "dots": "every matmul's output, including attention scores and adapter rotations",
  "dots_no_batch": "the outputs of matmuls without batch dimensions (the weight "
  "projections); attention scores, adapter rotations and elementwise values are recomputed",
}

_JAX_POLICIES = {
  "full": None,  # jax.checkpoint's default: nothing saveable
  "dots": jax.checkpoint_policies.dots_saveable,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def policy_name(remat: bool | str) -> str:
  """The policy name of `remat`: one of `POLICIES`, or a bool (`True` is `'full'`).

  Raises:
    ValueError: `remat` names no policy.
  """
  if remat is True or remat is False:
    return "full" if remat else "none"
  if remat not in POLICIES:
    raise ValueError(f"unknown remat policy {remat!r}: expected one of {', '.join(POLICIES)}")
  return remat


def checkpointed(layer_cls: type[nn.Module], remat: bool | str) -> type[nn.Module]:
  """`layer_cls` under `nn.remat` with the policy `remat`, or itself for `'none'`.

  `prevent_cse=False`: the layers run under `nn.scan`, which already keeps XLA from
  merging the recomputation into the forward pass (and the barrier would cost speed).

  Raises:
    ValueError: `remat` names no policy.
  """
  name = policy_name(remat)
  if name == "none":
    return layer_cls
  return nn.remat(layer_cls, prevent_cse=False, policy=_JAX_POLICIES[name])
