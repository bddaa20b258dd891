"""OmegaConf resolvers used by conf/ (registered on import, before Hydra composes)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "conf"

OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
