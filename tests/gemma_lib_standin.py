"""A tiny stand-in for the google-deepmind/gemma library's Transformer, with its layer forms.

Written from gemma 3.3.0's `gemma/gm/nn/_layers.py`, `_modules.py`, `_transformer.py`
and `gemma/gm/utils/_dtype_params.py` (read in /work/gemma-venv, not copied), keeping
what the adapters meet there:

- `Einsum(shape, weight_name='w')` called as `layer(eqn, x)`, its weight created by
  `self.param(weight_name, init, shape, dtype)`;
- attention projections `'BTD,NDH->BTNH'`, `'BSD,CKDH->CBSKH'` (the key/value pair, its
  output stacked first) and `'BTNH,NHD->BTD'`;
- the MLP: two einsums that share their parent's scope (`nn.share_scope`), weights
  `gating_einsum` (`'...F,NHF->...NH'`, the transposed gating) and `linear`
  (`'...H,HF->...F'`), both at the path `…/mlp`;
- `Transformer.__call__` wrapped in `nn.jit` (static `self`), returning an `Output`
  with `logits`;
- `patched_module_param()`: gemma replaces `nn.Module.param` at import with a version
  whose `shape` is a required argument.

The library itself is tested in tests/test_gemma_library.py (skipped without it).
"""

import contextlib
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

import oftjax

TARGETS = r".*(q_einsum|kv_einsum|attn_vec_einsum|mlp)"


class Einsum(nn.Module):
  """gemma's `_layers.Einsum`: a weight of `shape`, applied as `einsum(eqn, x, w)`."""

  shape: tuple[int, ...]
  weight_name: str = "w"
  initializer: nn.initializers.Initializer = nn.initializers.normal()
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
    w = self.param(self.weight_name, self.initializer, self.shape, self.dtype)
    return jnp.einsum(eqn, x, w)


oftjax.layer_kinds.register_layer(Einsum, oftjax.layer_kinds.describe_gemma_einsum)


class RMSNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
    normed = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)
    return normed * (1 + scale)


class Attention(nn.Module):
  num_heads: int
  num_kv_heads: int
  features: int
  head_dim: int

  def setup(self):
    self.q_einsum = Einsum((self.num_heads, self.features, self.head_dim))
    self.kv_einsum = Einsum((2, self.num_kv_heads, self.features, self.head_dim))
    self.attn_vec_einsum = Einsum((self.num_heads, self.head_dim, self.features))

  def __call__(self, x, mask):
    q = self.q_einsum("BTD,NDH->BTNH", x) * self.head_dim**-0.5
    k, v = self.kv_einsum("BSD,CKDH->CBSKH", x)
    b, t, n, h = q.shape
    q = q.reshape(b, t, self.num_kv_heads, n // self.num_kv_heads, h)
    logits = jnp.einsum("BTKGH,BSKH->BTKGS", q, k)
    logits = jnp.where(mask[:, :, None, None, :], logits, -2.3819763e38)
    probs = jax.nn.softmax(logits, axis=-1)
    encoded = jnp.einsum("BTKGS,BSKH->BTKGH", probs, v).reshape(b, t, n, h)
    return self.attn_vec_einsum("BTNH,NHD->BTD", encoded)


class FeedForward(nn.Module):
  features: int
  hidden_dim: int

  @nn.compact
  def __call__(self, x):
    gating = Einsum((2, self.hidden_dim, self.features), weight_name="gating_einsum")
    nn.share_scope(self, gating)
    gate = gating("...F,NHF->...NH", x)
    activations = nn.gelu(gate[..., 0, :]) * gate[..., 1, :]
    linear = Einsum((self.hidden_dim, self.features), weight_name="linear")
    nn.share_scope(self, linear)
    return linear("...H,HF->...F", activations)


class Block(nn.Module):
  num_heads: int
  num_kv_heads: int
  embed_dim: int
  head_dim: int
  hidden_dim: int

  def setup(self):
    self.pre_attention_norm = RMSNorm()
    self.attn = Attention(self.num_heads, self.num_kv_heads, self.embed_dim, self.head_dim)
    self.pre_ffw_norm = RMSNorm()
    self.mlp = FeedForward(self.embed_dim, self.hidden_dim)

  def __call__(self, x, mask):
    x = x + self.attn(self.pre_attention_norm(x), mask)
    return x + self.mlp(self.pre_ffw_norm(x))


@flax.struct.dataclass
class Output:
  logits: jax.Array


class Transformer(nn.Module):
  """Decoder: tied embedding, blocks, final norm; `__call__` under `nn.jit` as gemma's."""

  vocab: int = 64
  embed_dim: int = 32
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  hidden_dim: int = 64

  def setup(self):
    self.input_embedding = self.param(
      "input_embedding", nn.initializers.normal(), (self.vocab, self.embed_dim)
    )
    self.blocks = [
      Block(
        self.num_heads,
        self.num_kv_heads,
        self.embed_dim,
        self.head_dim,
        self.hidden_dim,
        name=f"layer_{i}",
      )
      for i in range(self.num_layers)
    ]
    self.final_norm = RMSNorm()

  @functools.partial(nn.jit, static_argnames=("self",))
  def __call__(self, tokens: jax.Array) -> Output:
    x = self.input_embedding[tokens] * jnp.sqrt(self.embed_dim)
    t = tokens.shape[-1]
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (tokens.shape[0], t, t))
    for block in self.blocks:
      x = block(x, mask)
    return Output(logits=self.final_norm(x) @ self.input_embedding.T)


@contextlib.contextmanager
def patched_module_param():
  """`nn.Module.param` replaced as gemma replaces it on import: `shape` is required."""
  original = nn.Module.param

  def param(self, name, init_fn, shape, dtype=None, **kwargs):
    return original(self, name, init_fn, shape, dtype, **kwargs)

  nn.Module.param = param
  try:
    yield
  finally:
    nn.Module.param = original
