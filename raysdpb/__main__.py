"""`python -m raysdpb COMMAND ...`: see `raysdpb.cli`."""

import sys

from raysdpb.cli import main

sys.exit(main())
