"""``python -m rdiag.cli``: the ``rdiag`` console script."""

import sys

from rdiag.cli import main

sys.exit(main())
