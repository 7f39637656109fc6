"""Configuration: TOML -> frozen dataclasses (`model`), read and validated by `load`."""

from maildetour.config.load import ConfigError, load_config
from maildetour.config.model import Config

__all__ = ["Config", "ConfigError", "load_config"]
