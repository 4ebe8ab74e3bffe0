"""The command-line boundary: which commands are offered, what `--help` imports, how
errors become one paragraph and an exit code."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import textwrap

import pytest

from ephemera import errors
from ephemera.cli import COMMANDS

# Modules that must never be imported just to print help: cloud and container SDKs,
# the inference stack, and test servers.
SDKS = ("boto3", "botocore", "docker", "huggingface_hub", "torch", "vllm", "transformers",
        "moto", "paramiko", "requests")


def run(*args: str, env: dict[str, str] | None = None, code: str | None = None) -> subprocess.CompletedProcess[str]:
    import os

    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "ephemera"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def imported_modules(*args: str) -> set[str]:
    """Top-level packages imported by ``ephemera ARGS`` (from ``python -X importtime``)."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "ephemera", *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    names = set()
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":
                names.add(name.split(".")[0])
    assert "ephemera" in names and "click" in names, "importtime output not understood"
    return names


def help_commands(text: str) -> list[str]:
    section = text.split("Commands:", 1)[1]
    return [m.group(1) for m in re.finditer(r"^  (\S+)", section, re.M)]


def test_help_lists_exactly_the_commands_whose_modules_exist():
    result = run("--help")
    assert result.returncode == 0, result.stderr
    expected = [name for name, module in COMMANDS.items()
                if importlib.util.find_spec(f"ephemera.cli.{module}") is not None]
    assert "validate" in expected and "schema" in expected
    assert help_commands(result.stdout) == expected
    # A name in COMMANDS whose module is missing is refused like any unknown command.
    missing = [name for name in COMMANDS if name not in expected]
    for name in missing[:1]:
        gone = run(name)
        assert gone.returncode == 2 and "No such command" in gone.stderr


def test_every_listed_command_has_a_short_help_and_its_own_help():
    result = run("--help")
    section = result.stdout.split("Commands:", 1)[1]
    for name in help_commands(result.stdout):
        line = next(ln for ln in section.splitlines() if ln.startswith(f"  {name} "))
        assert line[len(name) + 2:].strip(), f"command {name} has no one-line help"
    sub = run("validate", "--help")
    assert sub.returncode == 0 and "--tier" in sub.stdout


@pytest.mark.timeout(60)
def test_help_imports_no_sdk():
    names = imported_modules("--help")
    assert not names & set(SDKS), sorted(names & set(SDKS))
    # Not even the schema and YAML libraries are needed to print help.
    assert not names & {"pydantic", "pydantic_core", "ruamel", "rich"}, sorted(names)


@pytest.mark.timeout(120)
def test_command_help_imports_no_cloud_sdk():
    """``ephemera CMD --help`` imports CMD's module only; it must not pull in a cloud SDK."""
    listed = help_commands(run("--help").stdout)
    heavy = {"boto3", "botocore", "docker", "huggingface_hub", "torch", "vllm", "moto"}
    offenders = {}
    for name in listed:
        found = imported_modules(name, "--help") & heavy
        if found:
            offenders[name] = sorted(found)
    assert not offenders, offenders


def test_exit_codes_in_help_match_the_constants():
    text = " ".join(run("--help").stdout.split())
    table = re.search(r"Exit codes: (.*?)\.", text).group(1)
    documented = {m.group(2).strip(): int(m.group(1))
                  for m in re.finditer(r"(\d+) ([a-z ]+?)(?:,|$)", table)}
    assert documented == {
        "passed": errors.EXIT_OK,
        "tests failed": errors.EXIT_TESTS_FAILED,
        "bad input": errors.EXIT_BAD_INPUT,
        "infrastructure failure": errors.EXIT_INFRA,
        "timeout": errors.EXIT_TIMEOUT,
        "teardown not verified": errors.EXIT_TEARDOWN_FAILED,
    }
    assert "128+N stopped by signal N" in table
    assert f"({errors.EXIT_INTERRUPTED} SIGINT)" in table
    # Every typed error exits with a documented code.
    for cls in (errors.ConfigError, errors.NoFittingOfferError, errors.ProviderUnavailableError,
                errors.InfraError, errors.NoCapacityError, errors.QuotaError, errors.TransientError,
                errors.AuthError, errors.RemoteCommandError, errors.ServerFailedError,
                errors.PhaseTimeoutError, errors.TeardownError):
        assert cls.exit_code in documented.values(), cls


