"""``python -m bot_toolkit``: the ``bot-toolkit`` command."""

import sys

from bot_toolkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
