"""The node's configuration: one validated, frozen object built at start and passed in.

Values come from a TOML file (DESIGN.md §4) and are overridden by environment variables named
``AINODE_<SECTION>__<KEY>``. Nothing else in the code reads the environment.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_origin

import httpx
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from conf.providers import PRESETS, preset_for
from conf.routing import Route

_UID_ROOT = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # Part 5 §6.2 AE: no backslash


class ConfigError(Exception):
    """The configuration cannot be used; the message is one line naming the key and the value."""


def _check_ae_title(value: str, name: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError(f'{name} must be 1 to 16 printable characters without "\\", got {value!r}')
    return value.strip()


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NodeSettings(_Section):
    ae_title: str = "AINODE"
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=0, le=65535)
    allowed_calling_aets: tuple[str, ...] = ()
    # An association whose called AE title is not ae_title is rejected (as a PACS does)
    check_called_aet: bool = True
    network_timeout_seconds: float = Field(default=30.0, gt=0)
    acse_timeout_seconds: float = Field(default=30.0, gt=0)
    dimse_timeout_seconds: float = Field(default=60.0, gt=0)
    max_pdu_bytes: int = Field(default=1_048_576, ge=0)
    max_associations: int = Field(default=128, ge=1)
    max_associations_per_peer: int = Field(default=64, ge=1)
    # Processes receiving on the port (SO_REUSEPORT); 0: one per CPU core. The association
    # limits above hold per receiving process.
    receiver_processes: int = Field(default=0, ge=0, le=64)
    # A Deflated Explicit VR instance is inflated (to a scratch file, in constant memory) only up
    # to this size, and past 64 MiB only up to this ratio to its deflated size: a deflate bomb
    # gets 0xC000.
    max_inflated_mb: int = Field(default=4096, ge=1)
    max_inflate_ratio: int = Field(default=100, ge=2)
    # What one instance may hold (scp.dataset_check.DatasetLimits): sequence items (pixel data
    # fragments included) and data elements at every level, and Number of Frames. Past one,
    # 0xC000 with the reason.
    max_sequence_items: int = Field(default=200_000, ge=1)
    max_data_elements: int = Field(default=1_000_000, ge=1)
    max_frames: int = Field(default=100_000, ge=1)
    # DICOM TLS (scp.tls): our certificate and key; with tls_ca, callers must present a client
    # certificate that chains to it. TLS 1.2 at least, BCP 195 cipher suites.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    # Bind the client certificate to the calling AE title it claims: the association is rejected
    # unless the calling AE title is the certificate's subject CN or a DNS name in its
    # subjectAltName, or one that tls_client_aets grants to one of those names
    # ({"modality.hospital.local" = ["CT01", "CT02"]}). Needs tls_ca.
    tls_bind_calling_aet: bool = False
    tls_client_aets: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    # An organisation UID root (at most 24 characters) for what the node makes; without one,
    # UIDs are 2.25.<UUID> from this installation's own random value (PS3.5 B.2).
    uid_root: str | None = None

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return _check_ae_title(value, "node.ae_title")

    @field_validator("uid_root")
    @classmethod
    def _uid_root(cls, value: str | None) -> str | None:
        if value is not None and (not _UID_ROOT.match(value) or len(value) > 24):
            raise ValueError(
                "node.uid_root must be digits and dots, no leading zeros, at most 24 characters "
                "(room for the 39-digit suffix in a 64-character UID)"
            )
        return value

    @field_validator("allowed_calling_aets", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return () if isinstance(value, str) and not value.strip() else value  # AINODE_..._AETS=

    @field_validator("allowed_calling_aets")
    @classmethod
    def _allowed(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_ae_title(v, "node.allowed_calling_aets") for v in value)

    @field_validator("tls_client_aets")
    @classmethod
    def _client_aets(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        return {
            name: tuple(_check_ae_title(v, f'node.tls_client_aets "{name}"') for v in titles)
            for name, titles in value.items()
        }

    @model_validator(mode="after")
    def _tls(self) -> NodeSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("node.tls_cert and node.tls_key go together: set both or neither")
        if self.tls_cert is None and self.tls_ca is not None:
            raise ValueError("node.tls_ca needs node.tls_cert and node.tls_key (TLS on)")
        if (self.tls_bind_calling_aet or self.tls_client_aets) and self.tls_ca is None:
            raise ValueError(
                "node.tls_bind_calling_aet and node.tls_client_aets need node.tls_ca: without it callers "
                "present no client certificate to bind"
            )
        if self.tls_client_aets and not self.tls_bind_calling_aet:
            raise ValueError("node.tls_client_aets is used only with node.tls_bind_calling_aet = true")
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None


class StorageSettings(_Section):
    root: Path = Path("var/ainode")
    database_url: str = "sqlite:///var/ainode/ainode.db"
    min_free_mb: int = Field(default=1024, ge=0)
    retention_days: float = Field(
        default=0, ge=0
    )  # delete instance files this long after their study ended; 0 keeps them

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        try:
            url = make_url(value)
        except (ArgumentError, ValueError):
            raise ValueError(
                "storage.database_url must be a database URL such as sqlite:///var/ainode/ainode.db or "
                "postgresql+psycopg://user@host/db"
            ) from None
        if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
            raise ValueError(
                "storage.database_url: an in-memory SQLite database keeps nothing a second command "
                "can read; give a file, e.g. sqlite:///var/ainode/ainode.db"
            )
        return value


class StudySettings(_Section):
    settle_seconds: float = Field(default=10.0, ge=0)


# CT windows by Body Part Examined, first one first: each window is its own set of tiles (a chest
# CT is read in lung and mediastinal windows, a head CT in brain and subdural windows). Parts not
# listed: the anatomy is judged from the series (analysis.windows), else "mediastinum".
DEFAULT_CT_WINDOW_BY_BODY_PART: dict[str, tuple[str, ...]] = {
    "CHEST": ("lung", "mediastinum"),
    "LUNG": ("lung", "mediastinum"),
    "THORAX": ("lung", "mediastinum"),
    "HEAD": ("brain", "subdural"),
    "BRAIN": ("brain", "subdural"),
    "SKULL": ("bone", "brain"),
    "ABDOMEN": ("soft_tissue",),
    "PELVIS": ("soft_tissue",),
    "ABDOMENPELVIS": ("soft_tissue",),
}


class ImagingSettings(_Section):
    """What the model is shown. Providers may lower these (their image and byte limits)."""

    max_images: int = Field(default=16, ge=1, le=64)  # per request; a mosaic counts as one
    mosaic_grid: int = Field(default=8, ge=1, le=8)  # mosaics of up to 8 x 8 tiles
    tile_px: int = Field(default=256, ge=64, le=1024)  # tile size when a frame has no pixel spacing
    long_edge_px: int = Field(default=1024, ge=64, le=8192)  # single images are scaled down to this
    mosaic_long_edge_px: int = Field(default=2048, ge=64, le=8192)  # mosaics are at most this wide and tall
    image_format: Literal["jpeg", "png"] = "jpeg"
    jpeg_quality: int = Field(default=85, ge=30, le=95)
    max_bytes_per_image: int = Field(default=5_000_000, ge=1024)
    max_bytes_per_request: int = Field(default=20_000_000, ge=1024)
    allow_burned_in_annotation: bool = False
    # Images of modalities that often burn in text (US, SC, XA, RF, ES, OT, DOC, SM, XC, GM)
    # whose header does not say BurnedInAnnotation NO: "exclude" (the default for each),
    # "mask" (deid's rule set by manufacturer and model, plus the top band) or "allow".
    unlabelled_burned_in: dict[str, Literal["exclude", "mask", "allow"]] = Field(default_factory=dict)
    # The top band blacked out on masked images (and on US and secondary captures labelled NO).
    mask_top_fraction: float = Field(default=0.22, ge=0, le=0.5)
    ct_window_by_body_part: dict[str, tuple[str, ...]] = Field(
        default_factory=lambda: dict(DEFAULT_CT_WINDOW_BY_BODY_PART)
    )
    # Volumes are shown as slabs that partition the series; no slab is thicker than this. A series
    # too long for the budget at this thickness gets more mosaics, never thicker slabs.
    max_slab_mm: float = Field(default=10.0, gt=0, le=50)
    # Image tokens per study (0: only vision.max_cost_usd_per_study limits them), by the
    # provider's own formula. The default covers a 300-slice chest CT in lung and mediastinal
    # windows at <= 10 mm slabs for about $0.012 at GPT-4.1's input price.
    max_image_tokens: int = Field(default=6000, ge=0)
    # Tiles are never so small that a finding this size is fewer than min_finding_px pixels across
    # in the image as the provider processes it (after its own rescaling).
    min_finding_mm: float = Field(default=5.0, gt=0)
    min_finding_px: float = Field(default=3.0, gt=0)
    # CT as MedGemma was trained: one RGB image per slab carrying three windows (R -1024..1024 HU,
    # G -135..215, B 0..80) instead of one set of tiles per window.
    ct_rgb_windows: bool = False
    # Set from the provider preset by analysis.prepare.for_provider: whose image token formula
    # and rescaling the budget is computed with.
    token_formula: Literal["openai", "anthropic", "gemini"] = "openai"

    @field_validator("ct_window_by_body_part", mode="before")
    @classmethod
    def _windows(cls, value: Any) -> Any:
        """One window per part (``CHEST = "lung"``, as before) or several (``["lung",
        "mediastinum"]``, or ``"lung,mediastinum"`` from an environment variable)."""
        if not isinstance(value, Mapping):
            return value
        out: dict[str, Any] = {}
        for part, windows in value.items():
            if isinstance(windows, str):
                windows = [w.strip() for w in windows.split(",") if w.strip()]
            if not windows:
                raise ValueError(f'imaging.ct_window_by_body_part: "{part}" names no window')
            out[str(part).upper()] = tuple(windows)
        return out


class VisionSettings(_Section):
    """The vision API. The key never lives in the file: ``AINODE_VISION__API_KEY``, or the
    variable named by ``api_key_env`` (read once, in :func:`load_settings`)."""

    provider: str = "holysheep"
    base_url: str | None = None  # the preset's unless set
    model: str | None = None  # the preset's unless set
    api_key: SecretStr | None = None
    api_key_env: str | None = None
    timeout_seconds: float = Field(default=60.0, gt=0)  # per read
    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    request_deadline_seconds: float = Field(default=300.0, gt=0)  # one request, all reads together
    max_reply_bytes: int = Field(default=8_388_608, ge=1024)
    max_concurrency: int = Field(default=4, ge=1, le=64)
    requests_per_minute: int = Field(default=60, ge=0)  # 0: no limit of ours
    tokens_per_minute: int = Field(default=0, ge=0)
    max_retries: int = Field(default=5, ge=0, le=20)
    backoff_base_seconds: float = Field(default=1.0, gt=0)
    backoff_cap_seconds: float = Field(default=60.0, gt=0)
    retry_after_cap_seconds: float = Field(default=120.0, gt=0)  # a provider's Retry-After, at most
    max_cost_usd_per_study: float = Field(default=0.50, ge=0)
    max_output_tokens: int = Field(default=2048, ge=64)
    temperature: float = Field(default=0.0, ge=0, le=2)
    circuit_failure_threshold: int = Field(default=5, ge=1)
    circuit_cooldown_seconds: float = Field(default=60.0, gt=0)

    @field_validator("api_key", mode="before")
    @classmethod
    def _api_key(cls, value: Any) -> Any:
        """An empty or blank key (``AINODE_VISION__API_KEY=$UNSET``) is no key: the node waits
        and says so, instead of sending every study unauthenticated into a permanent 401; a
        newline pasted with the key is not sent as part of a header."""
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(raw, str):
            return raw.strip() or None
        return value

    @property
    def missing_key(self) -> str | None:
        """Why no study can be analysed yet, or None: the provider needs a key and has none."""
        if self.api_key is None and preset_for(self.provider).needs_key:
            variable = self.api_key_env or "AINODE_VISION__API_KEY"
            return f"no vision API key for {self.provider}; set {variable}"
        return None

    @model_validator(mode="after")
    def _vision_capable(self) -> VisionSettings:
        preset = preset_for(self.provider)
        if not preset.vision:
            raise ValueError(
                f'vision.provider "{self.provider}" (model {self.model or preset.default_model}) takes text '
                "only; ainode needs a model with image input"
            )
        return self


class DeliverySettings(_Section):
    """Sending SRs to the destinations: retries back off from ``retry_base_seconds``, doubling,
    up to ``retry_cap_seconds``."""

    retry_base_seconds: float = Field(default=15.0, gt=0)
    retry_cap_seconds: float = Field(default=900.0, gt=0)
    poll_seconds: float = Field(default=1.0, gt=0)
    # Then dead-lettered (visible in status, redeliverable): about four days of a PACS that
    # refuses or is down, at the 15-minute cap.
    max_attempts: int = Field(default=400, ge=1)


class WorkerSettings(_Section):
    concurrency: int = Field(default=2, ge=1, le=64)  # analyses in flight in this process
    # Renewed every third of it while working; a node that dies on another host delays its
    # studies by about this long (on its own host, a restart reclaims them at once).
    lease_seconds: float = Field(default=60.0, gt=0)
    poll_seconds: float = Field(default=1.0, gt=0)


class HttpSettings(_Section):
    """The HTTP server: ``/healthz``, ``/metrics`` and the web console (``/``).

    With no ``users`` and no token the console answers only to loopback; with either, it asks
    for a login on every interface. ``users`` maps a name to a password hash made by
    ``ainode hash-password`` (never a password); ``token_env`` names the environment variable
    holding a login token (read once, in :func:`load_settings`, like the API key).
    ``tls_cert``/``tls_key``: serve the whole HTTP server over TLS (then session cookies are
    ``Secure``)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    users: dict[str, str] = Field(default_factory=dict)
    token_env: str | None = None
    token: SecretStr | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    session_hours: float = Field(default=12.0, gt=0)

    @field_validator("users")
    @classmethod
    def _hashes(cls, value: dict[str, str]) -> dict[str, str]:
        for name, hashed in value.items():
            if not hashed.startswith("scrypt$") or hashed.count("$") != 5:
                raise ValueError(
                    f'http.users "{name}" must be a hash made by `ainode hash-password` (scrypt$...), '
                    "never a password"
                )
        return value

    @field_validator("token", mode="before")
    @classmethod
    def _token(cls, value: Any) -> Any:
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(raw, str):
            return raw.strip() or None
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> HttpSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("http.tls_cert and http.tls_key go together: set both or neither")
        return self

    @property
    def login_required(self) -> bool:
        return bool(self.users) or self.token is not None

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None and self.tls_key is not None


