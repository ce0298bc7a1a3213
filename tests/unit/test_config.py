"""Settings precedence (defaults < file < DAYTONA_* < LEASECTL_* < flags) and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.config import Settings, load_settings, redacted
from controller.errors import ConfigError


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LEASECTL_CONFIG")
    s = load_settings()
    assert s.database_url == "sqlite:///leasectl.db"
    assert s.controller.instance == "default"
    assert s.server.listen == "127.0.0.1:9464"
    assert s.controller.create_rate_per_minute == 300
    assert s.logging.format == "text"


def test_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "database_url: sqlite:///file.db\n"
        "controller: {instance: from-file, max_concurrent_actions: 3, gc_interval_seconds: 7}\n"
        "daytona: {api_url: http://file/api, target: file-target}\n"
    )
    assert load_settings(cfg).controller.instance == "from-file"
    monkeypatch.setenv("DAYTONA_API_URL", "http://std-env/api")
    monkeypatch.setenv("DAYTONA_API_KEY", "k-std")
    s = load_settings(cfg)
    assert s.daytona.api_url == "http://std-env/api" and s.daytona.target == "file-target"
    monkeypatch.setenv("LEASECTL_DAYTONA__API_URL", "http://leasectl-env/api")
    monkeypatch.setenv("LEASECTL_CONTROLLER__INSTANCE", "from-env")
    monkeypatch.setenv("LEASECTL_CONTROLLER__RECONCILE_INTERVAL_SECONDS", "12")
    monkeypatch.setenv("LEASECTL_DATABASE_URL", "sqlite:///env.db")
    s = load_settings(cfg, {"controller": {"instance": "from-flag"}})
    assert s.controller.instance == "from-flag"
    assert s.controller.reconcile_interval_seconds == 12
    assert s.controller.max_concurrent_actions == 3  # file value survives where nothing overrides it
    assert s.controller.gc_interval_seconds == 7
    assert s.daytona.api_url == "http://leasectl-env/api"
    assert s.database_url == "sqlite:///env.db"
    assert s.daytona.api_key is not None and s.daytona.api_key.get_secret_value() == "k-std"


def test_config_file_from_env_and_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "leasectl.yaml").write_text("controller: {instance: cwd}\n")
    other = tmp_path / "other.yaml"
    other.write_text("controller: {instance: envfile}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LEASECTL_CONFIG")
    assert load_settings().controller.instance == "cwd"
    monkeypatch.setenv("LEASECTL_CONFIG", str(other))
    assert load_settings().controller.instance == "envfile"


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("controller: {instanc: x}\n", ["c.yaml", "controller.instanc"]),
        ("controller: {max_concurrent_actions: 0}\n", ["c.yaml", "controller.max_concurrent_actions"]),
        ("logging: {format: xml}\n", ["c.yaml", "logging.format"]),
        ("server: {listen: nope}\n", ["c.yaml", "server.listen"]),
        # renewed every third of it: a shorter lease would renew more than 3 times a second
        ("controller: {leader_lease_seconds: 0.5}\n", ["c.yaml", "controller.leader_lease_seconds", "1"]),
        ("- a\n", ["c.yaml", "mapping"]),
        ("controller: [\n", ["c.yaml", "YAML"]),
    ],
)
def test_bad_file_names_file_and_key(tmp_path: Path, text: str, needles: list[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    for needle in needles:
        assert needle in str(info.value)


def test_bad_env_names_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEASECTL_CONTROLLER__RECONCILE_INTERVAL_SECONDS", "soon")
    with pytest.raises(ConfigError, match="LEASECTL_CONTROLLER__RECONCILE_INTERVAL_SECONDS"):
        load_settings()


def test_environment_names_json_sections_and_variables_that_are_not_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The LEASECTL_* layer (read by controller/config.py itself, as pydantic-settings did)."""
    monkeypatch.setenv("leasectl_controller__instance", "lower-case")  # names are not case sensitive
    monkeypatch.setenv("LEASECTL_POLICY__PRICES", '{"cpu_hour": 0.25}')  # a section: JSON
    monkeypatch.setenv("LEASECTL_SERVER__LISTEN", "[::1]:9464")  # a string that looks like JSON
    monkeypatch.setenv("LEASECTL_DAYTONA", '{"target": "eu"}')
    monkeypatch.setenv("LEASECTL_DAYTONA__API_URL", "http://nested/api")
    for not_a_setting in ("LEASECTL_CONFIG", "LEASECTL_DEBUG", "LEASECTL_TEST_PG_URL", "LEASECTL_"):
        monkeypatch.setenv(not_a_setting, "x")
    empty = tmp_path / "empty.yaml"  # given explicitly: LEASECTL_CONFIG=x is not read
    empty.write_text("")
    s = load_settings(empty)
    assert s.controller.instance == "lower-case"
    assert s.policy.prices is not None and s.policy.prices.cpu_hour == 0.25
    assert s.server.listen == "[::1]:9464"
    assert (s.daytona.target, s.daytona.api_url) == ("eu", "http://nested/api")

    monkeypatch.setenv("LEASECTL_CONTROLLER__BOGUS", "1")
    monkeypatch.setenv("LEASECTL_POLICY__DISK_GUARD_GIB", "[1]")
    with pytest.raises(ConfigError) as info:
        load_settings(empty)
    message = str(info.value)
    assert "environment variable LEASECTL_CONTROLLER__BOGUS: controller.bogus: Extra inputs" in message
    assert "environment variable LEASECTL_POLICY__DISK_GUARD_GIB: policy.disk_guard_gib" in message


def test_api_key_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAYTONA_API_KEY", "super-secret-key")
    s = load_settings()
    assert "super-secret-key" not in repr(s) and "super-secret-key" not in str(s)
    assert "super-secret-key" not in str(redacted(s))


def test_example_config_lists_every_setting_with_its_default() -> None:
    """config.example.yaml must parse, and hold exactly the defaults."""
    import yaml

    path = Path(__file__).resolve().parents[2] / "config.example.yaml"
    data = yaml.safe_load(path.read_text())
    defaults = Settings.model_validate({}).model_dump(mode="json")
    assert data == defaults


@pytest.mark.parametrize("flag", [None, "sqlite:///flag.db"])
@pytest.mark.parametrize("env", [None, "sqlite:///env.db"])
@pytest.mark.parametrize("in_file", [None, "sqlite:///file.db"])
def test_peeked_database_url_is_the_validated_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: str | None, env: str | None, in_file: str | None
) -> None:
    """``get`` reads database_url alone (config_sources.peek); it must resolve as load_settings does."""
    from controller.config_sources import DEFAULT_DATABASE_URL, peek

    config = tmp_path / "leasectl.yaml"
    config.write_text(f"database_url: {in_file}\n" if in_file else "controller: {instance: x}\n")
    if env:
        monkeypatch.setenv("LEASECTL_DATABASE_URL", env)
    monkeypatch.setenv("DAYTONA_API_URL", "http://not-the-database/api")
    overrides = {"database_url": flag} if flag else {}
    peeked = peek("database_url", config, overrides) or DEFAULT_DATABASE_URL
    assert (
        peeked
        == load_settings(config, overrides).database_url
        == (flag or env or in_file or DEFAULT_DATABASE_URL)
    )
