"""``python -m autockpt``: the same as the ``autockpt`` command.

One job: run the CLI. Imports ``autockpt.cli``.
"""

import sys

from autockpt.cli import main

sys.exit(main())
