"""Settings on hostile input: the TOML file named by EPHEMERA_CONFIG and the EPHEMERA_*
environment. Reading them ends in valid Settings or a ConfigError (exit 2), within
the time and memory bounds of tests/hostile.py."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ephemera.errors import ConfigError
from ephemera.spec.settings import MAX_GRACE_SECONDS, Settings, get_settings, reset_settings
from tests.hostile import bounded

NAMES = sorted(Settings.model_fields)
WORKDIR = Path(tempfile.mkdtemp(prefix="ephemera-hostile-settings-"))


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """Set EPHEMERA_* variables for one example, then put the environment back."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("EPHEMERA_")}
    for key in list(os.environ):
        if key.startswith("EPHEMERA_") and key not in ("EPHEMERA_CACHE_DIR",):
            del os.environ[key]
    os.environ.update(values)
    reset_settings()
    try:
        yield
    finally:
        for key in list(os.environ):
            if key.startswith("EPHEMERA_"):
                del os.environ[key]
        os.environ.update(saved)
        reset_settings()


def check_settings(toml: bytes | None, env: dict[str, str]) -> None:
    """The property: valid Settings whose numbers are in bounds, or a ConfigError."""
    config = WORKDIR / "config.toml"
    config.unlink(missing_ok=True)
    if toml is not None:
        config.write_bytes(toml)
    with environment({"EPHEMERA_CONFIG": str(config), **env}):
        outcome = bounded(get_settings, (ConfigError,))
    if outcome.error is not None:
        assert outcome.error.exit_code == 2 and str(outcome.error)
        return
    settings = outcome.value
    assert 1 <= settings.ssh_port <= 65535
    assert 0 <= settings.expiry_grace_seconds <= MAX_GRACE_SECONDS
    for name in NAMES:
        value = getattr(settings, name)
        for item in value if isinstance(value, list) else [value]:
            assert "\x00" not in str(item)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


LEAVES = st.one_of(
    st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["", " ", "~", "/", "/tmp/x", "a\x00b", "x" * 5000, "us-east-1", "22",
                     "99999999999999999999", "1e999", "local", "../../etc"]))
VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=12)
KEYS = st.sampled_from(NAMES) | st.text(max_size=10)


@given(doc=st.dictionaries(KEYS, VALUES, max_size=5))
def test_toml_documents(doc):
    try:
        text = "\n".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in doc.items())
    except ValueError:  # an integer too long to write
        text = "ssh_port = " + "9" * 5000
    check_settings(text.encode("utf-8", errors="surrogatepass"), {})


SNIPPETS = ["[", "]", "[[", "]]", "=", '"', "'", '"""', "\\", "\n", "#", "{", "}", ",",
            "\x00", "\ufeff", "\x80", "inf", "nan", "1979-05-27T07:32:00Z", "0x" + "f" * 30,
            "9" * 5000, "[section]\n", "[[array]]\n", "a.b.c = 1\n", "ssh_port = 0\n"]
BASE_TOML = ('default_provider = "docker"\nssh_port = 2222\naws_regions = ["us-east-1"]\n'
             'expiry_grace_seconds = 300\nstate_dir = "/tmp/state"\n')


@st.composite
def mangled_toml(draw) -> bytes:
    text = BASE_TOML
    for _ in range(draw(st.integers(1, 5))):
        at = draw(st.integers(0, len(text)))
        if draw(st.booleans()):
            text = text[:at] + draw(st.sampled_from(SNIPPETS) | st.text(max_size=5)) + text[at:]
        else:
            text = text[:at] + text[at + draw(st.integers(1, 20)):]
    return text.encode("utf-8", errors="surrogatepass")


@given(toml=mangled_toml())
def test_mangled_toml(toml):
    check_settings(toml, {})


@given(depth=st.integers(1, 100_000), kind=st.sampled_from(["[", "{a = "]),
       size=st.sampled_from([0, 10, 2_000_000]))
def test_deep_or_huge_toml(depth, kind, size):
    closing = "]" if kind == "[" else "}"
    text = "owner = " + kind * depth + "1" + closing * depth + "\n" + "# " + "x" * size + "\n"
    check_settings(text.encode(), {})


ENV_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                   max_size=40) | st.sampled_from(["", "[]", "[1]", '["a"]', "{}", "null", "-1",
                                                   "0", "65536", "1e999", "nan", "x" * 5000,
                                                   "99999999999999999999999"])


@given(env=st.dictionaries(st.sampled_from([f"EPHEMERA_{n.upper()}" for n in NAMES]),
                           ENV_TEXT, max_size=4),
       toml=st.sampled_from([None, b"", BASE_TOML.encode()]))
def test_environment(env, toml):
    check_settings(toml, env)


@pytest.mark.parametrize("toml, env, named", [
    (None, {"EPHEMERA_AWS_REGIONS": "us-east-1"}, "aws_regions"),
    (None, {"EPHEMERA_SSH_PORT": "70000"}, "EPHEMERA_SSH_PORT"),
    (None, {"EPHEMERA_EXPIRY_GRACE_SECONDS": "1e999"}, "EPHEMERA_EXPIRY_GRACE_SECONDS"),
    (b'state_dir = "a\\u0000b"\n', {}, "EPHEMERA_STATE_DIR"),
    (b'owner = ""\n', {}, "EPHEMERA_OWNER"),
    (b"owner = \x80\n", {}, "line 1: not UTF-8"),
    (b"owner = " + b"[" * 50_000 + b"]" * 50_000, {}, "too deeply"),
    (b"owner = \n", {}, "not valid TOML"),
])
def test_bad_settings_name_the_setting_or_the_file(toml, env, named):
    config = WORKDIR / "config.toml"
    config.unlink(missing_ok=True)
    if toml is not None:
        config.write_bytes(toml)
    with environment({"EPHEMERA_CONFIG": str(config), **env}):
        with pytest.raises(ConfigError) as info:
            get_settings()
    assert named in str(info.value) and str(config) in str(info.value)


def test_a_directory_as_the_settings_file_is_an_error(tmp_path: Path):
    with environment({"EPHEMERA_CONFIG": str(tmp_path)}):
        with pytest.raises(ConfigError, match="is not a file"):
            get_settings()


def test_an_empty_variable_means_the_default(tmp_path: Path):
    with environment({"EPHEMERA_CONFIG": str(tmp_path / "none.toml"), "EPHEMERA_SSH_PORT": "",
                      "EPHEMERA_DEFAULT_PROVIDER": ""}):
        settings = get_settings()
    assert settings.ssh_port == 22 and settings.default_provider == "local"
