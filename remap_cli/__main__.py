"""``python -m remap_cli`` is the ``remap`` command."""

import sys

from remap_cli.main import main

sys.exit(main())
