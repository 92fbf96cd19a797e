"""Session tokens: JWTs carrying one session's claims, and how a request presents them.

Claims: ``iss``, ``aud``, ``sub`` (``acct_<id>``), ``iat``, ``exp`` (the signed
``expiresAt``), ``jti`` (the session id), and ``wallet``, ``smart_account``,
``chain_id``, ``session_key``, ``session_key_bound`` (the session depends on the
session key's on-chain policy and is refused once it is revoked or expired; a token
without it predates smart accounts and depends on none). Verification accepts
exactly one algorithm (the
configured one: never ``none``, never the other), requires every claim, and
allows the authorization clock skew as leeway.

Every refusal is a 401 ``authentication_error`` with its own ``code`` and an RFC
6750 ``WWW-Authenticate`` challenge; a request without credentials gets the bare
challenge (RFC 6750 section 3.1: no error code when none were presented).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import jwt

from app.errors import AuthenticationFailed
from app.identity.addresses import is_address
from app.identity.token_keys import TokenKeys

REALM = "tollgate"
ACCOUNT_ID_PREFIX = "acct_"
# Our tokens are well under 1 KiB; anything near this bound is not one of them.
AUTHORIZATION_HEADER_CHARS_MAX = 4096
JTI_PATTERN = re.compile(r"[0-9a-f]{32}")
_SUBJECT = re.compile(ACCOUNT_ID_PREFIX + r"([1-9][0-9]{0,18})")
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9._~+/=-]+) *")
# RFC 6750 section 3: error_description may not hold '"' or '\'.
_DESCRIPTION = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")
REQUIRED_CLAIMS = ("iss", "aud", "sub", "iat", "exp", "jti")


def account_reference(account_id: int) -> str:
    """The public id of an account: ``acct_<id>``."""
    return f"{ACCOUNT_ID_PREFIX}{account_id}"


@dataclass(frozen=True, slots=True)
class SessionClaims:
    """What a session token says; addresses are lowercase."""

    account_id: int
    wallet: str
    smart_account: str
    chain_id: int
    session_key: str
    jti: str
    issued_at_s: int
    expires_at_s: int
    # The session depends on the session key's policy on chain (a TollgateAccount's key).
    session_key_bound: bool = False


def token_refused(message: str, code: str) -> AuthenticationFailed:
    """A 401 for presented but unusable credentials, with its RFC 6750 challenge."""
    assert _DESCRIPTION.fullmatch(message), "error_description must be a quoted-string"
    challenge = f'Bearer realm="{REALM}", error="invalid_token", error_description="{message}"'
    return AuthenticationFailed(message, code=code, headers={"WWW-Authenticate": challenge})


def credentials_missing() -> AuthenticationFailed:
    return AuthenticationFailed(
        "no session token: send Authorization: Bearer <token> from POST /v1/authorize",
        code="missing_token", headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'},
    )


def bearer_token(header_values: list[str]) -> str:
    """The token of the one ``Authorization: Bearer`` header, or a 401."""
    if not header_values:
        raise credentials_missing()
    if len(header_values) > 1:
        raise token_refused("send exactly one Authorization header", "malformed_token")
    value = header_values[0]
    if len(value) > AUTHORIZATION_HEADER_CHARS_MAX:
        raise token_refused("the Authorization header is too long", "malformed_token")
    match = _BEARER.fullmatch(value)
    if match is None:
        raise token_refused("expected Authorization: Bearer <token>", "malformed_token")
    return match.group(1)


# pyjwt's refusals, most specific first (InvalidSignatureError is a DecodeError).
_REFUSALS: tuple[tuple[type[jwt.PyJWTError], str, str], ...] = (
    (jwt.ExpiredSignatureError, "the session token has expired", "token_expired"),
    (jwt.ImmatureSignatureError, "the session token is not valid yet", "token_not_yet_valid"),
    (jwt.InvalidAudienceError, "the session token is for another audience",
     "invalid_token_audience"),
    (jwt.InvalidIssuerError, "the session token has another issuer", "invalid_token_issuer"),
    (jwt.InvalidAlgorithmError, "the session token's algorithm is not accepted",
     "invalid_token_algorithm"),
    (jwt.InvalidSignatureError, "the session token's signature does not verify",
     "invalid_token_signature"),
    (jwt.MissingRequiredClaimError, "the session token lacks a required claim",
     "invalid_token_claims"),
    (jwt.DecodeError, "the session token is not a well-formed JWT", "malformed_token"),
)


# Verified tokens kept per process (a few hundred bytes each).
VERIFIED_TOKENS_MAX = 50_000


class TokenCodec:
    """Issues and verifies session tokens with one key and algorithm."""

    def __init__(self, keys: TokenKeys, *, issuer: str, audience: str, leeway_s: int) -> None:
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.leeway_s = leeway_s
        # Tokens already verified, by their exact text. A signature check is a pure
        # function of the token, so its result can be reused until the token expires;
        # revocation is not cached here and is checked on every request.
        self._verified: dict[str, SessionClaims] = {}

    def issue(self, claims: SessionClaims) -> str:
        payload = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": account_reference(claims.account_id),
            "iat": claims.issued_at_s,
            "exp": claims.expires_at_s,
            "jti": claims.jti,
            "wallet": claims.wallet,
            "smart_account": claims.smart_account,
            "chain_id": claims.chain_id,
            "session_key": claims.session_key,
            "session_key_bound": claims.session_key_bound,
        }
        return jwt.encode(payload, self.keys.signing_key, algorithm=self.keys.algorithm)

    def verify(self, token: str) -> SessionClaims:
        """The claims of a token we issued that is still in its lifetime, or a 401."""
        claims = self._verified.get(token)
        if claims is not None and time.time() < claims.expires_at_s + self.leeway_s:
            return claims
        claims = self._verify_signature(token)
        if len(self._verified) >= VERIFIED_TOKENS_MAX:
            self._verified.clear()  # Simple bound; live tokens are re-verified once.
        self._verified[token] = claims
        return claims

    def _verify_signature(self, token: str) -> SessionClaims:
        try:
            payload = jwt.decode(
                token,
                self.keys.verifying_key,
                algorithms=[self.keys.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": list(REQUIRED_CLAIMS), "strict_aud": True},
            )
        except jwt.PyJWTError as error:
            for kind, message, code in _REFUSALS:
                if isinstance(error, kind):
                    raise token_refused(message, code) from None
            raise token_refused("the session token's claims are invalid",
                                "invalid_token_claims") from None
        claims = _session_claims(payload)
        if claims is None:
            raise token_refused("the session token's claims are invalid", "invalid_token_claims")
        return claims


def _session_claims(payload: dict[str, object]) -> SessionClaims | None:
    """Our claims, typed; None if any is missing or of the wrong shape."""
    subject = _SUBJECT.fullmatch(str(payload.get("sub")))
    jti, chain_id = payload.get("jti"), payload.get("chain_id")
    issued_at_s, expires_at_s = payload.get("iat"), payload.get("exp")
    wallet, smart_account = payload.get("wallet"), payload.get("smart_account")
    session_key = payload.get("session_key")
    session_key_bound = payload.get("session_key_bound", False)
    if (
        subject is None
        or not isinstance(jti, str) or not JTI_PATTERN.fullmatch(jti)
        or not _integer(chain_id) or not _integer(issued_at_s) or not _integer(expires_at_s)
        or not is_address(wallet) or not is_address(smart_account)
        or not is_address(session_key)
        or not isinstance(session_key_bound, bool)
    ):
        return None
    assert isinstance(chain_id, int) and isinstance(issued_at_s, int)
    assert isinstance(expires_at_s, int)
    assert isinstance(wallet, str) and isinstance(smart_account, str)
    assert isinstance(session_key, str)
    return SessionClaims(
        account_id=int(subject.group(1)), wallet=wallet, smart_account=smart_account,
        chain_id=chain_id, session_key=session_key, jti=jti, issued_at_s=issued_at_s,
        expires_at_s=expires_at_s, session_key_bound=session_key_bound,
    )


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
