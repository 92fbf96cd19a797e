"""``tollgate dev-wallet``: a development wallet and a ready session token.

This is a *client*: it keeps the wallet's private key on this machine (in the
state dir, mode 0600), reads the typed-data schema the server publishes, signs an
Authorization with a fresh session key, and posts only the signature to
``POST /v1/authorize``. No private key ever reaches the server. Dev keys are for
local development only; never fund them on a real chain.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from eth_account import Account
from eth_account.signers.local import LocalAccount

WALLET_FILE = "dev-wallet.json"
SESSION_TTL_S = 24 * 3600
REQUEST_TIMEOUT_S = 10


@dataclass(frozen=True)
class DevSession:
    wallet: LocalAccount
    session_key: LocalAccount
    chain_id: int
    token: str
    expires_at: int
    account_id: str

    def to_json(self) -> dict[str, object]:
        return {
            "wallet": {"address": self.wallet.address, "private_key": self.wallet.key.hex()},
            "session_key": {"address": self.session_key.address,
                            "private_key": self.session_key.key.hex()},
            "chain_id": self.chain_id,
            "account": self.account_id,
            "token": self.token,
            "expires_at": self.expires_at,
        }


def load_or_create_wallet(state_dir: Path) -> LocalAccount:
    """The state dir's dev wallet, created once (0600) so every run signs as the same account."""
    path = state_dir / WALLET_FILE
    state_dir.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        key = "0x" + secrets.token_hex(32)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # Another run created it first; read theirs.
        else:
            with os.fdopen(descriptor, "w") as handle:
                json.dump({"private_key": key, "note": "development only"}, handle)
    return Account.from_key(json.loads(path.read_text())["private_key"])


async def create_session(base_url: str, wallet: LocalAccount) -> DevSession:
    """Sign an Authorization as ``wallet`` from the server's schema and get a token."""
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.get(f"{base_url}/v1/authorize/schema") as response:
            response.raise_for_status()
            schema = await response.json()
        domain = schema["domains"][0]
        session_key = Account.create()
        now_s = int(time.time())
        message = {
            "wallet": wallet.address,
            "smartAccount": wallet.address,
            "sessionKey": session_key.address,
            "chainId": domain["chainId"],
            "nonce": secrets.token_hex(16),
            "issuedAt": now_s,
            "expiresAt": now_s + min(SESSION_TTL_S, schema["limits"]["session_ttl_max_s"]),
        }
        signed = wallet.sign_typed_data(
            full_message={"types": schema["types"], "primaryType": schema["primaryType"],
                          "domain": domain, "message": message}
        )
        async with http.post(
            f"{base_url}/v1/authorize", json=message,
            headers={schema["signature"]["header"]: "0x" + signed.signature.hex()},
        ) as response:
            body = await response.json()
            if response.status != 201:
                raise RuntimeError(f"authorize failed ({response.status}): {body}")
    return DevSession(wallet, session_key, int(domain["chainId"]), body["token"],
                      int(body["expiresAt"]), body["account"]["id"])


def describe(session: DevSession, base_url: str) -> str:
    return "\n".join([
        f"dev wallet {session.wallet.address} (account {session.account_id}, "
        f"chain {session.chain_id})",
        f"session key {session.session_key.address} (private key kept by you, not the server)",
        f"token (valid until {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(session.expires_at))}"
        " UTC):",
        f"  export TOLLGATE_TOKEN={session.token}",
        "",
        f"  curl -s {base_url}/v1/chat/completions -H \"Authorization: Bearer $TOLLGATE_TOKEN\""
        " -H 'Content-Type: application/json' \\",
        "    -d '{\"model\": \"mock-gpt\", \"messages\": [{\"role\": \"user\", "
        "\"content\": \"Hello\"}]}'",
        "",
        f"  OpenAI(base_url=\"{base_url}/v1\", api_key=os.environ[\"TOLLGATE_TOKEN\"])",
    ])
