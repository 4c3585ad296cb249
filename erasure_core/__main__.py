"""``python -m erasure_core``: the command line (``erasure_core/cli/``)."""

import sys

from .cli import main

sys.exit(main())
