"""Benchmark: SFT throughput of palign's LightningModule vs `transformers.Trainer`, and packing.

Same model (SmolLM2-135M-Instruct, fp32 on CPU), same data (CHAMP GPT-4 solutions tokenized by
palign's SFT formatting, response-only labels), same micro-batch size and optimizer steps. Each
configuration runs in its own subprocess so that its peak RSS is its own; the table reports
supervised-or-not real tokens per second (padding excluded), the padding fraction, and the ratio
of tokens/s against the `transformers.Trainer` baseline measured in the same invocation.

    python experiments/bench/sft.py                 # 3 optimizer steps per configuration
    python experiments/bench/sft.py --steps 10 --examples 64 --micro-batch 4
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

CONFIGS = ("hf_trainer", "lightning", "lightning_grouped", "lightning_packed")


def load_data(cache_dir: Path, examples: int, max_length: int):
    from omegaconf import OmegaConf

    from palign.data.sft import SupervisedExample, build_tokenized_split
    from palign.data.teachers import ChampTeacher
    from palign.llm.models import load_tokenizer

    import datasets

    spec = OmegaConf.load(ROOT / "conf" / "student" / "smollm2_135m.yaml")
    prompts = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "prompts" / "paper.yaml"))
    tokenizer = load_tokenizer(spec, cache_dir)
    records = ChampTeacher().load().records[:examples]
    split = build_tokenized_split([SupervisedExample(r.id, r.question, r.long_cot) for r in records], tokenizer,
                                  prompts, max_length, cache_dir, "bench")
    data = datasets.load_from_disk(str(split.path)).with_format(None, columns=["input_ids", "labels"])
    return spec, tokenizer, data


def run_one(name: str, args) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from palign.data.datamodule import PackedRows
    from palign.data.sampling import ResumableShuffleSampler, pack_examples
    from palign.data.sft import PackedSFTCollator, SFTCollator
    from palign.llm.models import load_model

    torch.manual_seed(0)
    spec, tokenizer, data = load_data(Path(args.cache_dir), args.examples, args.max_length)
    lengths = [len(x) for x in data["input_ids"]]
    pad = tokenizer.pad_token_id
    if name == "lightning_packed":
        rows = PackedRows(data, pack_examples(lengths, args.max_length, seed=0))
        loader = DataLoader(rows, batch_size=args.micro_batch, sampler=ResumableShuffleSampler(len(rows), seed=0),
                            collate_fn=PackedSFTCollator(pad))
    else:
        group = args.micro_batch * 16 if name == "lightning_grouped" else 0
        sampler = ResumableShuffleSampler(len(data), seed=0, lengths=lengths, batch_size=args.micro_batch, group_size=group)
        loader = DataLoader(data, batch_size=args.micro_batch, sampler=sampler, collate_fn=SFTCollator(pad))
    batches = [batch for _, batch in zip(range(args.steps), loader)]
    real = sum(int((b["real_tokens"] if "real_tokens" in b else b["attention_mask"]).sum()) for b in batches)
    total = sum(b["input_ids"].numel() for b in batches)
    model = load_model(spec, args.cache_dir)

    started = time.perf_counter()
    if name == "hf_trainer":
        from transformers import Trainer, TrainingArguments

        class FixedBatches(torch.utils.data.Dataset):
            def __len__(self):
                return len(batches)

            def __getitem__(self, i):
                return batches[i]

        training_args = TrainingArguments(
            output_dir=str(Path(args.cache_dir) / "bench_trainer"), per_device_train_batch_size=1, max_steps=len(batches),
            learning_rate=5e-5, lr_scheduler_type="cosine", warmup_steps=max(1, len(batches) // 10), weight_decay=0.0,
            logging_steps=1000,
            save_strategy="no", report_to=[], use_cpu=True, remove_unused_columns=False, dataloader_num_workers=0,
            disable_tqdm=True,
        )
        unbatch = lambda items: {k: v for k, v in items[0].items() if k != "real_tokens"}  # noqa: E731
        Trainer(model=model, args=training_args, train_dataset=FixedBatches(), data_collator=unbatch).train()
    else:
        import pytorch_lightning as pl

        from palign.training.module import StudentSFTModule

        module = StudentSFTModule(model_loader=lambda: model, learning_rate=5e-5, warmup_ratio=0.1)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=len(batches), logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    seconds = time.perf_counter() - started
    return {
        "config": name,
        "steps": len(batches),
        "seconds": seconds,
        "real_tokens": real,
        "tokens_per_s": real / seconds,
        "padding_fraction": 1 - real / total,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=768)
    parser.add_argument("--cache-dir", default=os.environ.get("PALIGN_CACHE", str(ROOT / "outputs" / "cache")))
    parser.add_argument("--only", choices=CONFIGS, help="run one configuration in this process and print JSON")
    args = parser.parse_args()
    if args.only:
        print("RESULT " + json.dumps(run_one(args.only, args)))
        return
    results = []
    for name in CONFIGS:
        cmd = [sys.executable, __file__, "--only", name, "--steps", str(args.steps), "--examples", str(args.examples),
               "--micro-batch", str(args.micro_batch), "--max-length", str(args.max_length), "--cache-dir", args.cache_dir]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(line[len("RESULT "):]))
        print(f"done: {name}", file=sys.stderr)
    base = results[0]["tokens_per_s"]
    print(f"SFT throughput, SmolLM2-135M fp32 on CPU, micro-batch {args.micro_batch}, {args.steps} optimizer steps, "
          f"max length {args.max_length} (load 1m: {os.getloadavg()[0]:.2f})")
    print("| configuration | steps | seconds | real tokens | tokens/s | padding | x Trainer | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['config']} | {r['steps']} | {r['seconds']:.1f} | {r['real_tokens']} | {r['tokens_per_s']:.0f} | "
              f"{100 * r['padding_fraction']:.0f}% | {r['tokens_per_s'] / base:.2f} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