class DestinationSettings(_Section):
    """A PACS reached by DIMSE C-STORE (``ae_title``, ``host``, ``port``) or by DICOMweb STOW-RS
    (``stow_url``, the service's base URL: ``.../dicom-web``; PS3.18 10.5)."""

    name: str
    ae_title: str | None = None
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    stow_url: str | None = None
    # What this destination gets: the SR ("sr"); the Secondary Capture summary image ("sc") that
    # viewers without TID 1500 support can show; a Key Object Selection flagging the images with
    # regions ("kos"); a presentation state drawing the regions on the original images ("gsps").
    outputs: tuple[Literal["sr", "sc", "kos", "gsps"], ...] = ("sr", "sc")
    # DICOM TLS to this destination (scp.tls; PS3.15 B.9): TLS 1.2 at least, BCP 195 cipher
    # suites, the PACS's certificate verified against tls_ca (else the system's trust store) and
    # its name against host (or tls_server_name, when the certificate names the PACS otherwise);
    # tls_cert/tls_key: our client certificate, for a PACS that asks for one. Never a fallback
    # to clear text.
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value, "destinations.ae_title")

    @field_validator("stow_url")
    @classmethod
    def _stow_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^https?://[^/\s]+", value):
            # not echoed: a URL may carry credentials
            raise ValueError("destinations.stow_url must be an http:// or https:// URL with a host")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_way_to_send(self) -> DestinationSettings:
        dimse = {"ae_title": self.ae_title, "host": self.host, "port": self.port}
        if self.stow_url is None:
            missing = [key for key, value in dimse.items() if value in (None, "")]
            if missing:
                raise ValueError(
                    f'destination "{self.name}" needs {", ".join(missing)} (DIMSE) or stow_url (DICOMweb)'
                )
        elif any(value is not None for value in dimse.values()):
            raise ValueError(
                f'destination "{self.name}" has both stow_url and ae_title/host/port: choose one'
            )
        tls_files = {
            "tls_ca": self.tls_ca,
            "tls_cert": self.tls_cert,
            "tls_key": self.tls_key,
            "tls_server_name": self.tls_server_name,
        }
        if self.stow_url is not None and (self.tls or any(v is not None for v in tls_files.values())):
            raise ValueError(
                f'destination "{self.name}": tls is for DIMSE destinations; a stow_url is secured by https://'
            )
        if not self.tls and any(v is not None for v in tls_files.values()):
            named = ", ".join(key for key, value in tls_files.items() if value is not None)
            raise ValueError(f'destination "{self.name}": {named} set but tls is not true')
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(
                f'destination "{self.name}": tls_cert and tls_key go together: set both or neither'
            )
        return self

    @property
    def address(self) -> tuple[str, int]:
        """The TCP address the destination listens on (for reachability checks)."""
        if self.stow_url is not None:
            url = httpx.URL(self.stow_url)
            return url.host, url.port or (443 if url.scheme == "https" else 80)
        return str(self.host), int(self.port or 0)

    def describe(self) -> str:
        """For logs and status: AE@host:port, or the STOW-RS URL without credentials."""
        if self.stow_url is not None:
            return str(httpx.URL(self.stow_url).copy_with(username=None, password=None))
        return f"{self.ae_title}@{self.host}:{self.port}" + (" (TLS)" if self.tls else "")


