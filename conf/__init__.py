"""Configuration: the default ``ainode.toml`` and the settings loader."""

from conf.settings import (
    ConfigError,
    DeliverySettings,
    DestinationSettings,
    HttpSettings,
    ImagingSettings,
    NodeSettings,
    Settings,
    StorageSettings,
    StudySettings,
    VisionSettings,
    WorkerSettings,
    default_config_path,
    load_settings,
)

__all__ = [
    "ConfigError",
    "DeliverySettings",
    "DestinationSettings",
    "HttpSettings",
    "ImagingSettings",
    "NodeSettings",
    "Settings",
    "StorageSettings",
    "StudySettings",
    "VisionSettings",
    "WorkerSettings",
    "default_config_path",
    "load_settings",
]
