"""Fully sharded training of the student (`trainer=fsdp` on GPUs, `trainer=fsdp_sim` for 2 CPU
processes on gloo; their `strategy` node calls `make_fsdp_strategy`): the paper recipe's LoRA on a bf16 base.

What Lightning's plain `FSDPStrategy` lacks for this student, and this module adds:

- **Wrapping by decoder layer**, the class read from the model itself (`_no_split_modules` of the
  transformers model: `LlamaDecoderLayer`, `Qwen2DecoderLayer`, ...), so one config fits every
  student: a unit per decoder layer and the root (embeddings, final norm, head), nothing else, so
  one all-gather per layer and micro-batch (and, in full fine-tuning, one reduce-scatter).
- **The frozen base sharded in its own dtype, the adapters replicated**: where some parameters
  train and others are frozen (LoRA), the trainable ones are FSDP's `ignored_states`: they stay
  whole on every rank, outside every unit, in their own dtype (peft's fp32 on a bf16 base), so each
  unit holds frozen base parameters of one dtype only (FSDP1 flattens a unit into one tensor of one
  dtype: `Must flatten tensors with uniform dtype`) and its flat parameter needs no gradient: autograd
  computes none for the base, FSDP reduces nothing for it (torch/distributed/fsdp/_runtime_utils.py
  registers its post-backward reduction only for a flat parameter that requires grad, and only a
  reshard for a frozen one). Their gradients are averaged over the ranks once per optimizer step,
  after the step's last backward (accumulated micro-batches included) and before the
  `on_before_optimizer_step` hooks, clipping and the step: one all-reduce of all of them, each rank's
  divided by the world size as DDP does (`average_gradients`, from the precision plugin's
  `_after_closure`). Full fine-tuning (every parameter trains) keeps every parameter in the units;
  a base whose sharded parameters mix dtypes is stored in fp32 (the export casts it back).
- **Mixed precision that trains**: under bf16-mixed the units compute in bf16 and reduce any
  gradient of theirs in fp32 (Lightning's `bf16-mixed` for FSDP reduces in bf16), buffers left in
  their own dtype (RoPE's `inv_freq` stays fp32, as transformers keeps it). FSDP never casts the
  adapters: they are stored, graded and stepped in fp32 and compute as peft computes them beside a
  bf16 base layer outside FSDP (their input cast to fp32, the sum cast back to bf16), under the
  autocast Lightning's bf16-mixed adds on GPUs as under DDP.
- **Activation checkpointing** for `training.gradient_checkpointing`: FSDP's non-reentrant wrapper
  around each decoder layer, instead of transformers' own (which the module switched on; both would
  recompute every layer twice).
- **Gradient clipping by norm** (`trainer.gradient_clip_val`), which Lightning refuses under FSDP:
  FSDP's `clip_grad_norm_` on the root unit, a collective that counts the parameters outside its
  units once, as replicated (fully_sharded_data_parallel.py: "All-reducing the local non-sharded
  norm would count it an extra world-size-many times"), which they are once averaged.
- **Sharded checkpoints that resume and survive a kill**: `last.ckpt` is a link to a complete
  folder of shards (torch.distributed.checkpoint, one file per rank plus Lightning's `meta.pt`);
  a save writes a new folder and swaps the link (`os.replace`), so a kill mid-save leaves the
  previous checkpoint whole, as AtomicCheckpointIO does for single-file checkpoints. The base is
  stored sharded in bf16; the adapters and their optimizer state whole, once. Lightning's loader
  reads every optimizer state as chunked across the ranks, which the replicated adapters' are not:
  `load_replicated_optimizer_state` reads theirs again whole.
- **The export gathered on rank 0**: when training ends (every rank still in the process group,
  which the pipeline ends after fit), the full weights are gathered to rank 0's CPU and rank 0's
  module becomes a plain model again, in its loaded dtypes, so `StudentSFTModule.export_pretrained`
  merges LoRA and writes the same `from_pretrained` folder as after DDP.
- **CPU processes** (gloo): Lightning refuses the registered name `fsdp` off GPUs, but not a
  subclass of its strategy; torch's FSDP runs on CPU tensors with gloo given the device itself as
  `device_id` (Lightning passes its index, None on a CPU), which the tests use.
- **At least two processes**: with one, FSDP runs unsharded (NO_SHARD), and FSDP1 then skips
  resharding a frozen unit after the backward (`_catch_all_reshard` takes it for resharded: its
  flat parameter is its shard; pytorch#83956), leaving the base's parameters as plain tensors until
  the next forward, which fails on a tied weight. The Trainer refuses it when it is built.

Why this layout, against the two it replaces (N parameters, R ranks; LoRA r16 on all linear layers
of Qwen2.5-7B: 40.4M adapter parameters, 161 MB in fp32):

- a unit per adapter leaf (lora_A, lora_B) beside the layer units kept the base in bf16 but cost
  an all-gather and a reduce-scatter per adapter per micro-batch: ~390 latency-bound collectives of
  0.1-1.2 MB each on the 7B student (28 layers x 7 projections x lora_A, lora_B).
- layer units over every parameter stored in fp32 (frozen and trainable sharing a flat parameter
  under use_orig_params) made the base views of a flat parameter that requires grad: autograd
  computed the frozen weights' gradients (2 more FLOPs per base parameter and token, a fifth to a
  quarter more per step for a 7B student at 32k tokens), each layer kept a sharded fp32 gradient
  (3.3 GB per GPU on 8 GPUs) and reduce-scattered it whole in fp32, the sharded parameters took
  4N/R bytes instead of 2N/R (3.8 GB instead of 1.9 GB per GPU), every process held the student in
  fp32 before the wrap (30 GB of host memory instead of 15), and checkpoints held the base in fp32.
- replicated adapters cost, per rank, the adapters whole instead of sharded with their gradients
  and AdamW state: 4 x 161 MB = 0.65 GB on every GPU (81 MB sharded over 8), and one all-reduce of
  161 MB per optimizer step (not overlapped with the backward; a ring moves about 2 x 161 MB per
  rank, against the per-micro-batch adapter traffic of the per-adapter units). The base costs 2N/R
  bytes and no gradient.

Backward FLOPs measured with torch's FlopCounterMode on the tiny student (conf/student/tiny_random:
2 layers, hidden 64, SmolLM2's 49k vocabulary; bf16 base, LoRA r16 on all linear layers, a batch of
2 x 256 tokens, half supervised, the chunked loss; one process): the forward is 1719.7 MFLOP in
every layout; the backward is 3352.3 MFLOP with the adapters replicated, as with a unit per adapter
and as without FSDP, and 3439.3 MFLOP (+2.6%) with the fp32-cast layer units (3459.3 / 3546.3 with
activation checkpointing). The head dominates this student's step; over the decoder layers alone
(a loss on the last hidden states) the backward is 131.1 MFLOP replicated or per adapter against
218.1 fp32-cast (+66%; 238.0 against 325.1 with checkpointing, +37%). tests/training/test_fsdp.py holds the
wrapped student's backward FLOPs to the unwrapped one's.

FSDP2 (`fully_shard`, per-parameter sharding, frozen and trainable parameters of other dtypes in
one unit, no gradient for the frozen ones) would shard the adapters too, their gradients
reduce-scattered with each layer's every micro-batch; Lightning reaches it through
ModelParallelStrategy, which refuses a LightningModule that does not shard itself in
`configure_model` (palign/training/module.py loads and wraps its model in `__init__`) and saves
DTensor checkpoints of another layout. FSDP1 with ignored states keeps Lightning's FSDPStrategy, its
checkpoints and this module's kill-safety as they are, for 0.65 GB per GPU.

The base model is still loaded whole by every process before FSDP shards it (the module loads it
in `__init__`): host memory holds one copy per process until the wrap, GPU memory never does (each
unit is moved to the GPU and sharded in turn). Loading it on rank 0 only — the others on the meta
device, FSDP's `sync_module_states` broadcasting rank 0's weights unit by unit with a
`param_init_fn` materialising the empty ones — needs the module to build its model per rank;
`sync_module_states` is already on, so only the loading side would change (the adapters, outside
the units, are broadcast here on every device).
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.precision import FSDPPrecision
from pytorch_lightning.strategies import FSDPStrategy
from pytorch_lightning.utilities.rank_zero import rank_zero_info

log = logging.getLogger(__name__)

SHARDS_SUFFIX = ".shards-"  # `last.ckpt` -> `last.ckpt.shards-<id>/`, the folder it links to


def make_fsdp_strategy(precision: str, gradient_checkpointing: bool) -> StudentFSDPStrategy:
    """The strategy of conf/trainer/fsdp*.yaml's `strategy` node: mixed precision from
    `trainer.precision`, activation checkpointing from `training.gradient_checkpointing` (the
    decoder layer class is the model's, read at setup; which parameters are sharded and which
    replicated follows their `requires_grad`, so LoRA needs no setting of its own here)."""
    return StudentFSDPStrategy(
        activation_checkpointing=bool(gradient_checkpointing), mixed_precision=mixed_precision(precision)
    )


def mixed_precision(precision: str):
    """FSDP's mixed precision for a Lightning precision string; None keeps the parameters' dtype.

    bf16-mixed: the units' parameters cast to bf16 for the forward and backward (a no-op for a bf16
    base), gradients of trained unit parameters (full fine-tuning) reduced and stored in fp32,
    buffers untouched. The replicated adapters are outside every unit: FSDP never casts them.
    """
    from torch.distributed.fsdp import MixedPrecision

    compute = {"bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16, "16-mixed": torch.float16, "16": torch.float16}
    if precision not in compute:
        return None
    # cast_forward_inputs: every decoder layer's unit computes on inputs in the compute dtype,
    # whatever dtype the module before it returned
    return MixedPrecision(
        param_dtype=compute[precision], reduce_dtype=torch.float32, buffer_dtype=None, cast_forward_inputs=True
    )


def decoder_layer_classes(model: torch.nn.Module) -> tuple[type[torch.nn.Module], ...]:
    """The classes of the model's decoder layers, as transformers names them (`_no_split_modules`)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    classes = tuple({type(m) for m in model.modules() if type(m).__name__ in names})
    if not classes:
        raise ValueError(
            f"trainer.strategy=fsdp wraps the student by decoder layer, but {type(model).__name__} names none "
            f"(transformers' `_no_split_modules`: {sorted(names) or 'unset'}); use trainer=ddp for this model"
        )
    return classes


