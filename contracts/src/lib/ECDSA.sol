// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title ECDSA
/// @notice Minimal secp256k1 signature recovery with malleability checks (low-s, v in {27, 28}).
/// @dev Every function returns address(0) instead of reverting on a malformed signature, so
///      callers compare the result against the expected signer (which must never be address(0)).
library ECDSA {
    /// @dev secp256k1n / 2: signatures with a larger s are malleable twins and are refused.
    uint256 internal constant HALF_CURVE_ORDER =
        0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    /// @notice Recover the signer of `digest` from (v, r, s), or address(0) if invalid.
    function tryRecover(bytes32 digest, uint8 v, bytes32 r, bytes32 s)
        internal
        pure
        returns (address)
    {
        if (uint256(s) > HALF_CURVE_ORDER) return address(0);
        if (v != 27 && v != 28) return address(0);
        return ecrecover(digest, v, r, s);
    }

    /// @notice Recover the signer of `digest` from a 65-byte `r ‖ s ‖ v` signature, or address(0).
    function tryRecover(bytes32 digest, bytes memory signature) internal pure returns (address) {
        if (signature.length != 65) return address(0);
        bytes32 r;
        bytes32 s;
        uint8 v;
        assembly ("memory-safe") {
            r := mload(add(signature, 0x20))
            s := mload(add(signature, 0x40))
            v := byte(0, mload(add(signature, 0x60)))
        }
        return tryRecover(digest, v, r, s);
    }

    /// @notice The eth_sign / personal_sign digest of a 32-byte message.
    function toEthSignedMessageHash(bytes32 hash) internal pure returns (bytes32 digest) {
        assembly ("memory-safe") {
            mstore(0x00, "\x19Ethereum Signed Message:\n32")
            mstore(0x1c, hash)
            digest := keccak256(0x00, 0x3c)
        }
    }

    /// @notice The EIP-712 digest of `structHash` in the domain `domainSeparator`.
    function toTypedDataHash(bytes32 domainSeparator, bytes32 structHash)
        internal
        pure
        returns (bytes32)
    {
        return keccak256(abi.encodePacked(hex"1901", domainSeparator, structHash));
    }
}
