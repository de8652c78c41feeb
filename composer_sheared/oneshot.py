"""`python -m composer_sheared.oneshot`, kept working: the same as `composer-sheared oneshot` (composer_sheared.cli.oneshot)."""
import sys

from composer_sheared.cli.oneshot import main

if __name__ == "__main__":
    sys.exit(main())
