"""The one exception type for mistakes a user can fix (config, data, missing model or data).

Entry points (`python -m raysdpb.train`, `python -m raysdpb.sweep`, `python -m raysdpb.report`) catch it and
print its message alone, without a traceback, then exit with status 2. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's config, data or environment; the message says what to do."""


def run_cli(main, argv=None) -> int:
    """Run a CLI `main(argv) -> int`, turning a `UserError` into one clear line on stderr and exit code 2."""
    import sys

    try:
        return int(main(argv) or 0)
    except UserError as err:
        print(f"raysdpb: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("raysdpb: interrupted", file=sys.stderr)
        return 130
