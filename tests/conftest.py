"""Shared pytest set-up: deterministic CPU JAX with fp32 matmuls, and the session fixtures
used by several test modules (plain helpers are in `*_helpers.py`)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests use local folders only
os.environ.setdefault(
  "OFTJAX_ASSETS",
  os.path.join(  # the job's shipped defaults
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "assets"
  ),
)

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
  """A random tiny Gemma 3 text model saved by transformers, with the shipped tokenizer."""
  import finetune_helpers

  folder = str(tmp_path_factory.mktemp("tiny-gemma3"))
  finetune_helpers.save_tiny_model(folder)
  return folder


@pytest.fixture(scope="session")
def tiny_multimodal_dir(tmp_path_factory):
  """A random tiny multimodal Gemma 3 (SigLIP tower, tied embeddings), shipped tokenizer."""
  import finetune_helpers

  folder = str(tmp_path_factory.mktemp("tiny-gemma3-multimodal"))
  finetune_helpers.save_tiny_multimodal_model(folder)
  return folder


@pytest.fixture(scope="session")
def rel(tmp_path_factory):
  """The reliability tests' session folder (`reliability_helpers.shared_dir`)."""
  import reliability_helpers

  return reliability_helpers.shared_dir(tmp_path_factory)
