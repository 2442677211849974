"""Shared fixtures: small checkpoints made on the spot (weights can never be downloaded here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from common.model.tiny import ARCHS, make_tiny

# Property tests draw the same examples on every run, so that `make test` is deterministic (a test
# that fails one run in twenty blocks everyone's CI); `HYPOTHESIS_PROFILE=explore` draws new ones,
# to look for what the fixed draw does not reach, and prints the seed of any failure found.
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A test-sized folder per architecture.

    llama: GQA; mistral: GQA with head_dim != hidden/heads; qwen2: q/k/v bias, MHA, tied embeddings.
    """
    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def llama_dir(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]
