"""How every command reports settings that fail validation: one line per field, exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, CliApp, SettingsError

S = TypeVar("S", bound=BaseSettings)


def report_invalid(program: str, exc: ValidationError) -> int:
    """Print ``<program>: invalid setting <field>: <why>`` per error to stderr; return 2."""
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "settings"
        print(f"{program}: invalid setting {field}: {err['msg']}", file=sys.stderr)
    return 2


def settings_from_cli(model: type[S], argv: Sequence[str], program: str) -> S | None:
    """``model`` from the command line and the environment; None (after saying why on stderr,
    field by field) when they are invalid: the caller exits 2."""
    try:
        return CliApp.run(model, cli_args=list(argv))
    except ValidationError as exc:
        report_invalid(program, exc)
    except SettingsError as exc:
        print(f"{program}: {exc}", file=sys.stderr)
    return None
