"""Every configured plugin, built once per process from ``config.toml``."""

from __future__ import annotations

from pathlib import Path

from controllers.registry import Controllers, build_controllers
from core.config import load_config
from core.settings import Settings


def load_controllers(settings: Settings) -> Controllers:
    """Read and validate ``config.toml`` and build every plugin (fails before serving)."""
    config = load_config(settings.config)
    return build_controllers(config, file=str(settings.config), data_dir=Path(settings.data_dir))