def test_version():
    from ephemera import __version__

    result = run("--version")
    assert result.returncode == 0 and __version__ in result.stdout


def test_unknown_command_and_option_are_usage_errors():
    for args in (["frobnicate"], ["--no-such-flag"]):
        result = run(*args)
        assert result.returncode == 2
        assert "Traceback" not in result.stderr and result.stderr.strip()


# A real command module, added at run time, whose body raises: main() must turn
# whatever escapes a command into one paragraph and an exit code.
RAISER = textwrap.dedent("""\
    import importlib.machinery, sys, types
    import click
    import ephemera.cli as cli_module
    from ephemera import errors

    @click.command("boom")
    @click.argument("what")
    def command(what):
        \"\"\"Raise an error on purpose.\"\"\"
        if what == "internal":
            {}["missing key that shows a bug"]
        if what == "config":
            raise errors.ConfigError("resources.gpu 'Z100' is not a GPU ephemera knows.",
                                     hint="Known: L4, L40S, A10G, A100, H100.")
        if what == "teardown":
            raise errors.TeardownError("instance i-0abc may still be running.")
        if what == "timeout":
            raise errors.PhaseTimeoutError("health", 1200)
        if what == "signal":
            raise errors.Interrupted(15, "SIGTERM")
        if what == "long":
            raise errors.InfraError("word " * 80)

    module = types.ModuleType("ephemera.cli.boom")
    module.__spec__ = importlib.machinery.ModuleSpec("ephemera.cli.boom", None)
    module.command = command
    sys.modules["ephemera.cli.boom"] = module
    cli_module.COMMANDS["boom"] = "boom"
    sys.argv[0] = "ephemera"
    cli_module.main()
""")


def test_internal_error_is_one_paragraph_without_traceback():
    result = run("boom", "internal", code=RAISER)
    assert result.returncode == errors.EXIT_INFRA
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("ephemera: internal error: KeyError:")
    assert "run again with --debug" in " ".join(result.stderr.split())
    assert "\n\n" not in result.stderr.strip()


@pytest.mark.parametrize("how", [("--debug",), ()])
def test_debug_shows_the_traceback(how):
    env = {} if how else {"EPHEMERA_DEBUG": "1"}
    result = run(*how, "boom", "internal", code=RAISER, env=env)
    assert result.returncode == errors.EXIT_INFRA
    assert "Traceback (most recent call last)" in result.stderr
    assert "missing key that shows a bug" in result.stderr


@pytest.mark.parametrize("what, code, text", [
    ("config", 2, "ephemera: configuration error: resources.gpu 'Z100' is not a GPU ephemera knows. Known: L4"),
    ("teardown", 5, "ephemera: teardown not verified: instance i-0abc may still be running."),
    ("timeout", 4, "ephemera: timeout: phase 'health' did not finish within 1200s"),
    ("signal", 143, "ephemera: interrupted: received SIGTERM"),
])
def test_typed_errors_map_to_their_exit_codes(what, code, text):
    result = run("boom", what, code=RAISER)
    assert result.returncode == code, result.stderr
    assert " ".join(result.stderr.split()).startswith(text), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_long_message_is_wrapped_into_one_paragraph():
    result = run("boom", "long", code=RAISER)
    lines = result.stderr.rstrip("\n").split("\n")
    assert len(lines) > 1 and all(len(line) <= 100 for line in lines) and "" not in lines
