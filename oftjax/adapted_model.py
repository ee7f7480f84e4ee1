"""One object for a model with adapters: its layers, its Linen module, init, fold, PEFT files.

    adapted = oftjax.adapt(model, config, tokens)       # traces once: finds the layers
    adapter = adapted.init(rng)                         # the adapter tree (R = I: base function)
    logits = adapted.apply(oftjax.merge_params(base, adapter), tokens)
    merged = adapted.fold(oftjax.merge_params(base, adapter))   # adapters folded into kernels
    adapted.export_peft("out/peft_adapter", adapter)

On a quantized base (QOFT / QLoRA) adapt the dequantizing wrapper:
`oftjax.adapt(quant.Dequantized(model), config, tokens)`.

References:
  Qiu et al. "Orthogonal Finetuning Made Scalable" (OFTv2), arXiv:2506.19847.
"""

from __future__ import annotations

from collections.abc import Mapping
import types
from typing import Any

import flax.linen as nn
import jax

from oftjax import adapters, intercept, peft_io
from oftjax import geometry as geo
from oftjax import params as P


class AdaptedModel:
  """A Linen model with adapters attached, built once by `adapt`.

  Attributes:
    model: the base Linen module as given (e.g. `quant.Dequantized(gemma_model)`).
    config: the adapter config.
    geometries: read-only `{path: LayerGeometry}` of every adapted layer.
    module: `Adapted(model, config)`, the Linen module to apply (or to hand to
      `gemma.generate`); its params are the base tree merged with the adapter tree.
      Deterministic: no block dropout.
    training_module: the module to train: `module` itself, or with
      `config.block_dropout > 0` the same adapters with block dropout on, applied with
      `rngs={'dropout': key}`.
  """

  def __init__(
    self,
    model: nn.Module,
    config: adapters.AdapterConfig,
    geometries: Mapping[str, geo.LayerGeometry],
    example: tuple[tuple, dict],
  ):
    self.model = model
    self.config = config
    self.geometries = types.MappingProxyType(dict(geometries))
    self.module = intercept.Adapted(model, config)
    self.training_module = (
      intercept.Adapted(model, config, deterministic=False) if config.block_dropout else self.module
    )
    self._example = example
    args, kwargs = example
    self._init = jax.jit(
      lambda rng: P.split_params(self.module.init(rng, *args, **kwargs)["params"])[1]
    )

  def init(self, rng: jax.Array) -> dict:
    """A fresh adapter tree (OFT: zeros, `R = I`; LoRA: `B = 0`): adapted = base.

    Jitted, so the base parameters `init` would create are dead code and never built.
    """
    return self._init(rng)

  def apply(self, params, *args, **kwargs) -> Any:
    """`module.apply({'params': params}, *args, **kwargs)`: params = base + adapter tree."""
    return self.module.apply({"params": params}, *args, **kwargs)

  def fold(self, params) -> dict:
    """Folds every adapter into its kernel (`oftjax.fold_adapters`): a base-shaped tree."""
    return P.fold_adapters(params, self.geometries, self.config)

  def unfold(self, params) -> dict:
    """Inverse of `fold`: `params` holds folded kernels and the adapter leaves."""
    return P.fold_adapters(params, self.geometries, self.config, unfold=True)

  def with_config(self, config: adapters.AdapterConfig) -> AdaptedModel:
    """The same model with another adapter config (traced again: targets may differ)."""
    args, kwargs = self._example
    return adapt(self.model, config, *args, **kwargs)

  def export_peft(self, directory: str, adapter, *args, **kwargs) -> None:
    """Writes `adapter` as a PEFT folder: `oftjax.peft_io.export_peft` with this config."""
    return peft_io.export_peft(directory, adapter, self.config, *args, **kwargs)

  def import_peft(self, directory: str, *args, **kwargs):
    """Reads a PEFT folder (`oftjax.peft_io.import_peft`), for this config's targets.

    Returns:
      `(adapter tree, AdapterConfig)` as read; `with_config` gives the model
      for that config.
    """
    if not args:
      kwargs.setdefault("targets", self.config.targets)
    return peft_io.import_peft(directory, *args, **kwargs)


def adapt(
  model: nn.Module, config: adapters.AdapterConfig, *example_args, **example_kwargs
) -> AdaptedModel:
  """Attaches adapters to `model`: finds the targeted layers by tracing it once.

  Args:
    model: any Linen module (wrap a quantized base in `quant.Dequantized` first).
    config: which adapter, where, and its hyper-parameters.
    *example_args: example inputs of `model.__call__` (small: only their shapes
      matter; `AdaptedModel.init` reuses them).
    **example_kwargs: example keyword inputs, likewise.

  Returns:
    The `AdaptedModel`.

  Raises:
    ValueError: when the targets match no layer or a targeted layer cannot take the
      adapter (block size, layer form), naming the layer and the fix.
  """
  geometries = intercept.find_geometries(model, config, *example_args, **example_kwargs)
  return AdaptedModel(model, config, geometries, (example_args, example_kwargs))
