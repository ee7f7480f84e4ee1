"""oftjax: orthogonal finetuning (OFTv2) for JAX/Flax.

The top level is the curated surface: the math contract (packed skew vector -> orthogonal
blocks -> input-centric rotation), the adapter config and object, parameter trees (split,
merge, fold, masks, counts), the train step, and PEFT adapter folders in and out. Everything
else is reached through its submodule (`oftjax.orthogonal`, `oftjax.geometry`,
`oftjax.quant`, `oftjax.models.gemma`, `oftjax.data`, ...); docs/ARCHITECTURE.md maps them.
"""

from oftjax.adapted_model import AdaptedModel, adapt
from oftjax.adapters import AdapterConfig
from oftjax.intercept import Adapted
from oftjax.orthogonal import (
  cayley,
  cayley_neumann,
  orthogonality_error,
  project_coft,
  rotate,
  skew_symmetric,
)
from oftjax.params import (
  adapter_only,
  count_params,
  fold_adapters,
  merge_params,
  split_params,
  trainable_mask,
  tree_bytes,
)
from oftjax.peft_io import export_peft, import_peft
from oftjax.train_step import make_train_step

__all__ = [
  "Adapted",
  "AdaptedModel",
  "AdapterConfig",
  "adapt",
  "adapter_only",
  "cayley",
  "cayley_neumann",
  "count_params",
  "export_peft",
  "fold_adapters",
  "import_peft",
  "make_train_step",
  "merge_params",
  "orthogonality_error",
  "project_coft",
  "rotate",
  "skew_symmetric",
  "split_params",
  "trainable_mask",
  "tree_bytes",
]
