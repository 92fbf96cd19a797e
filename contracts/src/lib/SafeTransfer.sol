// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "./Interfaces.sol";

/// @notice An ERC-20 transfer failed (reverted, returned false, or the token has no code).
error TokenTransferFailed(address token, address to, uint256 amount);

/// @title SafeTransfer
/// @notice ERC-20 `transfer` that also accepts tokens returning nothing, and refuses codeless tokens.
library SafeTransfer {
    function safeTransfer(address token, address to, uint256 amount) internal {
        (bool ok, bytes memory ret) = token.call(abi.encodeCall(IERC20.transfer, (to, amount)));
        bool success = ok
            && (ret.length == 0 ? token.code.length != 0 : (ret.length == 32 && abi.decode(ret, (bool))));
        if (!success) revert TokenTransferFailed(token, to, amount);
    }
}
