"""Sheared-LLaMA with Composer: the recipe script that `composer train.py yamls/<recipe>.yaml` runs.

    composer train.py yamls/prune_2.7b.yaml [key=value ...]     # any number of GPUs / CPU ranks
    python train.py yamls/prune_2.7b.yaml dry_run=true           # print the plan, exit

The recipe itself is `composer_sheared/run/recipe.py` (also `composer-sheared train` from a wheel).
"""
import sys

from composer_sheared.run.recipe import *  # noqa: F401,F403  (`import train; train.main(...)` keeps working)
from composer_sheared.run.recipe import cli

if __name__ == "__main__":
    sys.exit(cli())
