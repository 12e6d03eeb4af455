"""``python -m idsfs.emulator``: the same as ``idsfs emulator``."""

import sys

from idsfs.emulator.cli import main

if __name__ == "__main__":
    sys.exit(main())
