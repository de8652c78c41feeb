"""DynamicBatchLoading in a real Composer Trainer with one evaluator per domain (tiny random Llama, CPU)."""
import os
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from composer_sheared.callbacks import DynamicBatchLoading  # noqa: E402
from composer_sheared.data import DynamicStreamingDataset, domain_eval_dataset, update_weights  # noqa: E402
from data_prep.tokenize_domains import write_mds_sequences  # noqa: E402

DOMAINS = ["a", "b", "c"]
SEQ, VOCAB = 16, 64


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Domains of different difficulty: uniform over 64 tokens, over 4 tokens, a fixed cycle."""
    base = tmp_path_factory.mktemp("dbl_cb")
    rng = np.random.default_rng(0)
    gens = [lambda: rng.integers(0, 64, SEQ), lambda: rng.integers(0, 4, SEQ),
            lambda: (np.arange(SEQ) + rng.integers(0, 8)) % 8]
    for d, gen in zip(DOMAINS, gens):
        for split, n in (("train", 64), ("eval", 8)):
            write_mds_sequences(str(base / split / d), (gen() for _ in range(n)), SEQ, VOCAB)
    return str(base)


def tiny_llama():
    from composer.metrics.nlp import LanguageCrossEntropy
    from composer.models import HuggingFaceModel
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ)
    return HuggingFaceModel(LlamaForCausalLM(cfg), use_logits=True, shift_labels=True,
                            metrics=[LanguageCrossEntropy()], eval_metrics=[LanguageCrossEntropy()])


def make_trainer(root, callback, lr=1e-3, prefix="", **kw):
    from composer import Trainer
    from composer.core import Evaluator
    from composer.loggers import InMemoryLogger

    ds = DynamicStreamingDataset(root, DOMAINS, [0.4, 0.3, 0.3], batch_size=4, seed=2)
    evaluators = [Evaluator(label=prefix + d, metric_names=["LanguageCrossEntropy"],
                            dataloader=DataLoader(domain_eval_dataset(root, d, batch_size=4, domain_id=i), batch_size=4))
                  for i, d in enumerate(DOMAINS)]
    model = tiny_llama()
    mem = InMemoryLogger()
    trainer = Trainer(model=model, train_dataloader=DataLoader(ds, batch_size=4), eval_dataloader=evaluators,
                      eval_interval="2ba", callbacks=[callback], loggers=[mem],
                      optimizers=torch.optim.SGD(model.parameters(), lr=lr), device="cpu",
                      progress_bar=False, log_to_console=False, seed=1, **kw)
    return trainer, ds, mem


def values(mem, key):
    return [float(v) for _, v in mem.data[key]]


def test_weights_follow_the_rule_and_reach_the_dataset(root, tmp_path):
    refs = [1.0, 4.0, 3.5]  # a random model is at ~ln 64 = 4.16 everywhere: a is furthest above
    cb = DynamicBatchLoading(DOMAINS, references=refs, rule="doremi", eta=1.0, c=1e-4)
    trainer, ds, mem = make_trainer(root, cb, max_duration="6ba", save_folder=str(tmp_path / "ck"),
                                    save_interval="6ba")
    trainer.fit()
    trainer.close()

    assert [h["batch"] for h in cb.history] == [2, 4, 6]
    w = [0.4, 0.3, 0.3]
    for h in cb.history:
        w = update_weights(w, h["losses"], refs, "doremi", 1.0, 1e-4).tolist()
        np.testing.assert_allclose(h["weights"], w, atol=1e-12)
    np.testing.assert_allclose(cb.weights, w, atol=1e-12)
    # the dataset got every update, scheduled just past the prefetch window
    assert [s for s, _ in ds.changes[1:]] == [h["start_batch"] for h in cb.history] == [10, 12, 14]
    for (_, p), h in zip(ds.changes[1:], cb.history):
        np.testing.assert_allclose(p, h["weights"], atol=1e-12)
    # the losses the callback used are the ones Composer's evaluators logged
    for i, d in enumerate(DOMAINS):
        np.testing.assert_allclose(values(mem, f"dbl/loss/{d}"), values(mem, f"metrics/{d}/LanguageCrossEntropy"),
                                   rtol=1e-6)
        np.testing.assert_allclose(values(mem, f"dbl/excess/{d}"),
                                   [h["losses"][i] - refs[i] for h in cb.history], atol=1e-6)
        assert values(mem, f"dbl/weight/{d}")[-1] == pytest.approx(w[i])
    # the domain furthest above its reference gains weight
    assert cb.weights[0] > 0.4

    # a checkpoint restores the callback (weights, references, history) and the dataset's log
    cb2 = DynamicBatchLoading(DOMAINS, references=refs, rule="doremi")
    ckpt = str(tmp_path / "ck" / "ep0-ba6-rank0.pt")
    trainer2, ds2, _ = make_trainer(root, cb2, max_duration="6ba", load_path=ckpt)
    assert cb2.weights == cb.weights and cb2.history == cb.history
    assert ds2.changes == ds.changes
    trainer2.close()


def test_source_references_are_the_models_own_losses_before_training(root):
    # lr=0: the model never changes, so every later eval must reproduce the references exactly,
    # and under the paper rule (clipped excess) the weights must not move.
    cb = DynamicBatchLoading(DOMAINS, references="source", rule="paper", label_prefix="val_")
    trainer, ds, mem = make_trainer(root, cb, lr=0.0, prefix="val_", max_duration="4ba")
    trainer.fit()
    trainer.close()
    assert cb.references is not None and len(cb.references) == 3
    for h in cb.history:
        np.testing.assert_allclose(h["losses"], cb.references, rtol=1e-5)
    np.testing.assert_allclose(cb.weights, [0.4, 0.3, 0.3], atol=1e-6)
    # an untrained model is near-uniform over the vocabulary: every loss is close to ln 64
    np.testing.assert_allclose(cb.references, np.log(VOCAB), atol=0.3)
    assert len(set(cb.references)) == 3
    assert values(mem, "dbl/reference/a") == [cb.references[0]]


def test_source_references_in_a_pruning_run_are_the_dense_sources(root):
    # at FIT_START the masks already cut the eval model to the target shape; the references must
    # be the source's losses (the same model without masks). On a trained source the masked loss
    # is far above them (every excess would be negative and the weights would never move); on this
    # random one it differs by a little, which is enough to tell the two apart
    from composer_sheared.algorithms import ShearingPruning

    dense = DynamicBatchLoading(DOMAINS, references="source", rule="paper", label_prefix="val_")
    trainer, _, _ = make_trainer(root, dense, lr=0.0, prefix="val_", max_duration="2ba")
    trainer.fit()
    trainer.close()
    target = {"hidden_size": 16, "intermediate_size": 16, "num_attention_heads": 2, "num_key_value_heads": 2}
    pruned = DynamicBatchLoading(DOMAINS, references="source", rule="paper", label_prefix="val_")
    trainer, _, _ = make_trainer(root, pruned, lr=0.0, prefix="val_", max_duration="2ba",
                                 algorithms=[ShearingPruning(target, mask_init="uniform", lagrangian_warmup="1ba")])
    trainer.fit()
    trainer.close()
    np.testing.assert_allclose(pruned.references, dense.references, rtol=1e-6)
    masked = pruned.history[0]["losses"]  # the first eval: the masked model at the target shape
    assert max(abs(m - r) for m, r in zip(masked, pruned.references)) > 1e-3, (masked, pruned.references)


def test_missing_evaluator_label_is_an_error_before_training(root):
    # without its evaluators the weights could never move: that must stop the run, not warn
    cb = DynamicBatchLoading(DOMAINS, references=[1.0, 1.0, 1.0], rule="paper", label_prefix="nope/")
    trainer, ds, _ = make_trainer(root, cb, max_duration="2ba")
    with pytest.raises(ValueError, match=r"no evaluator for domains \['a', 'b', 'c'\].*'a', 'b', 'c'"):
        trainer.fit()
    trainer.close()
    assert cb.history == [] and len(ds.changes) == 1 and int(trainer.state.timestamp.batch) == 0


def test_evaluator_labels_with_a_prefix_are_found():
    # llm-foundry labels its eval_loaders eval/<label>; an exact domain name wins over a suffix
    cb = DynamicBatchLoading(["code", "docs"], references=[1.0, 1.0])
    assert cb.resolve_labels(["eval/code", "eval/docs", "icl/x"]) == ["eval/code", "eval/docs"]
    assert cb.resolve_labels(["code", "eval/code", "eval/docs"]) == ["code", "eval/docs"]
    with pytest.raises(ValueError, match="several evaluators"):
        cb.resolve_labels(["eval/code", "val/code", "docs"])
    with pytest.raises(ValueError, match=r"no evaluator for domains \['docs'\]"):
        cb.resolve_labels(["eval/code", "eval/documentation"])
    pinned = DynamicBatchLoading(["code"], references=[1.0], label_prefix="val_")
    assert pinned.resolve_labels(["val_code", "eval/code"]) == ["val_code"]


def test_reference_arguments_are_validated():
    with pytest.raises(ValueError, match="missing domains \\['c'\\]"):
        DynamicBatchLoading(DOMAINS, references={"a": 1.0, "b": 2.0})
    with pytest.raises(ValueError, match="2 reference losses for 3 domains"):
        DynamicBatchLoading(DOMAINS, references=[1.0, 2.0])
    with pytest.raises(ValueError, match="unknown rule"):
        DynamicBatchLoading(DOMAINS, references=[1.0, 2.0, 3.0], rule="nope")
    cb = DynamicBatchLoading(DOMAINS, references={"c": 3.0, "a": 1.0, "b": 2.0})
    assert cb.references == [1.0, 2.0, 3.0]
