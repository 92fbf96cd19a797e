"""Where Tollgate's chain is and what is deployed on it, resolved once at start.

It comes from the settings (an operator's chain) or from the dev chain that
``tollgate serve`` starts when no RPC URL is set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from app.config.settings import Settings


@dataclass(frozen=True)
class ChainConfig:
    rpc_url: str
    chain_id: int
    token: str  # the billing token (USDC, or TestUSDC on a dev chain)
    settlement: str  # TollgateSettlement
    account_factories: tuple[str, ...] = ()  # trusted for ERC-6492
    # The operator's key; repr=False keeps it out of every log line and traceback.
    operator_private_key: str | None = field(default=None, repr=False)
    confirmations: int = 1
    call_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        assert self.chain_id > 0 and self.confirmations >= 0


def chain_config_from_settings(settings: Settings) -> ChainConfig | None:
    """The operator's configured chain, or None (no RPC URL set)."""
    if settings.chain_rpc_url is None:
        return None
    assert settings.chain_id is not None
    assert settings.token_address is not None and settings.settlement_address is not None
    key = settings.operator_private_key
    return ChainConfig(
        rpc_url=settings.chain_rpc_url.get_secret_value(),
        chain_id=settings.chain_id,
        token=settings.token_address,
        settlement=settings.settlement_address,
        account_factories=settings.account_factories,
        operator_private_key=key.get_secret_value() if key is not None else None,
        confirmations=settings.chain_confirmations,
        call_timeout_s=settings.chain_call_timeout_s,
    )
