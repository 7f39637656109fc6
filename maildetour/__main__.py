"""`python -m maildetour ...`: the same command line as the `maildetour` script."""

import sys

from maildetour.cli import main

sys.exit(main())
