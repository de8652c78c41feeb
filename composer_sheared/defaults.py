"""Every default and allowed value of the method, defined once.

The functional forms (apply_shearing, ShearingMasks, update_weights, kd_loss), the Composer
adapters (ShearingPruning, Distillation, DynamicBatchLoading) and the YAML schema (config/) all
read them from here. Core: imports nothing, so the schema does not pull in Composer."""

# -- pruning: masks and their schedule ---------------------------------------------------------
# The target reaches its final shape after 20% of the run (the paper: 640 of 3200 pruning steps).
LAGRANGIAN_WARMUP = "0.2dur"
MASK_LR = 1.0  # mask logits (the reference code's)
LAMBDA_LR = 1.0  # Lagrange multipliers
# projection: every forward shifts each row of mask logits so the expected size equals the
# warm-up target exactly (won at equal tokens, bench/fidelity.py); lagrangian: the paper's game.
SCHEDULES = ("projection", "lagrangian")
SCHEDULE = "projection"
# eval-mode masks: exactly the target counts (what the sliced model computes) or the rounded
# expected counts (what the reference code evaluated during pruning)
EVAL_SHAPES = ("target", "expected")
EVAL_SHAPE = "target"
MASK_INITS = ("importance", "uniform")
MASK_INIT = "importance"
TRAIN_GATES = ("smooth", "sampled")
GATE_VALUES = ("soft", "binary")
INIT_MEAN = 5.0  # uniform init: N(INIT_MEAN, INIT_STD), the paper's
INIT_STD = 1e-2
INIT_SPREAD = 10.0  # importance init: ranks spread linearly over +-INIT_SPREAD within each row
TEMPERATURE = 2.0 / 3.0  # hard-concrete beta of the reference code (the paper's appendix says 0.83)


def default_train_gates(schedule: str) -> str:
    """Smooth gates with the projected schedule (they won at equal tokens); the Lagrangian needs
    sampled ones."""
    return "smooth" if schedule == "projection" else "sampled"


# -- importance calibration ----------------------------------------------------------------------
CALIBRATION_BATCHES = 8  # batches the importance pass reads when a config does not say
CALIBRATION_BATCH_SIZE = 4  # samples per batch when neither the config nor a train loader gives one
CALIBRATION_KEYS = ("local", "domains", "remote", "split", "num_batches", "batch_size")  # a YAML block's keys

# -- distillation ---------------------------------------------------------------------------------
KD_TEACHER = "copy"  # the model as it is at INIT (the unpruned source in a pruning run)
KD_ALPHA = 0.5  # loss = (1 - alpha) CE + alpha KD
KD_TEMPERATURE = 1.0

# -- dynamic batch loading ----------------------------------------------------------------------
RULES = ("paper", "doremi", "constant")
RULE = "doremi"  # the reference code's rule
ETA = 1.0  # step size of the exponentiated update
SMOOTHING = 1e-4  # c: mixing with the uniform distribution

# Remote data downloads (data.remote): each try may take this long per connect or read, and a
# failed try is repeated DOWNLOAD_RETRY times (Streaming's meaning of download_retry).
DOWNLOAD_TIMEOUT = 60.0
DOWNLOAD_RETRY = 2

