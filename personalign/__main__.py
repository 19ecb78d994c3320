"""`python -m personalign`: see personalign.cli."""

import sys

from personalign.cli import main

sys.exit(main())
