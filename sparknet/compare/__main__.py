"""`python -m sparknet.compare`: runs the command line (`sparknet.compare.cli.main`)."""

import sys

from sparknet.compare.cli import main

sys.exit(main())
