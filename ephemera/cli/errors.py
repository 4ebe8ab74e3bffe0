"""Turn an exception into one paragraph on stderr and an exit code."""

from __future__ import annotations

import sys
import textwrap
import traceback

from ephemera.errors import EXIT_INFRA, EphemeraError


def report_error(exc: BaseException, *, debug: bool = False) -> int:
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, EphemeraError):
        text = f"ephemera: {exc.kind}: {exc.message}"
        if exc.hint:
            text += f" {exc.hint}"
        code = exc.exit_code
    elif isinstance(exc, KeyboardInterrupt):
        text, code = "ephemera: interrupted", 130
    else:
        text = (f"ephemera: internal error: {type(exc).__name__}: {exc}. "
                "This is a bug in ephemera; run again with --debug for the traceback.")
        code = EXIT_INFRA
    # Keep multi-line messages (compiler-style error lists) as they are.
    if "\n" in text:
        print(text, file=sys.stderr)
    else:
        print(textwrap.fill(text, width=100, break_on_hyphens=False, break_long_words=False),
              file=sys.stderr)
    return code
