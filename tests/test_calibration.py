import pytest
import torch

from composer_sheared.data.calibration import calibration_batches
from tests.conftest import DOMAINS, make_data


def test_calibration_batches_round_robin_and_fixed(tmp_path):
    root = make_data(tmp_path / "mds", n_train=6)
    a = calibration_batches(str(root), DOMAINS, num_batches=3, batch_size=4)
    b = calibration_batches(str(root), DOMAINS, num_batches=3, batch_size=4)
    assert len(a) == 3 and all(x["input_ids"].shape == (4, 32) for x in a)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    # round robin: consecutive rows come from different domains (the synthetic domains differ in stride)
    rows = torch.cat([x["input_ids"] for x in a])
    strides = [int((r[1] - r[0]) % 128) for r in rows[:2]]
    assert strides[0] != strides[1]


def test_calibration_asks_for_more_than_the_data_has(tmp_path):
    root = make_data(tmp_path / "mds", n_train=2)
    with pytest.raises(ValueError, match="has only 4"):
        calibration_batches(str(root), DOMAINS, num_batches=2, batch_size=4)
