"""Gemma 4 MoE branch against transformers' own router/experts/decoder layer (fp32, random)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.gemma4 import modeling_gemma4

from oftjax.models.gemma import gemma4_moe

torch.set_num_threads(1)

HIDDEN, EXPERTS, TOP_K, MOE_WIDTH = 16, 6, 2, 8
BATCH, TIME = 2, 7
IMPLEMENTATIONS = ("ragged_dot", "dense")


def _hf_layer(seed=0):
  """A random fp32 transformers Gemma 4 decoder layer with the MoE block enabled."""
  cfg = transformers.Gemma4TextConfig(
    vocab_size=32,
    hidden_size=HIDDEN,
    intermediate_size=24,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    global_head_dim=8,
    hidden_size_per_layer_input=0,
    layer_types=["full_attention"],
    enable_moe_block=True,
    num_experts=EXPERTS,
    top_k_experts=TOP_K,
    moe_intermediate_size=MOE_WIDTH,
    attn_implementation="eager",
    experts_implementation="eager",
  )  # HF's per-expert loop
  layer = modeling_gemma4.Gemma4TextDecoderLayer(cfg, 0).eval()
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for _, p in layer.named_parameters():
      if p.ndim == 1:  # norm weights and scales: away from their init values of one
        p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[-1]))
    layer.layer_scalar.copy_(torch.tensor([0.7]))
  return layer


def _hf_branch(layer, x):
  """The MoE lines of `Gemma4TextDecoderLayer.forward`, on HF's own submodules."""
  flat = x.reshape(-1, HIDDEN)
  probs, weights, index = layer.router(flat)
  y = layer.experts(layer.pre_feedforward_layernorm_2(flat), index, weights)
  return layer.post_feedforward_layernorm_2(y.reshape(x.shape)), probs, index


def _model(implementation):
  return gemma4_moe.Gemma4MoE(
    hidden_size=HIDDEN,
    num_experts=EXPERTS,
    top_k=TOP_K,
    moe_intermediate_size=MOE_WIDTH,
    activation="gelu_pytorch_tanh",
    eps=1e-6,
    implementation=implementation,
  )


def _inputs(case, seed=1):
  rng = np.random.default_rng(seed)
  if case == "random":
    return (2.0 * rng.standard_normal((BATCH, TIME, HIDDEN))).astype(np.float32)
  # every token near one point: all pick the same top-k experts, the other groups are empty
  base = 2.0 * rng.standard_normal(HIDDEN)
  return (base + 1e-2 * rng.standard_normal((BATCH, TIME, HIDDEN))).astype(np.float32)


def _assert_no_ties(probs):
  top = np.sort(probs, axis=-1)[:, ::-1][:, : TOP_K + 1]
  assert np.min(top[:, :-1] - top[:, 1:]) > 1e-4, "routing ties make the comparison ill-posed"


