"""`python -m composer_sheared.fetch`, kept working: the same as `composer-sheared fetch` (composer_sheared.storage.fetch)."""
import sys

from composer_sheared.storage.fetch import main

if __name__ == "__main__":
    sys.exit(main())
