"""How every command reports settings that fail validation: one line per field, exit code 2."""

from __future__ import annotations

import sys

from pydantic import ValidationError


def report_invalid(program: str, exc: ValidationError) -> int:
    """Print ``<program>: invalid setting <field>: <why>`` per error to stderr; return 2."""
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "settings"
        print(f"{program}: invalid setting {field}: {err['msg']}", file=sys.stderr)
    return 2
