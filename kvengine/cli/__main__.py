"""`python -m kvengine.cli ...`: the same as the `kvengine` console script (used to launch servers)."""

import sys

from kvengine.cli import main

sys.exit(main())
