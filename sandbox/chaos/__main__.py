"""`python -m sandbox.chaos`."""

import sys

from sandbox.chaos.cli import main

sys.exit(main())
