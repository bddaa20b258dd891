"""The chunked SFT cross-entropy (palign/training/loss.py): the loss, accuracy and gradients of the
full-logits cross-entropy, with one chunk's logits alive at a time; Liger's kernel where it runs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from palign.data.sft import IGNORE_INDEX, SFTCollator
from palign.training.loss import liger_fused_linear_cross_entropy, resolve_loss_kernel, supervised_cross_entropy
from palign.training.module import StudentSFTModule

# 8 + 7 + 2 = 17 supervised (shifted) targets: chunks of 4 leave a remainder of 1
EXAMPLES = [
    {"input_ids": list(range(100, 112)), "labels": [IGNORE_INDEX] * 4 + list(range(104, 112))},
    {"input_ids": list(range(200, 209)), "labels": [IGNORE_INDEX] * 2 + list(range(202, 209))},
    {"input_ids": [300, 301, 302, 303, 304], "labels": [IGNORE_INDEX] * 3 + [303, 304]},
]
N_SUPERVISED = 17
LIGER_ON_CUDA = liger_fused_linear_cross_entropy() is not None and torch.cuda.is_available()


def _module(tiny_model, chunk_tokens: int, bias: bool = False, lora: bool = False, kernel: str = "chunked"):
    def load():
        model = copy.deepcopy(tiny_model)
        if bias:  # an untied head with a bias (Qwen2's has none; the kernel must not assume so)
            torch.manual_seed(1)
            old = model.get_output_embeddings()
            model.lm_head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
            model.config.tie_word_embeddings = False
        return model

    module = StudentSFTModule.with_defaults(
        load,
        lora={"r": 4, "alpha": 8, "dropout": 0.0} if lora else None,
        loss_kernel=kernel,
        loss_chunk_tokens=chunk_tokens,
    )
    if lora:  # B starts at zero, which would leave A's gradient zero: give the adapters a real effect
        torch.manual_seed(2)
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0.0, 0.05)
    assert module._output_head() is not None  # the selective-head path, the one that is chunked
    return module


def _full_logits_step(module: StudentSFTModule, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss before chunking: the head on every supervised position at once, fp32 cross-entropy."""
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    decoder = module.model.get_decoder()
    hidden = decoder(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    logits = module.model.get_output_embeddings()(hidden[:, :-1, :][mask])
    n = int(mask.sum())
    loss = F.cross_entropy(logits.float(), targets[mask], reduction="sum") / n
    return loss, (logits.argmax(-1) == targets[mask]).sum() / n


def _backward(module, loss, accuracy) -> tuple[float, float, dict[str, torch.Tensor]]:
    loss.backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    return float(loss.detach()), float(accuracy), grads


@pytest.mark.parametrize("chunk_tokens", [1, 4, N_SUPERVISED, 64])
@pytest.mark.parametrize("head", ["tied", "bias", "lora"])
def test_chunked_loss_and_gradients_equal_the_full_logits_cross_entropy(tiny_model, chunk_tokens, head):
    batch = SFTCollator(0)(EXAMPLES)
    chunked = _module(tiny_model, chunk_tokens, bias=head == "bias", lora=head == "lora")
    full = copy.deepcopy(chunked)
    step_loss, step_accuracy, n_tokens = chunked._step(batch)
    assert n_tokens == N_SUPERVISED
    loss, accuracy, grads = _backward(chunked, step_loss, step_accuracy)
    expected_loss, expected_accuracy, expected = _backward(full, *_full_logits_step(full, batch))
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert accuracy == expected_accuracy
    assert set(grads) == set(expected)
    if head == "lora":
        assert grads and all("lora_" in name for name in grads)  # the frozen head gets no gradient
    if head == "bias":
        assert "model.lm_head.bias" in grads
    for name, grad in expected.items():  # fp32 sums in another order: equal to 1e-5 of the gradient's scale
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()), msg=name)


