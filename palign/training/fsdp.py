"""Fully sharded training of the student (`trainer=fsdp` on GPUs, `trainer=fsdp_sim` for 2 CPU
processes on gloo; their `strategy` node calls `make_fsdp_strategy`): the paper recipe's LoRA on a bf16 base.

What Lightning's plain `FSDPStrategy` lacks for this student, and this module adds:

- **Wrapping by decoder layer**, the class read from the model itself (`_no_split_modules` of the
  transformers model: `LlamaDecoderLayer`, `Qwen2DecoderLayer`, ...), so one config fits every
  student: a unit per decoder layer and the root (embeddings, final norm, head), nothing else, so
  one all-gather and one reduce-scatter per layer and micro-batch.
- **One dtype per unit**: FSDP flattens each unit's parameters into one tensor of one dtype
  (`Must flatten tensors with uniform dtype`), and peft keeps the adapters in fp32 on a bf16 base.
  Where the student's parameters mix dtypes, every parameter is cast to fp32 before the wrap, the
  frozen base included (`use_orig_params=True` lets frozen and trainable parameters share a flat
  parameter). Compute follows `trainer.precision` (bf16 under bf16-mixed, fp32 under 32-true);
  the export casts every parameter back to the dtype it was loaded in (see "The trade-off" below).
- **Mixed precision that trains**: compute in bf16, gradients reduced and kept in fp32 (Lightning's
  `bf16-mixed` for FSDP reduces in bf16), buffers left in their own dtype (RoPE's `inv_freq`
  stays fp32, as transformers keeps it).
- **Activation checkpointing** for `training.gradient_checkpointing`: FSDP's non-reentrant wrapper
  around each decoder layer, instead of transformers' own (which the module switched on; both would
  recompute every layer twice).
- **Gradient clipping by norm** (`trainer.gradient_clip_val`), which Lightning refuses under FSDP:
  the norm of sharded gradients is FSDP's `clip_grad_norm_` on the root unit, a collective (over
  the trainable parameters' gradients only: a frozen one's is None).
- **Sharded checkpoints that resume and survive a kill**: `last.ckpt` is a link to a complete
  folder of shards (torch.distributed.checkpoint, one file per rank plus Lightning's `meta.pt`);
  a save writes a new folder and swaps the link (`os.replace`), so a kill mid-save leaves the
  previous checkpoint whole, as AtomicCheckpointIO does for single-file checkpoints.
- **The export gathered on rank 0**: when training ends (every rank still in the process group,
  which the pipeline ends after fit), the full weights are gathered to rank 0's CPU and rank 0's
  module becomes a plain model again, in its loaded dtypes, so `StudentSFTModule.export_pretrained`
  merges LoRA and writes the same `from_pretrained` folder as after DDP.
- **CPU processes** (gloo): Lightning refuses the registered name `fsdp` off GPUs, but not a
  subclass of its strategy; torch's FSDP runs on CPU tensors with gloo given the device itself as
  `device_id` (Lightning passes its index, None on a CPU), which the tests use.

The trade-off of layer units over a bf16 base with fp32 adapters (N parameters, R ranks). The
alternative, a unit per adapter leaf, keeps the base in bf16 but costs an all-gather and a
reduce-scatter per adapter per micro-batch (~390 small units on a 7B student), latency-bound.
Layer units instead cost:

- memory per rank: the sharded parameters take 4N/R bytes instead of 2N/R (fp32 base), and, since
  a flat parameter that holds a trainable adapter has a gradient over all of it, every decoder
  layer's sharded fp32 gradient (4 bytes per layer parameter / R) lives from the backward to the
  optimizer step (torch warns about exactly this for units mixing frozen and trainable parameters;
  the root unit, all frozen, has none). Qwen2.5-7B on 8 GPUs: about 3.8 GB of parameters and 3.3 GB
  of gradients per GPU instead of 1.9 GB and the adapters'. The adapters' AdamW state is as before
  (trainable parameters only), and so is the transient memory: one layer unsharded in bf16 at a time.
- compute and traffic: autograd computes the frozen base weights' gradients too (they are views of
  a flat parameter that requires grad): 2 more FLOPs per base parameter and token, on top of the 4
  (6 with activation checkpointing) LoRA needs in the linear layers: a fifth to a quarter more per
  step for a 7B student at 32k tokens, attention counted; and each layer's reduce-scatter carries
  its whole gradient in fp32 instead of the adapters'. FSDP2 (`fully_shard`: per-parameter
  sharding, which allows frozen parameters of another dtype in a unit and computes no gradient for
  them) would avoid both; Lightning's FSDPStrategy is FSDP1.
- host memory: every process holds the whole student before the wrap (see below), in fp32 after
  the cast: 4N bytes per process (30 GB for a 7B student) instead of 2N.
- checkpoints: the sharded checkpoint holds the base in fp32, twice its bf16 size.

The base model is still loaded whole by every process before FSDP shards it (the module loads it
in `__init__`): host memory holds one copy per process until the wrap, GPU memory never does (each
unit is moved to the GPU and sharded in turn). Loading it on rank 0 only — the others on the meta
device, FSDP's `sync_module_states` broadcasting rank 0's weights unit by unit with a
`param_init_fn` materialising the empty ones — needs the module to build its model per rank;
`sync_module_states` is already on, so only the loading side would change.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.precision import FSDPPrecision
from pytorch_lightning.strategies import FSDPStrategy
from pytorch_lightning.utilities.rank_zero import rank_zero_info

log = logging.getLogger(__name__)

SHARDS_SUFFIX = ".shards-"  # `last.ckpt` -> `last.ckpt.shards-<id>/`, the folder it links to


def make_fsdp_strategy(precision: str, gradient_checkpointing: bool, lora: Any) -> "StudentFSDPStrategy":
    """The strategy of conf/trainer/fsdp*.yaml's `strategy` node: mixed precision from
    `trainer.precision`, activation checkpointing from `training.gradient_checkpointing` (the
    decoder layer class is the model's, read at setup). `lora` (`training.lora`) no longer changes
    the wrap, which follows the parameters' dtypes: the node still passes it."""
    return StudentFSDPStrategy(activation_checkpointing=bool(gradient_checkpointing),
                               mixed_precision=mixed_precision(precision))


def mixed_precision(precision: str):
    """FSDP's mixed precision for a Lightning precision string; None keeps the parameters' dtype.

    bf16-mixed: parameters cast to bf16 for the forward and backward, gradients reduced and stored
    in fp32 (the parameters' own dtype under FSDP: the LoRA weights' optimizer sees fp32 gradients),
    buffers untouched.
    """
    from torch.distributed.fsdp import MixedPrecision

    compute = {"bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16, "16-mixed": torch.float16, "16": torch.float16}
    if precision not in compute:
        return None
    # cast_forward_inputs: every decoder layer's unit computes on inputs in the compute dtype,
    # whatever dtype the module before it returned
    return MixedPrecision(param_dtype=compute[precision], reduce_dtype=torch.float32, buffer_dtype=None,
                          cast_forward_inputs=True)


def decoder_layer_classes(model: torch.nn.Module) -> tuple[type[torch.nn.Module], ...]:
    """The classes of the model's decoder layers, as transformers names them (`_no_split_modules`)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    classes = tuple({type(m) for m in model.modules() if type(m).__name__ in names})
    if not classes:
        raise ValueError(
            f"trainer.strategy=fsdp wraps the student by decoder layer, but {type(model).__name__} names none "
            f"(transformers' `_no_split_modules`: {sorted(names) or 'unset'}); use trainer=ddp for this model")
    return classes


def wrap_policy(layer_classes: tuple[type[torch.nn.Module], ...]):
    """FSDP's auto-wrap policy: a unit per decoder layer (the root unit takes the rest)."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return ModuleWrapPolicy(set(layer_classes))


def uniform_dtype(model: torch.nn.Module) -> dict[str, torch.dtype]:
    """Cast every parameter to fp32 where the model's parameters mix dtypes (LoRA's fp32 adapters
    on a bf16 base), so each decoder layer flattens into one FSDP unit; the same Parameter objects
    (tied weights stay tied). Returns every parameter's dtype from before, for the export."""
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    if len(set(dtypes.values())) > 1:
        for param in model.parameters():
            param.data = param.data.float()
    return dtypes


class ShardedClipPrecision(FSDPPrecision):
    """FSDP's precision plugin that can clip by norm: through the root unit the strategy sets."""

    root: torch.nn.Module | None = None

    def clip_grad_by_norm(self, optimizer, clip_val: float | int) -> None:
        if self.root is None:
            raise RuntimeError("gradient clipping under FSDP before the model was wrapped")
        self.root.clip_grad_norm_(clip_val)


class StudentFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP, set up for the student (see the module docstring): the wrap and checkpoint
    policies resolved from the model at setup, fp32-reduced mixed precision, sharded atomic
    checkpoints, the full weights gathered to rank 0 when training ends."""

    def __init__(self, *, activation_checkpointing: bool, mixed_precision=None, **kwargs: Any):
        super().__init__(mixed_precision=mixed_precision, state_dict_type="sharded", sharding_strategy="FULL_SHARD",
                         use_orig_params=True, **kwargs)
        self.activation_checkpointing = activation_checkpointing
        self.loaded_dtypes: dict[str, torch.dtype] = {}  # each parameter's dtype before the wrap, for the export

    # Lightning sets FSDPPrecision(trainer.precision) here; keep its precision, add clipping by norm
    @property
    def precision_plugin(self) -> FSDPPrecision:
        return FSDPStrategy.precision_plugin.fget(self)

    @precision_plugin.setter
    def precision_plugin(self, plugin) -> None:
        if plugin is not None and type(plugin) is FSDPPrecision:
            plugin = ShardedClipPrecision(plugin.precision, plugin.scaler)
        FSDPStrategy.precision_plugin.fset(self, plugin)

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from lightning_fabric.strategies.fsdp import (
            _activation_checkpointing_kwargs,
            _move_torchmetrics_to_device,
            _setup_activation_checkpointing,
        )
        from torch.distributed.fsdp import FullyShardedDataParallel

        layers = decoder_layer_classes(model)
        self.kwargs["auto_wrap_policy"] = wrap_policy(layers)
        self.loaded_dtypes = uniform_dtype(model)
        mixed_dtypes = len(set(self.loaded_dtypes.values())) > 1
        if self.activation_checkpointing:
            self._activation_checkpointing_kwargs = _activation_checkpointing_kwargs(None, set(layers))
            for module in model.modules():  # transformers' own checkpointing would recompute each layer again
                if getattr(module, "is_gradient_checkpointing", False):
                    module.gradient_checkpointing_disable()
        rank_zero_info(f"FSDP: a unit per {', '.join(c.__name__ for c in layers)}"
                       f"{' (parameters of mixed dtypes stored in fp32)' if mixed_dtypes else ''}; activation "
                       f"checkpointing {'on' if self.activation_checkpointing else 'off'}; mixed precision {self.mixed_precision}")
        # every rank starts from rank 0's weights (as DDP does): FSDP broadcasts them unit by unit
        # on GPUs, and refuses to on CPUs, where they are broadcast here before the wrap
        self.kwargs["sync_module_states"] = self.root_device.type != "cpu"
        if not self.kwargs["sync_module_states"]:
            for tensor in [*model.parameters(), *model.buffers()]:
                torch.distributed.broadcast(tensor.data, src=0)
        # Lightning's wrap, but with the device itself as `device_id`: its index (None on a CPU)
        # makes torch look for an accelerator and refuse the CPU
        with warnings.catch_warnings():
            # torch warns for every unit holding frozen and trainable parameters: the gradient memory
            # of the module docstring's trade-off, taken knowingly
            warnings.filterwarnings("ignore", message=".*has both parameters with requires_grad=True and False")
            wrapped = FullyShardedDataParallel(
                module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy, device_id=self.root_device, **self.kwargs)
        _move_torchmetrics_to_device(wrapped, self.root_device)
        _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)  # inside the units
        plugin = self.precision_plugin
        if isinstance(plugin, ShardedClipPrecision):
            plugin.root = wrapped
        return wrapped

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        """Shards into a new folder next to `filepath`, then `filepath` (a link) swapped onto it."""
        link = Path(self.broadcast(os.fspath(filepath)))
        folder = link.with_name(link.name + SHARDS_SUFFIX + self.broadcast(uuid.uuid4().hex[:12]))
        super().save_checkpoint(checkpoint, folder, storage_options)
        self.barrier("shards written")
        if self.is_global_zero:
            swap_link(link, folder)
        self.barrier("checkpoint linked")

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            link = Path(filepath)
            target = link.resolve() if link.is_symlink() else None
            link.unlink(missing_ok=True)
            if target is not None:
                shutil.rmtree(target, ignore_errors=True)

    # -- the export -----------------------------------------------------------------------------
    def on_train_end(self) -> None:
        """Gather the full weights to rank 0 (a collective: every rank, while the group lives) and
        make rank 0's module a plain, unwrapped model holding them."""
        super().on_train_end()
        state = gather_full_state_dict(self.model)
        if self.is_global_zero:
            unwrap_with_state(self.lightning_module, state, self.loaded_dtypes)


def swap_link(link: Path, folder: Path) -> None:
    """Point `link` at `folder` atomically, then delete every other shard folder of `link`."""
    staged = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}")
    os.symlink(folder.name, staged)  # relative: the run folder can move
    if link.is_dir() and not link.is_symlink():  # a folder of an older layout
        shutil.rmtree(link)
    os.replace(staged, link)
    for old in link.parent.glob(link.name + SHARDS_SUFFIX + "*"):
        if old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)


