"""``python -m attnjax.accel_check``: the accelerator check (see ``attnjax/_src/accel_check.py``)."""

import sys

from attnjax._src.accel_check import main

if __name__ == "__main__":
    sys.exit(main())
