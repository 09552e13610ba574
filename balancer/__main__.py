"""``python -m balancer``: the same as the ``balancer`` command."""

from __future__ import annotations

import sys

from .cli import main

# The guard matters: `demo --redis` spawns worker processes, which import this
# module again as `__mp_main__`.
if __name__ == "__main__":
    sys.exit(main())