def wrap_policy(layer_classes: tuple[type[torch.nn.Module], ...]):
    """FSDP's auto-wrap policy: a unit per decoder layer (the root unit takes the rest)."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return ModuleWrapPolicy(set(layer_classes))


def replicated_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters kept whole on every rank, outside FSDP's units: the trainable ones where
    others are frozen (LoRA's adapters on a frozen base), none where every parameter trains (full
    fine-tuning) or none does. In `named_parameters` order, the same on every rank."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    return trainable if 0 < len(trainable) < len(params) else []


def uniform_dtype(model: torch.nn.Module, exclude: list[torch.nn.Parameter] = ()) -> dict[str, torch.dtype]:
    """Cast the sharded parameters (all but `exclude`) to fp32 where their dtypes mix, so each
    decoder layer flattens into one FSDP unit (`Must flatten tensors with uniform dtype`); the same
    Parameter objects (tied weights stay tied). A base loaded in one dtype is left as it is. Returns
    every parameter's dtype from before, for the export."""
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    excluded = {id(p) for p in exclude}
    sharded = [p for p in model.parameters() if id(p) not in excluded]
    if len({p.dtype for p in sharded}) > 1:
        for param in sharded:
            param.data = param.data.float()
    return dtypes


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Make each parameter's gradient the mean over the ranks of theirs, as DDP does (each rank's
    divided by the world size, then summed: torch/distributed/algorithms/ddp_comm_hooks/
    default_hooks.py: allreduce_hook), in one all-reduce per dtype (one for LoRA's fp32 adapters). A
    rank without a gradient for a parameter adds zeros, as DDP does for an unused parameter."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    if not params or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for dtype in sorted({p.dtype for p in params}, key=str):
        group = [p for p in params if p.dtype == dtype]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group]
        flat = _flatten_dense_tensors(grads).div_(world)
        dist.all_reduce(flat)
        for param, mean in zip(group, _unflatten_dense_tensors(flat, grads)):
            if param.grad is None:
                param.grad = mean
            else:
                param.grad.copy_(mean)


