"""Benchmark: peak memory and time of the SFT cross-entropy, full logits vs chunked (vs Liger).

One LM head (a random nn.Linear, hidden size --hidden, no bias; trained, so that its weight gets a
gradient, or with --frozen-head frozen as under LoRA) over --tokens supervised positions, forward
and backward, for each vocabulary size in --vocabs:

  full      today's loss before issue 12: the head on every position at once,
            `cross_entropy(logits.float(), targets, reduction="sum")`
  chunked   palign.training.loss (training.loss_kernel=chunked), --chunk-tokens rows at a time
  liger     Liger-Kernel's fused linear cross-entropy (training.loss_kernel=liger), where the
            liger_kernel package is installed and the device is CUDA

Peak memory is what the loss allocates on top of its inputs (hidden states, head weight and
targets), gradients included: on CUDA `torch.cuda.max_memory_allocated`; on the CPU a dispatch mode
that tracks every storage an op allocates and sums the live ones after each op (freed storages drop
out; a kernel's internal scratch is not seen). Time is the best of --repeats untracked forward +
backward passes after one warm-up. Ratios are against `full` at the same vocabulary, in the same run.

    python -m experiments.bench.loss_memory                                  # CPU: 1024 tokens, 32k-152k vocab
    python -m experiments.bench.loss_memory --device cuda --tokens 32768 --hidden 3584 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

KERNELS = ("full", "chunked", "liger")


def live_bytes_mode():
    """A TorchDispatchMode whose `peak` is the most bytes of storages allocated under it that were
    alive at once, measured after each op."""
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LiveBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.peak = 0
            self._alive: dict[int, tuple[StorageWeakRef, int]] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {
                t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
            }
            self._alive = {ptr: entry for ptr, entry in self._alive.items() if not entry[0].expired()}
            for tensor in tree_leaves(out):
                if isinstance(tensor, torch.Tensor):
                    storage = tensor.untyped_storage()
                    if storage.data_ptr() not in inputs and storage.nbytes():  # views and in-place ops allocate nothing
                        self._alive[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
            self.peak = max(self.peak, sum(nbytes for _, nbytes in self._alive.values()))
            return out

    return LiveBytes()


def loss_fn(kernel: str, chunk_tokens: int):
    import torch.nn.functional as F

    from palign.training.loss import supervised_cross_entropy

    if kernel == "full":
        return lambda hidden, head, targets: F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    return lambda hidden, head, targets: supervised_cross_entropy(
        hidden, head, targets, kernel=kernel, chunk_tokens=chunk_tokens
    )[0]


def measure(kernel: str, vocab: int, args) -> dict:
    import torch

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    head = torch.nn.Linear(args.hidden, vocab, bias=False, device=device, dtype=dtype).requires_grad_(
        not args.frozen_head
    )
    hidden = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    targets = torch.randint(vocab, (args.tokens,), device=device)
    loss = loss_fn(kernel, args.chunk_tokens)

    def step() -> float:
        hidden.grad = head.weight.grad = None
        value = loss(hidden, head, targets)
        value.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(value.detach())

    if device.type == "cuda":  # the warm-up is the measured pass
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        value = step()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        tracker = live_bytes_mode()
        with tracker:
            value = step()
        peak = tracker.peak
    seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
    return {"kernel": kernel, "vocab": vocab, "loss": value, "peak_mib": peak / 2**20, "seconds": min(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="supervised positions")
    parser.add_argument("--hidden", type=int, default=576, help="hidden size (SmolLM2-135M: 576; Qwen2.5-7B: 3584)")
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32768, 65536, 151936], help="vocabulary sizes")
    parser.add_argument("--chunk-tokens", type=int, default=256, help="rows per chunk of the chunked kernel")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="hidden states and head")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--frozen-head", action="store_true", help="no gradient for the head weight (LoRA's case)")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes after the warm-up (best reported)")
    parser.add_argument(
        "--kernels",
        nargs="+",
        choices=KERNELS,
        default=list(KERNELS),
        help="liger is skipped, with a note, where it cannot run; full always runs (the baseline)",
    )
    args = parser.parse_args()

    import torch

    from palign.training.loss import liger_fused_linear_cross_entropy

    kernels = ["full", *(k for k in args.kernels if k != "full")]
    if "liger" in kernels and (liger_fused_linear_cross_entropy() is None or args.device != "cuda"):
        kernels.remove("liger")
        print("liger skipped: it needs the liger_kernel package and --device cuda", file=sys.stderr)
    rows = []
    for vocab in args.vocabs:
        for kernel in kernels:
            rows.append(measure(kernel, vocab, args))
            print(f"done: {kernel} at vocab {vocab} ({rows[-1]['seconds']:.2f} s)", file=sys.stderr)
    where = f"CPU ({torch.get_num_threads()} threads)" if args.device == "cpu" else torch.cuda.get_device_name()
    print(
        f"SFT cross-entropy, forward + backward, on {where}: {args.tokens} supervised tokens, hidden {args.hidden}, "
        f"{args.dtype}, {'frozen' if args.frozen_head else 'trained'} head, chunks of {args.chunk_tokens}; "
        f"load 1m {os.getloadavg()[0]:.2f}"
    )
    print("| vocab | kernel | peak MiB | x full | fwd+bwd s | x full | loss / full |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        full = next(f for f in rows if f["vocab"] == r["vocab"] and f["kernel"] == "full")
        print(
            f"| {r['vocab']} | {r['kernel']} | {r['peak_mib']:.0f} | {r['peak_mib'] / full['peak_mib']:.3f} "
            f"| {r['seconds']:.2f} | {r['seconds'] / full['seconds']:.2f} | {r['loss'] / full['loss']:.7f} |"
        )
    print(
        "(peak: bytes the loss allocates beyond its inputs, the gradients of the hidden states and of a trained "
        "head's weight (vocab x hidden, in every kernel) included; x full: against the full-logits loss at the "
        "same vocabulary)"
    )


if __name__ == "__main__":
    main()
