"""The token keys: the state-dir secret is created once, privately, whoever races for it."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from app.identity.token_keys import TokenKeyError, load_token_keys, state_dir_secret
from tests.conftest import make_settings

THREADS = 16


def test_racing_creators_all_get_the_one_secret(tmp_path: Path) -> None:
    path = tmp_path / "state" / "jwt-secret"
    start = threading.Barrier(THREADS)

    def create() -> bytes:
        start.wait()
        return state_dir_secret(path)

    with ThreadPoolExecutor(THREADS) as pool:
        secrets = list(pool.map(lambda _: create(), range(THREADS)))
    assert len(set(secrets)) == 1 and len(secrets[0]) == 32
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["jwt-secret"], "no temporary files left"
    assert state_dir_secret(path) == secrets[0], "read back, not regenerated"


def test_a_corrupt_secret_file_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "jwt-secret"
    path.write_text("not hex\n")
    with pytest.raises(TokenKeyError, match="jwt-secret"):
        state_dir_secret(path)


def test_hs256_without_secret_uses_the_state_dir(tmp_path: Path) -> None:
    keys = load_token_keys(make_settings(jwt_secret=None, state_dir=tmp_path))
    assert keys.algorithm == "HS256"
    assert keys.signing_key == keys.verifying_key == state_dir_secret(tmp_path / "jwt-secret")


def _pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def test_es256_derives_the_public_key_and_refuses_other_curves() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    keys = load_token_keys(make_settings(jwt_algorithm="ES256",
                                         jwt_private_key_pem=_pem(private)))
    assert isinstance(keys.verifying_key, ec.EllipticCurvePublicKey)
    assert keys.verifying_key.public_numbers() == private.public_key().public_numbers()
    for wrong in (_pem(ec.generate_private_key(ec.SECP384R1())),
                  _pem(ed25519.Ed25519PrivateKey.generate()), "not a pem"):
        with pytest.raises(TokenKeyError, match="TOLLGATE_JWT_PRIVATE_KEY_PEM"):
            load_token_keys(make_settings(jwt_algorithm="ES256", jwt_private_key_pem=wrong))
