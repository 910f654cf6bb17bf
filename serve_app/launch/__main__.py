"""`python -m serve_app.launch CONFIG` (serve_app.launch.cli)."""

import sys

from serve_app.launch.cli import main

sys.exit(main())
