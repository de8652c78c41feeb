"""`python -m composer_sheared.prune`, kept working: the same as `composer-sheared export` (composer_sheared.cli.export)."""
import sys

from composer_sheared.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
