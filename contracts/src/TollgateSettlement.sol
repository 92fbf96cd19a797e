// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ECDSA} from "./lib/ECDSA.sol";
import {IERC20, IReceiveWithAuthorization, ISessionDebit} from "./lib/Interfaces.sol";
import {SafeTransfer} from "./lib/SafeTransfer.sol";

/// @notice EIP-3009 `transferWithAuthorization`, both signature forms (USDC v2.2 style): the
///         authorization x402's "exact" EVM scheme has the payer sign.
interface ITransferWithAuthorization {
    function transferWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        uint8 v,
        bytes32 r,
        bytes32 s
    ) external;

    function transferWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes calldata signature
    ) external;
}

/// @title TollgateSettlement
/// @notice Where the Tollgate operator collects what callers owe, in one fixed token (USDC).
///
/// Three ways to settle, all operator-only and each emitting exactly one
/// `Settled(payer, amount, method, ref)`. `ref` is the ledger's settlement reference (named `ref`
/// because `reference` is a reserved word in Solidity); each can be used once, so replaying a
/// settlement transaction is refused on-chain.
///
/// 1. `collect` (method 1): pull from a TollgateAccount through one of its session keys. The
///    session key signs cumulative vouchers, EIP-712 `DebitVoucher(address account,address token,
///    uint256 cumulativeAmount,uint256 deadline)` in this contract's domain (name
///    "TollgateSettlement", version "1", chainId, this contract): "up to `cumulativeAmount` in
///    total may be collected from `account` under my key". The contract keeps
///    `collected[account][key]` and only pulls `amount` while `collected + amount <=
///    cumulativeAmount`, so no voucher can be used for more than it says, and an old voucher is
///    worthless once a larger one was collected. The account itself enforces its session policy
///    (payee = this contract, token, cap per period, expiry, revocation), so even a malicious
///    operator cannot take more than the policy allows.
/// 2. `settleWithAuthorization` (method 2): an EIP-3009 `receiveWithAuthorization` paying this
///    contract; only this contract can submit it (`to == msg.sender`), so it cannot be front-run.
/// 3. `settleWithTransferAuthorization` (method 3): an EIP-3009 `transferWithAuthorization`
///    paying this contract, which is what a standard x402 "exact" payment signs (its `payTo` is
///    this contract). Anyone may submit such an authorization to the token, so a payment can
///    arrive here without a `Settled` event; see the function's notes.
contract TollgateSettlement {
    /// @notice `Settled.method` of a session-key collection.
    uint8 public constant METHOD_SESSION_DEBIT = 1;
    /// @notice `Settled.method` of an EIP-3009 `receiveWithAuthorization` payment.
    uint8 public constant METHOD_EIP3009 = 2;
    /// @notice `Settled.method` of an EIP-3009 `transferWithAuthorization` payment (x402 "exact").
    uint8 public constant METHOD_EIP3009_TRANSFER = 3;

    /// @notice EIP-712 type of the session key's cumulative voucher.
    bytes32 public constant DEBIT_VOUCHER_TYPEHASH = keccak256(
        "DebitVoucher(address account,address token,uint256 cumulativeAmount,uint256 deadline)"
    );
    bytes32 private constant EIP712_DOMAIN_TYPEHASH = keccak256(
        "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
    );
    bytes32 private constant DOMAIN_NAME_HASH = keccak256("TollgateSettlement");
    bytes32 private constant DOMAIN_VERSION_HASH = keccak256("1");

    /// @notice The token every settlement is paid in.
    address public immutable token;
    /// @notice May change the operator, the treasury and the admin, and sweep.
    address public admin;
    /// @notice The only account that may settle; may also sweep.
    address public operator;
    /// @notice Where `sweep` sends collected funds.
    address public treasury;

    /// @notice Whether a settlement reference has been used.
    mapping(bytes32 ref => bool) public referenceUsed;
    /// @notice Total collected so far from `account` under each session key's vouchers.
    mapping(address account => mapping(address sessionKey => uint256)) public collected;

    uint256 private immutable _cachedChainId;
    bytes32 private immutable _cachedDomainSeparator;

    event Settled(address indexed payer, uint256 amount, uint8 method, bytes32 indexed ref);
    event AdminChanged(address indexed previousAdmin, address indexed newAdmin);
    event OperatorChanged(address indexed previousOperator, address indexed newOperator);
    event TreasuryChanged(address indexed previousTreasury, address indexed newTreasury);
    event Swept(address indexed token, address indexed treasury, uint256 amount);

    error NotAdmin();
    error NotOperator();
    error NotOperatorOrAdmin();
    error ZeroAddress();
    error ZeroAmount();
    error InvalidReference();
    error ReferenceAlreadyUsed(bytes32 ref);
    error VoucherExpired(uint256 deadline);
    error InvalidVoucherSignature();
    error VoucherExceeded(uint256 alreadyCollected, uint256 cumulativeAmount);
    error AccountNotDeployed(address account);
    /// @notice What arrived differs from what `collect` or a transfer settlement pulled.
    error DebitShortfall(uint256 expected, uint256 received);

    modifier onlyAdmin() {
        if (msg.sender != admin) revert NotAdmin();
        _;
    }

    modifier onlyOperator() {
        if (msg.sender != operator) revert NotOperator();
        _;
    }

    /// @param token_ The settlement token (USDC or TestUSDC).
    /// @param admin_ The admin.
    /// @param operator_ The operator.
    /// @param treasury_ Where sweeps go.
    constructor(address token_, address admin_, address operator_, address treasury_) {
        if (
            token_ == address(0) || admin_ == address(0) || operator_ == address(0)
                || treasury_ == address(0)
        ) revert ZeroAddress();
        token = token_;
        admin = admin_;
        operator = operator_;
        treasury = treasury_;
        _cachedChainId = block.chainid;
        _cachedDomainSeparator = _buildDomainSeparator();
        emit AdminChanged(address(0), admin_);
        emit OperatorChanged(address(0), operator_);
        emit TreasuryChanged(address(0), treasury_);
    }

    // ---------------------------------------------------------------- settlement

    /// @notice Pull `amount` from `account` under `sessionKey`'s policy, authorized by the key's
    ///         cumulative voucher (`cumulativeAmount`, `deadline`, `signature`). Operator only.
    /// @param account The payer's TollgateAccount (must be deployed).
    /// @param sessionKey The session key that signed the voucher.
    /// @param amount What to pull now (> 0; `collected + amount <= cumulativeAmount`).
    /// @param cumulativeAmount The voucher's running total.
    /// @param deadline The voucher is valid while block.timestamp <= deadline.
    /// @param ref The ledger's settlement reference (unused, non-zero).
    /// @param signature The session key's 65-byte signature over `voucherDigest(...)`.
    function collect(
        address account,
        address sessionKey,
        uint256 amount,
        uint256 cumulativeAmount,
        uint256 deadline,
        bytes32 ref,
        bytes calldata signature
    ) external onlyOperator {
        if (amount == 0) revert ZeroAmount();
        _useReference(ref);
        if (block.timestamp > deadline) revert VoucherExpired(deadline);
        bytes32 digest = voucherDigest(account, cumulativeAmount, deadline);
        address signer = ECDSA.tryRecover(digest, signature);
        if (signer == address(0) || signer != sessionKey) revert InvalidVoucherSignature();
        uint256 already = collected[account][sessionKey];
        if (already + amount > cumulativeAmount) revert VoucherExceeded(already, cumulativeAmount);
        if (account.code.length == 0) revert AccountNotDeployed(account);
        collected[account][sessionKey] = already + amount;

        // The account is not trusted to report truthfully: measure what actually arrived.
        uint256 balanceBefore = IERC20(token).balanceOf(address(this));
        ISessionDebit(account).sessionDebit(sessionKey, token, amount);
        uint256 received = IERC20(token).balanceOf(address(this)) - balanceBefore;
        if (received != amount) revert DebitShortfall(amount, received);
        emit Settled(account, amount, METHOD_SESSION_DEBIT, ref);
    }

    /// @notice Settle with an EIP-3009 `receiveWithAuthorization` (v, r, s) paying this
    ///         contract. Operator only.
    function settleWithAuthorization(
        address from,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        uint8 v,
        bytes32 r,
        bytes32 s,
        bytes32 ref
    ) external onlyOperator {
        if (value == 0) revert ZeroAmount();
        _useReference(ref);
        IReceiveWithAuthorization(token).receiveWithAuthorization(
            from, address(this), value, validAfter, validBefore, nonce, v, r, s
        );
        emit Settled(from, value, METHOD_EIP3009, ref);
    }

    /// @notice Settle with an EIP-3009 `receiveWithAuthorization` paying this contract, with a
    ///         bytes signature (65-byte ECDSA, or ERC-1271 when `from` is a contract wallet).
    ///         Operator only.
    function settleWithAuthorization(
        address from,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes calldata signature,
        bytes32 ref
    ) external onlyOperator {
        if (value == 0) revert ZeroAmount();
        _useReference(ref);
        IReceiveWithAuthorization(token).receiveWithAuthorization(
            from, address(this), value, validAfter, validBefore, nonce, signature
        );
        emit Settled(from, value, METHOD_EIP3009, ref);
    }

    /// @notice Settle a standard x402 "exact" payment: an EIP-3009 `transferWithAuthorization`
    ///         from `from` to this contract, with a bytes signature (65-byte ECDSA, or ERC-1271
    ///         when `from` is a contract wallet). Operator only.
    /// @dev Unlike `receiveWithAuthorization`, a transfer authorization is not bound to its
    ///      submitter: anyone holding the signed authorization can submit it to the token
    ///      directly, first. The funds then still arrive here (the signed `to` is this contract,
    ///      so nobody can redirect them), but without a `Settled` event, and this call then
    ///      reverts in the token because the nonce is used, leaving the reference unused. The
    ///      server detects that case through the
    ///      token's `authorizationState(from, nonce)` / `AuthorizationUsed(from, nonce)` and
    ///      records the payment from the token's `Transfer(from, this, value)` event.
    /// @param from The payer (the authorization's signer, or its ERC-1271 wallet).
    /// @param value The amount authorized (> 0); exactly this much must arrive.
    /// @param validAfter The authorization is valid strictly after this timestamp.
    /// @param validBefore The authorization is valid strictly before this timestamp.
    /// @param nonce The authorization's unique 32-byte nonce.
    /// @param signature The payer's signature over the token's `TransferWithAuthorization`.
    /// @param ref The ledger's settlement reference (unused, non-zero).
    function settleWithTransferAuthorization(
        address from,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes calldata signature,
        bytes32 ref
    ) external onlyOperator {
        uint256 balanceBefore = _beginTransferSettlement(value, ref);
        ITransferWithAuthorization(token).transferWithAuthorization(
            from, address(this), value, validAfter, validBefore, nonce, signature
        );
        _finishTransferSettlement(from, value, ref, balanceBefore);
    }

    /// @notice `settleWithTransferAuthorization` with the signature as (v, r, s), for EOA payers
    ///         and tokens without the bytes form. Operator only; the same front-running notes
    ///         apply.
    function settleWithTransferAuthorization(
        address from,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        uint8 v,
        bytes32 r,
        bytes32 s,
        bytes32 ref
    ) external onlyOperator {
        uint256 balanceBefore = _beginTransferSettlement(value, ref);
        ITransferWithAuthorization(token).transferWithAuthorization(
            from, address(this), value, validAfter, validBefore, nonce, v, r, s
        );
        _finishTransferSettlement(from, value, ref, balanceBefore);
    }

    // ---------------------------------------------------------------- views

    /// @notice The EIP-712 domain separator (name "TollgateSettlement", version "1").
    function DOMAIN_SEPARATOR() public view returns (bytes32) {
        return block.chainid == _cachedChainId ? _cachedDomainSeparator : _buildDomainSeparator();
    }

    /// @notice The EIP-712 digest a session key signs for a `DebitVoucher` of `account`.
    function voucherDigest(address account, uint256 cumulativeAmount, uint256 deadline)
        public
        view
        returns (bytes32)
    {
        return ECDSA.toTypedDataHash(
            DOMAIN_SEPARATOR(),
            keccak256(abi.encode(DEBIT_VOUCHER_TYPEHASH, account, token, cumulativeAmount, deadline))
        );
    }

    // ---------------------------------------------------------------- treasury and roles

    /// @notice Send `amount` of `token_` held here to the treasury. Operator or admin.
    function sweep(address token_, uint256 amount) external {
        if (msg.sender != operator && msg.sender != admin) revert NotOperatorOrAdmin();
        address to = treasury;
        emit Swept(token_, to, amount);
        SafeTransfer.safeTransfer(token_, to, amount);
    }

    /// @notice Replace the operator. Admin only.
    function setOperator(address newOperator) external onlyAdmin {
        if (newOperator == address(0)) revert ZeroAddress();
        emit OperatorChanged(operator, newOperator);
        operator = newOperator;
    }

    /// @notice Replace the treasury. Admin only.
    function setTreasury(address newTreasury) external onlyAdmin {
        if (newTreasury == address(0)) revert ZeroAddress();
        emit TreasuryChanged(treasury, newTreasury);
        treasury = newTreasury;
    }

    /// @notice Hand the admin role to `newAdmin`. Admin only.
    function transferAdmin(address newAdmin) external onlyAdmin {
        if (newAdmin == address(0)) revert ZeroAddress();
        emit AdminChanged(admin, newAdmin);
        admin = newAdmin;
    }

    // ---------------------------------------------------------------- internals

    function _useReference(bytes32 ref) private {
        if (ref == bytes32(0)) revert InvalidReference();
        if (referenceUsed[ref]) revert ReferenceAlreadyUsed(ref);
        referenceUsed[ref] = true;
    }

    /// @dev Checks the amount, uses the reference, and returns this contract's token balance
    ///      before the transfer.
    function _beginTransferSettlement(uint256 value, bytes32 ref) private returns (uint256) {
        if (value == 0) revert ZeroAmount();
        _useReference(ref);
        return IERC20(token).balanceOf(address(this));
    }

    /// @dev The token is not trusted to report truthfully: measure what actually arrived.
    function _finishTransferSettlement(
        address from,
        uint256 value,
        bytes32 ref,
        uint256 balanceBefore
    ) private {
        uint256 received = IERC20(token).balanceOf(address(this)) - balanceBefore;
        if (received != value) revert DebitShortfall(value, received);
        emit Settled(from, value, METHOD_EIP3009_TRANSFER, ref);
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
