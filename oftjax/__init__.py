"""oftjax: orthogonal finetuning (OFTv2) for JAX/Flax."""

from oftjax.adapted_model import AdaptedModel, adapt
from oftjax.adapters import AdapterConfig
from oftjax.intercept import Adapted
from oftjax.orthogonal import (
    block_diagonal,
    cayley,
    cayley_neumann,
    num_packed,
    orthogonal_blocks,
    orthogonality_error,
    pack_skew_symmetric,
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
from oftjax.train_step import make_train_step

__all__ = [
    "Adapted", "AdaptedModel", "AdapterConfig", "adapt", "adapter_only", "block_diagonal",
    "cayley", "cayley_neumann", "count_params", "fold_adapters", "make_train_step",
    "merge_params", "num_packed", "orthogonal_blocks", "orthogonality_error",
    "pack_skew_symmetric", "project_coft", "rotate", "skew_symmetric", "split_params",
    "trainable_mask", "tree_bytes",
]
