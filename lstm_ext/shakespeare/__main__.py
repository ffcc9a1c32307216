"""``python -m lstm_ext.shakespeare`` (and the ``lstm-ext-shakespeare`` script): see ``cli.py``."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
