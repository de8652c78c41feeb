"""The packaged recipes: the repository's `yamls/` tree, addressable by name.

    recipe_path("prune_2.7b")            -> .../yamls/prune_2.7b.yaml
    recipe_path("demo/prune_smollm2")    -> .../yamls/demo/prune_smollm2.yaml
    recipe_path("my/own.yaml")           -> my/own.yaml (an existing file is returned as is)

The wheel installs `yamls/` as `composer_sheared/recipes/yamls/` (pyproject's package-dir
mapping); a checkout, editable or not, reads the root `yamls/` itself, so `composer train.py
yamls/...` and a name give the same file.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["recipe_dir", "recipe_names", "recipe_path"]

_SUFFIX = ".yaml"


def recipe_dir() -> Path:
    """The directory holding the recipes: the packaged copy, else the checkout's `yamls/`."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "yamls", here.parent.parent / "yamls"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"{here / 'yamls'}: expected the packaged recipes (is the installation complete?)")


def recipe_names() -> list[str]:
    """Every recipe's name, e.g. `prune_2.7b`, `demo/prune_smollm2`, sorted."""
    root = recipe_dir()
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob(f"*{_SUFFIX}"))


def recipe_path(name_or_path: str | Path) -> Path:
    """The YAML file of a recipe name (with or without `.yaml`), or an existing path unchanged."""
    given = Path(name_or_path)
    if given.is_file():
        return given
    name = given.as_posix().removesuffix(_SUFFIX)
    if name.startswith("yamls/"):  # the README's checkout-relative spelling works from anywhere
        name = name[len("yamls/"):]
    candidate = recipe_dir() / f"{name}{_SUFFIX}"
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(f"{name_or_path}: expected an existing YAML file or a recipe name, one of "
                            f"{recipe_names()}")
