"""`python -m raysdpb.report`: see `raysdpb.report`."""

import sys

from raysdpb.errors import run_cli
from raysdpb.report import main

sys.exit(run_cli(main))
