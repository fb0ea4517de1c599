"""``python -m fimfast``: the ``fimfast`` command (see :mod:`fimfast.cli`)."""

import sys

from fimfast.cli import main

sys.exit(main())
