"""The `raysdpb` command: `raysdpb sweep|train|report|export ...`, the same as `python -m raysdpb.<command> ...`."""

from __future__ import annotations

import importlib
import sys

__all__ = ["COMMANDS", "main", "entry_point"]

# command -> (the module whose `main(argv)` runs it, what it does)
COMMANDS = {
    "sweep": ("raysdpb.sweep.cli", "run (or --resume) a sweep of trials on Ray Tune and Ray Train"),
    "train": ("raysdpb.train", "run one trial in one process (debugging, no Ray)"),
    "report": ("raysdpb.report", "tables, figures and an HTML page of a sweep's results"),
    "export": ("raysdpb.export", "a sweep's best (or any) trial as a Hugging Face model folder"),
}


def _usage() -> str:
    from raysdpb import __version__

    lines = [f"usage: raysdpb COMMAND [ARGS ...]   (raysdpb {__version__})", "", "commands:"]
    lines += [f"  {name:<8} {what}" for name, (_, what) in COMMANDS.items()]
    lines += ["", "`raysdpb COMMAND --help` for a command's arguments."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from raysdpb.errors import run_cli

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from raysdpb import __version__

        print(f"raysdpb {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"raysdpb: error: no command {command!r}; the commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return run_cli(module.main, rest)


def entry_point() -> None:
    sys.exit(main())
