// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {TollgateAccount} from "./TollgateAccount.sol";

/// @title TollgateAccountFactory
/// @notice Deploys TollgateAccounts with CREATE2, so an account's address is known (and can be
///         funded, or sign through ERC-6492) before it exists. Usable as an ERC-4337 v0.7
///         `initCode` factory: `factory ‖ abi.encodeCall(createAccount, (owner, salt))`.
/// @dev The CREATE2 salt is `bytes32(salt)`; the owner is part of the init code (constructor
///      argument), so (owner, salt) determines the address.
contract TollgateAccountFactory {
    /// @notice The EntryPoint every account of this factory trusts.
    address public immutable entryPoint;

    event AccountCreated(address indexed account, address indexed owner, uint256 salt);

    error ZeroAddress();

    /// @param entryPoint_ The ERC-4337 v0.7 EntryPoint handed to every account.
    constructor(address entryPoint_) {
        if (entryPoint_ == address(0)) revert ZeroAddress();
        entryPoint = entryPoint_;
    }

    /// @notice Deploy the account of (`owner`, `salt`), or return it if it already exists.
    function createAccount(address owner, uint256 salt) external returns (TollgateAccount account) {
        address predicted = getAddress(owner, salt);
        if (predicted.code.length != 0) return TollgateAccount(payable(predicted));
        account = new TollgateAccount{salt: bytes32(salt)}(entryPoint, owner);
        emit AccountCreated(address(account), owner, salt);
    }

    /// @notice The counterfactual address of the account of (`owner`, `salt`).
    function getAddress(address owner, uint256 salt) public view returns (address) {
        bytes32 initCodeHash = keccak256(
            abi.encodePacked(type(TollgateAccount).creationCode, abi.encode(entryPoint, owner))
        );
        return address(
            uint160(
                uint256(keccak256(abi.encodePacked(bytes1(0xff), address(this), bytes32(salt), initCodeHash)))
            )
        );
    }
}
