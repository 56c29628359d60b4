"""``python -m autockpt``: the same as the ``autockpt`` command."""

import sys

from autockpt.cli import main

sys.exit(main())
