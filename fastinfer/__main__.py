"""``python -m fastinfer``: see :mod:`fastinfer._cli`."""

import sys

from fastinfer._cli import main

if __name__ == "__main__":
    sys.exit(main())
