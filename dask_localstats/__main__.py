"""``python -m dask_localstats``: the command line, as ``dask-localstats``."""

import sys

from ._cli import main

sys.exit(main())
