// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ECDSA} from "./lib/ECDSA.sol";
import {PackedUserOperation} from "./lib/Interfaces.sol";
import {SafeTransfer} from "./lib/SafeTransfer.sol";

/// @title TollgateAccount
/// @notice A single-owner ERC-4337 (EntryPoint v0.7) smart account with capped session keys.
///
/// Signatures the account accepts:
/// - UserOperations (`validateUserOp`): the owner's eth_sign / personal_sign signature over the
///   `userOpHash`, i.e. ecrecover(keccak256("\x19Ethereum Signed Message:\n32" ‖ userOpHash)).
///   65 bytes `r ‖ s ‖ v` = no time bounds. A 77-byte form `uint48 validUntil ‖ uint48 validAfter
///   ‖ r ‖ s ‖ v` signs keccak256(abi.encode(userOpHash, validUntil, validAfter)) the same way and
///   returns the bounds packed in the validation data.
/// - ERC-1271 (`isValidSignature`): the owner's raw ECDSA signature over the replay-safe digest
///   `replaySafeHash(hash)` = EIP-712 `TollgateMessage(bytes32 hash)` in this account's own domain
///   (name "TollgateAccount", version "1", chainId, verifyingContract = this account). A signature
///   over the bare hash is refused, and one made for another account of the same owner does not
///   verify here. Session keys are NOT accepted by `isValidSignature`: a 1271 signature can
///   authorize anything (EIP-3009 transfers, permits) and would bypass the session policy. Use
///   `isValidSessionSignature` to check a session key's (same-wrapped) signature, e.g. for login.
///
/// Session keys: the owner grants a key a policy (token, payee, capPerPeriod, periodSeconds,
/// validUntil). Only the policy's payee contract may then pull `token` from this account with
/// `sessionDebit`, at most `capPerPeriod` per period window (windows are `periodSeconds` long,
/// aligned to the grant time) and only strictly before `validUntil`. The payee (the Tollgate
/// settlement contract) is responsible for checking that the key authorized the debit.
contract TollgateAccount {
    /// @notice Limits of a session key.
    struct SessionPolicy {
        address token; // the only token the key's payee may pull
        address payee; // the only contract allowed to call sessionDebit for this key
        uint128 capPerPeriod; // most that may be pulled within one period window
        uint64 periodSeconds; // length of a period window (> 0)
        uint64 validUntil; // the key is live strictly before this timestamp
    }

    struct SessionSpend {
        uint128 spentInPeriod;
        uint64 periodStart;
    }

    bytes4 internal constant ERC1271_MAGIC_VALUE = 0x1626ba7e;
    bytes4 internal constant ERC1271_INVALID = 0xffffffff;
    uint256 internal constant SIG_VALIDATION_FAILED = 1;

    /// @notice EIP-712 type of the replay-safe ERC-1271 wrapper.
    bytes32 public constant TOLLGATE_MESSAGE_TYPEHASH = keccak256("TollgateMessage(bytes32 hash)");
    bytes32 private constant EIP712_DOMAIN_TYPEHASH = keccak256(
        "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
    );
    bytes32 private constant DOMAIN_NAME_HASH = keccak256("TollgateAccount");
    bytes32 private constant DOMAIN_VERSION_HASH = keccak256("1");

    /// @notice The ERC-4337 EntryPoint allowed to validate and execute UserOperations.
    address public immutable entryPoint;
    /// @notice The single owner (an EOA), fixed at deployment.
    address public immutable owner;

    uint256 private immutable _cachedChainId;
    bytes32 private immutable _cachedDomainSeparator;

    mapping(address key => SessionPolicy) private _policies;
    mapping(address key => SessionSpend) private _spends;

    event SessionKeyGranted(
        address indexed key,
        address indexed token,
        address indexed payee,
        uint256 capPerPeriod,
        uint256 periodSeconds,
        uint256 validUntil
    );
    event SessionKeyRevoked(address indexed key);
    event SessionDebited(
        address indexed key,
        address indexed token,
        address indexed payee,
        uint256 amount,
        uint256 spentInPeriod
    );

    error NotEntryPoint();
    error NotOwnerOrEntryPoint();
    error ZeroAddress();
    error BatchLengthMismatch();
    error InvalidSessionPolicy();
    error UnknownSessionKey(address key);
    error SessionKeyExpired(address key);
    error NotSessionPayee(address caller);
    error WrongSessionToken(address token);
    error SessionCapExceeded(uint256 available, uint256 requested);

    modifier onlyOwnerOrEntryPoint() {
        if (msg.sender != owner && msg.sender != entryPoint && msg.sender != address(this)) {
            revert NotOwnerOrEntryPoint();
        }
        _;
    }

    /// @param entryPoint_ The EntryPoint (v0.7) this account trusts.
    /// @param owner_ The owner EOA.
    constructor(address entryPoint_, address owner_) {
        if (entryPoint_ == address(0) || owner_ == address(0)) revert ZeroAddress();
        entryPoint = entryPoint_;
        owner = owner_;
        _cachedChainId = block.chainid;
        _cachedDomainSeparator = _buildDomainSeparator();
    }

    /// @notice Accept native currency (e.g. to pre-fund the EntryPoint deposit).
    receive() external payable {}

    // ---------------------------------------------------------------- ERC-4337

    /// @notice ERC-4337 v0.7 validation. EntryPoint only. Returns 0 (or the packed time bounds
    ///         `validUntil << 160 | validAfter << 208`) for a good owner signature and 1 for a bad
    ///         one, and pays `missingAccountFunds` to the EntryPoint.
    /// @param userOp The operation; `userOp.signature` is the owner's eth_sign signature (see above).
    /// @param userOpHash The EntryPoint's hash of the operation.
    /// @param missingAccountFunds What the EntryPoint still needs from this account.
    function validateUserOp(
        PackedUserOperation calldata userOp,
        bytes32 userOpHash,
        uint256 missingAccountFunds
    ) external returns (uint256 validationData) {
        if (msg.sender != entryPoint) revert NotEntryPoint();
        validationData = _validateUserOpSignature(userOp.signature, userOpHash);
        if (missingAccountFunds != 0) {
            // Failure is ignored on purpose (as SimpleAccount): the EntryPoint checks its deposit.
            (bool ok,) = payable(msg.sender).call{value: missingAccountFunds}("");
            (ok);
        }
    }

    /// @notice Call `dest` with `value` and `func`. Owner, EntryPoint or the account itself.
    function execute(address dest, uint256 value, bytes calldata func)
        external
        onlyOwnerOrEntryPoint
    {
        _call(dest, value, func);
    }

    /// @notice Several calls in order (SimpleAccount v0.7 shape); an empty `value` means all 0.
    function executeBatch(address[] calldata dest, uint256[] calldata value, bytes[] calldata func)
        external
        onlyOwnerOrEntryPoint
    {
        if (dest.length != func.length || (value.length != 0 && value.length != func.length)) {
            revert BatchLengthMismatch();
        }
        for (uint256 i = 0; i < dest.length; ++i) {
            _call(dest[i], value.length == 0 ? 0 : value[i], func[i]);
        }
    }

    // ---------------------------------------------------------------- ERC-1271

    /// @notice The EIP-712 domain separator of this account.
    function DOMAIN_SEPARATOR() public view returns (bytes32) {
        return block.chainid == _cachedChainId ? _cachedDomainSeparator : _buildDomainSeparator();
    }

    /// @notice The digest an owner (or session key) signs to vouch for `hash` on this account:
    ///         EIP-712 `TollgateMessage(bytes32 hash)` in this account's domain.
    function replaySafeHash(bytes32 hash) public view returns (bytes32) {
        return ECDSA.toTypedDataHash(
            DOMAIN_SEPARATOR(), keccak256(abi.encode(TOLLGATE_MESSAGE_TYPEHASH, hash))
        );
    }

    /// @notice ERC-1271: 0x1626ba7e iff `signature` is the owner's signature over
    ///         `replaySafeHash(hash)`; 0xffffffff otherwise (session keys are not accepted).
    function isValidSignature(bytes32 hash, bytes calldata signature)
        external
        view
        returns (bytes4 magicValue)
    {
        address signer = ECDSA.tryRecover(replaySafeHash(hash), signature);
        return signer == owner ? ERC1271_MAGIC_VALUE : ERC1271_INVALID;
    }

    /// @notice Like `isValidSignature` but also accepts a live session key's signature over
    ///         `replaySafeHash(hash)`. For off-chain checks (e.g. API login), never for payments.
    function isValidSessionSignature(bytes32 hash, bytes calldata signature)
        external
        view
        returns (bytes4 magicValue)
    {
        address signer = ECDSA.tryRecover(replaySafeHash(hash), signature);
        if (signer == address(0)) return ERC1271_INVALID;
        if (signer == owner || _isLive(_policies[signer])) return ERC1271_MAGIC_VALUE;
        return ERC1271_INVALID;
    }

    // ---------------------------------------------------------------- session keys

    /// @notice Grant (or replace) `key`'s policy; its spend counter restarts now.
    ///         Owner, EntryPoint or the account itself.
    function grantSessionKey(address key, SessionPolicy calldata policy)
        external
        onlyOwnerOrEntryPoint
    {
        if (
            key == address(0) || policy.token == address(0) || policy.payee == address(0)
                || policy.periodSeconds == 0 || policy.validUntil <= block.timestamp
        ) revert InvalidSessionPolicy();
        _policies[key] = policy;
        _spends[key] = SessionSpend({spentInPeriod: 0, periodStart: uint64(block.timestamp)});
        emit SessionKeyGranted(
            key,
            policy.token,
            policy.payee,
            policy.capPerPeriod,
            policy.periodSeconds,
            policy.validUntil
        );
    }

    /// @notice Revoke `key` at once. Owner, EntryPoint or the account itself.
    function revokeSessionKey(address key) external onlyOwnerOrEntryPoint {
        if (_policies[key].token == address(0)) revert UnknownSessionKey(key);
        delete _policies[key];
        delete _spends[key];
        emit SessionKeyRevoked(key);
    }

    /// @notice `key`'s policy (all zero if never granted or revoked) and whether it is live now.
    function sessionPolicy(address key)
        external
        view
        returns (SessionPolicy memory policy, bool live)
    {
        policy = _policies[key];
        live = _isLive(policy);
    }

    /// @notice What `key`'s payee could pull right now (0 if the key is not live).
    function sessionAvailable(address key) external view returns (uint256) {
        SessionPolicy memory policy = _policies[key];
        if (!_isLive(policy)) return 0;
        (uint256 spent,) = _currentPeriod(policy, _spends[key]);
        return policy.capPerPeriod - spent;
    }

    /// @notice Pull `amount` of `token` to the caller under `key`'s policy. Only the policy's
    ///         payee may call, only for the policy's token, while the key is live, and within the
    ///         cap of the current period window.
    function sessionDebit(address key, address token, uint256 amount) external {
        SessionPolicy memory policy = _policies[key];
        if (policy.token == address(0)) revert UnknownSessionKey(key);
        if (block.timestamp >= policy.validUntil) revert SessionKeyExpired(key);
        if (msg.sender != policy.payee) revert NotSessionPayee(msg.sender);
        if (token != policy.token) revert WrongSessionToken(token);
        (uint256 spent, uint64 periodStart) = _currentPeriod(policy, _spends[key]);
        uint256 available = policy.capPerPeriod - spent;
        if (amount > available) revert SessionCapExceeded(available, amount);
        spent += amount; // <= capPerPeriod, fits in uint128
        _spends[key] = SessionSpend({spentInPeriod: uint128(spent), periodStart: periodStart});
        emit SessionDebited(key, token, msg.sender, amount, spent);
        SafeTransfer.safeTransfer(token, msg.sender, amount);
    }

    // ---------------------------------------------------------------- internals

    function _validateUserOpSignature(bytes calldata signature, bytes32 userOpHash)
        private
        view
        returns (uint256)
    {
        if (signature.length == 65) {
            address signer = ECDSA.tryRecover(ECDSA.toEthSignedMessageHash(userOpHash), signature);
            return signer == owner ? 0 : SIG_VALIDATION_FAILED;
        }
        if (signature.length == 77) {
            uint48 validUntil = uint48(bytes6(signature[0:6]));
            uint48 validAfter = uint48(bytes6(signature[6:12]));
            bytes32 bounded = keccak256(abi.encode(userOpHash, validUntil, validAfter));
            address signer =
                ECDSA.tryRecover(ECDSA.toEthSignedMessageHash(bounded), signature[12:77]);
            if (signer != owner) return SIG_VALIDATION_FAILED;
            return (uint256(validUntil) << 160) | (uint256(validAfter) << 208);
        }
        return SIG_VALIDATION_FAILED;
    }

    function _isLive(SessionPolicy memory policy) private view returns (bool) {
        return policy.token != address(0) && block.timestamp < policy.validUntil;
    }

    /// @dev The spend and start of the period window containing now (windows are aligned to the
    ///      grant time, so an idle period does not shift them).
    function _currentPeriod(SessionPolicy memory policy, SessionSpend memory spend)
        private
        view
        returns (uint256 spent, uint64 periodStart)
    {
        periodStart = spend.periodStart;
        if (block.timestamp - periodStart >= policy.periodSeconds) {
            uint256 elapsed = block.timestamp - periodStart;
            periodStart += uint64(elapsed - (elapsed % policy.periodSeconds));
            return (0, periodStart);
        }
        return (spend.spentInPeriod, periodStart);
    }

    function _call(address target, uint256 value, bytes calldata data) private {
        (bool ok, bytes memory ret) = target.call{value: value}(data);
        if (!ok) {
            assembly ("memory-safe") {
                revert(add(ret, 0x20), mload(ret))
            }
        }
    }

    function _buildDomainSeparator() private view returns (bytes32) {
        return keccak256(
            abi.encode(
                EIP712_DOMAIN_TYPEHASH,
                DOMAIN_NAME_HASH,
                DOMAIN_VERSION_HASH,
                block.chainid,
                address(this)
            )
        );
    }
}