class ShardedClipPrecision(FSDPPrecision):
    """FSDP's precision plugin that averages the replicated parameters' gradients over the ranks
    once per optimizer step and can clip by norm (through the root unit); the strategy sets both."""

    root: torch.nn.Module | None = None
    replicated: tuple[torch.nn.Parameter, ...] | list[torch.nn.Parameter] = ()

    def _after_closure(self, model, optimizer) -> None:
        # after the last backward of the step (accumulated micro-batches included: Lightning calls
        # this once per optimizer step, plugins/precision/precision.py: _wrap_closure), before the
        # `on_before_optimizer_step` hooks, the clipping and the step, which all see the mean
        average_gradients(self.replicated)
        super()._after_closure(model, optimizer)

    def clip_grad_by_norm(self, optimizer, clip_val: float | int) -> None:
        if self.root is None:
            raise RuntimeError("gradient clipping under FSDP before the model was wrapped")
        # FSDP's norm counts the parameters outside its units once, as replicated (their gradients
        # are the same on every rank by now)
        self.root.clip_grad_norm_(clip_val)


class StudentFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP, set up for the student (see the module docstring): the wrap and checkpoint
    policies resolved from the model at setup, frozen parameters sharded in their own dtype and
    trainable ones beside a frozen base replicated, fp32-reduced mixed precision, sharded atomic
    checkpoints, the full weights gathered to rank 0 when training ends."""

    def __init__(self, *, activation_checkpointing: bool, mixed_precision=None, **kwargs: Any):
        super().__init__(
            mixed_precision=mixed_precision,
            state_dict_type="sharded",
            sharding_strategy="FULL_SHARD",
            use_orig_params=True,
            **kwargs,
        )
        self.activation_checkpointing = activation_checkpointing
        self.loaded_dtypes: dict[str, torch.dtype] = {}  # each parameter's dtype before the wrap, for the export
        self.replicated: list[torch.nn.Parameter] = []  # outside FSDP's units (LoRA's adapters)

    # Lightning sets FSDPPrecision(trainer.precision) here; keep its precision, add the replicated
    # parameters' gradient averaging and clipping by norm
    @property
    def precision_plugin(self) -> FSDPPrecision:
        return FSDPStrategy.precision_plugin.fget(self)

    @precision_plugin.setter
    def precision_plugin(self, plugin) -> None:
        if plugin is not None and type(plugin) is FSDPPrecision:
            plugin = ShardedClipPrecision(plugin.precision, plugin.scaler)
        FSDPStrategy.precision_plugin.fset(self, plugin)

    def _configure_launcher(self) -> None:
        # Lightning calls this when the Trainer is built, with the devices and nodes known, so the
        # refusal comes before any process starts (and preflight reports it)
        super()._configure_launcher()
        if self.world_size == 1:
            raise ValueError(
                "trainer=fsdp with a single process (trainer.devices x trainer.num_nodes = 1): FSDP shards nothing "
                "there (it runs NO_SHARD), and torch's FSDP1 then leaves the frozen base's units unresharded after a "
                "backward (torch/distributed/fsdp/_runtime_utils.py: _catch_all_reshard, pytorch#83956), which breaks "
                "the next step; use trainer=gpu (or trainer=cpu) for one device"
            )

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from lightning_fabric.strategies.fsdp import (
            _activation_checkpointing_kwargs,
            _move_torchmetrics_to_device,
            _setup_activation_checkpointing,
        )
        from torch.distributed.fsdp import FullyShardedDataParallel

        layers = decoder_layer_classes(model)
        self.kwargs["auto_wrap_policy"] = wrap_policy(layers)
        self.replicated = replicated_parameters(model)
        self.loaded_dtypes = uniform_dtype(model, exclude=self.replicated)
        if self.activation_checkpointing:
            self._activation_checkpointing_kwargs = _activation_checkpointing_kwargs(None, set(layers))
            for module in model.modules():  # transformers' own checkpointing would recompute each layer again
                if getattr(module, "is_gradient_checkpointing", False):
                    module.gradient_checkpointing_disable()
        rank_zero_info(
            f"FSDP: a unit per {', '.join(c.__name__ for c in layers)}; "
            f"{sum(p.numel() for p in self.replicated):,} trainable parameters replicated outside the units; "
            f"activation checkpointing {'on' if self.activation_checkpointing else 'off'}; "
            f"mixed precision {self.mixed_precision}"
        )
        # FSDP moves and broadcasts only the parameters of its units
        for param in self.replicated:
            param.data = param.data.to(self.root_device)
        # every rank starts from rank 0's weights (as DDP does): FSDP broadcasts its units' unit by
        # unit on GPUs, and refuses to on CPUs, where they are broadcast here before the wrap
        self.kwargs["sync_module_states"] = self.root_device.type != "cpu"
        unsynced = self.replicated if self.kwargs["sync_module_states"] else [*model.parameters(), *model.buffers()]
        for tensor in unsynced:
            torch.distributed.broadcast(tensor.data, src=0)
        # Lightning's wrap, but with the device itself as `device_id`: its index (None on a CPU)
        # makes torch look for an accelerator and refuse the CPU
        wrapped = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device,
            ignored_states=self.replicated or None,
            **self.kwargs,
        )
        _move_torchmetrics_to_device(wrapped, self.root_device)
        _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)  # inside the units
        plugin = self.precision_plugin
        if isinstance(plugin, ShardedClipPrecision):
            plugin.root = wrapped
            plugin.replicated = self.replicated
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

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's sharded load, then the replicated parameters' optimizer state read whole."""
        from pytorch_lightning.trainer.states import TrainerFn

        metadata = super().load_checkpoint(checkpoint_path, weights_only)
        path = Path(self.broadcast(os.fspath(checkpoint_path)))
        if self.replicated and path.is_dir() and self.lightning_module.trainer.state.fn == TrainerFn.FITTING:
            load_replicated_optimizer_state(self.model, self.optimizers, self.replicated, path)
        return metadata

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


