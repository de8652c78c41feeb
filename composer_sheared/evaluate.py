"""`python -m composer_sheared.evaluate`, kept working: the same as `composer-sheared evaluate` (composer_sheared.cli.evaluate)."""
import sys

from composer_sheared.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