@pytest.mark.parametrize("case", ["random", "clustered"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_matches_transformers(implementation, case):
  layer = _hf_layer()
  x = _inputs(case)
  with torch.no_grad():
    want, probs, index = _hf_branch(layer, torch.from_numpy(x))
  probs, index = probs.numpy(), index.numpy()
  _assert_no_ties(probs)
  counts = np.bincount(index.reshape(-1), minlength=EXPERTS)
  assert counts.max() >= 2  # several tokens share an expert
  if case == "clustered":
    assert np.all(index == index[:1]) and np.sum(counts == 0) == EXPERTS - TOP_K

  params = gemma4_moe.params_from_hf(layer.state_dict())
  got = jax.jit(_model(implementation).apply)({"params": params}, x)
  _, _, got_index = gemma4_moe.Gemma4Router(EXPERTS, TOP_K).apply(
    {"params": params["router"]}, x.reshape(-1, HIDDEN)
  )
  np.testing.assert_array_equal(np.asarray(got_index), index)
  assert got.shape == (BATCH, TIME, HIDDEN)
  err = np.max(np.abs(np.asarray(got) - want.numpy()))
  assert err <= 1e-5, err


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gradients_match_transformers(implementation):
  layer = _hf_layer(seed=2)
  x = _inputs("random", seed=3)
  cotangent = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
  x_torch = torch.from_numpy(x).requires_grad_(True)
  out, probs, _ = _hf_branch(layer, x_torch)
  _assert_no_ties(probs.detach().numpy())
  (out * torch.from_numpy(cotangent)).sum().backward()
  want = gemma4_moe.params_from_hf(
    {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
  )

  model = _model(implementation)
  params = gemma4_moe.params_from_hf(layer.state_dict())
  loss = lambda p, v: jnp.sum(model.apply({"params": p}, v) * cotangent)
  grads, grad_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

  np.testing.assert_allclose(np.asarray(grad_x), x_torch.grad.numpy(), rtol=0, atol=1e-5)
  flat_got = dict(jax.tree_util.tree_flatten_with_path(grads)[0])
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  assert flat_got.keys() == flat_want.keys()
  for path, g in flat_got.items():
    g = np.asarray(g)
    assert np.all(np.isfinite(g)) and np.max(np.abs(g)) > 1e-3, path
    np.testing.assert_allclose(
      g,
      flat_want[path],
      rtol=0,
      atol=1e-5 * max(1.0, np.max(np.abs(g))),
      err_msg=jax.tree_util.keystr(path),
    )


def test_decoder_layer_combination_matches_transformers():
  """The combination the module docstring prescribes equals HF's decoder feed-forward half."""

  class NoAttention(torch.nn.Module):
    def forward(self, hidden_states, **kwargs):
      return torch.zeros_like(hidden_states), None

  layer = _hf_layer(seed=5)
  layer.self_attn = NoAttention()  # the attention half becomes the identity: x + norm(0)
  x = _inputs("random", seed=6)
  with torch.no_grad():
    want = layer(torch.from_numpy(x)).numpy()

  sd = {n: t.numpy() for n, t in layer.state_dict().items()}
  gelu = lambda v: jax.nn.gelu(v, approximate=True)
  norm = lambda name, v: gemma4_moe.rms_normalize(v, 1e-6) * sd[name + ".weight"]
  linear = lambda name, v: v @ sd[f"mlp.{name}.weight"].T

  def mlp(v):
    return linear("down_proj", gelu(linear("gate_proj", v)) * linear("up_proj", v))

  moe = _model("ragged_dot").apply({"params": gemma4_moe.params_from_hf(sd)}, x)
  dense = norm("post_feedforward_layernorm_1", mlp(norm("pre_feedforward_layernorm", x)))
  got = (x + norm("post_feedforward_layernorm", dense + moe)) * sd["layer_scalar"]
  err = np.max(np.abs(np.asarray(got) - want))
  assert err <= 1e-5, err


def test_param_table_matches_module_and_round_trips():
  layer = _hf_layer()
  state = {n: t.numpy() for n, t in layer.state_dict().items()}
  prefix = "model.language_model.layers.3."
  params = gemma4_moe.params_from_hf({prefix + n: t for n, t in state.items()}, prefix=prefix)
  shapes = jax.eval_shape(_model("ragged_dot").init, jax.random.key(0), jnp.zeros((1, 3, HIDDEN)))[
    "params"
  ]
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda s: s.shape, shapes)

  back = gemma4_moe.params_to_hf(params, prefix=prefix)
  entries = gemma4_moe.hf_tensor_entries(HIDDEN, EXPERTS, MOE_WIDTH)
  assert sorted(back) == sorted(prefix + suffix for suffix, *_ in entries)
  for name, array in back.items():
    np.testing.assert_array_equal(array, state[name[len(prefix) :]])
  assert params["router"]["proj"]["kernel"].shape == (HIDDEN, EXPERTS)  # the one transposed


def test_bad_inputs_raise():
  state = {n: t.numpy() for n, t in _hf_layer().state_dict().items()}
  with pytest.raises(KeyError, match="router.scale"):
    gemma4_moe.params_from_hf({k: v for k, v in state.items() if k != "router.scale"})
  state["experts.gate_up_proj"] = state["experts.gate_up_proj"][:, :-1]
  with pytest.raises(ValueError, match="gate_up_proj"):
    gemma4_moe.params_from_hf(state)
  model = gemma4_moe.Gemma4MoE(HIDDEN, EXPERTS, TOP_K, MOE_WIDTH, implementation="loop")
  with pytest.raises(ValueError, match="implementation"):
    model.init(jax.random.key(0), jnp.zeros((1, 2, HIDDEN)))
  with pytest.raises(ValueError, match="activation"):
    gemma4_moe.activation_fn("relu6")
