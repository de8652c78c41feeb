"""The method core works from any trainer: importing it must not import Composer. The one check of
that rule: every module of the core packages (pruning/, data/), the loose core modules, and the
YAML schema, which reads its defaults from the core."""
import pkgutil
import subprocess
import sys

import composer_sheared.config
import composer_sheared.data
import composer_sheared.distill
import composer_sheared.pruning

CORE = ["composer_sheared", "composer_sheared.shapes", "composer_sheared.defaults", "composer_sheared.eval",
        "composer_sheared.eval.domain_loss", "composer_sheared.config", "composer_sheared.storage.atomic"]
CORE_PACKAGES = [composer_sheared.pruning, composer_sheared.data, composer_sheared.distill, composer_sheared.config]


def _core_modules() -> list[str]:
    subs = [m.name for pkg in CORE_PACKAGES for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    return CORE + [pkg.__name__ for pkg in CORE_PACKAGES] + subs


def test_core_imports_no_composer():
    modules = _core_modules()
    assert {"composer_sheared.data.mixing", "composer_sheared.data.calibration",
            "composer_sheared.pruning.importance"} <= set(modules)
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "bad = sorted(m for m in sys.modules if m == 'composer' or m.startswith('composer.'))\n"
        + "print(bad); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_public_names():
    import composer_sheared as cs

    for name in ("ModelShape", "ShearingPruning", "apply_shearing", "prune_to_target"):
        assert getattr(cs, name) is not None
