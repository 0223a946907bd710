"""`python -m raysdpb.sweep`: see `raysdpb.sweep.cli`."""

import sys

from raysdpb.errors import run_cli
from raysdpb.sweep.cli import main

sys.exit(run_cli(main))
