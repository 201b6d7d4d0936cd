"""`python -m hsu` is the `hsu` command."""

import sys

from hsu._kernel.cli import main

sys.exit(main())
