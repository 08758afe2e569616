"""``python -m capsule_actors.actors``: the program of every actor process."""

import sys

from .worker import main

sys.exit(main())
