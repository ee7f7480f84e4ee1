"""The Mixture-of-Experts branch of a Gemma 4 decoder layer (26B-A4B), in Flax Linen.

Follows `transformers` 5.24 (`models/gemma4/modeling_gemma4.py`: `Gemma4TextRouter`,
`Gemma4TextExperts` and the `enable_moe_block` part of `Gemma4TextDecoderLayer.forward`).
In Hugging Face the router, the experts and their two norms are children of the decoder layer
itself (there is no separate "moe" module); `Gemma4MoE` gathers them under the same
names, so a decoder layer that shares its scope with this module (`nn.share_scope`) has
exactly Hugging Face's names.

What one MoE branch computes, for the residual stream `x` entering the feed-forward half::

  r      = rms_normalize(x) * router.scale * hidden_size**-0.5      # no learned norm weight
  probs  = softmax(r @ router.proj, fp32)                            # [tokens, num_experts]
  w, idx = top_k(probs, top_k); w = w / sum(w)                       # renormalised over the k
  w      = w * router.per_expert_scale[idx]
  h      = pre_feedforward_layernorm_2(x)
  y      = sum_k w_k * down_proj[idx_k] @ (act(gate) * up),  [gate | up] = gate_up_proj[idx_k] @ h
  out    = post_feedforward_layernorm_2(y)

The router reads `x` *before* any norm; the experts read it after their own norm. The dense
MLP is not part of this module: Hugging Face keeps `mlp` (gate_proj/up_proj/down_proj, plain
`nn.Linear`) in the decoder layer, and so should the Linen decoder. The layer combines them as::

  residual = x                                                       # after the attention half
  dense    = post_feedforward_layernorm_1(mlp(pre_feedforward_layernorm(residual)))
  x        = residual + post_feedforward_layernorm(dense + Gemma4MoE(residual))
  # ... then the optional per-layer-input block and `x *= layer_scalar`, as without MoE.

Every Gemma 4 norm is `x / rms(x) * weight` in fp32 (weight initialised to ones), not Gemma
1-3's `(1 + weight)`: `Gemma4RMSNorm` here.

Parameters (Hugging Face names are relative to `model.layers.{i}.`, or
`model.language_model.layers.{i}.` in a multimodal checkpoint; E experts, D hidden, F
`moe_intermediate_size`)::

  HF tensor                              shape        Linen param (in Gemma4MoE)           layout
  router.proj.weight                     [E, D]       router/proj/kernel         [D, E]    'T'
  router.scale                           [D]          router/scale               [D]       'id'
  router.per_expert_scale                [E]          router/per_expert_scale    [E]       'id'
  experts.gate_up_proj                   [E, 2F, D]   experts/gate_up_proj       [E, 2F, D] 'id'
  experts.down_proj                      [E, D, F]    experts/down_proj          [E, D, F]  'id'
  pre_feedforward_layernorm_2.weight     [D]          pre_feedforward_layernorm_2/scale     'id'
  post_feedforward_layernorm_2.weight    [D]          post_feedforward_layernorm_2/scale    'id'

The expert tensors keep Hugging Face's layout exactly (no transposition): `gate_up_proj[e]`
is a torch `Linear` weight `[out=2F, in=D]` whose first F rows are the gate and last F rows
the up projection; `down_proj[e]` is `[out=D, in=F]`. `router/proj` is an `nn.Dense`
(an adapter may target it, as PEFT may target `router.proj`); the expert tensors are plain
3-D params, not Dense layers, so the adapter interceptor never sees them.
`hf_tensor_entries` is this table in code; `params_from_hf` and
`params_to_hf` use it.

Config fields read (`transformers.Gemma4TextConfig` -> attribute here): `hidden_size` ->
`hidden_size`, `num_experts` -> `num_experts`, `top_k_experts` -> `top_k`,
`moe_intermediate_size` -> `moe_intermediate_size`, `hidden_activation` -> `activation`,
`rms_norm_eps` -> `eps`, `initializer_range` -> `initializer_range` (init only). A
layer has this branch when `enable_moe_block` is true (then every layer has it).

Formulation and cost. `implementation="ragged_dot"` (default) sorts the `tokens * top_k`
(token, expert) pairs by expert and runs the two expert matmuls as grouped matmuls
(`jax.lax.ragged_dot_general`, contracting the HF layout in place), then un-sorts and sums
the k weighted outputs per token. Only the selected experts are computed: `6 * k * F * D`
flops per token (plus `2 * D * E` for the router). For 26B-A4B (`hidden_size` 2816, 128
experts, top-8, `moe_intermediate_size` 704; 30 layers, all MoE) that is 95.2 MFLOP per
token per layer forward (0.72 for the router), and `k * (2D + 3F)` = 61,952 activations per
token per layer (124 KB in bf16) in the sorted buffers. The expert weights are
`3 * E * F * D` = 761M per layer (1.52 GB in bf16), read in place. On TPU ragged_dot lowers
to the native grouped matmul and on GPU to XLA's ragged dot (not measured here; JAX can use a
Pallas Triton kernel instead with `jax_ragged_dot_use_gpu_pallas_triton_lowering`). JAX's CPU
lowering expands it densely over the groups, `E` times the flops above: XLA's cost analysis
on CPU (bf16, 512 tokens, the 26B-A4B dims) gives 12.2 GFLOP per token forward and 9.0 GB of
temporaries. So on CPU `implementation="dense"` is the cheaper exact choice: it computes every
expert for every token and weights the outputs by the routing (zero for unselected experts),
`6 * E * F * D` flops per token (1.52 GFLOP for 26B-A4B, 16x the selected-expert cost;
measured 1.53) and `E * (3F + D)` activations per token (3.4 GB of temporaries at 512
tokens). Both equal Hugging Face's per-expert loop; the one difference in low precision is that
the k weighted expert outputs are summed in fp32 here (HF adds them one by one in the model
dtype).

Use in a decoder layer (`setup` style), giving the params Hugging Face's names::

  self.moe = Gemma4MoE(cfg.hidden_size, cfg.num_experts, cfg.top_k_experts,
                       cfg.moe_intermediate_size, cfg.hidden_activation, cfg.rms_norm_eps,
                       dtype=..., param_dtype=...)
  nn.share_scope(self, self.moe)  # layer/router/..., layer/experts/..., not layer/moe/...

References:
  Hugging Face transformers 5.24, `transformers/models/gemma4/modeling_gemma4.py`;
  Gale et al., "MegaBlocks: Efficient Sparse Training with Mixture-of-Experts", MLSys 2023
  (grouped matmul over expert-sorted tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = Any

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "silu": jax.nn.silu,
}
_IMPLEMENTATIONS = ("ragged_dot", "dense")

# Contract x [tokens, D] with w [E, out, D] on D; tokens are grouped by expert along axis 0.
_RAGGED_DIMS = jax.lax.RaggedDotDimensionNumbers(
  dot_dimension_numbers=(([1], [2]), ([], [])),
  lhs_ragged_dimensions=[0],
  rhs_group_dimensions=[0],
)


def activation_fn(name: str) -> Callable[[Array], Array]:
  """The JAX function for a Hugging Face `hidden_activation` name.

  Raises:
    ValueError: an activation this module does not implement.
  """
  if name not in _ACTIVATIONS:
    raise ValueError(f"unsupported activation {name!r}; expected one of {', '.join(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


def rms_normalize(x: Array, eps: float) -> Array:
  """`x / sqrt(mean(x^2) + eps)` over the last axis, in fp32, returned in fp32."""
  xf = x.astype(jnp.float32)
  return xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)


class Gemma4RMSNorm(nn.Module):
  """Gemma 4 RMSNorm: `x / rms(x) * scale` in fp32, cast back to the input dtype.

  Unlike Gemma 1-3 the weight multiplies directly (HF initialises it to ones).

  Attributes:
    eps: epsilon added to the mean square.
    param_dtype: dtype of `scale`.
  """

  eps: float = 1e-6
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.ones_init(), (x.shape[-1],), self.param_dtype)
    return (rms_normalize(x, self.eps) * scale.astype(jnp.float32)).astype(x.dtype)


class Gemma4Router(nn.Module):
  """Top-k router: scale-free RMS norm, learned scale, linear scores, softmax, top-k.

  Attributes:
    num_experts: number of experts E.
    top_k: experts chosen per token.
    eps: RMS-norm epsilon.
    initializer_range: std of the normal init of `proj`.
    dtype: compute dtype of the projection.
    param_dtype: parameter dtype.
  """

  num_experts: int
  top_k: int
  eps: float = 1e-6
  initializer_range: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array, Array]:
    """Routes tokens.

    Args:
      x: `[tokens, hidden]` residual stream (not normalised).

    Returns:
      `(probs, weights, index)`: `probs` `[tokens, E]` fp32 softmax over all experts;
      `weights` `[tokens, k]` fp32, the top-k probabilities renormalised to sum to one, then
      times `per_expert_scale` of the chosen expert; `index` `[tokens, k]` int32 experts,
      best first.
    """
    hidden = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones_init(), (hidden,), self.param_dtype)
    per_expert_scale = self.param(
      "per_expert_scale", nn.initializers.ones_init(), (self.num_experts,), self.param_dtype
    )
    normed = rms_normalize(x, self.eps).astype(x.dtype)
    normed = normed * scale.astype(x.dtype) * (hidden**-0.5)
    scores = nn.Dense(
      self.num_experts,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.initializers.normal(self.initializer_range),
      name="proj",
    )(normed)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    weights, index = jax.lax.top_k(probs, self.top_k)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights * jnp.take(per_expert_scale, index, axis=0)
    return probs, weights, index


class Gemma4Experts(nn.Module):
  """E gated-MLP experts held as two packed 3-D params in Hugging Face's layout.

  Attributes:
    num_experts: number of experts E.
    moe_intermediate_size: width F of one expert.
    activation: Hugging Face activation name of the gate.
    implementation: `"ragged_dot"` (grouped matmul over expert-sorted tokens: only the
      selected experts are computed) or `"dense"` (every expert for every token; see the
      module docstring for costs).
    initializer_range: std of the normal init of the expert weights.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  num_experts: int
  moe_intermediate_size: int
  activation: str = "gelu_pytorch_tanh"
  implementation: str = "ragged_dot"
  initializer_range: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, index: Array, weights: Array) -> Array:
    """Applies the chosen experts and sums their weighted outputs.

    Args:
      x: `[tokens, hidden]` expert inputs.
      index: `[tokens, k]` chosen experts.
      weights: `[tokens, k]` routing weights.

    Returns:
      `[tokens, hidden]` in `dtype`.

    Raises:
      ValueError: an unknown `implementation` or `activation`.
    """
    e, f, d = self.num_experts, self.moe_intermediate_size, x.shape[-1]
    init = nn.initializers.normal(self.initializer_range)
    gate_up = self.param("gate_up_proj", init, (e, 2 * f, d), self.param_dtype).astype(self.dtype)
    down = self.param("down_proj", init, (e, d, f), self.param_dtype).astype(self.dtype)
    act = activation_fn(self.activation)
    x = x.astype(self.dtype)
    if self.implementation == "ragged_dot":
      out = _ragged_experts(x, index, weights, gate_up, down, act, e)
    elif self.implementation == "dense":
      out = _dense_experts(x, index, weights, gate_up, down, act, e)
    else:
      raise ValueError(
        f"unknown MoE implementation {self.implementation!r}; "
        f"expected one of {', '.join(_IMPLEMENTATIONS)}"
      )
    return out.astype(self.dtype)


