"""The run's masker: a secret is hidden as written, base64-encoded at any alignment
inside a longer text, and URL-encoded; short values are refused with a warning."""

from __future__ import annotations

import base64
import urllib.parse

import pytest

from ephemera.masking import MASK, Masker, secret_values

CANARY = "canary-S3cr3t/+=value-7731"


@pytest.mark.parametrize("prefix", ["", "a", "ab", "abc", "header: "])
def test_base64_forms_are_masked_at_every_alignment(prefix):
    masker = Masker([CANARY])
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        encoded = encode(f"{prefix}{CANARY} tail".encode()).decode()
        text = f"token={encoded}"
        masked = masker(text)
        assert MASK in masked
        # All of the encoding that depends only on the secret is gone: at most the two
        # characters at each edge that share bits with the neighbours are left.
        removed = len(text) - len(masked) + len(MASK)
        assert removed >= len(CANARY) * 4 // 3 - 2, (text, masked)


def test_plain_and_url_encoded_forms():
    masker = Masker([CANARY])
    text = f"plain {CANARY} url {urllib.parse.quote(CANARY, safe='')} plus {urllib.parse.quote_plus(CANARY)}"
    assert CANARY not in masker(text)
    assert urllib.parse.quote(CANARY, safe="") not in masker(text)
    assert masker(text).count(MASK) == 3


def test_short_values_are_refused_with_a_warning():
    warnings: list[str] = []
    masker = Masker(["abc", "long-enough-secret"], warn=warnings.append)
    assert masker("abc long-enough-secret") == f"abc {MASK}"
    assert len(warnings) == 1 and "3 characters" in warnings[0]


def test_secret_values_by_key_and_url_passwords():
    env = {"HF_TOKEN": "hf_abcdefgh", "OPENAI_API_KEY": "sk-123456", "MY_PAT": "pat-value-1",
           "DB_URL": "postgres://user:p%40ssw0rd@db:5432/x", "PLAIN": "not-secret-value"}
    values = secret_values(env)
    assert {"hf_abcdefgh", "sk-123456", "pat-value-1", "p@ssw0rd"} <= set(values)
    assert "not-secret-value" not in values


def test_mask_tree_rewrites_text_files_and_leaves_links(tmp_path):
    masker = Masker([CANARY])
    (tmp_path / "junit.xml").write_text(f"<system-out>{CANARY}</system-out>")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "log.txt").write_text(base64.b64encode(CANARY.encode()).decode())
    outside = tmp_path.parent / "outside-masking.txt"
    outside.write_text(CANARY)
    (tmp_path / "link").symlink_to(outside)
    assert masker.mask_tree(tmp_path) == []
    assert CANARY not in (tmp_path / "junit.xml").read_text()
    assert MASK in (tmp_path / "sub" / "log.txt").read_text()
    assert outside.read_text() == CANARY   # a link is not followed, not even to mask
