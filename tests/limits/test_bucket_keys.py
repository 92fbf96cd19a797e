"""Bucket keys: one hash tag per owner, and the IP grouping of per-IP limits."""

from __future__ import annotations

import pytest

from app.limits.bucket_keys import (
    account_request_key,
    account_token_key,
    hash_tag,
    ip_owner,
    ip_request_key,
)


def test_an_accounts_buckets_share_one_hash_tag() -> None:
    assert account_request_key(42) == "tg:rl:{acct:42}:req"
    assert account_token_key(42) == "tg:rl:{acct:42}:tok"
    assert hash_tag(account_request_key(42)) == hash_tag(account_token_key(42)) == "acct:42"
    assert hash_tag(account_request_key(43)) != hash_tag(account_request_key(42))


def test_ip_keys_carry_the_ip_as_hash_tag() -> None:
    assert ip_request_key("1.2.3.4") == "tg:rl:{ip:1.2.3.4}:req"
    assert hash_tag(ip_request_key("1.2.3.4")) == "ip:1.2.3.4"


def test_hash_tag_follows_redis_cluster_rules() -> None:
    assert hash_tag("plain") == "plain"
    assert hash_tag("a{}b{c}") == "a{}b{c}", "an empty first tag means the whole key"
    assert hash_tag("a{b}{c}") == "b"


@pytest.mark.parametrize(
    ("remote", "owner"),
    [
        ("1.2.3.4", "1.2.3.4"),
        ("::ffff:1.2.3.4", "1.2.3.4"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("", "unknown"),
        (None, "unknown"),
        ("not-an-ip", "unknown"),
    ],
)
def test_ip_owner_groups_an_ipv6_64_and_unwraps_mapped_ipv4(
    remote: str | None, owner: str
) -> None:
    assert ip_owner(remote) == owner
