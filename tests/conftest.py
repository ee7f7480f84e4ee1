"""Shared pytest set-up: deterministic CPU JAX with fp32 matmuls."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests use local folders only
os.environ.setdefault("OFTJAX_ASSETS", os.path.join(  # the job's shipped defaults
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "assets"))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
