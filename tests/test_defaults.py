"""Each default and allowed value is defined once (composer_sheared.defaults): the functional forms,
the Composer adapters and the YAML schema all show the same one."""
import inspect
import subprocess
import sys

import pytest

from composer_sheared import defaults as D


def _default(fn, name):
    return inspect.signature(fn).parameters[name].default


def test_functional_forms_adapters_and_schema_agree():
    from composer_sheared.algorithms import Distillation, ShearingPruning
    from composer_sheared.callbacks import DynamicBatchLoading
    from composer_sheared.config import DistillationConfig, DynamicLoadingConfig, PruningConfig
    from composer_sheared.data.mixing import update_weights
    from composer_sheared.distill import apply_distillation, kd_loss
    from composer_sheared.pruning import ShearingMasks, apply_shearing

    expected = {"mask_lr": D.MASK_LR, "lambda_lr": D.LAMBDA_LR, "eval_shape": D.EVAL_SHAPE, "schedule": D.SCHEDULE,
                "init_mean": D.INIT_MEAN}
    for name, value in expected.items():
        assert _default(apply_shearing, name) == _default(ShearingPruning, name) == value, name
        assert getattr(PruningConfig(target="x"), name, value) == value, name
    for name in ("eval_shape", "schedule", "init_mean"):
        assert _default(ShearingMasks, name) == expected[name], name
    assert _default(ShearingPruning, "mask_init") == PruningConfig(target="x").mask_init == D.MASK_INIT
    assert _default(ShearingPruning, "init_spread") == PruningConfig(target="x").init_spread == D.INIT_SPREAD
    assert _default(ShearingPruning, "lagrangian_warmup") == PruningConfig(target="x").lagrangian_warmup == D.LAGRANGIAN_WARMUP
    assert _default(ShearingPruning, "calibration_batches") == PruningConfig(target="x").calibration_batches == D.CALIBRATION_BATCHES
    assert _default(Distillation, "alpha") == _default(apply_distillation, "alpha") == DistillationConfig().alpha == D.KD_ALPHA
    assert (_default(Distillation, "temperature") == _default(kd_loss, "temperature") == DistillationConfig().temperature
            == D.KD_TEMPERATURE)
    assert _default(DynamicBatchLoading, "rule") == DynamicLoadingConfig().rule == D.RULE
    assert _default(DynamicBatchLoading, "eta") == _default(update_weights, "eta") == DynamicLoadingConfig().eta == D.ETA
    assert _default(DynamicBatchLoading, "c") == _default(update_weights, "c") == DynamicLoadingConfig().c == D.SMOOTHING


@pytest.mark.parametrize("module, names", [
    ("composer_sheared.pruning.masks", ["EVAL_SHAPES", "SCHEDULES", "TRAIN_GATES", "GATE_VALUES"]),
    ("composer_sheared.pruning.hard_concrete", ["TEMPERATURE"]),
    ("composer_sheared.data.mixing", ["RULES"]),
])
def test_allowed_values_are_the_defaults_modules_objects(module, names):
    import importlib

    mod = importlib.import_module(module)
    for name in names:
        assert getattr(mod, name) is getattr(D, name), (module, name)


def test_defaults_pull_in_no_framework():
    code = ("import sys; import composer_sheared.defaults; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'composer', 'omegaconf', 'numpy', 'llmfoundry'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
