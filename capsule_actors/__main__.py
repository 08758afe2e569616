"""``python -m capsule_actors`` is the ``capsule-actors`` command."""

import sys

from .cli import main

sys.exit(main())
