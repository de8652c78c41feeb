"""Where ShearingPruning's importance init reads its batches: given batches, a YAML-style mapping
(read at INIT), or nothing (the train dataloader's DynamicStreamingDataset, read at FIT_START with
the masks lifted, so the logits are the ones the dense source gives)."""
from __future__ import annotations

import pytest
import torch
from composer import Trainer
from composer.core import Callback, Event
from composer.models import HuggingFaceModel
from composer.optim import DecoupledAdamW
from torch.testing import assert_close
from torch.utils.data import DataLoader

from composer_sheared import ShearingPruning
from composer_sheared.data import DynamicStreamingDataset
from composer_sheared.data.calibration import calibration_batches
from tests.conftest import DOMAINS, TARGET, TokenDataset, tiny_model

BATCH = 4


class Capture(Callback):
    """The mask logits as the first batch starts (after INIT and FIT_START)."""

    def __init__(self):
        self.logits = None

    def run_event(self, event, state, logger):
        if event == Event.BATCH_START and self.logits is None:
            masks = state.model.model.shearing_masks
            self.logits = {k: v.detach().clone() for k, v in masks.log_alpha.items()}


def first_logits(calibration, train) -> dict:
    model = HuggingFaceModel(tiny_model(seed=3), use_logits=True)
    cap = Capture()
    trainer = Trainer(model=model, train_dataloader=train, max_duration="1ba", device="cpu", progress_bar=False,
                      optimizers=DecoupledAdamW(model.parameters(), lr=1e-3), callbacks=[cap], seed=5,
                      algorithms=[ShearingPruning(TARGET, calibration=calibration, calibration_batches=2)])
    trainer.fit()
    trainer.close()
    return cap.logits


def dynamic_loader(mds):
    return DataLoader(DynamicStreamingDataset(str(mds), DOMAINS, [0.5, 0.5], batch_size=BATCH), batch_size=BATCH)


def test_the_three_calibration_sources_give_the_same_importance_init(mds):
    given = first_logits(calibration_batches(str(mds), DOMAINS, 2, BATCH), dynamic_loader(mds))
    mapping = first_logits({"local": str(mds), "domains": list(DOMAINS), "num_batches": 2, "batch_size": BATCH},
                           dynamic_loader(mds))
    drawn = first_logits(None, dynamic_loader(mds))
    for name in given:
        assert_close(mapping[name], given[name], rtol=0, atol=0)
        assert_close(drawn[name], given[name], rtol=1e-6, atol=1e-6)
    # an importance init, not the uniform N(5, 0.01) one: ranks spread over +-10 within each row
    assert float(given["intermediate"].max() - given["intermediate"].min()) > 10


def test_without_calibration_a_loader_that_is_not_dynamic_streaming_is_an_error():
    loader = DataLoader(TokenDataset(seq_len=16), batch_size=BATCH)
    with pytest.raises(ValueError, match="calibration: \\{local: <MDS root>, domains: \\[...\\]\\} or use mask_init: uniform"):
        first_logits(None, loader)


def test_calibration_mapping_is_checked_when_the_algorithm_is_built():
    with pytest.raises(ValueError, match="calibration: expected a mapping with keys local, domains"):
        ShearingPruning(TARGET, calibration={"local": "x"})
    with pytest.raises(ValueError, match="calibration_batches=0"):
        ShearingPruning(TARGET, calibration_batches=0)
