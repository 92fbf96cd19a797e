"""Settings from the environment: valid ones parse, bad ones name themselves."""

from __future__ import annotations

import pytest

from app.config.settings import SettingsError, load_settings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    settings = load_settings()
    assert settings.port == 8402
    assert settings.database_url is None and settings.redis_url is None


def test_environment_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLGATE_PORT", "9000")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:hunter2pw@db/tollgate")
    settings = load_settings(workers=3)
    assert settings.port == 9000 and settings.workers == 3
    assert "hunter2pw" not in repr(settings), "secrets never print"
    assert load_settings(port=9100).port == 9100


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("TOLLGATE_PORT", "http", "TOLLGATE_PORT"),
        ("TOLLGATE_PORT", "70000", "TOLLGATE_PORT"),
        ("TOLLGATE_WORKERS", "0", "TOLLGATE_WORKERS"),
        ("DATABASE_URL", "mysql://x", "DATABASE_URL"),
        ("REDIS_URL", "http://x", "REDIS_URL"),
        ("TOLLGATE_LOG_LEVEL", "LOUD", "TOLLGATE_LOG_LEVEL"),
        ("TOLLGATE_MAX_BODY_BYTES", "-1", "TOLLGATE_MAX_BODY_BYTES"),
    ],
)
def test_bad_setting_is_named(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, named: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as error:
        load_settings()
    assert named in str(error.value)
    assert "secret" not in str(error.value)


def test_settlement_policy_comes_from_the_settings() -> None:
    from app.settlement.worker import policy_from_settings

    policy = policy_from_settings(load_settings(settlement_threshold_micros=2_000_000,
                                                settlement_max_age_s=3600,
                                                settlement_minimum_micros=5_000))
    assert (policy.threshold_micros, policy.age_s, policy.minimum_micros) == (
        2_000_000, 3600, 5_000)
    with pytest.raises(SettingsError, match="TOLLGATE_SETTLEMENT_MINIMUM_MICROS"):
        load_settings(settlement_threshold_micros=10, settlement_minimum_micros=11)
