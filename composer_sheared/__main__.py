"""`python -m composer_sheared`: the `composer-sheared` console script."""
import sys

from composer_sheared.cli import main

sys.exit(main())
