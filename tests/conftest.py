"""Shared fixtures: small checkpoints made on the spot (weights can never be downloaded here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.model.tiny import ARCHS, make_tiny


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
