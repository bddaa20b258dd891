"""Benchmark: SFT throughput of palign's LightningModule vs `transformers.Trainer`, and packing.

Same model (SmolLM2-135M-Instruct on CPU), same data: the first --examples CHAMP GPT-4 solutions
(those longer than --max-length dropped), tokenized by palign's SFT formatting (response-only labels). Every
configuration trains one pass over exactly these examples, one optimizer step per micro-batch:

  hf_trainer              `transformers.Trainer`, micro-batches in a shuffled order (the baseline)
  lightning               palign's `StudentSFTModule`, the very same micro-batches
  lightning_grouped       length-grouped micro-batches (`data.group_by_length`, the default)
  lightning_packed        padding-free packed rows of --max-length tokens (`data.packing=true`),
                          --micro-batch rows per step

each in full fp32 and, with the suffix `_bf16`, in bf16 autocast (Trainer `bf16=True`, Lightning
`precision: bf16-mixed`, palign's default where the hardware has native bf16).

Each runs in its own subprocess, so its peak RSS is its own. Throughput is real (non-padding)
tokens per second over the steps after the first (the first step carries one-off set-up costs);
the table gives it against the Trainer and against the unpacked, ungrouped LightningModule at the
same precision, and against the fp32 Trainer, with the padding fraction and the ceiling
1 / (1 - padding) that removing padding alone could reach.

    python experiments/bench/sft.py                        # 48 examples, micro-batch 4, all 8 rows
    python experiments/bench/sft.py --configs lightning lightning_packed --examples 96 --micro-batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

BASE_CONFIGS = ("hf_trainer", "lightning", "lightning_grouped", "lightning_packed")
CONFIGS = (*BASE_CONFIGS, *(f"{name}_bf16" for name in BASE_CONFIGS))


def load_data(cache_dir: Path, examples: int, max_length: int):
    import datasets
    from omegaconf import OmegaConf

    from palign.data.sft import SupervisedExample, build_tokenized_split
    from palign.llm.models import load_tokenizer
    from palign.teachers.sources import ChampTeacher

    spec = OmegaConf.load(ROOT / "conf" / "student" / "smollm2_135m.yaml")
    prompts = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "prompts" / "paper.yaml"))
    tokenizer = load_tokenizer(spec, cache_dir)
    records = ChampTeacher.with_defaults().load().records[:examples]
    split = build_tokenized_split(
        [SupervisedExample(r.id, r.question, r.long_cot) for r in records],
        tokenizer,
        prompts,
        max_length,
        cache_dir,
        "bench",
    )
    data = datasets.load_from_disk(str(split.path)).with_format(None, columns=["input_ids", "labels"])
    return spec, tokenizer, data


def make_batches(name: str, data, pad: int, args) -> list[dict]:
    """One pass over all examples, batched by the training loader as the configuration sets it."""
    from palign.data.datamodule import train_loader

    name = name.removesuffix("_bf16")
    return list(
        train_loader(
            data,
            pad,
            args.micro_batch,
            seed=0,
            packing=name == "lightning_packed",
            pack_length=args.max_length,
            group_by_length=name == "lightning_grouped",
        )
    )


def real_tokens(batch) -> int:
    return int((batch["real_tokens"] if "real_tokens" in batch else batch["attention_mask"]).sum())


def run_one(name: str, args) -> dict:
    import torch

    from palign.llm.models import load_model

    torch.manual_seed(0)
    spec, tokenizer, data = load_data(Path(args.cache_dir), args.examples, args.max_length)
    batches = make_batches(name, data, tokenizer.pad_token_id, args)
    model = load_model(spec, args.cache_dir)
    step_seconds: list[float] = []  # wall time of each optimizer step, set-up excluded

    started = time.perf_counter()
    bf16 = name.endswith("_bf16")
    if name.startswith("hf_trainer"):
        from transformers import Trainer, TrainerCallback, TrainingArguments

        class FixedBatches(torch.utils.data.Dataset):
            def __len__(self):
                return len(batches)

            def __getitem__(self, i):
                return batches[i]

        class StepTimer(TrainerCallback):
            def on_step_begin(self, *_, **__):
                self.began = time.perf_counter()

            def on_step_end(self, *_, **__):
                step_seconds.append(time.perf_counter() - self.began)

        training_args = TrainingArguments(
            output_dir=str(Path(args.cache_dir) / "bench_trainer"),
            per_device_train_batch_size=1,
            max_steps=len(batches),
            learning_rate=5e-5,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, len(batches) // 10),
            weight_decay=0.0,
            max_grad_norm=1.0,
            bf16=bf16,
            logging_steps=1000,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        unbatch = lambda items: {k: v for k, v in items[0].items() if k != "real_tokens"}  # noqa: E731
        Trainer(
            model=model,
            args=training_args,
            train_dataset=FixedBatches(),
            data_collator=unbatch,
            callbacks=[StepTimer()],
        ).train()
    else:
        import pytorch_lightning as pl

        from palign.training.module import StudentSFTModule

        class StepTimer(pl.Callback):
            def on_train_batch_start(self, *_):
                self.began = time.perf_counter()

            def on_train_batch_end(self, *_):
                step_seconds.append(time.perf_counter() - self.began)

        module = StudentSFTModule.with_defaults(
            lambda: model
        )  # the schema's training defaults (the paper's lr, warmup, loss)
        precision = "bf16-mixed" if bf16 else "32-true"
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=len(batches),
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            gradient_clip_val=1.0,
            precision=precision,
            callbacks=[StepTimer()],
        )
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    total_seconds = time.perf_counter() - started
    if len(step_seconds) != len(batches):
        raise RuntimeError(f"{name}: timed {len(step_seconds)} steps of {len(batches)}")
    steady = batches[1:]
    return {
        "config": name,
        "steps": len(batches),
        "examples": len(data),
        "total_seconds": total_seconds,
        "steady_seconds": sum(step_seconds[1:]),
        "real_tokens": sum(real_tokens(b) for b in batches),
        "tokens_per_s": sum(real_tokens(b) for b in steady) / sum(step_seconds[1:]),
        "padding_fraction": 1 - sum(real_tokens(b) for b in batches) / sum(b["input_ids"].numel() for b in batches),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=48, help="first CHAMP solutions (over-length ones dropped)")
    parser.add_argument("--micro-batch", type=int, default=4, help="examples (packed: rows) per optimizer step")
    parser.add_argument("--max-length", type=int, default=1024, help="drop longer examples; packed row length")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--cache-dir", default=os.environ.get("PALIGN_CACHE", str(ROOT / "outputs" / "cache")))
    parser.add_argument("--only", choices=CONFIGS, help="run one configuration in this process and print JSON")
    args = parser.parse_args()
    if args.only:
        print("RESULT " + json.dumps(run_one(args.only, args)))
        return
    # the baselines always run: the fp32 Trainer, and the Trainer and plain Lightning at each precision used
    wanted = set(args.configs) | {"hf_trainer"}
    for name in list(wanted):
        if name.endswith("_bf16"):
            wanted |= {"hf_trainer_bf16", "lightning_bf16"}
        elif name != "hf_trainer":
            wanted.add("lightning")
    configs = [name for name in CONFIGS if name in wanted]
    results = {}
    for name in configs:
        cmd = [
            sys.executable,
            __file__,
            "--only",
            name,
            "--examples",
            str(args.examples),
            "--micro-batch",
            str(args.micro_batch),
            "--max-length",
            str(args.max_length),
            "--cache-dir",
            args.cache_dir,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((text for text in out.stdout.splitlines() if text.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
        results[name] = json.loads(line[len("RESULT ") :])
        print(f"done: {name} ({results[name]['total_seconds']:.0f} s)", file=sys.stderr)
    fp32_trainer = results["hf_trainer"]["tokens_per_s"]
    print(
        f"SFT throughput, SmolLM2-135M on CPU ({torch_threads()} threads), "
        f"one pass over {results['hf_trainer']['examples']} "
        f"CHAMP solutions ({results['hf_trainer']['real_tokens']} real tokens), micro-batch {args.micro_batch}, "
        f"max length {args.max_length}; load 1m {os.getloadavg()[0]:.2f}"
    )
    print(
        "| configuration | steps | steady s | tokens/s | padding | 1/(1-padding) | x Trainer | x lightning "
        "| x fp32 Trainer | peak RSS MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        suffix = "_bf16" if name.endswith("_bf16") else ""
        trainer = results[f"hf_trainer{suffix}"]["tokens_per_s"]
        plain = results.get(f"lightning{suffix}", results[f"hf_trainer{suffix}"])["tokens_per_s"]
        print(
            f"| {name} | {r['steps']} | {r['steady_seconds']:.1f} | {r['tokens_per_s']:.0f} "
            f"| {100 * r['padding_fraction']:.0f}% | {1 / (1 - r['padding_fraction']):.2f} "
            f"| {r['tokens_per_s'] / trainer:.2f} | {r['tokens_per_s'] / plain:.2f} "
            f"| {r['tokens_per_s'] / fp32_trainer:.2f} "
            f"| {r['peak_rss_mib']:.0f} |"
        )
    print(
        "(tokens/s: real tokens of steps 2..n over their wall time. x Trainer, x lightning: against the Trainer and "
        "the unpacked, ungrouped LightningModule at the same precision; the latter's 1/(1-padding) bounds what "
        "removing padding alone can gain)"
    )


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
