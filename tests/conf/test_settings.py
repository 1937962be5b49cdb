"""Configuration: TOML, environment overrides, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conf import ConfigError, load_settings
from conf.settings import default_config_path


def test_packaged_default_loads_and_environment_overrides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    packaged = Path(__file__).parents[2] / "conf" / "ainode.toml"
    defaults = load_settings(packaged)
    assert (defaults.node.ae_title, defaults.node.port, defaults.study.settle_seconds) == (
        "AINODE",
        11112,
        10,
    )
    assert defaults.destinations[0].ae_title == "ORTHANC"
    monkeypatch.setenv("AINODE_NODE__PORT", "11999")
    monkeypatch.setenv("AINODE_STUDY__SETTLE_SECONDS", "2.5")
    overridden = load_settings(packaged)
    assert (overridden.node.port, overridden.study.settle_seconds) == (11999, 2.5)
    assert overridden.node.ae_title == "AINODE"  # the rest still comes from the file


def test_config_path_prefers_the_environment(tmp_path: Path) -> None:
    assert default_config_path({"AINODE_CONFIG": "/x/y.toml"}) == Path("/x/y.toml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[node]\nae_title = "WAY_TOO_LONG_AE_TITLE"\n', r"node.ae_title.*WAY_TOO_LONG_AE_TITLE"),
        ("[node]\nport = 70000\n", r"node.port.*70000"),
        ("[nodee]\nport = 1\n", r"nodee"),
        ("[node\n", r"not valid TOML"),
        ("vision = 5\n", r"vision: Input should be a valid dictionary"),
        ('[storage]\ndatabase_url = "sqlite:///:memory:"\n', r"in-memory SQLite database"),
        ('[storage]\ndatabase_url = "sqlite://"\n', r"in-memory SQLite database"),
        ('[node]\ntls_cert = "a.crt"\n', r"node.tls_cert and node.tls_key go together"),
        ('[node]\ntls_ca = "ca.crt"\n', r"node.tls_ca needs node.tls_cert"),
        (
            '[node]\ntls_cert = "a.crt"\ntls_key = "a.key"\ntls_bind_calling_aet = true\n',
            r"tls_bind_calling_aet and node.tls_client_aets need node.tls_ca",
        ),
        (
            '[node]\ntls_cert = "a"\ntls_key = "b"\ntls_ca = "c"\ntls_client_aets = { "ct" = ["CT01"] }\n',
            r"tls_client_aets is used only with node.tls_bind_calling_aet = true",
        ),
        (
            '[node]\ntls_cert = "a"\ntls_key = "b"\ntls_ca = "c"\ntls_bind_calling_aet = true\n'
            'tls_client_aets = { "ct" = ["A\\\\B"] }\n',
            r'node.tls_client_aets "ct" must be 1 to 16 printable characters',
        ),
        (
            '[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 104\ntls_ca = "ca.crt"\n',
            r'destination "p": tls_ca set but tls is not true',
        ),
        (
            '[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 104\ntls = true\n'
            'tls_cert = "a.crt"\n',
            r'destination "p": tls_cert and tls_key go together',
        ),
        (
            '[[destinations]]\nname = "p"\nstow_url = "https://pacs/dicom-web"\ntls = true\n',
            r'destination "p": tls is for DIMSE destinations; a stow_url is secured by https://',
        ),
    ],
)
def test_bad_configuration_is_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(path)


def test_cli_exits_non_zero_with_a_one_line_reason(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[storage]\nmin_free_mb = -5\n")
    result = subprocess.run(
        [sys.executable, "-m", "scp.cli", "-c", str(path), "status"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "storage.min_free_mb" in lines[0] and "-5" in lines[0]


def test_lists_from_the_environment_as_a_shell_user_writes_them(monkeypatch: pytest.MonkeyPatch) -> None:
    packaged = Path(__file__).parents[2] / "conf" / "ainode.toml"
    monkeypatch.setenv("AINODE_NODE__ALLOWED_CALLING_AETS", "CT01, MR02")
    assert load_settings(packaged).node.allowed_calling_aets == ("CT01", "MR02")
    monkeypatch.setenv("AINODE_NODE__ALLOWED_CALLING_AETS", '["CT01"]')
    assert load_settings(packaged).node.allowed_calling_aets == ("CT01",)
    monkeypatch.setenv("AINODE_NODE__ALLOWED_CALLING_AETS", "")  # set but empty: anyone may call
    assert load_settings(packaged).node.allowed_calling_aets == ()


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "AINODE_NODE__PORT",
            "eleven",
            r"node.port: .*got 'eleven'; from environment variable AINODE_NODE__PORT",
        ),
        ("AINODE_DESTINATIONS", '[{"name": ', r"AINODE_DESTINATIONS: not valid JSON"),
        (
            "AINODE_NODE__ALLOWED_CALLING_AETS",
            "A\\B",
            r"node.allowed_calling_aets.*AINODE_NODE__ALLOWED_CALLING",
        ),
    ],
)
def test_an_error_from_the_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=message):
        load_settings(Path(__file__).parents[2] / "conf" / "ainode.toml")


def test_configuration_errors_never_echo_the_api_key_or_a_database_password(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    packaged = Path(__file__).parents[2] / "conf" / "ainode.toml"
    monkeypatch.setenv("AINODE_VISION__API_KEY", "sk-never-print-me")
    monkeypatch.setenv("AINODE_VISION__PROVIDER", "openal")
    with pytest.raises(ConfigError) as typo:
        load_settings(packaged)
    assert "openal" in str(typo.value) and "sk-never-print-me" not in str(typo.value)
    monkeypatch.delenv("AINODE_VISION__PROVIDER")
    monkeypatch.setenv("AINODE_STORAGE__DATABASE_URL", "postgresql+psycopg://u:pw-never-print@h:port/db")
    with pytest.raises(ConfigError, match=r"storage\.database_url must be a database URL") as other:
        load_settings(packaged)
    assert "pw-never-print" not in str(other.value)


def test_relative_paths_are_relative_to_the_configuration_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "site" / "ainode.toml"
    config.parent.mkdir()
    config.write_text(
        '[storage]\nroot = "data"\ndatabase_url = "sqlite:///data/node.db"\n'
        '[node]\ntls_cert = "certs/node.crt"\ntls_key = "certs/node.key"\n'
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "pacs"\nport = 104\ntls = true\n'
        'tls_ca = "certs/ca.crt"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_settings(config)
    assert settings.storage.root == tmp_path / "site" / "data"
    assert settings.storage.database_url == f"sqlite:///{tmp_path}/site/data/node.db"
    assert settings.node.tls_cert == tmp_path / "site" / "certs" / "node.crt"
    assert settings.destinations[0].tls_ca == tmp_path / "site" / "certs" / "ca.crt"
    config.write_text('[storage]\nroot = "/srv/ainode"\ndatabase_url = "sqlite:////srv/ainode/a.db"\n')
    absolute = load_settings(config)
    assert (absolute.storage.root, absolute.storage.database_url) == (
        Path("/srv/ainode"),
        "sqlite:////srv/ainode/a.db",
    )


def test_the_packaged_default_keeps_its_files_in_the_users_data_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no conf/ainode.toml here
    monkeypatch.delenv("AINODE_CONFIG", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    settings = load_settings()
    assert settings.storage.root == tmp_path / "xdg" / "ainode" / "var" / "ainode"
    assert settings.storage.database_url == f"sqlite:///{tmp_path}/xdg/ainode/var/ainode/ainode.db"


@pytest.mark.parametrize("key", ["", "   ", "\n"])
def test_an_empty_api_key_is_no_key(monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    """``AINODE_VISION__API_KEY=$KEY`` with KEY unset: the node waits and names the variable, not
    a permanent 401 for every study."""
    monkeypatch.setenv("AINODE_VISION__API_KEY", key)
    vision = load_settings(Path(__file__).parents[2] / "conf" / "ainode.toml").vision
    assert vision.api_key is None
    assert vision.missing_key == "no vision API key for holysheep; set AINODE_VISION__API_KEY"
    monkeypatch.setenv("AINODE_VISION__API_KEY", " sk-pasted-with-a-newline\n")
    key_read = load_settings(Path(__file__).parents[2] / "conf" / "ainode.toml").vision.api_key
    assert key_read is not None and key_read.get_secret_value() == "sk-pasted-with-a-newline"


def test_a_path_under_the_home_folder_is_the_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = tmp_path / "ainode.toml"
    config.write_text('[storage]\nroot = "~/ainode"\ndatabase_url = "sqlite:///~/ainode/node.db"\n')
    settings = load_settings(config)
    assert settings.storage.root == tmp_path / "home" / "ainode"
    assert settings.storage.database_url == f"sqlite:///{tmp_path}/home/ainode/node.db"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "AINODE_DESTINATIONS",
            '[{"name": "pacs"}]',
            r"destinations.0: .*needs ae_title, host, port.*from environment variable AINODE_DESTINATIONS",
        ),
        ("AINODE_VISION__PROVIDER", "deepseek", r"takes text only.*AINODE_VISION__PROVIDER"),
    ],
)
def test_an_error_inside_a_table_from_the_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=message):
        load_settings(Path(__file__).parents[2] / "conf" / "ainode.toml")


def _route_config(tmp_path: Path, route: str) -> Path:
    path = tmp_path / "ainode.toml"
    path.write_text(
        f'[vision]\nprovider = "openai"\n\n[[routes]]\nname = "ct-claude"\nmodalities = ["CT"]\n{route}\n'
    )
    return path


def test_a_route_to_another_provider_has_its_own_key_never_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AINODE_VISION__API_KEY", "sk-openai-default-key")
    monkeypatch.delenv("ROUTE_CLAUDE_KEY", raising=False)
    unkeyed = load_settings(_route_config(tmp_path, 'provider = "anthropic"'))
    problem = unkeyed.route_key_problem
    assert problem is not None and "ct-claude" in problem and "routes.api_key_env" in problem
    assert unkeyed.routes[0].api_key is None  # the default's key is not lent to it
    named = load_settings(_route_config(tmp_path, 'provider = "anthropic"\napi_key_env = "ROUTE_CLAUDE_KEY"'))
    assert named.route_key_problem == 'routes "ct-claude": ROUTE_CLAUDE_KEY (routes.api_key_env) is not set'
    monkeypatch.setenv("ROUTE_CLAUDE_KEY", "  sk-ant-route-key\n")
    keyed = load_settings(_route_config(tmp_path, 'provider = "anthropic"\napi_key_env = "ROUTE_CLAUDE_KEY"'))
    assert keyed.route_key_problem is None
    route_key = keyed.routes[0].api_key
    assert route_key is not None and route_key.get_secret_value() == "sk-ant-route-key"
    assert "sk-ant-route-key" not in repr(keyed) and "sk-openai-default-key" not in repr(keyed)
    # The same provider as the default needs no key of its own; a local server needs none at all.
    assert load_settings(_route_config(tmp_path, 'model = "gpt-4.1-mini"')).route_key_problem is None
    assert load_settings(_route_config(tmp_path, 'provider = "ollama"')).route_key_problem is None


def test_a_node_with_an_unkeyed_route_refuses_to_start_in_one_line(tmp_path: Path) -> None:
    config = _route_config(tmp_path, 'provider = "anthropic"')
    for command in ("serve", "worker"):
        started = subprocess.run(
            [sys.executable, "-m", "scp.cli", "-c", str(config), command],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "AINODE_VISION__API_KEY": "sk-openai-default-key"},
        )
        assert started.returncode == 2
        lines = started.stderr.strip().splitlines()
        assert lines == [
            f'ainode {command}: routes "ct-claude": provider anthropic needs its own API key, never the '
            "default provider's; name the variable that holds it in routes.api_key_env"
        ]


def test_a_route_to_another_host_of_the_same_provider_is_never_lent_the_default_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default key belongs to the default endpoint: a route that only changes base_url (a
    gateway, a look-alike host, a local server under the default's provider name) must not be
    sent it, and a node whose such route has no key of its own refuses to start."""
    monkeypatch.setenv("AINODE_VISION__API_KEY", "sk-openai-default-key")
    monkeypatch.delenv("ROUTE_GATEWAY_KEY", raising=False)
    elsewhere = load_settings(_route_config(tmp_path, 'base_url = "https://api.openai.example.net/v1"'))
    assert elsewhere.route_api_key(elsewhere.routes[0]) is None
    problem = elsewhere.route_key_problem
    assert problem is not None and "ct-claude" in problem and "routes.api_key_env" in problem
    assert "sk-openai-default-key" not in problem
    # Its own key, when it names one.
    monkeypatch.setenv("ROUTE_GATEWAY_KEY", "sk-gateway-key")
    keyed = load_settings(
        _route_config(
            tmp_path, 'base_url = "https://api.openai.example.net/v1"\napi_key_env = "ROUTE_GATEWAY_KEY"'
        )
    )
    assert keyed.route_key_problem is None
    key = keyed.route_api_key(keyed.routes[0])
    assert key is not None and key.get_secret_value() == "sk-gateway-key"
    # The default's own endpoint (written out, or with a trailing slash) keeps the default's key.
    for url in ("https://api.openai.com/v1", "https://api.openai.com/v1/"):
        same = load_settings(_route_config(tmp_path, f'base_url = "{url}"\nmodel = "gpt-4.1-mini"'))
        assert same.route_key_problem is None
        lent = same.route_api_key(same.routes[0])
        assert lent is not None and lent.get_secret_value() == "sk-openai-default-key"


def test_a_misspelt_route_provider_is_named_as_the_routes_not_the_defaults(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(_route_config(tmp_path, 'provider = "anthropc"'))
    message = str(raised.value)
    assert 'routes "ct-claude": provider must be one of' in message and 'got "anthropc"' in message
    assert "vision.provider" not in message


@pytest.mark.parametrize(
    "text",
    [
        '[vision]\nprovider = "openai"\napi_key = "sk-written-in-the-file"\n',
        '[[routes]]\nname = "r"\nprovider = "anthropic"\napi_key = "sk-written-in-the-file"\n',
        '[http]\ntoken = "sk-written-in-the-file"\n',
    ],
)
def test_a_key_written_in_the_file_is_refused_without_echoing_it(tmp_path: Path, text: str) -> None:
    path = tmp_path / "ainode.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="is written in the file") as refused:
        load_settings(path)
    assert "sk-written-in-the-file" not in str(refused.value)
