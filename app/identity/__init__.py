"""Identity: wallet-signed authorizations become sessions, sessions authenticate requests.

    addresses.py          0x addresses from outside: parsed, checksum-checked, lowercased
    typed_data.py         the EIP-712 domain and types a wallet signs
    authorization.py      the Authorization message: parsing, limits, time window, schema
    signature.py          65-byte ECDSA signatures: format, low-s, signer recovery
    verifier.py           who may authorize for which account: the seam, EOAs, per-chain routing
    chain_verifier.py     smart accounts proven on chain (ERC-1271, ERC-6492, owner, session key)
    session_policy.py     session-key policies read on chain, cached briefly, judged
    token_keys.py         the JWT signing and verifying keys (HS256 secret or ES256 PEM)
    tokens.py             session JWTs: claims, issue, verify, bearer header, refusals
    session_store.py      Postgres: accounts, nonces, sessions, revocation (the truth)
    revocation_list.py    Redis: revoked session ids, read on every request
    account_cache.py      a two-second in-process cache of session and account rows
    sessions.py           the service tying them together (authorize, authenticate, revoke)
    authenticate.py       ``authenticate(request)`` and the pipeline stage
    routes.py             the HTTP endpoints
    setup.py              installs all of it into the app (chain verifier with a chain)
"""
