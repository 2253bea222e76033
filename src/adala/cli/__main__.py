"""``python -m adala.cli`` (what ``torchrun -m adala.cli`` runs)."""

import sys

from . import main

sys.exit(main())
