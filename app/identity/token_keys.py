"""The keys that sign and verify session tokens.

HS256 uses ``TOLLGATE_JWT_SECRET``; without one, a secret generated once in the
state dir (``jwt-secret``), so every worker process started on that state dir
verifies every other's tokens. ES256 uses ``TOLLGATE_JWT_PRIVATE_KEY_PEM`` (a
P-256 key) and verifies with the public key derived from it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from app.config.settings import Settings

log = logging.getLogger(__name__)

SECRET_FILE_NAME = "jwt-secret"
SECRET_BYTES = 32
# RFC 7518 section 3.2: an HS256 key must be at least as long as the hash (32 bytes).
HMAC_KEY_BYTES_MIN = 32
_SECRET_HEX = re.compile(rf"[0-9a-f]{{{2 * SECRET_BYTES}}}")


class TokenKeyError(Exception):
    """The configured key material cannot be used; the message says which setting."""


@dataclass(frozen=True, slots=True)
class TokenKeys:
    """One algorithm and its keys. The verifying key never accepts another algorithm."""

    algorithm: str
    signing_key: bytes | ec.EllipticCurvePrivateKey
    verifying_key: bytes | ec.EllipticCurvePublicKey


def load_token_keys(settings: Settings) -> TokenKeys:
    """Blocking (it may create a file): call at startup."""
    if settings.jwt_algorithm == "ES256":
        assert settings.jwt_private_key_pem is not None, "settings require the PEM with ES256"
        private = _p256_private_key(settings.jwt_private_key_pem.get_secret_value())
        return TokenKeys("ES256", private, private.public_key())
    assert settings.jwt_algorithm == "HS256"
    if settings.jwt_secret is not None:
        secret = settings.jwt_secret.get_secret_value().encode()
        if len(secret) < HMAC_KEY_BYTES_MIN:
            log.warning("TOLLGATE_JWT_SECRET is %d bytes; use at least %d random bytes",
                        len(secret), HMAC_KEY_BYTES_MIN)
        return TokenKeys("HS256", secret, secret)
    path = Path(settings.state_dir).resolve() / SECRET_FILE_NAME
    secret = state_dir_secret(path)
    log.warning(
        "TOLLGATE_JWT_SECRET is not set: sessions are signed with the secret in %s and only"
        " verify on instances that share this state dir", path,
    )
    return TokenKeys("HS256", secret, secret)


def _p256_private_key(pem: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as error:
        raise TokenKeyError(f"TOLLGATE_JWT_PRIVATE_KEY_PEM: not a usable PEM key ({error})"
                            ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise TokenKeyError("TOLLGATE_JWT_PRIVATE_KEY_PEM: ES256 needs a P-256 EC private key")
    return key


def state_dir_secret(path: Path) -> bytes:
    """The secret in ``path``, created there first if missing; safe between processes.

    The secret is written under a private temporary name and then hard-linked into
    place: the link fails if the file exists, so exactly one process's secret wins
    and nobody ever reads a half-written file. The temporary file is created with
    O_EXCL and mode 0600.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "w") as file:
                file.write(secrets.token_hex(SECRET_BYTES) + "\n")
                file.flush()
                os.fsync(file.fileno())
            # If another process won the race, its secret is the one.
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by other users; chmod 600 it", path)
    text = path.read_text().strip()
    if not _SECRET_HEX.fullmatch(text):
        raise TokenKeyError(f"{path}: expected {2 * SECRET_BYTES} lowercase hex digits;"
                            " delete it to generate a new one (existing sessions end)")
    return bytes.fromhex(text)
