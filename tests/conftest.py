"""Shared fixtures: composed configs, the tiny random models, the packaged models (session-scoped)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

ROOT = Path(__file__).resolve().parents[1]
RELEASE_DIR = ROOT.parent / "shared" / "ember-release"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-large", action="store_true", help="run the large reliability suites")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-large"):
        return
    skip = pytest.mark.skip(reason="large suite: run with `make test-large`")
    for item in items:
        if "large" in item.keywords:
            item.add_marker(skip)


def compose(overrides: list[str] | None = None):
    """Compose the project's config the way `python -m ember` does (no Hydra run dir)."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import ember.config  # noqa: F401

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return hcompose(config_name="config", overrides=overrides or [])


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model cache is shared with the user's (converting a GGUF is slow); derived caches are per session."""
    return Path(os.environ.get("EMBER_CACHE", Path.home() / ".cache" / "ember"))


@pytest.fixture(scope="session")
def tiny(cache_dir: Path):
    from ember.config import model_preset
    from ember.models import load_model

    return load_model(model_preset("tiny_random"), cache_root=cache_dir)


@pytest.fixture(scope="session")
def tiny_gemma(cache_dir: Path):
    from ember.config import model_preset
    from ember.models import load_model

    return load_model(model_preset("tiny_random_gemma"), cache_root=cache_dir)


@pytest.fixture(scope="session")
def smollm2(cache_dir: Path):
    from ember.config import model_preset
    from ember.models import load_model

    return load_model(model_preset("smollm2_135m"), cache_root=cache_dir)


@pytest.fixture(scope="session")
def gemma3(cache_dir: Path):
    from ember.config import model_preset
    from ember.models import load_model

    return load_model(model_preset("gemma3_270m"), cache_root=cache_dir)


@pytest.fixture(scope="session")
def release_dir() -> Path:
    if not RELEASE_DIR.is_dir():
        pytest.skip(f"release data not found at {RELEASE_DIR}")
    return RELEASE_DIR