def gather_full_state_dict(root: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict, on rank 0's CPU (empty on the other ranks), in the wrapped
    parameters' dtype; keys without FSDP's or the checkpoint wrapper's prefixes."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # on CPUs, "offloading" would keep views of the unsharded buffers FSDP frees afterwards (a
    # segfault on access); without it, FSDP clones them
    on_cpu = next(root.parameters()).device.type == "cpu"
    config = FullStateDictConfig(offload_to_cpu=not on_cpu, rank0_only=True)
    with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, config):
        return root.state_dict()


WRAPPER_ATTRIBUTES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def unwrap_with_state(module: torch.nn.Module, state: dict[str, torch.Tensor],
                      dtypes: dict[str, torch.dtype] | None = None) -> None:
    """Replace every FSDP and checkpoint wrapper inside `module` by the module it wraps, and give
    each parameter its full tensor from `state` (the same Parameter objects: tied weights stay tied),
    cast to its dtype in `dtypes` (the dtypes it was loaded in) where given."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            inner = child
            while any(hasattr(inner, attr) for attr in WRAPPER_ATTRIBUTES):
                inner = next(getattr(inner, attr) for attr in WRAPPER_ATTRIBUTES if hasattr(inner, attr))
            if inner is not child:
                setattr(parent, name, inner)
    missing = []
    for name, param in module.named_parameters():
        if name not in state:
            missing.append(name)
            continue
        param.data = state[name].to((dtypes or {}).get(name, state[name].dtype))
    if missing:
        raise RuntimeError(f"the gathered FSDP state dict lacks {len(missing)} parameters, e.g. {missing[:3]}")
    for name, buffer in module.named_buffers():
        if name in state:
            buffer.data = state[name].to(buffer.dtype)