def test_low_precision_hidden_states_get_fp32_logits_and_the_accuracy_counts_argmax_hits():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, dtype=torch.bfloat16)
    hidden = torch.randn(13, 16, dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():
        targets = torch.randint(50, (13,))
        targets[::2] = head(hidden[::2]).argmax(-1)  # 7 of the 13 predicted right, at least
        logits = head(hidden)
        expected_correct = int((logits.argmax(-1) == targets).sum())
    assert expected_correct >= 7
    nll, correct = supervised_cross_entropy(hidden, head, targets, kernel="chunked", chunk_tokens=5)
    assert nll.dtype == torch.float32
    assert float(nll.detach()) == pytest.approx(
        float(F.cross_entropy(logits.float(), targets, reduction="sum")), rel=1e-6
    )
    assert int(correct) == expected_correct

    # no supervised token in the batch: a zero loss that still back-propagates
    empty_nll, empty_correct = supervised_cross_entropy(hidden[:0], head, targets[:0], kernel="chunked", chunk_tokens=5)
    empty_nll.backward()
    assert float(empty_nll) == 0.0 and int(empty_correct) == 0
    assert hidden.grad is not None and not hidden.grad.any()


class VocabWideAllocations(TorchDispatchMode):
    """Every new tensor an op allocates whose last dimension is the vocabulary (logits, their
    log-softmax, their gradients), forward and backward: the most rows one had, and the most bytes
    such tensors held at once (measured after each op; freed storages drop out)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.max_rows, self.peak_bytes = vocab, 0, 0
        self._alive: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self._alive = {ptr: entry for ptr, entry in self._alive.items() if not entry[0].expired()}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and tensor.shape[-1] == self.vocab:
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in inputs:  # views and in-place results allocate nothing
                    self.max_rows = max(self.max_rows, tensor.shape[0])
                    self._alive[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        self.peak_bytes = max(self.peak_bytes, sum(nbytes for _, nbytes in self._alive.values()))
        return out


def test_only_one_chunk_of_logits_exists_at_a_time_in_the_forward_and_the_backward(tiny_model):
    batch = SFTCollator(0)(EXAMPLES)
    chunk = 3
    module = _module(tiny_model, chunk)
    vocab = module.model.get_output_embeddings().out_features
    fp32_chunk_logits = chunk * vocab * 4

    full = VocabWideAllocations(vocab)
    with full:  # the tracker sees the full-logits loss for what it is
        _full_logits_step(module, batch)[0].backward()
    assert full.max_rows == N_SUPERVISED
    assert full.peak_bytes >= 2 * N_SUPERVISED * vocab * 4

    module.zero_grad()
    chunked = VocabWideAllocations(vocab)
    with chunked:
        module._step(batch)[0].backward()
    assert chunked.max_rows == chunk
    # logits, log-softmax and their gradients of one chunk, never several chunks' (nor N rows')
    assert chunked.peak_bytes <= 4 * fp32_chunk_logits < full.peak_bytes


def test_auto_is_the_chunked_kernel_off_cuda_and_unknown_kernels_are_refused():
    assert resolve_loss_kernel("auto", torch.device("cpu")) == "chunked"
    assert resolve_loss_kernel("chunked", torch.device("cpu")) == "chunked"
    with pytest.raises(ValueError, match=r"training\.loss_kernel='fused' is not one of auto, chunked, liger"):
        resolve_loss_kernel("fused", None)


def test_liger_off_cuda_or_uninstalled_is_an_error_naming_the_setting(tiny_model):
    # where Liger is installed, the CPU is what is refused; where it is not, the installation
    with pytest.raises(ValueError, match=r"training\.loss_kernel=liger .*training\.loss_kernel=chunked"):
        resolve_loss_kernel("liger", torch.device("cpu"))
    if liger_fused_linear_cross_entropy() is not None:
        return
    loaded = []
    with pytest.raises(ValueError, match=r"training\.loss_kernel=liger needs the liger_kernel package"):
        StudentSFTModule.with_defaults(lambda: loaded.append(1), loss_kernel="liger", loss_chunk_tokens=4096)
    assert not loaded  # refused before the student loads


@pytest.mark.skipif(
    not LIGER_ON_CUDA, reason="Liger's fused linear cross-entropy needs the liger_kernel package and a CUDA device"
)
@pytest.mark.parametrize("head", ["tied", "bias", "lora"])
def test_liger_kernel_gives_the_chunked_loss_accuracy_and_gradients(tiny_model, head):
    batch = {k: v.cuda() for k, v in SFTCollator(0)(EXAMPLES).items()}
    chunked = _module(tiny_model, 4, bias=head == "bias", lora=head == "lora").cuda()
    liger = copy.deepcopy(chunked)
    liger.hparams.loss_kernel = "liger"
    loss, accuracy, grads = _backward(chunked, *chunked._step(batch)[:2])
    liger_loss, liger_accuracy, liger_grads = _backward(liger, *liger._step(batch)[:2])
    assert liger._loss_kernel == "liger"
    assert liger_loss == pytest.approx(loss, rel=1e-4)
    assert liger_accuracy == pytest.approx(accuracy)
    assert set(liger_grads) == set(grads)
    for name, grad in grads.items():
        assert torch.allclose(liger_grads[name], grad, rtol=1e-3, atol=1e-5), name
