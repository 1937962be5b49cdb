"""Configuration: the default ``ainode.toml`` and the settings loader."""

from conf.settings import (
    ConfigError,
    DestinationSettings,
    HttpSettings,
    ImagingSettings,
    NodeSettings,
    Settings,
    StorageSettings,
    StudySettings,
    VisionSettings,
    default_config_path,
    load_settings,
)

__all__ = [
    "ConfigError",
    "DestinationSettings",
    "HttpSettings",
    "ImagingSettings",
    "NodeSettings",
    "Settings",
    "StorageSettings",
    "StudySettings",
    "VisionSettings",
    "default_config_path",
    "load_settings",
]