class Settings(BaseSettings):
    """Everything the node is configured with. Sections mirror the TOML file."""

    model_config = SettingsConfigDict(
        env_prefix="AINODE_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )

    node: NodeSettings = NodeSettings()
    storage: StorageSettings = StorageSettings()
    study: StudySettings = StudySettings()
    http: HttpSettings = HttpSettings()
    imaging: ImagingSettings = ImagingSettings()
    delivery: DeliverySettings = DeliverySettings()
    destinations: tuple[DestinationSettings, ...] = ()
    routes: tuple[Route, ...] = ()

    @model_validator(mode="after")
    def _routes_name_known_destinations(self) -> Settings:
        known = {d.name for d in self.destinations}
        for route in self.routes:
            unknown = sorted(set(route.destinations) - known)
            if unknown:
                raise ValueError(f'routes "{route.name}": destinations {unknown} are not in [[destinations]]')
            if route.provider is not None and route.provider not in PRESETS:
                raise ValueError(
                    f'routes "{route.name}": provider must be one of {sorted(PRESETS)}, '
                    f'got "{route.provider}"'
                )
        return self

    def route_base_url(self, route: Route) -> str:
        """The endpoint a route's requests go to: its own base_url, else the default's for the
        default's provider, else its provider's preset."""
        provider = route.provider or self.vision.provider
        default = self.vision.base_url if provider == self.vision.provider else None
        return route.base_url or default or preset_for(provider).base_url

    def route_api_key(self, route: Route) -> SecretStr | None:
        """The key a route's requests carry: its own; the default's only when the route goes to
        the default's provider at the default's endpoint (a key is never sent to another vendor,
        nor to another host under the same provider's name)."""
        if route.api_key is not None:
            return route.api_key
        return self.vision.api_key if self._default_endpoint(route) else None

    def _default_endpoint(self, route: Route) -> bool:
        """Whether a route's requests go where the default's do: same provider, same endpoint."""
        default_url = self.vision.base_url or preset_for(self.vision.provider).base_url
        same_provider = (route.provider or self.vision.provider) == self.vision.provider
        return same_provider and _same_endpoint(self.route_base_url(route), default_url)

    @property
    def route_key_problem(self) -> str | None:
        """Why a route cannot be analysed, or None: one that goes to another provider or another
        endpoint needing a key has no key of its own (it is never sent the default provider's), or
        its variable is unset."""
        for route in self.routes:
            if route.action != "analyse":
                continue
            provider = route.provider or self.vision.provider
            if route.api_key_env and route.api_key is None:
                return f'routes "{route.name}": {route.api_key_env} (routes.api_key_env) is not set'
            if provider != self.vision.provider and preset_for(provider).needs_key and route.api_key is None:
                return (
                    f'routes "{route.name}": provider {provider} needs its own API key, never the default '
                    f"provider's; name the variable that holds it in routes.api_key_env"
                )
            if preset_for(provider).needs_key and route.api_key is None and not self._default_endpoint(route):
                return (
                    f'routes "{route.name}": base_url {self.route_base_url(route)} is not the default '
                    "endpoint, whose API key it is never sent; name the variable that holds its own in "
                    "routes.api_key_env"
                )
        return None

    # Sections owned by later parts of the node (vision, worker, routing) are accepted as
    # tables so a complete configuration file loads today.
    vision: VisionSettings = VisionSettings()
    worker: WorkerSettings = WorkerSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file's values arrive as init arguments; the environment must override them.
        return _EnvironmentSource(settings_cls), init_settings


class _EnvironmentSource(EnvSettingsSource):
    """``AINODE_*`` variables as pydantic-settings reads them (JSON for lists and tables), and a
    list also as a shell user writes it: ``AINODE_NODE__ALLOWED_CALLING_AETS=CT01,MR02``."""

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        try:
            return super().decode_complex_value(field_name, field, value)
        except ValueError:
            sequence = field is not None and get_origin(field.annotation) in (tuple, list)
            if isinstance(value, str) and sequence and not value.lstrip().startswith(("[", "{")):
                return [part.strip() for part in value.split(",") if part.strip()]
            variable = next(
                (
                    name
                    for name in os.environ
                    if name.upper().startswith("AINODE_")
                    and name.upper().endswith(field_name.upper())
                    and os.environ[name] == value
                ),
                f"the variable for {field_name}",
            )
            raise ValueError(
                f"{variable}: not valid JSON; give a list as CT01,MR02 or as JSON, a table as JSON"
            ) from None


def packaged_config_path() -> Path:
    return Path(__file__).with_name("ainode.toml")


def default_config_path(environ: dict[str, str] | None = None) -> Path:
    """``$AINODE_CONFIG``, else ``conf/ainode.toml`` in the working directory, else the packaged
    default (so a ``pip install``-ed node starts anywhere)."""
    env = os.environ if environ is None else environ
    if env.get("AINODE_CONFIG"):
        return Path(env["AINODE_CONFIG"])
    local = Path("conf/ainode.toml")
    if local.is_file():
        return local
    return packaged_config_path()


def data_home(environ: dict[str, str] | None = None) -> Path:
    """Where the packaged default configuration keeps the node's files: ``$XDG_DATA_HOME/ainode``,
    else ``~/.local/share/ainode`` (never the installed package's folder)."""
    env = os.environ if environ is None else environ
    base = Path(env["XDG_DATA_HOME"]) if env.get("XDG_DATA_HOME") else Path.home() / ".local" / "share"
    return base / "ainode"


def _absolute(path: Path, base: Path) -> Path:
    path = path.expanduser()  # root = "~/ainode" is the user's folder, not one named "~"
    return path if path.is_absolute() else (base / path).resolve()


def resolve_paths(settings: Settings, base: Path) -> Settings:
    """Relative ``storage.root``, SQLite file and TLS paths, made absolute against ``base`` (the
    configuration file's folder), so every command reads the same node wherever it runs."""
    storage = settings.storage
    url = make_url(storage.database_url)
    database_url = storage.database_url
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        database = _absolute(Path(url.database), base)
        database_url = url.set(database=str(database)).render_as_string(hide_password=False)
    node = settings.node
    tls = {
        name: _absolute(value, base)
        for name in ("tls_cert", "tls_key", "tls_ca")
        if (value := getattr(node, name)) is not None
    }
    return settings.model_copy(
        update={
            "storage": storage.model_copy(
                update={"root": _absolute(storage.root, base), "database_url": database_url}
            ),
            "node": node.model_copy(update=tls),
            "http": settings.http.model_copy(
                update={
                    name: _absolute(value, base)
                    for name in ("tls_cert", "tls_key")
                    if (value := getattr(settings.http, name)) is not None
                }
            ),
            "destinations": tuple(
                destination.model_copy(
                    update={
                        name: _absolute(value, base)
                        for name in ("tls_ca", "tls_cert", "tls_key")
                        if (value := getattr(destination, name)) is not None
                    }
                )
                for destination in settings.destinations
            ),
        }
    )


_SECRET_KEYS = frozenset(
    {"api_key", "database_url", "stow_url", "token", "users"}
)  # a URL may hold a password


def _env_variable(loc: tuple[str | int, ...], environ: Mapping[str, str]) -> str | None:
    """The AINODE_* variable a value at ``loc`` came from, if one is set."""
    names = [str(part) for part in loc if isinstance(part, str)]
    upper = {name.upper(): name for name in environ}
    for end in range(len(names), 0, -1):  # the key's own variable, else its table's (JSON)
        candidate = "AINODE_" + "__".join(names[:end]).upper()
        if candidate in upper:
            return upper[candidate]
    # An error of a whole table (vision.provider checked against its model): the keys set in it.
    below = sorted(upper[name] for name in upper if names and name.startswith(f"AINODE_{names[0].upper()}__"))
    return ", ".join(below) or None


def _describe_error(error: Any, environ: Mapping[str, str]) -> str:
    """One validation error as ``where: problem (got value; from VARIABLE)``, never echoing a
    secret or a whole table (which could hold one)."""
    loc = tuple(error["loc"])
    where = ".".join(str(p) for p in loc) or "configuration"
    details = []
    got = error.get("input")
    if not any(str(part) in _SECRET_KEYS for part in loc) and isinstance(got, str | int | float | bool):
        details.append(f"got {got!r}")
    variable = _env_variable(loc, environ)
    if variable is not None:
        details.append(f"from environment variable {variable}")
    return f"{where}: {error['msg']}" + (f" ({'; '.join(details)})" if details else "")


def _same_endpoint(a: str, b: str) -> bool:
    """Whether two base URLs name the same endpoint (scheme and host case, a trailing slash and
    the scheme's default port aside)."""
    try:
        x, y = httpx.URL(a.strip()), httpx.URL(b.strip())
    except httpx.InvalidURL:
        return False
    return (x.scheme, x.host, x.port, x.path.rstrip("/")) == (y.scheme, y.host, y.port, y.path.rstrip("/"))


def _with_route_keys(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Each route's key from the variable its ``api_key_env`` names (a key never lives in the
    file); a blank value is no key."""
    routes = data.get("routes")
    if not isinstance(routes, list):
        return data
    keyed = []
    for route in routes:
        variable = route.get("api_key_env") if isinstance(route, dict) else None
        if isinstance(variable, str) and environ.get(variable, "").strip():
            route = {**route, "api_key": environ[variable].strip()}
        keyed.append(route)
    return {**data, "routes": keyed}


def _refuse_keys_in_the_file(config_path: Path, data: dict[str, Any]) -> None:
    """A key never lives in the configuration file (it is copied, backed up, sent to support):
    only in the environment, by the variable the file names."""
    vision = data.get("vision")
    places = ["vision"] if isinstance(vision, dict) and "api_key" in vision else []
    routes = data.get("routes")
    if isinstance(routes, list):
        places += [
            f'routes "{route.get("name", index)}"'
            for index, route in enumerate(routes)
            if isinstance(route, dict) and "api_key" in route
        ]
    http = data.get("http")
    if isinstance(http, dict) and "token" in http:
        places.append("http (token)")
    if places:
        raise ConfigError(
            f"{config_path}: an API key or token is written in the file ({', '.join(places)}); remove it "
            "and name the environment variable that holds it (api_key_env, token_env), or set "
            "AINODE_VISION__API_KEY"
        )


def load_settings(path: Path | None = None) -> Settings:
    """Read and validate the configuration; raise :class:`ConfigError` with a one-line reason."""
    config_path = path if path is not None else default_config_path()
    packaged = path is None and config_path == packaged_config_path()
    try:
        with config_path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {str(config_path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {str(config_path)!r} is not valid TOML: {exc}") from None
    _refuse_keys_in_the_file(config_path, data)
    vision = data.get("vision", {})
    table = isinstance(vision, dict)  # `vision = 5`: validation below says what is wrong
    key_env = (vision.get("api_key_env") if table else None) or os.environ.get("AINODE_VISION__API_KEY_ENV")
    if table and key_env and os.environ.get(key_env) and not os.environ.get("AINODE_VISION__API_KEY"):
        data["vision"] = {**vision, "api_key": os.environ[key_env]}
    http = data.get("http", {})
    token_env = (http.get("token_env") if isinstance(http, dict) else None) or os.environ.get(
        "AINODE_HTTP__TOKEN_ENV"
    )
    if isinstance(http, dict) and token_env and os.environ.get(token_env):
        data["http"] = {**http, "token": os.environ[token_env]}
    data = _with_route_keys(data, os.environ)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        first = _describe_error(exc.errors()[0], os.environ)
        raise ConfigError(f"{config_path}: {first} ({exc.error_count()} error(s) in all)") from None
    except SettingsError as exc:
        cause = exc.__cause__
        raise ConfigError(f"{config_path}: {cause if isinstance(cause, ValueError) else exc}") from None
    return resolve_paths(settings, data_home() if packaged else config_path.parent.resolve())
