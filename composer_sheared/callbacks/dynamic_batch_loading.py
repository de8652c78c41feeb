"""DynamicBatchLoading: Composer callback that re-weights the training domains after every eval.

Contract with the training script:

- one Composer ``Evaluator`` per domain whose metrics include ``LanguageCrossEntropy``
  (``metric_name``): the model's per-domain loss. Its label is the domain name or ends in
  ``/<domain>`` (llm-foundry labels its ``eval_loaders`` ``eval/<label>``); ``label_prefix`` pins an
  exact prefix instead. A domain without an evaluator is an error at ``FIT_START``: without it the
  weights could never move;
- the train dataloader's dataset is a ``DynamicStreamingDataset`` (anything with
  ``set_proportions(p, current_batch)`` and ``proportions``).

At ``EVAL_AFTER_ALL`` the callback reads the per-domain losses, applies the update rule
(``composer_sheared.data.mixing.update_weights``), hands the new weights to the dataset (which
schedules them past the prefetch window, deterministically), and logs ``dbl/weight/<domain>``,
``dbl/excess/<domain>`` and ``dbl/loss/<domain>``. Weights, references and history are in the
callback's ``state_dict`` so a checkpoint restores them.

``references="source"`` means the source model's own per-domain loss before training: measured at
``FIT_START`` by running the domain evaluators once (``source_at="fit_start"``), with any pruning
masks lifted, so a pruning run compares against the dense source and not against its model at
the initial masks (already cut to the target shape in eval, and far worse: every excess would be
negative and the weights would never move); or taken from the first regular evaluation
(``source_at="first_eval"``, which then makes no update, and in a pruning run is the masked model's).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger

from composer_sheared.data.mixing import RULES, excess_losses, update_weights
from composer_sheared.defaults import ETA, RULE, SMOOTHING
from composer_sheared.pruning.masks import ShearingMasks

__all__ = ["DynamicBatchLoading", "check_references", "update_weights"]

log = logging.getLogger(__name__)


def _unwrap_dataset(dataloader: Any) -> Any:
    dataset = getattr(dataloader, "dataset", None)
    if dataset is None or not hasattr(dataset, "set_proportions"):
        raise TypeError("DynamicBatchLoading needs a train dataloader whose .dataset is a DynamicStreamingDataset "
                        f"(has set_proportions); got {type(dataset).__name__}")
    return dataset


def check_references(references: Union[Sequence[float], Mapping[str, float], str],
                     domains: Sequence[str]) -> Optional[list[float]]:
    """Reference losses in domain order (None for "source"); ValueError names the bad domain."""
    if isinstance(references, str):
        if references != "source":
            raise ValueError(f"references must be a list, a dict or 'source', got {references!r}")
        return None
    if isinstance(references, Mapping):
        missing = [d for d in domains if d not in references]
        extra = [k for k in references if k not in domains]
        if missing or extra:
            raise ValueError(f"reference dict: missing domains {missing}, unknown domains {extra}")
        values = [references[d] for d in domains]
    elif isinstance(references, Sequence):
        values = list(references)
        if len(values) != len(domains):
            raise ValueError(f"{len(values)} reference losses for {len(domains)} domains")
    else:
        raise ValueError(f"references must be a list, a dict or 'source', got {type(references).__name__}")
    refs = []
    for d, v in zip(domains, values):
        # a NaN/inf reference would poison every weight update; catch it before training
        try:
            r = float(v)
        except (TypeError, ValueError):
            r = None
        if r is None or isinstance(v, bool) or not np.isfinite(r):
            raise ValueError(f"reference loss of domain {d!r} must be a finite number, got {v!r}")
        refs.append(r)
    return refs


class DynamicBatchLoading(Callback):
    """Dynamic batch loading (Sheared-LLaMA, Xia et al. 2023) as a Composer callback.

    Args:
        domains: domain names, in the train dataset's order.
        references: per-domain reference losses: a list (domain order), a dict
            ``{domain: loss}``, or ``"source"`` (the model's own loss before training).
        rule: ``"paper"``, ``"doremi"`` (the reference code's rule) or ``"constant"``.
        eta, c: step size and smoothing (see ``update_weights``).
        label_prefix: evaluator labels are exactly ``label_prefix + domain``; None (default): the
            label that is the domain name or ends in ``/<domain>``.
        metric_name: the per-domain loss metric of each evaluator.
        source_at: ``"fit_start"`` or ``"first_eval"``; how ``references="source"`` is measured.
    """

    def __init__(self, domains: Sequence[str], references: Union[Sequence[float], Mapping[str, float], str],
                 rule: str = RULE, eta: float = ETA, c: float = SMOOTHING, label_prefix: Optional[str] = None,
                 metric_name: str = "LanguageCrossEntropy", source_at: str = "fit_start"):
        self.domains = list(domains)
        if not self.domains or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains must be non-empty and unique, got {self.domains}")
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; expected one of {RULES}")
        if source_at not in ("fit_start", "first_eval"):
            raise ValueError(f"source_at must be 'fit_start' or 'first_eval', got {source_at!r}")
        self.rule, self.eta, self.c = rule, float(eta), float(c)
        self.label_prefix, self.metric_name, self.source_at = label_prefix, metric_name, source_at
        self.use_source = isinstance(references, str)
        self.references: Optional[list[float]] = check_references(references, self.domains)
        self.weights: Optional[list[float]] = None
        self.history: list[dict[str, Any]] = []
        self._warned_missing = False
        self.labels: Optional[list[str]] = None  # evaluator label of each domain, found at FIT_START

    def resolve_labels(self, labels: Sequence[str]) -> list[str]:
        """The evaluator label of each domain among `labels`; ValueError naming what is missing."""
        found, missing = [], []
        for d in self.domains:
            if self.label_prefix is not None:
                hits = [x for x in labels if x == self.label_prefix + d]
            else:
                hits = [x for x in labels if x == d] or [x for x in labels if x.endswith("/" + d)]
            if len(hits) > 1:
                raise ValueError(f"DynamicBatchLoading: domain {d!r} matches several evaluators {hits}; "
                                 f"set label_prefix to pick one")
            (found if hits else missing).append(hits[0] if hits else d)
        if missing:
            want = "labelled " + (f"{self.label_prefix!r} + domain" if self.label_prefix is not None
                                  else "<domain> or .../<domain>")
            raise ValueError(f"DynamicBatchLoading: no evaluator for domains {missing} (want one per domain, {want}, "
                             f"with metric {self.metric_name}); the evaluators are {sorted(labels)}. Without them "
                             f"the domain weights never change")
        return found

    # -- Composer hooks --------------------------------------------------------------------
    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            self._fit_start(state, logger)
        elif event == Event.EVAL_AFTER_ALL:
            self._after_eval(state, logger)

    def _fit_start(self, state: State, logger: Logger) -> None:
        dataset = _unwrap_dataset(state.train_dataloader)
        self.labels = self.resolve_labels([ev.label for ev in state.evaluators])
        if list(getattr(dataset, "domains", self.domains)) != self.domains:
            raise ValueError(f"callback domains {self.domains} differ from dataset domains {dataset.domains}")
        if self.weights is None:
            self.weights = [float(x) for x in dataset.proportions]
        if self.use_source and self.references is None and self.source_at == "fit_start":
            self.references = self._measure_losses(state)
            log.info("dynamic batch loading: source reference losses %s", dict(zip(self.domains, self.references)))
        if self.references is not None:
            logger.log_metrics({f"dbl/reference/{d}": r for d, r in zip(self.domains, self.references)})
        logger.log_metrics({f"dbl/weight/{d}": w for d, w in zip(self.domains, self.weights)})

    def _read_losses(self, state: State) -> Optional[list[float]]:
        losses, missing = [], []
        labels = self.labels or self.resolve_labels([ev.label for ev in state.evaluators])
        for label in labels:
            metrics = state.eval_metrics.get(label, {})
            metric = metrics.get(self.metric_name)
            if metric is None or not getattr(metric, "_update_count", 1):
                missing.append(label)
                continue
            losses.append(float(metric.compute()))
        if missing:
            if not self._warned_missing:
                warnings.warn(f"DynamicBatchLoading: no {self.metric_name} from evaluators {missing} at this "
                              f"evaluation; weights not updated")
                self._warned_missing = True
            return None
        return losses

    def _after_eval(self, state: State, logger: Logger) -> None:
        losses = self._read_losses(state)
        if losses is None:
            return
        if self.references is None:  # "source", measured at the first evaluation
            self.references = list(losses)
            logger.log_metrics({f"dbl/reference/{d}": r for d, r in zip(self.domains, self.references)})
            return
        dataset = _unwrap_dataset(state.train_dataloader)
        if self.weights is None:
            self.weights = [float(x) for x in dataset.proportions]
        new = update_weights(self.weights, losses, self.references, self.rule, self.eta, self.c)
        current = int(state.timestamp.batch_in_epoch)
        start = dataset.set_proportions(new.tolist(), current_batch=current)
        self.weights = new.tolist()
        excess = excess_losses(losses, self.references)
        self.history.append({"batch": int(state.timestamp.batch), "losses": list(losses),
                             "weights": list(self.weights), "start_batch": int(start)})
        metrics = {}
        for i, d in enumerate(self.domains):
            metrics[f"dbl/weight/{d}"] = self.weights[i]
            metrics[f"dbl/excess/{d}"] = float(excess[i])
            metrics[f"dbl/loss/{d}"] = losses[i]
        logger.log_metrics(metrics)

    @torch.no_grad()
    def _measure_losses(self, state: State) -> list[float]:
        """Run each domain evaluator once with the source function: the current model with any
        pruning masks lifted (for references='source')."""
        evaluators = {ev.label: ev for ev in state.evaluators}
        model = state.model
        original = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        was_training = model.training
        model.eval()
        losses = []
        with contextlib.ExitStack() as lifted:
            for masks in [m for m in model.modules() if isinstance(m, ShearingMasks)]:
                lifted.enter_context(masks.lifted())
            try:
                for label in self.labels or self.resolve_labels(list(evaluators)):
                    losses.append(self._domain_loss(state, original, evaluators, label))
            finally:
                model.train(was_training)
        return losses

    def _domain_loss(self, state: State, original, evaluators: dict, label: str) -> float:
        from composer.core.precision import get_precision_context

        if label not in evaluators:
            raise ValueError(f"references='source' needs an evaluator labelled {label!r}; have {sorted(evaluators)}")
        template = state.eval_metrics.get(label, {}).get(self.metric_name)
        if template is None:
            raise ValueError(f"evaluator {label!r} has no metric {self.metric_name!r}")
        metric = copy.deepcopy(template)
        metric.reset()
        ev = evaluators[label]
        limit = ev.subset_num_batches if ev.subset_num_batches and ev.subset_num_batches > 0 else None
        for i, batch in enumerate(ev.dataloader.dataloader):
            if limit is not None and i >= limit:
                break
            batch = state.device.batch_to_device(batch)
            with get_precision_context(state.precision, state.precision_config):
                outputs = original.eval_forward(batch, None)
            original.update_metric(batch, outputs, metric)
        return float(metric.compute())

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"domains": list(self.domains), "weights": self.weights, "references": self.references,
                "history": copy.deepcopy(self.history), "rule": self.rule}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state.get("domains", self.domains)) != self.domains:
            raise ValueError(f"checkpoint domains {state['domains']} differ from {self.domains}")
        self.weights = None if state.get("weights") is None else [float(x) for x in state["weights"]]
        if state.get("references") is not None:
            saved = [float(x) for x in state["references"]]
            if not self.use_source and self.references is not None and not np.allclose(saved, self.references):
                warnings.warn(f"DynamicBatchLoading: references {self.references} differ from the "
                              f"checkpoint's {saved}; using the configured ones")
            else:
                self.references = saved
        self.history = list(state.get("history", []))
