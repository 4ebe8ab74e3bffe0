"""Sorting EC2 API errors into what ephemera does about them.

AWS reports every failure as a code string. The launch loop needs to know, for each
code, whether to try the next subnet or region (capacity), give up on an instance
family in a region (quota), call again after a pause (throttling, 5xx), or stop at
once because nothing will change by retrying (credentials, bad parameters).
Two codes mean "not here" rather than "never": spot without its service-linked role
(spot is unavailable in this account, on-demand may still work) and ``OptInRequired``
(the region is not enabled for the account, other regions may work).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import Any

from ephemera import errors
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
    SPOT_UNAVAILABLE = "spot-unavailable"   # spot cannot be used in this account
    REGION_DISABLED = "region-disabled"     # the region is not enabled for the account
    OTHER = "other"


# Spot in an account without the AWSServiceRoleForEC2Spot role, by a caller that may
# not create it: no spot here, which says nothing about the credentials otherwise.
SPOT_ROLE_CODE = "AuthFailure.ServiceLinkedRoleCreationNotPermitted"
SPOT_ROLE_HINT = (
    "Spot needs the service-linked role AWSServiceRoleForEC2Spot, which this account "
    "lacks and these credentials may not create. Create it once with `aws iam "
    "create-service-linked-role --aws-service-name spot.amazonaws.com`, or allow "
    "iam:CreateServiceLinkedRole for that role (README, Running on AWS).")
REGION_DISABLED_CODE = "OptInRequired"
REGION_DISABLED_HINT = (
    "Enable the region for the account (AWS console > Account > AWS Regions) or remove "
    "it from resources.regions / EPHEMERA_AWS_REGIONS.")


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
        "the EC2 'Running On-Demand G and VT instances' (L-DB2E81BA) / 'Running On-Demand "
        "P instances' (L-417A185B) vCPU quota (Service Quotas > Amazon EC2)"),
    "MaxSpotInstanceCountExceeded": (
        "the EC2 'All G and VT Spot Instance Requests' (L-3819A6DF) / 'All P Spot Instance "
        "Requests' (L-7212CCBC) vCPU quota (Service Quotas > Amazon EC2)"),
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
    return kind_of_code(code, http_status(exc))


def kind_of_code(code: str, status: int = 0) -> Kind:
    """What kind of failure an AWS error code (and HTTP status) stands for."""
    if code == SPOT_ROLE_CODE:
        return Kind.SPOT_UNAVAILABLE
    if code == REGION_DISABLED_CODE:
        return Kind.REGION_DISABLED
    if code in CAPACITY_CODES:
        return Kind.CAPACITY
    if code in QUOTA_CODES:
        return Kind.QUOTA
    if code in TRANSIENT_CODES or status >= 500:
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


def aws_code(exc: BaseException) -> str:
    """The AWS error code behind an error: a botocore error's own, or the one
    :func:`to_ephemera_error` kept on the ephemera error it made."""
    return getattr(exc, "aws_code", "") or error_code(exc)


def classify_code(exc: BaseException) -> Kind | None:
    """The Kind of the AWS error code an error carries (None without one)."""
    code = aws_code(exc)
    return kind_of_code(code) if code else None


def to_ephemera_error(exc: BaseException, action: str, region: str | None) -> EphemeraError:
    """A typed ephemera error with a message that says what failed, where, and what to
    do. The AWS code stays readable as the error's ``aws_code`` attribute."""
    error = _typed_error(exc, action, region)
    error.aws_code = error_code(exc)  # type: ignore[attr-defined]
    return error


def _typed_error(exc: BaseException, action: str, region: str | None) -> EphemeraError:
    code = error_code(exc) or type(exc).__name__
    where = f" in {region}" if region else ""
    text = f"AWS {action}{where} failed: {code}: {error_text(exc)}"
    kind = classify(exc)
    if kind is Kind.SPOT_UNAVAILABLE:
        return NoCapacityError(text, hint=SPOT_ROLE_HINT)
    if kind is Kind.REGION_DISABLED:
        return InfraError(text, hint=REGION_DISABLED_HINT)
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


class IncompleteSearchError(errors.IncompleteSearchError):
    """A search that could not look in every AWS region it had to (see the base class)."""

    def __init__(self, found: Sequence[Any], failures: Iterable[str]) -> None:
        failures = list(failures)
        super().__init__(
            list(found), failures, "could not search every AWS region: " + "; ".join(failures),
            hint="Nothing is known about those regions; run `ephemera reap --provider aws` "
                 "or `ephemera down` again once they answer.")
