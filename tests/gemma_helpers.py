"""Tiny random Hugging Face Gemma models for the Gemma tests (built locally, no hub)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from oftjax.models.gemma import loading, safetensors_file

VOCAB = 128
torch.set_num_threads(1)  # tiny models: threads only add contention on a shared 2-core machine

# name -> (config class, kwargs). Small widths; head_dim != hidden / heads everywhere.
CONFIGS = {
  "gemma1_mha": (
    transformers.GemmaConfig,
    dict(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=4,
      head_dim=16,
    ),
  ),
  "gemma1_mqa": (
    transformers.GemmaConfig,
    dict(
      hidden_size=32,
      intermediate_size=48,
      num_hidden_layers=2,
      num_attention_heads=2,
      num_key_value_heads=1,
      head_dim=24,
      rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    ),
  ),
  "gemma2": (
    transformers.Gemma2Config,
    dict(
      hidden_size=48,
      intermediate_size=96,
      num_hidden_layers=3,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=16,
      sliding_window=5,
      query_pre_attn_scalar=24,
      attn_logit_softcapping=3.0,
      final_logit_softcapping=10.0,
    ),
  ),
  "gemma3": (
    transformers.Gemma3TextConfig,
    dict(
      hidden_size=48,
      intermediate_size=96,
      num_hidden_layers=4,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=16,
      sliding_window=4,
      query_pre_attn_scalar=16,
      final_logit_softcapping=12.0,
      layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
      rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
      },
    ),
  ),
  "gemma3_mqa": (
    transformers.Gemma3TextConfig,
    dict(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=3,
      num_attention_heads=4,
      num_key_value_heads=1,
      head_dim=8,
      sliding_window=3,
      query_pre_attn_scalar=8,
      sliding_window_pattern=2,
    ),
  ),
}
CAUSAL_LM = {
  transformers.GemmaConfig: transformers.GemmaForCausalLM,
  transformers.Gemma2Config: transformers.Gemma2ForCausalLM,
  transformers.Gemma3TextConfig: transformers.Gemma3ForCausalLM,
}


def hf_config(name: str):
  """The transformers config of a tiny test model."""
  cls, kwargs = CONFIGS[name]
  return cls(
    vocab_size=VOCAB,
    pad_token_id=0,
    eos_token_id=None,
    bos_token_id=2,
    attn_implementation="eager",
    **kwargs,
  )


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
  """Gives every weight (norms included) random values of a size that keeps activations O(1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        p.copy_(torch.rand(p.shape, generator=gen) - 0.5)
      elif "embed_tokens" in name:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
      else:
        p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[1]))


def make_hf_model(name: str, seed: int = 0):
  """A random fp32 eager transformers causal LM of config `name`."""
  torch.manual_seed(seed)
  cfg = hf_config(name)
  model = CAUSAL_LM[type(cfg)](cfg).eval()
  randomize_(model, seed)
  return model


def save_hf_model(name: str, folder, seed: int = 0):
  """Builds and `save_pretrained`s a random model; returns the torch model."""
  model = make_hf_model(name, seed)
  model.save_pretrained(folder)
  return model


def assert_same_state(ref: torch.nn.Module, back: torch.nn.Module) -> None:
  """The two models hold the same tensors under the same names, equal to the bit."""
  ref_sd, back_sd = ref.state_dict(), back.state_dict()
  assert set(ref_sd) == set(back_sd)
  for key in ref_sd:
    assert torch.equal(ref_sd[key], back_sd[key]), key


def raw_tensors(folder) -> dict:
  """`{name: (dtype, shape, bytes)}` of every tensor in a folder's safetensors files."""
  out = {}
  for path in loading._weight_files(folder, allow_pickle=False):
    with open(path, "rb") as fh:
      header, start = safetensors_file.read_header(path, fh)
      for name, info in header.items():
        begin, end = info["data_offsets"]
        fh.seek(start + begin)
        out[name] = (info["dtype"], tuple(info["shape"]), fh.read(end - begin))
  return out


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
  """transformers logits (fp32); padded batches get `position_ids = cumsum(mask) - 1`."""
  ids = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
  kwargs = {}
  if mask is not None:
    m = torch.as_tensor(np.asarray(mask), dtype=torch.long)
    kwargs = dict(attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0))
  with torch.no_grad():
    return model(ids, **kwargs).logits.float().numpy()


