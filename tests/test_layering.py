"""The method core works from any trainer: importing it must not import Composer."""
import subprocess
import sys

CORE = ["composer_sheared", "composer_sheared.shapes", "composer_sheared.pruning", "composer_sheared.data",
        "composer_sheared.data.mixing", "composer_sheared.data.calibration", "composer_sheared.distill",
        "composer_sheared.domain_loss"]


def test_core_imports_no_composer():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in CORE)
        + "bad = sorted(m for m in sys.modules if m == 'composer' or m.startswith('composer.'))\n"
        + "print(bad); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_public_names():
    import composer_sheared as cs

    for name in ("ModelShape", "ShearingPruning", "apply_shearing", "prune_to_target"):
        assert getattr(cs, name) is not None
