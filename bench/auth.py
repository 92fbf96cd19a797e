"""A session token for the benchmark: a throwaway wallet signs Tollgate's Authorization.

The message is built from ``GET /v1/authorize/schema``, so the bench follows the
published contract instead of copying it: every ``address`` field is the wallet
(the session key is a second throwaway key), ``chainId`` is the first domain's,
the nonce is random and the session lasts an hour.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data

SESSION_S = 3600
HTTP_TIMEOUT_S = 30.0


class AuthError(RuntimeError):
    """Tollgate would not issue a session token to the bench."""


def _http(method: str, url: str, body: bytes | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read()[:500]


def _message(schema: dict[str, Any], wallet: str, session_key: str) -> dict[str, object]:
    chain_id = schema["domains"][0]["chainId"]
    now = int(time.time())
    values: dict[str, object] = {
        "sessionKey": session_key,
        "chainId": chain_id,
        "nonce": secrets.token_hex(16),
        "issuedAt": now,
        "expiresAt": now + SESSION_S,
    }
    message: dict[str, object] = {}
    for field in schema["types"][schema["primaryType"]]:
        name, kind = field["name"], field["type"]
        if name in values:
            message[name] = values[name]
        elif kind == "address":
            message[name] = wallet  # the wallet pays for itself: wallet, smartAccount
        else:
            raise AuthError(f"the bench does not know how to fill Authorization.{name}")
    return message


def session_token(base_url: str) -> str | None:
    """Authorize a fresh wallet at ``base_url`` (``http://host:port``); return the token.

    None when this Tollgate has no ``/v1/authorize`` (a build without identity).
    """
    status, schema = _http("GET", f"{base_url}/v1/authorize/schema")
    if status == 404:
        return None
    if status != 200:
        raise AuthError(f"GET /v1/authorize/schema: HTTP {status}: {schema!r}")
    wallet, session_key = Account.create(), Account.create()
    message = _message(schema, wallet.address, session_key.address)
    signable = encode_typed_data(full_message={
        "types": schema["types"],
        "primaryType": schema["primaryType"],
        "domain": schema["domains"][0],
        "message": message,
    })
    signature = bytes(Account.sign_message(signable, private_key=wallet.key).signature)
    status, issued = _http(
        "POST", f"{base_url}/v1/authorize", json.dumps(message).encode(),
        {"Content-Type": "application/json", schema["signature"]["header"]: "0x" + signature.hex()},
    )
    if status != 201:
        raise AuthError(f"POST /v1/authorize: HTTP {status}: {issued!r}")
    return str(issued["token"])
