"""The one error tree of Tollgate.

Every error a client can see is an ``ApiError``; the HTTP edge renders it in the
OpenAI shape ``{"error": {"message", "type", "param", "code"}}`` in exactly one
place (``app.http.errors``). Lower-level failures (upstream I/O, database,
Redis) are translated into this tree where they happen, never leaked raw.

    ApiError                      status  type
    ├── InvalidRequest             400    invalid_request_error
    ├── AuthenticationFailed       401    authentication_error
    ├── PaymentRequired            402    payment_required
    │   └── CreditLimitExceeded    402    payment_required  (carries the amounts)
    ├── PermissionDenied           403    permission_error
    ├── NotFound                   404    not_found_error
    ├── RequestTooLarge            413    invalid_request_error
    ├── RateLimited                429    rate_limit_error
    ├── InternalError              500    server_error      (our own fault)
    ├── UpstreamError              502    upstream_error    (provider failed)
    ├── ServiceUnavailable         503    service_unavailable
    └── UpstreamTimeout            504    upstream_error    (provider too slow)
"""

from __future__ import annotations

from collections.abc import Mapping


class ApiError(Exception):
    """An error that is answered to the client with its own status and type."""

    status: int = 500
    type: str = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, object]:
        """The OpenAI error object."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequest(ApiError):
    """The request is malformed or a field is out of range; ``param`` names it."""

    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(ApiError):
    """No valid credentials were presented."""

    status = 401
    type = "authentication_error"
    default_code = "invalid_authentication"


class PaymentRequired(ApiError):
    """The account must pay before it is served."""

    status = 402
    type = "payment_required"
    default_code = "payment_required"


class CreditLimitExceeded(PaymentRequired):
    """This request's maximum cost does not fit under the account's credit limit.

    Carries the amounts (integer micro-USD) the rule was applied to, so the x402
    layer can ask for a payment: ``balance + open holds + max cost <= credit limit``
    must hold to be served, and ``payment_required_micros`` is the smallest payment
    that makes it hold (a payment lowers the balance by its amount). A payment
    cannot help when ``max_cost_micros`` alone exceeds what any balance admits.
    """

    default_code = "credit_limit_exceeded"

    def __init__(
        self,
        *,
        balance_micros: int,
        held_micros: int,
        max_cost_micros: int,
        credit_limit_micros: int,
        code: str | None = None,
    ) -> None:
        self.balance_micros = balance_micros
        self.held_micros = held_micros
        self.max_cost_micros = max_cost_micros
        self.credit_limit_micros = credit_limit_micros
        shortfall = balance_micros + held_micros + max_cost_micros - credit_limit_micros
        # At least one micro-USD: the request was refused, so something must be paid
        # even when holds released since the refusal make the numbers fit (a retry may).
        self.payment_required_micros = max(1, shortfall)
        super().__init__(
            f"this request may cost up to {max_cost_micros} micro-USD; balance"
            f" {balance_micros} + open holds {held_micros} + {max_cost_micros} exceeds the"
            f" credit limit of {credit_limit_micros} micro-USD; pay at least"
            f" {self.payment_required_micros} micro-USD to be served",
            code=code,
        )


class PermissionDenied(ApiError):
    """The credentials are valid but do not allow this action."""

    status = 403
    type = "permission_error"
    default_code = "permission_denied"


class NotFound(ApiError):
    """The named resource (a model, a route, a record) does not exist."""

    status = 404
    type = "not_found_error"


class RequestTooLarge(ApiError):
    """The body or one of its parts is larger than the configured limit."""

    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class RateLimited(ApiError):
    """A rate limit refused the request; headers carry ``Retry-After``."""

    status = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class InternalError(ApiError):
    """Our own fault. The message never carries internal details."""

    status = 500
    type = "server_error"
    default_code = "internal_error"


class UpstreamError(ApiError):
    """Every upstream route failed (connection, 5xx, 429) before any byte reached the client."""

    status = 502
    type = "upstream_error"
    default_code = "upstream_error"


class ServiceUnavailable(ApiError):
    """A dependency of ours (Redis, Postgres) or every provider is unavailable."""

    status = 503
    type = "service_unavailable"
    default_code = "service_unavailable"


class UpstreamTimeout(ApiError):
    """The upstream did not answer in time."""

    status = 504
    type = "upstream_error"
    default_code = "upstream_timeout"
