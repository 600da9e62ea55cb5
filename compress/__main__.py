"""``python -m compress`` (and ``torchrun -m compress distill ...``): the ``compress`` command."""

import sys

from compress.app.cli import main

sys.exit(main())
