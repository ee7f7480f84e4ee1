"""OFT on a google-deepmind/gemma library model (`gm.nn.Transformer`), a few steps.

Needs the optional extra: `pip install oftjax[gemma-lib]` (gemma pulls tensorflow; keep it
out of the main environment). With no checkpoint it builds a tiny random model from
Gemma3_270M's config, shrunk; pass `--checkpoint DIR` to load that library's own params
with `gm.ckpts.load_params` (the full-size Gemma3_270M config is used then).

    python experiments/finetune_gemma_library.py --steps 5

The layers are the library's `Einsum`, registered in `oftjax.layer_kinds`; the adapter
tree has `oft_w` beside each attention weight and `oft_gating_einsum` / `oft_linear` in
each MLP. After training, `adapted.fold` writes the rotations into those weights, under
their own names, so the library loads the folded tree as its own params.
"""

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import optax

import oftjax

TARGETS = r".*(q_einsum|kv_einsum|attn_vec_einsum|mlp)"


def tiny_model():
  """Gemma3_270M's config shrunk: 2 layers, width 32, 4 heads of 16, one KV head, vocab 128."""
  from gemma import gm

  config = dataclasses.replace(
    gm.nn.Gemma3_270M.config,
    num_embed=128,
    embed_dim=32,
    hidden_dim=64,
    num_heads=4,
    head_dim=16,
    num_kv_heads=1,
    attention_types=gm.nn.config.make_attention_layers_types(
      gm.nn.config.GEMMA3_ATTENTION_PATTERN, num_layers=2
    ),
    sliding_window_size=8,
  )
  return gm.nn.Transformer(config=config, dtype=jnp.float32)


def build(checkpoint: str | None):
  """`(model, params, vocab size)`: the library's Gemma3_270M from `checkpoint`, else tiny."""
  from gemma import gm

  if checkpoint:
    model = gm.nn.Gemma3_270M(dtype=jnp.float32)
    return model, gm.ckpts.load_params(checkpoint), model.config.num_embed
  model = tiny_model()
  example = jnp.ones((1, 8), jnp.int32)
  return model, model.init(jax.random.key(0), example)["params"], model.config.num_embed


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", default=None, help="a gemma library params folder")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--block-size", type=int, default=8)
  parser.add_argument("--lr", type=float, default=3e-2)
  args = parser.parse_args()

  model, base, vocab = build(args.checkpoint)
  tokens = jax.random.randint(jax.random.key(1), (4, 17), 1, vocab)
  config = oftjax.AdapterConfig(block_size=args.block_size, targets=TARGETS)
  adapted = oftjax.adapt(model, config, tokens[:, :-1])
  print(f"adapted {len(adapted.geometries)} weights, e.g. {sorted(adapted.geometries)[:3]}")

  def loss_fn(params, batch):
    logits = adapted.module.apply({"params": params}, batch[:, :-1]).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

  optimizer = optax.adam(args.lr)
  step = oftjax.make_train_step(loss_fn, optimizer)
  adapter = adapted.init(jax.random.key(2))
  opt_state = optimizer.init(adapter)
  for i in range(args.steps):
    adapter, opt_state, loss, _ = step(adapter, opt_state, base, tokens)
    print(f"step {i}: loss {float(loss):.4f}")
  folded = adapted.fold(oftjax.merge_params(base, adapter))
  gap = jnp.abs(
    model.apply({"params": folded}, tokens).logits
    - adapted.apply(oftjax.merge_params(base, adapter), tokens).logits
  ).max()
  print(f"folded into the model's own weights: max |logit gap| {float(gap):.2e}")


if __name__ == "__main__":
  main()
