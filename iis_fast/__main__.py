"""``python -m iis_fast``: the same as the ``iis-fast`` command."""
import sys

from .cli import main

sys.exit(main())
