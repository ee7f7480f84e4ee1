"""What a run trains, built once: full finetuning, adapters, or adapters on a quantized base.

The job asks the same questions of every run (which module the loss applies, which tree
the evaluator and the merged export see, whether adapters are projected or watched); each
kind of run answers them in one class, chosen once by `build_run_model`, so no code
downstream branches on the method or the quantization again.

All three take the train step's view of parameters: `merge_params(frozen, trainable)`.
"""

from __future__ import annotations

from collections.abc import Callable
import copy
from typing import Any

import jax
import jax.numpy as jnp

from oftjax import params as P
from oftjax import quant
from oftjax.train import remat_choice
from oftjax.train.objective import next_token_loss


class FullFinetune:
  """`--method full`: every weight is trained; nothing is frozen, nothing to fold.

  Attributes:
    model: the base Gemma module (its folder names the PEFT modules and the export).
    frozen: the frozen tree (`{}`).
    module: the Linen module the loss applies to `merge_params(frozen, trainable)`.
    eval_module: the Linen module the evaluator applies to `evaluated`.
    adapter_config: the `AdapterConfig` trained, or `None`.
    shards_trainable: whether the trainable tree is FSDP-sharded (the full model is) or
      replicated (small adapters).
    trains_head: whether the output head's weight is trained (its loss gradient is needed).
    project: maps the trainable tree onto its constraint set after each update (COFT), or
      `None`.
    health: jitted `trainable -> oftjax.params.adapter_health(...)` (OFT), or `None`.
    uses_rng: whether `loss` takes a `'dropout'` key (OFT block dropout).
  """

  adapter_config = None
  shards_trainable = True
  trains_head = True
  project: Callable[[Any], Any] | None = None
  health: Callable[[Any], dict] | None = None
  uses_rng = False

  def __init__(self, model):
    self.model = self.module = self.eval_module = model
    self.frozen = {}

  def loss(self, params, batch: dict, rng=None):
    """Masked next-token loss of `module` on a packed batch (`has_aux` form)."""
    return next_token_loss(self.module, params, batch, rng, head_grad=self.trains_head)

  def with_remat(self, policy: str):
    """A copy whose `loss` rematerialises the decoder layers with `policy` (the rest shared)."""
    other = copy.copy(self)
    other.module = remat_choice.with_remat(self.module, policy)
    return other

  def merged(self, trainable) -> dict:
    """The trained function as one full-precision base-shaped tree (what an export holds)."""
    return P.merge_params(self.frozen, trainable)

  def evaluated(self, trainable) -> dict:
    """The params `eval_module` evaluates: here the merged tree."""
    return self.merged(trainable)

  def float_frozen(self) -> dict:
    """The frozen tree with float kernels (a quantized one dequantized to float32)."""
    return self.frozen

  def exported(self, trainable, evaluated) -> dict:
    """`merged`, reusing `evaluated` (this run's `evaluated`) where it is that."""
    del trainable
    return evaluated

  def final(self, trainable) -> dict:
    """`evaluated` after the last step, when the frozen tree is needed no more."""
    return self.evaluated(trainable)


class AdapterFinetune(FullFinetune):
  """OFT, OFTv1 or LoRA adapters over a full-precision frozen base.

  Trains `adapted.module` (the adapters see each layer's input); evaluates and exports
  the merged model (adapters folded into the kernels), the function a user deploys.
  """

  shards_trainable = False
  trains_head = False

  def __init__(self, model, adapted, frozen):
    self.model, self.adapted, self.frozen = model, adapted, frozen
    self.module, self.eval_module = adapted.training_module, model
    config = self.adapter_config = adapted.config
    self.uses_rng = bool(config.block_dropout)
    if config.coft_eps is not None:  # PEFT's write-back after each update
      self.project = lambda tree: P.project_adapters(tree, config)
    if config.leaf_name == "oft":
      self.health = jax.jit(lambda tree: P.adapter_health(tree, config, per_layer=False))

  def merged(self, trainable) -> dict:
    return self.adapted.fold(P.merge_params(self.frozen, trainable))

  def evaluated(self, trainable) -> dict:
    """The merged tree; the frozen tree itself while every adapter leaf is zero.

    A zero OFT adapter is the identity rotation (`R = I` exactly), so folding it would
    only copy every targeted kernel: evaluating a fresh adapter needs no second model.
    """
    leaves = jax.tree_util.tree_leaves(trainable)
    if self.adapter_config.leaf_name == "oft" and not any(bool(jnp.any(x != 0)) for x in leaves):
      return self.frozen
    return self.merged(trainable)

  def final(self, trainable) -> dict:
    """The merged tree, folded into the frozen kernels' own buffers (donated).

    After the last step the frozen base is needed no more, so each targeted kernel is
    overwritten by its folded one rather than copied: the merged model costs no second copy
    of the targeted kernels (host memory on CPU, device memory on an accelerator).
    `frozen` is left holding the shapes it had (the summary counts its bytes).
    """
    frozen = self.frozen
    self.frozen = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), frozen)
    fold = jax.jit(lambda f, t: self.adapted.fold(P.merge_params(f, t)), donate_argnums=0)
    return fold(frozen, trainable)


class QuantizedAdapterFinetune(AdapterFinetune):
  """QOFT / QLoRA: the targeted frozen kernels are stored quantized.

  Evaluates the adapted model over the quantized kernels with unmerged adapters, so an
  evaluation never materializes a full-precision copy of a model quantized to fit; only
  the merged export dequantizes (in `dtype`).
  """

  def __init__(self, model, adapted, frozen, dtype):
    super().__init__(model, adapted, frozen)
    self.eval_module, self.dtype = adapted.module, dtype

  def merged(self, trainable) -> dict:
    base = quant.dequantize_params(self.frozen, self.adapted.geometries, self.dtype)
    return self.adapted.fold(P.merge_params(base, trainable))

  def evaluated(self, trainable) -> dict:
    return P.merge_params(self.frozen, trainable)

  def float_frozen(self) -> dict:
    return quant.dequantize_params(self.frozen, self.adapted.geometries)

  def exported(self, trainable, evaluated) -> dict:
    del evaluated
    return self.merged(trainable)

  def final(self, trainable) -> dict:
    return self.evaluated(trainable)


def build_run_model(model, frozen, adapted=None, quantized: bool = False, dtype=None):
  """The run's model: `FullFinetune` without `adapted`, else adapters (quantized).

  Args:
    model: the base Gemma module.
    frozen: the frozen tree (quantized kernels where `quantized`); ignored for full.
    adapted: the `AdaptedModel` (its `model` is `quant.Dequantized` when quantized),
      or `None` for full finetuning.
    quantized: whether `frozen` holds quantized kernels.
    dtype: the compute dtype a merged export dequantizes into.
  """
  if adapted is None:
    return FullFinetune(model)
  if quantized:
    return QuantizedAdapterFinetune(model, adapted, frozen, dtype)
  return AdapterFinetune(model, adapted, frozen)
