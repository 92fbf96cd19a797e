"""The one settings object, parsed once from the environment and passed explicitly.

Names: ``DATABASE_URL`` and ``REDIS_URL`` as every platform spells them, everything
else ``TOLLGATE_*``. A bad value stops the process at start with a message that
names the setting (see ``load_settings``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PORT = 8402
DEFAULT_STATE_DIR = Path(".tollgate")


class SettingsError(Exception):
    """A setting from the environment or the command line is invalid."""


class Settings(BaseSettings):
    """Process configuration. Units are in the names (``_s`` seconds, ``_bytes``)."""

    model_config = SettingsConfigDict(
        env_prefix="TOLLGATE_",
        extra="ignore",
        frozen=True,
        validate_default=True,
        populate_by_name=True,
    )

    # Storage. None means: start the embedded server in the state dir.
    database_url: SecretStr | None = Field(default=None, validation_alias="DATABASE_URL")
    redis_url: SecretStr | None = Field(default=None, validation_alias="REDIS_URL")

    host: str = "127.0.0.1"
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    state_dir: Path = DEFAULT_STATE_DIR
    # None means the sample catalog shipped inside the package.
    catalog: Path | None = None
    log_level: str = "INFO"

    # Limits on what comes from outside.
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    max_messages: int = Field(default=2048, ge=1, le=100_000)
    max_header_bytes: int = Field(default=8190, ge=1024, le=65536)
    max_n: int = Field(default=8, ge=1, le=128)

    # Streaming: an SSE comment goes out after this much upstream silence.
    stream_keepalive_s: float = Field(default=15.0, gt=0, le=300)
    # How long Ctrl-C waits for in-flight requests before closing them.
    shutdown_timeout_s: float = Field(default=30.0, ge=0, le=3600)

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return level

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(
            ("postgresql://", "postgres://", "postgresql+asyncpg://")
        ):
            raise ValueError("must be a postgresql:// URL")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value


_ENV_NAMES = {"database_url": "DATABASE_URL", "redis_url": "REDIS_URL"}


def setting_env_name(field: str) -> str:
    """The environment variable that sets ``field``."""
    return _ENV_NAMES.get(field, f"TOLLGATE_{field.upper()}")


def load_settings(**overrides: object) -> Settings:
    """Parse the environment (plus command-line overrides) or raise ``SettingsError``.

    The error message names each bad setting by its environment variable, so an
    operator can fix it without reading code.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)  # type: ignore[arg-type]
    except ValidationError as error:
        problems = []
        for item in error.errors():
            field = str(item["loc"][0]) if item["loc"] else "?"
            field = {"DATABASE_URL": "database_url", "REDIS_URL": "redis_url"}.get(field, field)
            problems.append(f"{setting_env_name(field)}: {item['msg']}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
