"""``python -m routereplay.cli``: the ``routereplay`` command."""

import sys

from routereplay.cli.main import main

sys.exit(main())
