"""Redis keys of the rate-limit buckets, and who an IP bucket belongs to.

Every key carries a Redis Cluster hash tag (the part in braces) naming its owner,
so the buckets of one call live in one slot and one script can touch them all:

    tg:rl:{acct:42}:req     requests per minute of account 42
    tg:rl:{acct:42}:tok     tokens per minute of account 42
    tg:rl:{ip:1.2.3.4}:req  requests per minute of one IPv4 address
    tg:rl:{ip:2001:db8:1:2::/64}:req   of one IPv6 /64 (see ``ip_owner``)
"""

from __future__ import annotations

import ipaddress

KEY_PREFIX = "tg:rl:"
# An IPv6 client usually holds a whole /64 and can pick any address in it, so a
# per-address bucket would not limit it at all; the /64 is the unit that costs it.
IPV6_PREFIX_BITS = 64
# Where the peer address is unknown (a Unix socket, a test transport) all such
# clients share one bucket: they are limited together rather than not at all.
UNKNOWN_IP_OWNER = "unknown"


def account_request_key(account_id: int) -> str:
    return f"{KEY_PREFIX}{{acct:{account_id}}}:req"


def account_token_key(account_id: int) -> str:
    return f"{KEY_PREFIX}{{acct:{account_id}}}:tok"


def ip_request_key(remote: str | None) -> str:
    return f"{KEY_PREFIX}{{ip:{ip_owner(remote)}}}:req"


def ip_owner(remote: str | None) -> str:
    """The IPv4 address, or the IPv6 /64, a request comes from; ``unknown`` if unparsable.

    An IPv4-mapped IPv6 address (``::ffff:1.2.3.4``, seen on dual-stack sockets)
    counts as the IPv4 address it carries.
    """
    if not remote:
        return UNKNOWN_IP_OWNER
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])  # drop an IPv6 zone id
    except ValueError:
        return UNKNOWN_IP_OWNER
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        network = ipaddress.IPv6Network((address, IPV6_PREFIX_BITS), strict=False)
        return str(network)
    return str(address)


def hash_tag(key: str) -> str:
    """The part of a key Redis Cluster hashes: the first ``{...}`` with something inside."""
    start = key.find("{")
    if start < 0:
        return key
    end = key.find("}", start + 1)
    if end <= start + 1:
        return key
    return key[start + 1 : end]
