"""The SFT cross-entropy over the supervised positions, with memory flat in the vocabulary (method
step 4, PAPER.md §2.3; issue 12, "Loss memory flat in the vocabulary").

Applying the LM head to every supervised position at once materialises fp32 logits of N x V
(and, in the backward, their gradient and the log-softmax output beside them: about 12 bytes per
token and vocabulary entry, 59 GB for 32k supervised tokens and Qwen2.5's 152k vocabulary). Both
kernels here keep the logits of one chunk of rows alive at a time instead:

  chunked   the head and the fp32 cross-entropy over `chunk_tokens` rows at a time, each chunk under
            `torch.utils.checkpoint`: the forward keeps no logits, and the backward recomputes one
            chunk's logits, back-propagates through them and frees them before the next chunk.
  liger     Liger-Kernel's fused linear cross-entropy (CUDA, Triton): it computes the gradients
            chunk by chunk in the forward and keeps those instead of the logits; it picks its own
            chunk size from V and H, so `chunk_tokens` does not apply to it.

Why checkpointing rather than a hand-written autograd.Function with the gradients computed in the
forward (Liger's approach, redone in PyTorch): the checkpointed chunk is the full-logits code on
fewer rows, so autograd derives every gradient (hidden states, head weight and bias, LoRA adapters
upstream, a tied embedding) under whatever autocast Lightning set, and the loss cannot drift from
the plain cross-entropy; a hand-written backward would re-derive softmax-minus-one-hot, its dtype
casts and the frozen-head cases, and keep the weight's gradient alive from the forward to the
backward. The price is one more head matmul per chunk in the backward (the recomputation): a
third more head FLOPs with a trained head, half more with a frozen one (LoRA), so up to ~10% of a
step for SmolLM2-135M (whose head is about a fifth of its FLOPs) and a few percent for a 7B student
with a 152k vocabulary; and a trained head's weight gradient briefly exists twice while autograd
adds one chunk's into the sum (V x H, 2.2 GB in fp32 for Qwen2.5-7B, against the 59 GB of logits
saved). On a GPU, `auto` takes Liger where it is installed, which recomputes nothing and
accumulates in place. experiments/bench/loss_memory.py measures both against the full logits.

Logits are fp32 for the softmax whatever the hidden states' dtype, as with full logits (`liger`:
the matmul in the input's dtype, the softmax in fp32 inside the kernel).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSS_KERNELS = ("auto", "chunked", "liger")


@functools.cache
def liger_fused_linear_cross_entropy() -> Callable | None:
    """Liger's functional fused linear cross-entropy, or None when liger_kernel is not importable."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as fused
    except ImportError:
        return None
    return fused


@functools.cache
def _liger_returns_accuracy() -> bool:
    # liger-kernel >= 0.6.4 counts correct argmax predictions inside the kernel; older ones do not
    return "return_token_accuracy" in inspect.signature(liger_fused_linear_cross_entropy()).parameters


def resolve_loss_kernel(name: str, device: torch.device | None) -> str:
    """The kernel `training.loss_kernel=name` means on `device`: "chunked" or "liger".

    `device` None (the model is not on its device yet) checks the name and Liger's installation only.
    """
    if name not in LOSS_KERNELS:
        raise ValueError(f"training.loss_kernel={name!r} is not one of {', '.join(LOSS_KERNELS)}")
    if name == "chunked":
        return name
    installed = liger_fused_linear_cross_entropy() is not None
    on_cuda = device is not None and device.type == "cuda"
    if name == "liger":
        if not installed:
            raise ValueError(
                "training.loss_kernel=liger needs the liger_kernel package, which is not importable "
                "here: `pip install liger-kernel` (CUDA only), or set training.loss_kernel=chunked "
                "(or auto: Liger where installed and on a GPU)"
            )
        if device is not None and not on_cuda:
            raise ValueError(
                f"training.loss_kernel=liger runs on CUDA only, and the student is on {device}: "
                "set training.loss_kernel=chunked (or auto: Liger where installed and on a GPU)"
            )
        return name
    return "liger" if installed and on_cuda else "chunked"


def supervised_cross_entropy(
    hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, *, kernel: str, chunk_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the NLL of `targets` [N] under `head(hidden)` (hidden states [N, H] of the supervised
    positions), and the count of positions whose argmax is the target; `kernel` as resolved by
    `resolve_loss_kernel`. Only one chunk's logits exist at a time, in the forward and the backward."""
    if kernel not in ("chunked", "liger"):
        raise ValueError(f"unknown loss kernel {kernel!r}: resolve training.loss_kernel with resolve_loss_kernel")
    if kernel == "liger" and len(targets):  # no supervised token: the chunked path's one empty chunk does
        return _liger_cross_entropy(hidden, head, targets, chunk_tokens)
    needs_graph = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    nll, correct = [], []
    for rows, chunk_targets in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens)):
        if needs_graph:
            # non-reentrant checkpointing stops recomputing once the loss's saved tensors are back,
            # so the argmax below is not redone in the backward
            chunk_nll, chunk_correct = checkpoint(
                _chunk_cross_entropy, rows, head, chunk_targets, use_reentrant=False, preserve_rng_state=False
            )
        else:
            chunk_nll, chunk_correct = _chunk_cross_entropy(rows, head, chunk_targets)
        nll.append(chunk_nll)
        correct.append(chunk_correct)
    return torch.stack(nll).sum(), torch.stack(correct).sum()


def _chunk_cross_entropy(rows: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor):
    logits = head(rows).float()
    nll = F.cross_entropy(logits, targets, reduction="sum")
    with torch.no_grad():
        correct = (logits.argmax(-1) == targets).sum()
    return nll, correct


def _liger_cross_entropy(hidden, head, targets, chunk_tokens):
    fused = liger_fused_linear_cross_entropy()
    if _liger_returns_accuracy():
        out = fused(hidden, head.weight, targets, bias=head.bias, reduction="sum", return_token_accuracy=True)
        return out.loss, out.token_accuracy * len(targets)  # the kernel's accuracy is the mean over the rows
    nll = fused(hidden, head.weight, targets, bias=head.bias, reduction="sum")
    with torch.no_grad():  # an older Liger: one more head matmul per chunk for the accuracy, no graph
        correct = sum(
            (head(rows).argmax(-1) == chunk_targets).sum()
            for rows, chunk_targets in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens))
        )
    return nll, correct
