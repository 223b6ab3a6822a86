"""``python -m df_mps.models``: see ``df_mps.models.cli``."""

import sys

from .cli import main

sys.exit(main())
