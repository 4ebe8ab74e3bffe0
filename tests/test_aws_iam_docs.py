"""The README's AWS section lists every IAM permission the aws provider uses: each API
call in providers/aws*.py, named as IAM names it (botocore's service model gives the
API name and the signing name that IAM uses as the prefix)."""

from __future__ import annotations

import re

import boto3

from tests.runlib import REPO

CALL = re.compile(r'_call(?:_raw)?\(\s*"([a-z0-9-]+)",\s*[\w"-]+,\s*"([a-z_]+)"')


def used_operations() -> set[tuple[str, str]]:
    from ephemera_providers.aws_quotas import QUOTA_OPERATIONS

    found = set()
    for path in sorted((REPO / "providers").glob("aws*.py")):
        found |= set(CALL.findall(path.read_text(encoding="utf-8")))
    found |= {("service-quotas", op) for op in QUOTA_OPERATIONS}
    return found


def iam_action(service: str, operation: str) -> str:
    client = boto3.client(service, region_name="us-east-1", aws_access_key_id="x",
                          aws_secret_access_key="x")
    api = client.meta.method_to_api_mapping[operation]
    return f"{client.meta.service_model.signing_name}:{api}"


def aws_section() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("## Running on AWS")
    return text[start:text.index("\n## ", start + 1)]


def test_every_api_call_is_in_the_readme_iam_list():
    operations = used_operations()
    # The scan itself works: it sees the calls everyone knows are there.
    assert {("ec2", "run_instances"), ("ec2", "terminate_instances"), ("ssm", "get_parameter"),
            ("ec2", "describe_regions"), ("ec2", "describe_spot_price_history")} <= operations
    section = aws_section()
    missing = sorted(a for a in (iam_action(s, o) for s, o in operations) if f"`{a}`" not in section)
    assert missing == [], f"README's AWS section lacks {missing}"


def test_readme_names_the_permissions_that_are_not_api_calls_of_ours():
    section = aws_section()
    assert "`ec2:CreateTags`" in section  # TagSpecifications at creation need it
    assert "`iam:CreateServiceLinkedRole`" in section
    assert "AWSServiceRoleForEC2Spot" in section and "spot.amazonaws.com" in section
    for code in ("L-DB2E81BA", "L-417A185B", "L-3819A6DF", "L-7212CCBC"):
        assert code in section
