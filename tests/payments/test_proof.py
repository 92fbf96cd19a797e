"""Payment proofs from the official x402 client: read, checked against what we ask, refused
with the right status and reason when they are not ours."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_keys import keys
from x402 import x402ClientSync
from x402.http.utils import decode_payment_required_header, encode_payment_signature_header
from x402.mechanisms.evm.exact import ExactEvmScheme

from app.errors import InvalidRequest, PaymentRequired
from app.payments.assets import PaymentAsset
from app.payments.checks import VALID_BEFORE_MARGIN_S, Asked, authorization_digest, check_proof
from app.payments.proof import PaymentProof, read_payment_proof
from app.payments.requirements import X402PaymentRequiredError, payment_required

ASSET = PaymentAsset(31337, "0x5FbDB2315678afecb367f032d93F642f64180aa3", "USD Coin", "2")
PAY_TO = "0x9fE46736679d2D9a65F0992F2272dE9f3c7fa6e0"
NOW = 1_900_000_000


def ask(amount: int = 1_000_000) -> X402PaymentRequiredError:
    return payment_required("pay first", asset=ASSET, pay_to=PAY_TO, amount_micros=amount,
                            resource_url="http://tollgate/v1/chat/completions")


def signed_header(payer: LocalAccount, error: X402PaymentRequiredError) -> str:
    # The dev chain's TestUSDC is not one of the client's known assets: allow it by address.
    client = x402ClientSync().set_spend_controls({"allowed_assets": [
        {"network": ASSET.network, "asset": ASSET.address, "max_amount_per_payment": "10000000"},
    ]}).register(ASSET.network, ExactEvmScheme(payer))
    payload = client.create_payment_payload(error.required)
    return encode_payment_signature_header(payload)


@pytest.fixture(scope="module")
def payer() -> LocalAccount:
    return Account.create()


def read(header: str, name: str = "PAYMENT-SIGNATURE") -> PaymentProof:
    proof = read_payment_proof({name: header})
    assert proof is not None
    return proof


def test_402_header_and_body_are_one_x402_document() -> None:
    error = ask(2_500_000)
    assert error.status == 402
    decoded = decode_payment_required_header(error.headers["PAYMENT-REQUIRED"])
    body = error.body()
    assert decoded.model_dump(by_alias=True, exclude_none=True, mode="json") == body
    (accepted,) = body["accepts"]
    assert accepted == {
        "scheme": "exact", "network": "eip155:31337", "asset": ASSET.address,
        "amount": "2500000", "payTo": PAY_TO, "maxTimeoutSeconds": 300,
        "extra": {"name": "USD Coin", "version": "2"},
    }
    assert body["x402Version"] == 2 and body["error"] == "pay first"


def test_official_client_proof_is_read_and_accepted(payer: LocalAccount) -> None:
    proof = read(signed_header(payer, ask()))
    assert (proof.x402_version, proof.scheme, proof.network) == (2, "exact", "eip155:31337")
    assert proof.payer == payer.address.lower() and proof.to == PAY_TO.lower()
    assert proof.value == 1_000_000
    check_proof(proof, Asked(ASSET, PAY_TO, 1_000_000), now_s=proof.valid_before - 300)
    digest = authorization_digest(proof, ASSET)
    signer = keys.Signature(proof.signature[:64] + bytes([proof.signature[64] - 27]))
    assert signer.recover_public_key_from_msg_hash(digest).to_checksum_address() == payer.address


def test_v1_header_is_read(payer: LocalAccount) -> None:
    v2 = json.loads(base64.b64decode(signed_header(payer, ask())))
    v1 = {"x402Version": 1, "scheme": "exact", "network": "eip155:31337",
          "payload": v2["payload"]}
    proof = read(base64.b64encode(json.dumps(v1).encode()).decode(), "X-PAYMENT")
    assert proof.x402_version == 1 and proof.accepted is None and proof.header == "X-PAYMENT"


def tampered(payer: LocalAccount, change: Any) -> str:
    document = json.loads(base64.b64decode(signed_header(payer, ask())))
    change(document)
    return base64.b64encode(json.dumps(document).encode()).decode()


@pytest.mark.parametrize(("header", "reason"), [
    ("%%%not base64%%%", "JSON"),
    (base64.b64encode(b"\xff\xfe").decode(), "base64 of UTF-8 JSON"),
    (base64.b64encode(b"[1, 2]").decode(), "JSON object"),
    (base64.b64encode(b'{"x402Version": 2}').decode(), "not an x402 payment payload"),
    ("", "empty"),
    ("A" * 9000, "longer than"),
])
def test_unreadable_headers_are_400_with_a_reason(header: str, reason: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        read_payment_proof({"PAYMENT-SIGNATURE": header})
    assert refused.value.status == 400 and reason in refused.value.message
    assert refused.value.param == "PAYMENT-SIGNATURE"


@pytest.mark.parametrize(("change", "where"), [
    (lambda d: d["payload"]["authorization"].update(value=5), "value"),
    (lambda d: d["payload"]["authorization"].update(nonce="0x12"), "nonce"),
    (lambda d: d["payload"].update(signature=17), "signature"),
    (lambda d: d["payload"]["authorization"].pop("from"), "from"),
    (lambda d: d["payload"].update(extra=1), "extra"),
])
def test_wrong_types_in_the_authorization_are_400(payer: LocalAccount, change: Any,
                                                  where: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        read(tampered(payer, change))
    assert where in refused.value.message


@pytest.mark.parametrize(("asked", "now_offset", "code"), [
    (Asked(ASSET, PAY_TO, 1_000_001), 0, "payment_amount_too_low"),
    (Asked(ASSET, "0x" + "11" * 20, 1), 0, "payment_wrong_pay_to"),
    (Asked(PaymentAsset(8453, ASSET.address, "USD Coin", "2"), PAY_TO, 1), 0,
     "payment_wrong_network"),
    (Asked(PaymentAsset(31337, "0x" + "22" * 20, "USD Coin", "2"), PAY_TO, 1), 0,
     "payment_wrong_asset"),
    (Asked(ASSET, PAY_TO, 1), 300 - VALID_BEFORE_MARGIN_S + 1, "payment_expired"),
])
def test_unacceptable_terms_are_402_with_a_reason(payer: LocalAccount, asked: Asked,
                                                  now_offset: int, code: str) -> None:
    proof = read(signed_header(payer, ask()))
    with pytest.raises(PaymentRequired) as refused:
        check_proof(proof, asked, now_s=proof.valid_before - 300 + now_offset)
    assert refused.value.status == 402 and refused.value.code == code


def test_authorization_paying_someone_else_is_refused_even_if_accepted_says_otherwise(
    payer: LocalAccount,
) -> None:
    def redirect(document: dict[str, Any]) -> None:
        document["payload"]["authorization"]["to"] = "0x" + "33" * 20

    proof = read(tampered(payer, redirect))
    with pytest.raises(PaymentRequired) as refused:
        check_proof(proof, Asked(ASSET, PAY_TO, 1), now_s=proof.valid_before - 300)
    assert refused.value.code == "payment_wrong_pay_to"
