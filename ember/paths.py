"""Where things live: the package, its shipped data, the config tree, and the project root."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

PKG_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PKG_DIR.parent
CONF_DIR = PROJECT_ROOT / "conf"
STARTER_DIR = PKG_DIR / "data" / "starter"
#: the paper's concept data as the experiment scripts read it (jobs use ``data.release_dir``)
SCRIPT_RELEASE_DIR = Path(os.environ.get("EMBER_RELEASE_DIR", str(PROJECT_ROOT.parent / "shared" / "ember-release")))


def cache_root(cfg: Any) -> Path:
    """The job's ``cache_dir`` with ``~`` expanded (a quoted ``cache_dir='~/x'`` is not expanded by the shell)."""
    return Path(str(cfg.cache_dir)).expanduser()


def require_script_release(what: str) -> Path:
    """:data:`SCRIPT_RELEASE_DIR`, or exit naming where it was looked for and how to point elsewhere."""
    if not (SCRIPT_RELEASE_DIR / "concept_sentences.json").exists():
        raise SystemExit(f"{what} the paper's concept data, which is not at {SCRIPT_RELEASE_DIR}: put ember-release "
                         "at ../shared/ember-release or set EMBER_RELEASE_DIR")
    return SCRIPT_RELEASE_DIR


def project_root() -> str:
    """The checkout root when running from a clone, else the current directory."""
    return str(PROJECT_ROOT if (PROJECT_ROOT / "conf").is_dir() else Path.cwd())


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("ember_root"):
        OmegaConf.register_new_resolver("ember_root", project_root)
    if not OmegaConf.has_resolver("ember_pkg"):
        OmegaConf.register_new_resolver("ember_pkg", lambda: str(PKG_DIR))
    if not OmegaConf.has_resolver("job_tag"):
        OmegaConf.register_new_resolver("job_tag", lambda s="": job_tag(str(s)))


def job_tag(override_dirname: str) -> str:
    """A readable, filesystem-safe job directory name built from a job's overrides."""
    import hashlib

    if not override_dirname:
        return "defaults"
    safe = "".join(c if (c.isalnum() or c in "=,._+-") else "_" for c in override_dirname)
    if len(safe) > 120:
        digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:10]
        safe = safe[:100] + "-" + digest
    return safe
