"""A small transformer-shaped Linen model for adapter tests (no oftjax imports)."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class Block(nn.Module):
  """Pre-norm attention + gated MLP with HF-style projection names."""

  width: int = 64
  heads: int = 4
  mlp: int = 128
  use_einsum: bool = False

  @nn.compact
  def __call__(self, x, _=None):
    head_dim = self.width // self.heads
    h = nn.RMSNorm(name="norm1")(x)
    q = nn.DenseGeneral((self.heads, head_dim), use_bias=False, name="q_proj")(h)
    k = nn.DenseGeneral((self.heads, head_dim), use_bias=False, name="k_proj")(h)
    v = nn.DenseGeneral((self.heads, head_dim), use_bias=False, name="v_proj")(h)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim)
    causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
    attn = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", attn, v)
    x = x + nn.DenseGeneral(self.width, axis=(-2, -1), use_bias=False, name="o_proj")(ctx)
    h = nn.RMSNorm(name="norm2")(x)
    gate = nn.Dense(self.mlp, use_bias=False, name="gate_proj")(h)
    up = nn.Dense(self.mlp, use_bias=False, name="up_proj")(h)
    hidden = jax.nn.gelu(gate) * up
    if self.use_einsum:
      down = nn.Einsum((self.mlp, self.width), "btf,fd->btd", use_bias=False, name="down_proj")
    else:
      down = nn.Dense(self.width, use_bias=False, name="down_proj")
    return x + down(hidden), None


class TinyLM(nn.Module):
  """Embedding, `depth` blocks under `nn.scan` (optionally remat), tied-free LM head."""

  vocab: int = 97
  width: int = 64
  depth: int = 2
  mlp: int = 128
  scan: bool = True
  remat: bool = False
  use_einsum: bool = False

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.width, name="embed")(tokens)
    block = nn.remat(Block) if self.remat else Block
    kwargs = dict(width=self.width, mlp=self.mlp, use_einsum=self.use_einsum)
    if self.scan:
      stack = nn.scan(
        block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.depth
      )
      x, _ = stack(name="layers", **kwargs)(x, None)
    else:
      for i in range(self.depth):
        x, _ = block(name=f"layers_{i}", **kwargs)(x)
    return nn.Dense(self.vocab, use_bias=False, name="lm_head")(nn.RMSNorm(name="final_norm")(x))


def next_token_loss(logits, tokens):
  """Mean cross-entropy of predicting `tokens[:, 1:]`."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
