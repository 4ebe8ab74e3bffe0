"""The ``ephemera`` command line. One command per module in this package; modules are
imported only when their command runs, so ``ephemera --help`` stays fast."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from ephemera import __version__

# command name -> module in ephemera.cli that defines ``command``.
# A command whose module does not exist is not offered.
COMMANDS = {
    "run": "run",
    "plan": "plan",
    "estimate": "estimate",
    "validate": "validate",
    "schema": "schema",
    "providers": "providers",
    "check": "check",
    "ls": "ls",
    "logs": "logs",
    "down": "down",
    "reap": "reap",
    "cost": "cost",
    "results": "results",
    "baseline": "baseline",
    "compare": "compare",
    "image": "image",
    "model": "model",
    "catalog": "catalog",
    "env": "cpu_env",
    "bake": "bake",
}


def _short_help(module_name: str) -> str:
    """First docstring line of a command module, read without importing it."""
    spec = importlib.util.find_spec(f"ephemera.cli.{module_name}")
    if spec is None or spec.origin is None:
        return ""
    import ast
    import tokenize

    # Only the first token is needed: parsing whole modules cost ~2 ms per command.
    doc = ""
    try:
        with tokenize.open(spec.origin) as fh:
            for tok in tokenize.generate_tokens(fh.readline):
                if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.ENCODING):
                    continue
                if tok.type == tokenize.STRING:
                    doc = str(ast.literal_eval(tok.string))
                break
    except (OSError, SyntaxError, ValueError, tokenize.TokenError):
        return ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, mod in COMMANDS.items()
                if importlib.util.find_spec(f"ephemera.cli.{mod}") is not None]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        mod_name = COMMANDS.get(cmd_name)
        if mod_name is None or importlib.util.find_spec(f"ephemera.cli.{mod_name}") is None:
            return None
        module = importlib.import_module(f"ephemera.cli.{mod_name}")
        return module.command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, _short_help(COMMANDS[name])) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ephemera")
@click.option("--debug", is_flag=True, envvar="EPHEMERA_DEBUG",
              help="Show tracebacks and debug logs.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Run GPU test jobs for LLM serving on throw-away machines.

    Exit codes: 0 passed, 1 tests failed, 2 bad input, 3 infrastructure failure,
    4 timeout, 5 teardown not verified, 128+N stopped by signal N (130 SIGINT).
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main() -> None:
    debug = "--debug" in sys.argv[1:] or bool(sys.argv and _env_debug())
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2 if exc.exit_code in (1, 2) else exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - the CLI boundary
        from ephemera.cli.errors import report_error

        sys.exit(report_error(exc, debug=debug))


def _env_debug() -> bool:
    import os

    return os.environ.get("EPHEMERA_DEBUG", "").lower() in ("1", "true", "yes")