def load_replicated_optimizer_state(
    root: torch.nn.Module, optimizers, replicated: list[torch.nn.Parameter], folder: Path
) -> None:
    """Read the optimizer state of the parameters outside FSDP's units whole, on every rank.

    Lightning reads a sharded checkpoint's optimizer state with
    torch/distributed/checkpoint/optimizer.py: `load_sharded_optimizer_state_dict`, which makes
    every non-scalar state tensor a ShardedTensor chunked across the ranks (it knows only FSDP's
    parameters), and `FSDP.optim_state_dict_to_load` hands a parameter FSDP does not manage its state
    as it is (_optim_utils.py: "do not flatten non-FSDP parameters' states"): AdamW's step then
    fails on a ShardedTensor `exp_avg`. The checkpoint holds those states whole (FSDP saves them as
    plain tensors), so each is read again into a plain tensor of its own and replaces the chunked one.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.fsdp._common_utils import clean_tensor_name

    fqns = {id(p): clean_tensor_name(name) for name, p in root.named_parameters()}  # FSDP's optimizer state keys
    for index, optimizer in enumerate(optimizers):
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer
        chunked = {
            (param, key): value
            for param in replicated
            for key, value in optimizer.state.get(param, {}).items()
            if isinstance(value, ShardedTensor)
        }
        if not chunked:
            continue
        whole: dict[str, dict[str, torch.Tensor]] = {}
        for (param, key), value in chunked.items():
            whole.setdefault(fqns[id(param)], {})[key] = torch.empty(
                value.size(), dtype=value.dtype, device=param.device
            )
        dcp.load({f"optimizer_{index}": {"state": whole}}, checkpoint_id=folder)
        for param, key in chunked:
            optimizer.state[param][key] = whole[fqns[id(param)]][key]


def gather_full_state_dict(root: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict, on rank 0's CPU (on the other ranks only the replicated
    parameters, which FSDP leaves in every rank's state dict), in the wrapped parameters' dtype;
    keys without FSDP's or the checkpoint wrapper's prefixes."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # on CPUs, "offloading" would keep views of the unsharded buffers FSDP frees afterwards (a
    # segfault on access); without it, FSDP clones them
    on_cpu = next(root.parameters()).device.type == "cpu"
    config = FullStateDictConfig(offload_to_cpu=not on_cpu, rank0_only=True)
    with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, config):
        state = root.state_dict()
    # FSDP neither gathers nor offloads the parameters outside its units: they are the live ones,
    # on the GPU there
    return {name: tensor.detach().cpu() for name, tensor in state.items()}


WRAPPER_ATTRIBUTES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def unwrap_with_state(
    module: torch.nn.Module, state: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype] | None = None
) -> None:
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
