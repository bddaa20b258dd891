"""GPU check: the paper recipe's training step at its real shape, through palign's LightningModule.

A random-initialised Qwen2.5-7B-shaped student (28 layers, hidden 3584, 152k vocabulary) in bf16 on
one GPU, the paper's LoRA (r 16, alpha 16, dropout 0.05, all linear layers), gradient checkpointing,
and the chunked cross-entropy (`training.loss_kernel`), trained for a few optimizer steps by a real
Lightning Trainer on sequences of --tokens tokens (half of them supervised). It prints one JSON
object: peak GPU memory, tokens per second, model FLOPs utilization, the losses, and whether the
merged export reloads.

    python -m experiments.gpu.check_training                    # on the GPU machine: 7B shape, 32k tokens
    python -m experiments.gpu.check_training --tokens 8192      # shorter examples

MFU counts the model's FLOPs per trained token as 6 x parameters (forward and backward, as in the
PaLM paper's definition; the recomputation of gradient checkpointing and LoRA's skipped weight
gradients are not counted) plus causal attention, 6 x layers x hidden x sequence length, over the
device's dense bf16 peak (--peak-tflops, or read from the device name).
    python -m experiments.gpu.check_training --shrink           # anywhere: a 2-layer model on the CPU (the test suite)

Random weights: the loss is ~log(vocabulary) and says nothing about the method; the check is that
the step fits, how fast it runs, and that the LoRA export is a plain `from_pretrained` folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

QWEN25_7B = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rope_theta": 1_000_000.0,
}
SHRUNK = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 4096,
    "max_position_embeddings": 1024,
}
# dense bf16 peaks (TFLOP/s) by device name
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
PAPER_LORA = {"r": 16, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shrink", action="store_true", help="a 2-layer model on the CPU, in fp32 (what the tests run)"
    )
    parser.add_argument("--tokens", type=int, default=32768, help="tokens per example (one example per micro-batch)")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (default: by its name)"
    )
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (the first one is warm-up, not timed)")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--loss-kernel", default="auto", choices=("auto", "chunked", "liger"))
    parser.add_argument("--loss-chunk-tokens", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.shrink:
        args.tokens = min(args.tokens, 256)
    return args


class RandomRows:
    """`n` rows of `tokens` random ids; the first half of each row is the prompt (label -100)."""

    def __init__(self, n: int, tokens: int, vocab: int):
        import torch

        generator = torch.Generator().manual_seed(0)
        self.rows = torch.randint(0, vocab, (n, tokens), generator=generator)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        import torch

        ids = self.rows[i]
        labels = ids.clone()
        labels[: len(ids) // 2] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


class StepTimer:
    """Lightning callback: wall time of each optimizer step after the first."""

    def __init__(self):
        import pytorch_lightning as pl

        class _Timer(pl.Callback):
            def __init__(self):
                self.started = None
                self.times = []

            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if self.started is None:
                    self.started = time.perf_counter()

            def on_before_optimizer_step(self, trainer, module, optimizer):
                if self.started is not None:
                    self.times.append(time.perf_counter() - self.started)
                    self.started = None

        self.callback = _Timer()


def main(argv=None) -> dict:
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from palign.training.loss import resolve_loss_kernel
    from palign.training.module import StudentSFTModule

    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.shrink
    shape = SHRUNK if args.shrink else QWEN25_7B
    dtype = torch.bfloat16 if cuda else torch.float32
    config = Qwen2Config(**shape, tie_word_embeddings=False, torch_dtype=str(dtype).removeprefix("torch."))

    def load():
        torch.manual_seed(0)
        with torch.device("cuda" if cuda else "cpu"):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)

    module = StudentSFTModule.with_defaults(
        load,
        warmup_ratio=0.0,
        lora=PAPER_LORA,
        gradient_checkpointing=True,
        loss_kernel=args.loss_kernel,
        loss_chunk_tokens=args.loss_chunk_tokens,
    )
    rows = RandomRows(args.steps * args.accumulate, args.tokens, shape["vocab_size"])
    loader = DataLoader(rows, batch_size=1, shuffle=False)
    timer = StepTimer().callback
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision="bf16-mixed" if cuda else "32-true",
        max_steps=args.steps,
        accumulate_grad_batches=args.accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        gradient_clip_val=1.0,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, train_dataloaders=loader)
    timed = timer.times[1:] or timer.times
    tokens_per_step = args.tokens * args.accumulate
    seconds = sum(timed) / len(timed)
    flops_per_token = (
        6 * sum(p.numel() for n, p in module.model.named_parameters() if "lora_" not in n)
        + 6 * shape["num_hidden_layers"] * shape["hidden_size"] * args.tokens
    )
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    report = {
        "device": name,
        "shape": "qwen2.5-7b" if not args.shrink else "shrunk",
        "parameters": sum(p.numel() for p in module.parameters()),
        "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "tokens_per_example": args.tokens,
        "steps": trainer.global_step,
        "loss_kernel": resolve_loss_kernel(
            args.loss_kernel, torch.device("cuda" if cuda else "cpu")
        ),  # as the module did
        "loss_curve": module.loss_curve,
        "seconds_per_step": seconds,
        "tokens_per_s": tokens_per_step / seconds,
        "model_tflops_per_s": flops_per_token * tokens_per_step / seconds / 1e12,
        "mfu": flops_per_token * tokens_per_step / seconds / (peak * 1e12) if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
    with tempfile.TemporaryDirectory() as folder:  # the merged export reloads as a plain model
        tokenizer_dir = Path(folder) / "tokenizer"
        _write_tokenizer(tokenizer_dir, shape["vocab_size"])
        module.export_pretrained(Path(folder) / "student", AutoTokenizer.from_pretrained(tokenizer_dir))
        reloaded = AutoModelForCausalLM.from_pretrained(Path(folder) / "student")
        report["export_reloads"] = sum(p.numel() for p in reloaded.parameters()) == sum(
            p.numel() for n, p in module.model.named_parameters() if "lora_" not in n
        )
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return report


def _write_tokenizer(folder: Path, vocab: int) -> None:
    """A word-level tokenizer over `vocab` ids (the export saves one beside the model)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", pad_token="t0").save_pretrained(folder)


if __name__ == "__main__":
    main()