def _ragged_experts(x, index, weights, gate_up, down, act, num_experts):
  """Sort-by-expert grouped matmul; returns the fp32 weighted sum `[tokens, hidden]`."""
  tokens, k = index.shape
  flat_expert = index.reshape(-1)
  order = jnp.argsort(flat_expert, stable=True)  # pair slots grouped by expert
  group_sizes = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)
  sorted_x = jnp.take(x, order // k, axis=0)  # [tokens * k, hidden]
  gate, up = jnp.split(
    jax.lax.ragged_dot_general(sorted_x, gate_up, group_sizes, _RAGGED_DIMS), 2, axis=-1
  )
  sorted_y = jax.lax.ragged_dot_general(act(gate) * up, down, group_sizes, _RAGGED_DIMS)
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  y = jnp.take(sorted_y, inverse, axis=0).reshape(tokens, k, -1)
  return jnp.einsum("tkd,tk->td", y.astype(jnp.float32), weights.astype(jnp.float32))


def _dense_experts(x, index, weights, gate_up, down, act, num_experts):
  """Every expert on every token, combined by the routing; returns fp32 `[tokens, hidden]`."""
  gate, up = jnp.split(jnp.einsum("td,efd->tef", x, gate_up), 2, axis=-1)
  y = jnp.einsum("tef,edf->ted", act(gate) * up, down)
  combine = jnp.sum(
    jax.nn.one_hot(index, num_experts, dtype=jnp.float32) * weights.astype(jnp.float32)[..., None],
    axis=1,
  )  # [tokens, E]
  return jnp.einsum("ted,te->td", y.astype(jnp.float32), combine)


class Gemma4MoE(nn.Module):
  """The MoE branch of a Gemma 4 decoder layer: router, experts and their two norms.

  Attributes:
    hidden_size: model width D (`hidden_size`).
    num_experts: number of experts E (`num_experts`).
    top_k: experts per token (`top_k_experts`).
    moe_intermediate_size: width F of one expert (`moe_intermediate_size`).
    activation: Hugging Face activation name (`hidden_activation`).
    eps: RMS-norm epsilon (`rms_norm_eps`).
    implementation: `"ragged_dot"` or `"dense"` (see the module docstring).
    initializer_range: std of the normal init of the router and expert weights.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """

  hidden_size: int
  num_experts: int
  top_k: int
  moe_intermediate_size: int
  activation: str = "gelu_pytorch_tanh"
  eps: float = 1e-6
  implementation: str = "ragged_dot"
  initializer_range: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Applies the branch.

    Args:
      x: `[batch, time, hidden]` residual stream entering the feed-forward half (before
        `pre_feedforward_layernorm`).

    Returns:
      `[batch, time, hidden]`: `post_feedforward_layernorm_2` of the expert mixture, to be
      added to the dense MLP's normalised output.

    Raises:
      ValueError: `x`'s last axis is not `hidden_size`, or `top_k` is not in
        `[1, num_experts]`.
    """
    if x.shape[-1] != self.hidden_size:
      raise ValueError(f"MoE input width {x.shape[-1]} differs from hidden_size {self.hidden_size}")
    if not 1 <= self.top_k <= self.num_experts:
      raise ValueError(f"top_k {self.top_k} must be between 1 and num_experts {self.num_experts}")
    flat = x.astype(self.dtype).reshape(-1, self.hidden_size)
    _, weights, index = Gemma4Router(
      self.num_experts,
      self.top_k,
      self.eps,
      self.initializer_range,
      self.dtype,
      self.param_dtype,
      name="router",
    )(flat)
    h = Gemma4RMSNorm(self.eps, self.param_dtype, name="pre_feedforward_layernorm_2")(flat)
    y = Gemma4Experts(
      self.num_experts,
      self.moe_intermediate_size,
      self.activation,
      self.implementation,
      self.initializer_range,
      self.dtype,
      self.param_dtype,
      name="experts",
    )(h, index, weights)
    y = Gemma4RMSNorm(self.eps, self.param_dtype, name="post_feedforward_layernorm_2")(y)
    return y.reshape(x.shape)


def hf_tensor_entries(
  hidden_size: int, num_experts: int, moe_intermediate_size: int
) -> list[tuple[str, tuple[str, ...], str, tuple]]:
  """The Hugging Face <-> Linen table of one MoE branch.

  Args:
    hidden_size: D.
    num_experts: E.
    moe_intermediate_size: F.

  Returns:
    `(hf_suffix, path, kind, hf_shape)` per tensor: `hf_suffix` relative to the decoder
    layer (`router.proj.weight`), `path` relative to `Gemma4MoE`, `kind` `'id'`
    (same array) or `'T'` (transposed), as in `hf_names.to_flax`.
  """
  d, e, f = hidden_size, num_experts, moe_intermediate_size
  return [
    ("router.proj.weight", ("router", "proj", "kernel"), "T", (e, d)),
    ("router.scale", ("router", "scale"), "id", (d,)),
    ("router.per_expert_scale", ("router", "per_expert_scale"), "id", (e,)),
    ("experts.gate_up_proj", ("experts", "gate_up_proj"), "id", (e, 2 * f, d)),
    ("experts.down_proj", ("experts", "down_proj"), "id", (e, d, f)),
    ("pre_feedforward_layernorm_2.weight", ("pre_feedforward_layernorm_2", "scale"), "id", (d,)),
    ("post_feedforward_layernorm_2.weight", ("post_feedforward_layernorm_2", "scale"), "id", (d,)),
  ]


def _to_numpy(value) -> np.ndarray:
  """A numpy view of a numpy, jax or torch array (torch bf16, which numpy lacks, as fp32)."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def params_from_hf(state_dict: Mapping[str, Any], prefix: str = "") -> dict:
  """Builds `Gemma4MoE`'s params from one decoder layer's Hugging Face tensors.

  Args:
    state_dict: mapping from names to arrays (numpy, torch or jax), e.g. a decoder layer's
      `state_dict()`; extra keys are ignored.
    prefix: prepended to every name (`"model.layers.3."`).

  Returns:
    The nested params dict of one `Gemma4MoE` (numpy arrays; torch bf16 becomes fp32).

  Raises:
    KeyError: a tensor of the table is missing.
    ValueError: a tensor's shape disagrees with the others (the dims are read from
      `router.proj.weight` and `experts.down_proj`).
  """

  def get(suffix):
    name = prefix + suffix
    if name not in state_dict:
      raise KeyError(f"missing MoE tensor {name!r} in the checkpoint")
    return _to_numpy(state_dict[name])

  num_experts, hidden = get("router.proj.weight").shape
  moe_width = get("experts.down_proj").shape[-1]
  params: dict = {}
  for suffix, path, kind, shape in hf_tensor_entries(hidden, num_experts, moe_width):
    array = get(suffix)
    if array.shape != shape:
      raise ValueError(f"MoE tensor {prefix + suffix!r} has shape {array.shape}, expected {shape}")
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = array.T if kind == "T" else array
  return params


def params_to_hf(params: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  """Inverse of `params_from_hf`: one `Gemma4MoE`'s params as Hugging Face tensors.

  Args:
    params: the params of one (unstacked) `Gemma4MoE`.
    prefix: prepended to every name.

  Returns:
    `{name: numpy array}` in Hugging Face layout.
  """
  num_experts, hidden, moe_width = np.shape(params["experts"]["down_proj"])
  out = {}
  for suffix, path, kind, _ in hf_tensor_entries(hidden, num_experts, moe_width):
    node = params
    for key in path:
      node = node[key]
    array = np.asarray(node)
    out[prefix + suffix] = array.T if kind == "T" else array
  return out
