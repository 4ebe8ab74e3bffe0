"""Sorting EC2 API errors into what ephemera does about them.

AWS reports every failure as a code string. The launch loop needs to know, for each
code, whether to try the next subnet or region (capacity), give up on an instance
family in a region (quota), call again after a pause (throttling, 5xx), or stop at
once because nothing will change by retrying (credentials, bad parameters).
"""

from __future__ import annotations

import enum

from ephemera.errors import (
    AuthError,
    ConfigError,
    EphemeraError,
    InfraError,
    NoCapacityError,
    QuotaError,
    TransientError,
)


class Kind(enum.StrEnum):
    CAPACITY = "capacity"
    QUOTA = "quota"
    TRANSIENT = "transient"
    AUTH = "auth"
    INVALID = "invalid"
    NOT_FOUND = "not-found"
    OTHER = "other"


CAPACITY_CODES = frozenset({
    "InsufficientInstanceCapacity",
    "InsufficientHostCapacity",
    "InsufficientReservedInstanceCapacity",
    "InsufficientCapacity",
    "Unsupported",                     # instance type not offered in this AZ
    "SpotMaxPriceTooLow",
    "InsufficientFreeAddressesInSubnet",
})

# Code -> the quota a user raises in Service Quotas to get past it.
QUOTA_CODES = {
    "VcpuLimitExceeded": (
        "the EC2 'Running On-Demand G and VT instances' / 'Running On-Demand P instances' "
        "vCPU quota (Service Quotas > Amazon EC2)"),
    "MaxSpotInstanceCountExceeded": (
        "the EC2 'All G and VT Spot Instance Requests' / 'All P Spot Instance Requests' "
        "vCPU quota (Service Quotas > Amazon EC2)"),
    "InstanceLimitExceeded": "the EC2 running instances limit for this instance type",
    "ResourceLimitExceeded": "the EC2 limit named in the message",
}

TRANSIENT_CODES = frozenset({
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "TooManyRequestsException",
    "RequestThrottled",
    "ServiceUnavailable",
    "Unavailable",
    "InternalError",
    "InternalFailure",
    "InternalServerError",
    "ServerInternal",
})

AUTH_CODES = frozenset({
    "AuthFailure",
    "UnauthorizedOperation",
    "AccessDenied",
    "AccessDeniedException",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "OptInRequired",
    "ExpiredToken",
    "RequestExpired",
    "UnrecognizedClientException",
    "Blocked",
    "PendingVerification",
})


def error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def error_text(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Message", "")) or str(exc)


def http_status(exc: BaseException) -> int:
    response = getattr(exc, "response", None) or {}
    try:
        return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    except (TypeError, ValueError):
        return 0


def classify(exc: BaseException) -> Kind:
    """What kind of failure a botocore ClientError (or connection error) is."""
    code = error_code(exc)
    if not code:
        # No AWS error body: a connection failure or an unparsable 5xx.
        return Kind.TRANSIENT if _is_connection_error(exc) or http_status(exc) >= 500 else Kind.OTHER
    if code in CAPACITY_CODES:
        return Kind.CAPACITY
    if code in QUOTA_CODES:
        return Kind.QUOTA
    if code in TRANSIENT_CODES or http_status(exc) >= 500:
        return Kind.TRANSIENT
    if code in AUTH_CODES:
        return Kind.AUTH
    if code.endswith(".NotFound") or code.endswith("NotFound"):
        return Kind.NOT_FOUND
    if code.startswith("Invalid") or code in ("MissingParameter", "UnknownParameter",
                                               "ValidationError", "ParameterNotFound"):
        return Kind.INVALID
    return Kind.OTHER


def _is_connection_error(exc: BaseException) -> bool:
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:  # pragma: no cover - boto3 is present whenever this runs
        return False
    return isinstance(exc, BotoConnectionError | HTTPClientError)


def to_ephemera_error(exc: BaseException, action: str, region: str | None) -> EphemeraError:
    """A typed ephemera error with a message that says what failed, where, and what to do."""
    code = error_code(exc) or type(exc).__name__
    where = f" in {region}" if region else ""
    text = f"AWS {action}{where} failed: {code}: {error_text(exc)}"
    kind = classify(exc)
    if kind is Kind.CAPACITY:
        return NoCapacityError(text)
    if kind is Kind.QUOTA:
        return QuotaError(text, hint=f"Raise {QUOTA_CODES.get(code, 'the quota')}{where}.")
    if kind is Kind.TRANSIENT:
        return TransientError(text, hint="AWS kept throttling or failing; try again later.")
    if kind is Kind.AUTH:
        return AuthError(text, hint=(
            "Check the AWS credentials, profile and region (AWS_PROFILE, AWS_REGION, "
            "`aws sts get-caller-identity`) and that the IAM policy allows this call."))
    if kind is Kind.INVALID:
        return ConfigError(text)
    return InfraError(text)
