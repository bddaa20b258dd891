"""The LightningModule's loss: response-only NLL, with the LM head run on supervised positions only."""

from __future__ import annotations

import copy

import pytest
import torch

from palign.data.sft import PackedSFTCollator, SFTCollator
from palign.training.module import StudentSFTModule

EXAMPLES = [
    {"input_ids": [5, 6, 7, 8, 9, 10], "labels": [-100, -100, -100, 8, 9, 10]},
    {"input_ids": [11, 12, 13], "labels": [-100, 12, 13]},
    {"input_ids": [21, 22, 23, 24], "labels": [-100, -100, 23, 24]},
]
# the chunked cross-entropy, 3 supervised tokens per chunk: the 7 of a batch span three chunks
LOSS = {"loss_kernel": "chunked", "loss_chunk_tokens": 3}


def _loss_and_grads(module: StudentSFTModule, batch) -> tuple[float, float, dict[str, torch.Tensor]]:
    module.zero_grad()
    loss, accuracy, _ = module._step(batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return float(loss.detach()), float(accuracy), grads


def _reference(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    """transformers' own causal-LM loss over full logits (mean over the supervised shifted tokens)."""
    model.zero_grad()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    loss = model(**inputs, labels=batch["labels"], use_cache=False).loss
    loss.backward()
    return float(loss), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packed", [False, True])
def test_supervised_only_head_gives_transformers_loss_and_gradients(tiny_model, packed):
    batch = PackedSFTCollator()([EXAMPLES[:2], EXAMPLES[2:]]) if packed else SFTCollator(0)(EXAMPLES)
    reference_model = copy.deepcopy(tiny_model)
    module = StudentSFTModule.with_defaults(lambda: copy.deepcopy(tiny_model), **LOSS)
    assert module._output_head() is module.model.get_output_embeddings()  # the selective path is taken
    loss, accuracy, grads = _loss_and_grads(module, batch)
    expected_loss, expected_grads = _reference(reference_model, batch)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert 0.0 <= accuracy <= 1.0
    assert set(grads) == {f"model.{name}" for name in expected_grads}
    for name, grad in expected_grads.items():
        assert torch.allclose(grads[f"model.{name}"], grad, atol=1e-6, rtol=1e-4), name


def test_full_logits_fallback_and_lora_agree_with_selective_head(tiny_model):
    batch = SFTCollator(0)(EXAMPLES)
    selective = StudentSFTModule.with_defaults(lambda: copy.deepcopy(tiny_model), **LOSS)
    fallback = StudentSFTModule.with_defaults(lambda: copy.deepcopy(tiny_model), **LOSS)
    fallback._selective_head = False  # as for a model with logit soft-capping
    assert fallback._output_head() is None
    assert _loss_and_grads(selective, batch)[0] == pytest.approx(_loss_and_grads(fallback, batch)[0], rel=1e-6)

    lora = {"r": 4, "alpha": 4, "dropout": 0.0}
    with_lora = StudentSFTModule.with_defaults(lambda: copy.deepcopy(tiny_model), lora=lora, **LOSS)
    assert with_lora._output_head() is not None
    loss, _, grads = _loss_and_grads(with_lora, batch)
    # LoRA's B starts at zero: the adapted model is the base model, so the loss is the base loss
    assert loss == pytest.approx(_loss_and_grads(fallback, batch)[0], rel=1e-5)
    assert grads and all("lora_" in name for name in grads)
    # the head is not registered a second time: checkpoints hold the model's keys only
    assert all(key.startswith("model.") for key in with_lora.state_dict())


def test_a_packed_micro_batch_trains_on_each_example_as_if_alone(tiny_model):
    """One flattened row of 2 bins: its loss is the token-weighted loss of its examples run alone (no
    loss and no attention crosses an example), and every one of its tokens counts as a real token."""
    module = StudentSFTModule.with_defaults(lambda: copy.deepcopy(tiny_model), **LOSS)
    module.eval()
    alone = []
    with torch.no_grad():
        for example in EXAMPLES:
            loss, _, n_tokens = module._step(SFTCollator(0)([example]))
            alone.append((float(loss) * n_tokens, n_tokens))
        batch = PackedSFTCollator()([EXAMPLES[:2], EXAMPLES[2:]])
        loss = module.training_step(batch, 0)
    assert batch["input_ids"].shape == (1, 13)
    assert module._pending_tokens == 13  # what tokens/s and tokens_seen count: no padding
    total = sum(n for _, n in alone)
    assert float(loss) == pytest.approx(sum(s for s, _ in alone) / total, rel=1e-5)


def test_a_validation_filler_batch_weighs_nothing(tiny_model):
    """The empty batch that evens out the ranks' validation shards runs a forward and changes no metric."""
    module = StudentSFTModule.with_defaults(lambda: copy.deepcopy(tiny_model), **LOSS)
    module.eval()
    filler = SFTCollator(0)([])
    assert filler["input_ids"].shape == (1, 2) and (filler["labels"] == -100).all()
    with torch.no_grad():
        assert module._step(filler)[2] == 0
        module.validation_step(SFTCollator(0)(EXAMPLES), 0)
        alone = (float(module.val_nll.compute()), float(module.val_accuracy.compute()))
        module.validation_step(filler, 1)
    assert (float(module.val_nll.compute()), float(module.val_accuracy.compute())) == alone


EPOCH_METRICS = (
    "train_nll",
    "train_accuracy",
)  # what train/loss_epoch, perplexity and token accuracy are computed from


def _epoch_sums(module: StudentSFTModule) -> dict:
    return {
        name: {key: value.clone() for key, value in getattr(module, name).metric_state.items()}
        for name in EPOCH_METRICS
    }


def test_a_mid_epoch_resume_carries_the_epochs_metric_sums(tiny_model):
    """The epoch's loss, perplexity and token accuracy after a mid-epoch resume are the uninterrupted
    epoch's, to the bit (the whole run through the CLI: tests/test_pipeline.py)."""
    batches = [SFTCollator(0)([example]) for example in EXAMPLES]
    straight = StudentSFTModule.with_defaults(lambda: copy.deepcopy(tiny_model), **LOSS)
    resumed = StudentSFTModule.with_defaults(lambda: copy.deepcopy(tiny_model), **LOSS)
    with torch.no_grad():
        for index, batch in enumerate(batches):
            straight.training_step(batch, index)
            if index == 1:  # checkpointed here, mid-epoch
                saved = _epoch_sums(straight)
        resumed.on_load_checkpoint({"palign": {"mid_epoch": True, "epoch_metrics_by_rank": [saved]}})
        resumed.training_step(batches[2], 2)
    for name in EPOCH_METRICS:
        assert torch.equal(getattr(resumed, name).compute(), getattr(straight, name).compute()), name


def test_an_epoch_end_checkpoint_starts_the_next_epoch_afresh_and_another_world_size_sums_the_ranks(tiny_model):
    batches = [SFTCollator(0)([example]) for example in EXAMPLES]
    ranks = [StudentSFTModule.with_defaults(lambda: copy.deepcopy(tiny_model), **LOSS) for _ in range(2)]
    alone = StudentSFTModule.with_defaults(lambda: copy.deepcopy(tiny_model), **LOSS)
    with torch.no_grad():
        for index, batch in enumerate(batches[:2]):  # each rank its own micro-batch
            ranks[index].training_step(batch, 0)
            alone.training_step(batch, index)
        by_rank = [_epoch_sums(rank) for rank in ranks]
        # written at an epoch's end (the callback saves before the module logs and resets the epoch)
        after_epoch = StudentSFTModule.with_defaults(lambda: copy.deepcopy(tiny_model), **LOSS)
        after_epoch.on_load_checkpoint({"palign": {"mid_epoch": False, "epoch_metrics_by_rank": by_rank}})
        assert not after_epoch.train_nll.update_called and float(after_epoch.train_nll.weight) == 0.0
        # a 2-process checkpoint resumed by one process: rank 0 holds both ranks' sums
        one = StudentSFTModule.with_defaults(lambda: copy.deepcopy(tiny_model), **LOSS)
        one.on_load_checkpoint({"palign": {"mid_epoch": True, "epoch_metrics_by_rank": by_rank}})
        one.training_step(batches[2], 2)
        alone.training_step(batches[2], 2)
    for name in EPOCH_METRICS:
        assert float(getattr(one, name).compute()) == pytest.approx(float(getattr(alone, name).compute()), rel=1e-6), (
            name
        )