def hf_generate(model, tokens, mask, max_new_tokens: int, **kw) -> np.ndarray:
  """transformers' greedy `generate` of `max_new_tokens` after a padded batch: the new ids."""
  with torch.no_grad():
    out = model.generate(
      torch.as_tensor(tokens),
      attention_mask=torch.as_tensor(mask),
      max_new_tokens=max_new_tokens,
      do_sample=False,
      pad_token_id=0,
      **kw,
    )
  return out[:, tokens.shape[1] :].numpy()


def padded_batch(rng: np.random.Generator, lengths, total: int, left: bool = True):
  """Random tokens `[batch, total]` with per-row lengths and a padding mask."""
  tokens = np.zeros((len(lengths), total), np.int64)
  mask = np.zeros((len(lengths), total), np.int64)
  for i, n in enumerate(lengths):
    sl = slice(total - n, total) if left else slice(0, n)
    tokens[i, sl] = rng.integers(3, VOCAB, n)
    mask[i, sl] = 1
  return tokens, mask


@functools.partial(jax.jit, static_argnums=0)
def forward(model, params, tokens, positions=None, segment_ids=None, attention_mask=None):
  """Jitted `model.apply` (compiled once per model config and input shape)."""
  return model.apply({"params": params}, tokens, positions, segment_ids, attention_mask)


def next_token_loss_of(model):
  """`loss(params, tokens)`: mean cross-entropy of `model` predicting `tokens[:, 1:]`."""

  def loss(params, tokens):
    logits = model.apply({"params": params}, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

  return loss


def deep_gemma3_config(layers: int):
  """The tiny Gemma 3 config with `layers` layers, sliding and full attention alternating."""
  cfg = hf_config("gemma3")
  cfg.num_hidden_layers = layers
  cfg.layer_types = ["sliding_attention", "full_attention"] * (layers // 2)
  return cfg


def random_like(tree, rng: np.random.Generator, scale: float):
  """Normal values times `scale` in the shapes and dtypes of `tree` (arrays or shape structs):
  random frozen weights without compiling an init, or non-zero adapters (`R = I` or `B = 0`
  would hide mistakes)."""
  return jax.tree_util.tree_map(
    lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), tree
  )


def adapter_loss_of(module):
  """`loss(trainable, frozen, tokens)`: `next_token_loss_of(module)` on the merged trees."""
  from oftjax import params as P

  loss = next_token_loss_of(module)
  return lambda trainable, frozen, tokens: loss(P.merge_params(frozen, trainable), tokens)


def decode_stepwise(model, params, decode_method, cache, tokens, mask, prefill: int = 6):
  """Logits of a left-padded batch from one full forward and from a key/value cache: a
  prefill of `prefill` tokens, then one `decode_method` step per token.

  Returns:
    `(stepped, full)`: `[batch, time, vocab]` NumPy logits of the cache path and the full pass.
  """
  full = np.asarray(forward(model, params, jnp.asarray(tokens), attention_mask=jnp.asarray(mask)))
  kv = jnp.zeros(mask.shape, jnp.int32).at[:, :prefill].set(jnp.asarray(mask[:, :prefill]))
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  decode = jax.jit(lambda *a: model.apply({"params": params}, *a, method=decode_method))
  logits, cache = decode(
    jnp.asarray(tokens[:, :prefill]), jnp.asarray(pos[:, :prefill]), cache, 0, kv
  )
  steps = [np.asarray(logits)]
  for t in range(prefill, tokens.shape[1]):
    kv = kv.at[:, t].set(1)
    logits, cache = decode(
      jnp.asarray(tokens[:, t : t + 1]), jnp.asarray(pos[:, t : t + 1]), cache, t, kv
    )
    steps.append(np.asarray(logits))
  return np.concatenate(steps, axis=1), full
