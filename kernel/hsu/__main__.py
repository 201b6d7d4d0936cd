"""`python -m hsu` is the `hsu` command."""

import sys

from hsu.cli import main

sys.exit(main())
