"""Configuration: the default ``ainode.toml`` and the settings loader."""

from conf.settings import (
    ConfigError,
    DestinationSettings,
    HttpSettings,
    NodeSettings,
    Settings,
    StorageSettings,
    StudySettings,
    default_config_path,
    load_settings,
)

__all__ = [
    "ConfigError",
    "DestinationSettings",
    "HttpSettings",
    "NodeSettings",
    "Settings",
    "StorageSettings",
    "StudySettings",
    "default_config_path",
    "load_settings",
]
