"""``python -m lstm_ext.shakespeare``: see ``cli.py``."""
import sys

from .cli import main

sys.exit(main())
