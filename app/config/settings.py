"""The one settings object, parsed once from the environment and passed explicitly.

Names: ``DATABASE_URL`` and ``REDIS_URL`` as every platform spells them, everything
else ``TOLLGATE_*``. A bad value stops the process at start with a message that
names the setting (see ``load_settings``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError

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

    # Identity: wallet sessions (POST /v1/authorize) and their JWTs.
    # HS256 needs jwt_secret; ES256 needs a PEM private key (the public key is derived).
    jwt_algorithm: Literal["HS256", "ES256"] = "HS256"
    jwt_secret: SecretStr | None = None
    jwt_private_key_pem: SecretStr | None = None
    jwt_issuer: str = "tollgate"
    jwt_audience: str = "tollgate-api"
    # Chains whose wallets may authorize (EIP-155 ids); the first is the default.
    chain_ids: Annotated[tuple[int, ...], NoDecode] = (31337,)
    session_ttl_max_s: int = Field(default=7 * 24 * 3600, ge=60)
    authorize_clock_skew_s: int = Field(default=60, ge=0, le=3600)
    # How old an Authorization's issuedAt may be when it reaches us.
    authorize_max_age_s: int = Field(default=600, ge=10)
    # The operator's bearer token for admin endpoints (revoke-all for any wallet, ...).
    admin_token: SecretStr | None = None

    # Rate limits: token buckets in Redis. Per account per minute, per IP per minute.
    # Upper bounds keep bucket arithmetic exact in Redis' Lua doubles (capacity x 60000 < 2^51).
    rate_limit_requests_per_min: int = Field(default=600, ge=1, le=10**9)
    rate_limit_tokens_per_min: int = Field(default=2_000_000, ge=1, le=10**10)
    rate_limit_ip_requests_per_min: int = Field(default=120, ge=1, le=10**9)
    # A busy account's calls are admitted on tokens its process took ahead for a few
    # calls (app.limits.leases), for at most this long; 0: Redis is asked per call.
    rate_limit_lease_s: float = Field(default=5.0, ge=0, le=60)
    # When Redis cannot be reached: "closed" refuses with 503, "open" lets requests through.
    rate_limit_on_redis_error: Literal["closed", "open"] = "closed"

    # The chain Tollgate bills on. No RPC URL: `tollgate serve` starts a dev chain (anvil)
    # in the state dir and deploys the contracts there. The URL is a secret because
    # hosted RPC URLs carry API keys.
    chain_rpc_url: SecretStr | None = None
    # The chain the RPC serves (checked against eth_chainId at start); must be in chain_ids.
    chain_id: int | None = Field(default=None, ge=1)
    # The billing token (USDC) and Tollgate's settlement contract on that chain.
    token_address: str | None = None
    settlement_address: str | None = None
    # Factories trusted to deploy accounts for ERC-6492 signatures ("0x..,0x..").
    account_factories: Annotated[tuple[str, ...], NoDecode] = ()
    # The operator's key: sends settlement transactions. Never logged.
    operator_private_key: SecretStr | None = None
    # How deep a settlement transaction must be before it counts (1: mined in a block).
    chain_confirmations: int = Field(default=1, ge=0, le=1000)
    chain_call_timeout_s: float = Field(default=10.0, gt=0, le=120)
    # How long a session key's on-chain policy is trusted before it is read again: a key
    # revoked on chain loses its sessions within this time.
    session_policy_cache_s: float = Field(default=10.0, ge=0, le=3600)
    # A dev node Tollgate does not start but deploys to as it would to its own dev chain
    # (docker-compose's anvil service). Ignored when TOLLGATE_CHAIN_RPC_URL is set.
    dev_chain_rpc_url: str | None = None

    # Automatic settlement from smart accounts: collect when an account owes this much,
    # or when some of its debt is this old (and at least the minimum); every interval.
    settlement_threshold_micros: int = Field(default=1_000_000, ge=1)
    settlement_max_age_s: int = Field(default=86_400, ge=0)
    settlement_minimum_micros: int = Field(default=10_000, ge=1)
    settlement_interval_s: float = Field(default=60.0, gt=0, le=86_400)

    # x402 payments. With a facilitator URL, payments are verified and settled through
    # it (/verify, /settle); without one, on chain by the operator key through the
    # settlement contract.
    x402_facilitator_url: str | None = None
    x402_facilitator_timeout_s: float = Field(default=30.0, gt=0, le=300)
    # A 402 asks for at least this much (micro-USD), so a payer does not pay per request.
    x402_min_topup_micros: int = Field(default=1_000_000, ge=1)

    # Money. Commission in basis points of the base cost (1000 = 10%).
    commission_bps: int = Field(default=1000, ge=0, le=10_000)
    # Credit a new account gets before it must pay, in micro-USD.
    default_credit_limit_micros: int = Field(default=5_000_000, ge=0)
    # A busy account's calls are admitted on credit a process reserved for many of
    # them (a lease, app.ledger.leases) for this long; 0: every call takes its own hold.
    credit_lease_s: float = Field(default=5.0, ge=0, le=60)

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


    @field_validator("chain_ids", mode="before")
    @classmethod
    def _chain_list(cls, value: object) -> object:
        # The environment gives "8453,84532"; code and tests give a tuple.
        if isinstance(value, str):
            try:
                return tuple(int(part) for part in value.split(",") if part.strip())
            except ValueError:
                raise ValueError("must be comma-separated integers") from None
        if isinstance(value, int):
            return (value,)
        return value

    @field_validator("account_factories", mode="before")
    @classmethod
    def _address_list(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("token_address", "settlement_address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is not None:
            _require_address(value)
        return value

    @field_validator("account_factories")
    @classmethod
    def _addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for address in value:
            _require_address(address)
        return value

    @field_validator("operator_private_key")
    @classmethod
    def _private_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            raw = value.get_secret_value().removeprefix("0x")
            if len(raw) != 64 or any(c not in "0123456789abcdefABCDEF" for c in raw):
                # The message must not echo the value: it is a key.
                raise ValueError("must be 32 bytes of hex")
        return value

    @field_validator("jwt_secret")
    @classmethod
    def _long_secret(cls, value: SecretStr | None) -> SecretStr | None:
        # HS256 with a short secret can be brute-forced offline from any token.
        if value is not None and len(value.get_secret_value().encode()) < 32:
            raise ValueError("must be at least 32 bytes")
        return value

    @model_validator(mode="after")
    def _jwt_key_present(self) -> Settings:
        if self.jwt_algorithm == "ES256" and self.jwt_private_key_pem is None:
            raise ValueError("TOLLGATE_JWT_PRIVATE_KEY_PEM is required with ES256")
        if not self.chain_ids:
            raise ValueError("TOLLGATE_CHAIN_IDS: at least one chain id")
        if self.settlement_minimum_micros > self.settlement_threshold_micros:
            raise ValueError("TOLLGATE_SETTLEMENT_MINIMUM_MICROS must not exceed"
                             " TOLLGATE_SETTLEMENT_THRESHOLD_MICROS")
        if self.chain_rpc_url is not None:
            missing = [setting_env_name(name) for name in
                       ("chain_id", "token_address", "settlement_address")
                       if getattr(self, name) is None]
            if missing:
                raise ValueError("TOLLGATE_CHAIN_RPC_URL also needs " + ", ".join(missing))
            if self.chain_id not in self.chain_ids:
                raise ValueError("TOLLGATE_CHAIN_ID must be one of TOLLGATE_CHAIN_IDS")
        return self


def _require_address(value: str) -> None:
    raw = value.removeprefix("0x")
    if not value.startswith("0x") or len(raw) != 40 or any(
        c not in "0123456789abcdefABCDEF" for c in raw
    ):
        raise ValueError("must be a 0x-prefixed 20-byte hex address")


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
    except SourceError as error:
        raise SettingsError(f"invalid settings: {error}") from None
    except ValidationError as error:
        problems = []
        for item in error.errors():
            field = str(item["loc"][0]) if item["loc"] else "?"
            field = {"DATABASE_URL": "database_url", "REDIS_URL": "redis_url"}.get(field, field)
            message = str(item["msg"]).removeprefix("Value error, ")
            problems.append(f"{setting_env_name(field)}: {message}" if item["loc"] else message)
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
