"""Builds the shipped tokenizer, pretraining corpus and finetuning task (seeded, reproducible).

Everything lands under `experiments/assets/`:

- `tokenizer/`: a character-level tokenizer saved as Hugging Face files (`tokenizer.json`,
  `tokenizer_config.json`, `special_tokens_map.json`, `chat_template.jinja`), loadable by
  `transformers.AutoTokenizer.from_pretrained`. Ids follow Gemma's order for the specials:
  `<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>` 3, then `<start_of_turn>`/`<end_of_turn>`,
  newline, space and the 94 printable ASCII characters (102 ids in all). Encoding adds `<bos>`.
- `pretrain/train.jsonl`: the base model's pretraining corpus, `{"prompt","completion"}`
  records over four string skills on short lowercase words: `copy`, `reverse`, `upper`
  (uppercase) and `next` (shift every letter by one, z -> a). A prompt reads `"reverse abcd:"`
  and its completion `"dcba"`.
- `task/train.jsonl` and `task/eval.jsonl`: the new task, `shout`: reverse the word *and*
  uppercase it (`"shout abcd:"` -> `"DCBA"`). The base never saw the keyword nor the
  composition, so it cannot do it; both halves are skills it has, so adapting only rotations of
  the linear layers' inputs can route the new keyword to them. `train.jsonl` also holds a
  replay share (25%) of pretraining records: trained on `shout` alone, every adapter learns
  "always reverse and uppercase" and the old skills drop to 0%; with 10% replay retention was
  ~60%, with 25% ~90-95% (OFT, 200 steps). `eval.jsonl` is `shout` only.
- `task/retention.jsonl`: held-out examples of the four pretraining skills (forgetting check).

Words in the three task files are disjoint from each other and from the pretraining corpus.

Usage: `python experiments/make_assets.py [--out experiments/assets] [--seed 0]`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import string

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
CHARACTERS = ("\n", " ") + tuple(chr(i) for i in range(33, 127))

# Gemma's chat format; `assistant` renders as `model` like Gemma's own template.
CHAT_TEMPLATE = (
  "{{ bos_token }}"
  "{% for message in messages %}"
  "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
  "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

PRETRAIN_SKILLS = ("copy", "reverse", "upper", "next")
NEW_TASK = "shout"
MIN_LEN, MAX_LEN = 3, 8
SIZES = {"pretrain": 40_000, "task_train": 2_000, "task_eval": 200, "retention": 200}
REPLAY_FRACTION = 0.25  # share of task/train.jsonl drawn from the pretraining corpus


def apply_skill(skill: str, word: str) -> str:
  """Returns the completion of `skill` on `word` (lowercase ASCII letters)."""
  if skill == "copy":
    return word
  if skill == "reverse":
    return word[::-1]
  if skill == "upper":
    return word.upper()
  if skill == "next":
    return "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in word)
  if skill == NEW_TASK:
    return word[::-1].upper()
  raise ValueError(f"unknown skill {skill!r}")


def make_record(skill: str, word: str) -> dict:
  """One `{"prompt","completion"}` record; the prompt is `"<skill> <word>:"`."""
  return {"prompt": f"{skill} {word}:", "completion": apply_skill(skill, word)}


def build_tokenizer(out_dir: pathlib.Path) -> None:
  """Writes the character-level tokenizer's Hugging Face files into `out_dir`."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

  vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
  tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
  tokenizer.decoder = decoders.Fuse()
  tokenizer.add_special_tokens(
    [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
  )
  tokenizer.post_processor = processors.TemplateProcessing(
    single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
  )
  out_dir.mkdir(parents=True, exist_ok=True)
  tokenizer.save(str(out_dir / "tokenizer.json"))
  specials = {
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
  }
  config = {
    **specials,
    "tokenizer_class": "PreTrainedTokenizerFast",
    "clean_up_tokenization_spaces": False,
    "add_bos_token": True,
    "add_eos_token": False,
    "padding_side": "left",
    "model_max_length": 512,
    "chat_template": CHAT_TEMPLATE,
  }
  _write_json(out_dir / "tokenizer_config.json", config)
  _write_json(out_dir / "special_tokens_map.json", specials)
  (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def sample_words(rng: random.Random, count: int, taken: set[str]) -> list[str]:
  """Draws `count` distinct words not in `taken` (and adds them to it)."""
  words = []
  while len(words) < count:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))
    if word not in taken:
      taken.add(word)
      words.append(word)
  return words


def build_datasets(seed: int) -> dict[str, list[dict]]:
  """Returns the records of every shipped JSONL file, keyed by its path under the assets folder."""
  rng = random.Random(seed)
  taken: set[str] = set()
  pretrain_words = sample_words(rng, SIZES["pretrain"], taken)
  pretrain = [make_record(rng.choice(PRETRAIN_SKILLS), w) for w in pretrain_words]
  retention_words = sample_words(rng, SIZES["retention"], taken)
  retention = [
    make_record(PRETRAIN_SKILLS[i % len(PRETRAIN_SKILLS)], w) for i, w in enumerate(retention_words)
  ]
  task_train = [make_record(NEW_TASK, w) for w in sample_words(rng, SIZES["task_train"], taken)]
  num_replay = round(SIZES["task_train"] * REPLAY_FRACTION / (1 - REPLAY_FRACTION))
  task_train += rng.sample(pretrain, num_replay)
  rng.shuffle(task_train)
  task_eval = [make_record(NEW_TASK, w) for w in sample_words(rng, SIZES["task_eval"], taken)]
  return {
    "pretrain/train.jsonl": pretrain,
    "task/train.jsonl": task_train,
    "task/eval.jsonl": task_eval,
    "task/retention.jsonl": retention,
  }


def _write_json(path: pathlib.Path, obj: dict) -> None:
  path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: pathlib.Path, records: list[dict]) -> None:
  """Writes one compact JSON object per line."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--out",
    default=str(pathlib.Path(__file__).parent / "assets"),
    help="assets folder (default: experiments/assets)",
  )
  parser.add_argument("--seed", type=int, default=0, help="seed of the data generator (default: 0)")
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  build_tokenizer(out / "tokenizer")
  for rel_path, records in build_datasets(args.seed).items():
    write_jsonl(out / rel_path, records)
    print(f"wrote {out / rel_path} ({len(records)} records)")
  print(f"wrote {out / 'tokenizer'}")


if __name__ == "__main__":
  main()
