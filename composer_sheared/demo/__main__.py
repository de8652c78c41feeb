"""`python -m composer_sheared.demo`."""
import sys

from composer_sheared.demo.pipeline import main

sys.exit(main())
