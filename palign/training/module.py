"""The LightningModule: the student and the prefix-alignment SFT loss (method step 4, PAPER.md §2.3).

The loss is the causal-LM negative log-likelihood on response tokens only (labels are -100 on the
prompt), whichever target the baseline built. Optional LoRA follows the paper's recipe (r=16,
alpha=16, dropout 0.05 on all linear projections, PAPER.md §5). Token accuracy and perplexity are
torchmetrics aggregations weighted by supervised tokens, so they are exact over an epoch and reduce
correctly under DDP; perplexity is exp of the token-weighted mean NLL (never a softmax over a
second copy of the logits, which would not fit for a 150k vocabulary at 32k tokens).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torchmetrics.aggregation import MeanMetric

from palign.data.sft import IGNORE_INDEX
from palign.training.loss import resolve_loss_kernel, supervised_cross_entropy

log = logging.getLogger(__name__)


def apply_lora(model, lora: Mapping[str, Any]):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora.get("target_modules", "all-linear"),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor at optimizer step `step` of `total`: linear warmup, then cosine to 0."""
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def random_states() -> dict[str, Any]:
    import random

    import numpy as np

    # plain types and tensors only: checkpoints load with torch.load(weights_only=True)
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states: Mapping[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class StudentSFTModule(pl.LightningModule):
    def __init__(
        self,
        model_loader: Callable[[], torch.nn.Module],
        *,
        learning_rate: float,
        weight_decay: float,
        betas: Sequence[float],
        warmup_ratio: float,
        lora: Mapping[str, Any] | None,
        gradient_checkpointing: bool,
        loss_kernel: str,
        loss_chunk_tokens: int,
    ):
        """The fields of the `training` node (palign/schema.py: Training documents each and holds
        its default); `model_loader` builds the student (called here, once)."""
        super().__init__()
        resolve_loss_kernel(loss_kernel, device=None)  # a bad name or a missing Liger fails before the model loads
        self.save_hyperparameters(ignore=["model_loader"])
        self.model = model_loader()
        self.model.train()  # from_pretrained returns eval mode; dropout (e.g. LoRA's) must be live
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
            self.model.config.use_cache = False
        if lora:
            self.model = apply_lora(self.model, lora)
        self.train_nll = MeanMetric()
        self.train_accuracy = MeanMetric()
        self.val_nll = MeanMetric()
        self.val_accuracy = MeanMetric()
        self._tokens_seen = 0
        self._selective_head: bool | None = None  # LM head on supervised positions only (decided on first use)
        self._loss_kernel: str | None = None  # the kernel `loss_kernel` resolved to on the model's device (logged once)
        self._step_started: float | None = None
        self._pending_losses: list[float] = []  # this rank's micro-batch losses since the last optimizer step
        self._pending_tokens = 0  # and its real tokens
        self._restore_at_first_batch: dict[str, Any] | None = None  # random streams of a mid-epoch resume
        self.loss_curve: list[float] = []  # mean loss of each optimizer step, kept across resumes
        self._total_steps: int | None = None  # optimizer steps of the whole run, read at the first step

    # the `training` fields that size the loop, read by the Trainer's construction (palign/pipeline.py)
    LOOP_FIELDS = ("epochs", "max_steps", "effective_batch_size", "checkpoint_every_n_steps")

    @classmethod
    def from_config(cls, *, model_loader: Callable[[], torch.nn.Module], **training: Any) -> StudentSFTModule:
        """The `_target_` of the `training` node: the module from its fields, less the loop's."""
        return cls(model_loader, **{k: v for k, v in training.items() if k not in cls.LOOP_FIELDS})

    @classmethod
    def with_defaults(cls, model_loader: Callable[[], torch.nn.Module], **overrides: Any) -> StudentSFTModule:
        """The module at the `training` schema's defaults (palign/schema.py: Training), but `overrides`:
        for benchmarks and tests, which build the module without a composed run."""
        from palign.schema import Training, defaults

        return cls.from_config(model_loader=model_loader, **defaults(Training, **overrides))

    @property
    def tokens_seen(self) -> int:
        """Real (non-padding) tokens trained on so far, across resumes."""
        return self._tokens_seen

    # -- the loss -------------------------------------------------------------------------------
    def _step(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Mean NLL and token accuracy over the supervised tokens, and their count.

        The language-model head runs on the supervised positions only: prompt and padding tokens
        need hidden states (they are attended to) but no logits, and the head over a large vocabulary
        is a big share of the step (for SmolLM2 about a fifth of the FLOPs, more with the softmax).
        It runs a chunk of `loss_chunk_tokens` positions at a time (or in Liger's fused kernel), so the
        loss's memory does not grow with positions x vocabulary (palign/training/loss.py).
        """
        labels = batch["labels"]
        if "position_ids" in batch:  # packed: one row, positions restarting per example (PackedSFTCollator)
            inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        else:
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        targets = labels[:, 1:]
        mask = targets != IGNORE_INDEX
        n_tokens = int(mask.sum())
        head = self._output_head()
        if head is None:
            logits = self.model(**inputs, use_cache=False).logits[:, :-1, :][mask]
            loss = torch.nn.functional.cross_entropy(logits.float(), targets[mask], reduction="sum") / max(n_tokens, 1)
            with torch.no_grad():
                accuracy = (logits.argmax(-1) == targets[mask]).sum() / max(n_tokens, 1)
            return loss, accuracy, n_tokens
        hidden = self.model.get_decoder()(**inputs, use_cache=False).last_hidden_state[:, :-1, :]
        kernel = resolve_loss_kernel(self.hparams.loss_kernel, hidden.device)
        if kernel != self._loss_kernel:
            log.info(
                "cross-entropy kernel: %s%s",
                kernel,
                f" ({self.hparams.loss_chunk_tokens} tokens per chunk)" if kernel == "chunked" else "",
            )
            self._loss_kernel = kernel
        nll, correct = supervised_cross_entropy(
            hidden[mask], head, targets[mask], kernel=kernel, chunk_tokens=self.hparams.loss_chunk_tokens
        )
        return nll / max(n_tokens, 1), correct / max(n_tokens, 1), n_tokens

    def _output_head(self):
        """The LM head to apply to selected hidden states, or None where the model's forward does more
        than `lm_head(hidden)` (e.g. Gemma's logit soft-capping); then full logits are computed.
        Only the decision is cached: the head itself stays the model's (no second registration)."""
        if self._selective_head is False:
            return None
        try:
            decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            decoder = head = None
        if self._selective_head is None:
            config = getattr(self.model, "config", None)
            extra = [
                name
                for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")
                if getattr(config, name, None) not in (None, 1, 1.0)
            ]
            self._selective_head = (
                not extra and decoder is not None and decoder is not self.model and isinstance(head, torch.nn.Linear)
            )
            if not self._selective_head:
                log.info("computing full logits for the loss (%s)", ", ".join(extra) or "no separate decoder and head")
                return None
        return head

    def training_step(self, batch, batch_idx):
        loss, accuracy, n_tokens = self._step(batch)
        self.train_nll.update(loss.detach(), weight=n_tokens)
        self.train_accuracy.update(accuracy, weight=n_tokens)
        real = int(self._real_tokens(batch).sum())
        self._pending_tokens += real
        self.log("train/padding_fraction", 1.0 - real / batch["input_ids"].numel(), on_step=True, on_epoch=False)
        self._pending_losses.append(float(loss.detach()))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/tokens_seen", float(self._tokens_seen + self._pending_tokens), on_step=True, on_epoch=False)
        return loss

    def on_before_optimizer_step(self, optimizer):
        # one optimizer step of the whole job: the mean micro-batch loss and the tokens over every rank
        pending = torch.tensor(
            [sum(self._pending_losses), len(self._pending_losses), self._pending_tokens], dtype=torch.float64
        )
        if self.trainer.world_size > 1:
            pending = self.trainer.strategy.reduce(pending.to(self.device), reduce_op="sum").cpu()
        losses, count, tokens = pending.tolist()
        if count:
            self.loss_curve.append(losses / count)
        self._tokens_seen += int(tokens)
        self._pending_losses.clear()
        self._pending_tokens = 0

    # the metrics an epoch's figures are computed from while it runs (train/loss_epoch, perplexity,
    # token accuracy): a mid-epoch checkpoint carries what they summed before it
    EPOCH_METRICS = ("train_nll", "train_accuracy")

    def on_save_checkpoint(self, checkpoint):
        # the random streams too (dropout, LoRA's included), each rank's own: a resumed run draws
        # what the uninterrupted one would have drawn from this step on. Lightning builds the
        # checkpoint on every rank (rank 0 writes it), so the ranks' streams are gathered here, and
        # so are the ranks' own sums of this epoch's metrics (torchmetrics reduces them at its end).
        states = random_states()
        metrics = {
            name: {key: value.detach().cpu() for key, value in getattr(self, name).metric_state.items()}
            for name in self.EPOCH_METRICS
        }
        by_rank = [(states, metrics)]
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            by_rank = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(by_rank, (states, metrics))
        mid_epoch = not self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        checkpoint["palign"] = {
            "loss_curve": self.loss_curve,
            "tokens_seen": self._tokens_seen,
            "rng": states,
            "rng_by_rank": [rng for rng, _ in by_rank],
            "mid_epoch": mid_epoch,
            "epoch_metrics_by_rank": [sums for _, sums in by_rank],
        }

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint.get("palign", {})
        self.loss_curve = list(state.get("loss_curve", []))
        self._tokens_seen = int(state.get("tokens_seen", 0))
        by_rank = state.get("rng_by_rank") or []
        rank = self.trainer.global_rank if self._trainer is not None else 0
        world_size = self.trainer.world_size if self._trainer is not None else 1
        states = state.get("rng")
        if len(by_rank) > 1 and len(by_rank) == world_size:
            states = by_rank[rank]
        elif len(by_rank) > 1:  # a checkpoint of another world size: rank 0's stream (not an exact resume)
            log.warning(
                "resuming a %d-process checkpoint with another number of processes: the random streams "
                "(dropout) continue from rank 0's, so the run is not the uninterrupted one",
                len(by_rank),
            )
        if states:
            restore_random_states(states)
            # Mid-epoch, the uninterrupted run had drawn its DataLoader iterator's seed before this
            # checkpoint; the resumed run draws it again after this restore. Restore once more at the
            # first batch, so dropout continues exactly. (At an epoch's end both runs draw it next.)
            self._restore_at_first_batch = states if state.get("mid_epoch") else None
        if state.get("mid_epoch"):  # (an epoch-end checkpoint's sums are the finished epoch's)
            self._restore_epoch_metrics(state.get("epoch_metrics_by_rank") or [], rank, world_size)

    def _restore_epoch_metrics(
        self, by_rank: Sequence[Mapping[str, Mapping[str, torch.Tensor]]], rank: int, world_size: int
    ) -> None:
        """This epoch's metric sums as the checkpoint left them: each rank its own; with another number of
        processes, rank 0 all of them (they are sums, reduced over the ranks at the epoch's end)."""
        if not by_rank:
            return
        if len(by_rank) == world_size:
            sums = by_rank[rank]
        elif rank == 0:
            sums = {
                name: {key: sum(ranks[name][key] for ranks in by_rank) for key in by_rank[0][name]}
                for name in by_rank[0]
            }
        else:
            sums = {}
        for name, values in sums.items():
            metric = getattr(self, name)
            metric.reset()
            metric.merge_state({key: value.to(metric.device) for key, value in values.items()})

    def on_train_batch_start(self, batch, batch_idx):
        if self._restore_at_first_batch is not None:
            restore_random_states(self._restore_at_first_batch)
            self._restore_at_first_batch = None
        if self._step_started is None:
            self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        elapsed = time.perf_counter() - (self._step_started or time.perf_counter())
        self._step_started = None
        if elapsed > 0:
            self.log(
                "train/tokens_per_s", float(self._real_tokens(batch).sum()) / elapsed, on_step=True, on_epoch=False
            )

    @staticmethod
    def _real_tokens(batch) -> torch.Tensor:
        return batch["real_tokens"] if "real_tokens" in batch else batch["attention_mask"]

    def _log_epoch(self, split: str, nll: MeanMetric, accuracy: MeanMetric) -> None:
        if not nll.update_called:
            return
        mean_nll = float(nll.compute())  # torchmetrics reduces over the ranks: every rank has the job's value
        self.log(f"{split}/loss_epoch", mean_nll, prog_bar=split == "val", sync_dist=True)  # (a mean of equal values)
        self.log(f"{split}/perplexity", math.exp(min(mean_nll, 50.0)), sync_dist=True)
        self.log(f"{split}/token_accuracy", float(accuracy.compute()), sync_dist=True)
        nll.reset()
        accuracy.reset()

    def on_train_epoch_end(self):
        self._log_epoch("train", self.train_nll, self.train_accuracy)

    def validation_step(self, batch, batch_idx):
        loss, accuracy, n_tokens = self._step(batch)
        self.val_nll.update(loss, weight=n_tokens)
        self.val_accuracy.update(accuracy, weight=n_tokens)

    def on_validation_epoch_end(self):
        self._log_epoch("val", self.val_nll, self.val_accuracy)

    # -- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params,
            lr=self.hparams.learning_rate,
            weight_decay=self.hparams.weight_decay,
            betas=tuple(self.hparams.betas),
        )
        # The schedule's length is read lazily, at the first optimizer step, never here: reading
        # `trainer.estimated_stepping_batches` in configure_optimizers builds the train loader
        # before Lightning restores its mid-epoch state from the checkpoint, and the restored
        # state is then never applied (Lightning issue 20550): a resumed run would restart the
        # epoch's order from its first batch.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _lr_factor(self, step: int) -> float:
        """Linear warmup over `warmup_ratio` of the optimizer steps, then cosine decay to 0."""
        ratio = self.hparams.warmup_ratio
        if step == 0:  # called once while configure_optimizers builds the scheduler
            return 0.0 if ratio > 0 else 1.0
        if self._total_steps is None:  # the loaders are set up (and restored) by now: read it once
            self._total_steps = max(int(self.trainer.estimated_stepping_batches), 1)
        total = self._total_steps
        return cosine_with_warmup(step, math.ceil(ratio * total), total)

    # -- export ---------------------------------------------------------------------------------
    def export_pretrained(self, folder, tokenizer) -> None:
        """Save the trained student (LoRA merged) as a plain `from_pretrained` folder."""
        from palign.artifacts.writes import atomic_path

        model = self.model
        if hasattr(model, "merge_and_unload"):
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        with atomic_path(folder) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
