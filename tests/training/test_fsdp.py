"""Fully sharded training (palign/training/fsdp.py).

Claims tested: the strategy built from the config wraps a unit per decoder layer (the model's own
class) and nothing else, LoRA or not: fp32 adapters on a bf16 base cannot share a layer's unit as
they are (a layer-only policy fails), so the strategy leaves them outside the units, whole and fp32
(FSDP's ignored parameters), and shards the frozen base in bf16 with no gradient: no base parameter
or flat parameter gets one, and the backward costs the FLOPs of the unwrapped LoRA model (the layout
it replaces, every parameter cast to fp32, costs more); without LoRA every parameter is sharded and
trains. It checkpoints activations per decoder layer for training.gradient_checkpointing (and turns
transformers' own off); bf16-mixed computes the base in bf16; the full weights gathered on rank 0
make a plain model again, in the dtypes it was loaded in; a single process is refused when the
Trainer is built. End to end with 2 CPU processes on gloo (`trainer=fsdp_sim`, fp32: bf16 runs on
the GPU check): a LoRA job wraps decoder layers + root on every rank with only the adapters outside,
averages the adapters' gradients over the ranks once per step (each rank's own from different data,
after 2 accumulated micro-batches: their mean, equal on both ranks), trains, checkpoints as a link
to a folder of shards, exports a `from_pretrained` folder with LoRA merged equal to a DDP job's, and
a job killed mid-epoch and rerun resumes from the shards (the adapters' optimizer state included)
and ends where the uninterrupted one does.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from palign.training.fsdp import StudentFSDPStrategy, decoder_layer_classes, gather_full_state_dict, unwrap_with_state
from palign.training.module import StudentSFTModule
from tests.conftest import PROJECT_ROOT, compose_config, run_cli, run_cli_killed

LOSS = {"loss_kernel": "chunked", "loss_chunk_tokens": 16}
LORA = {"r": 4, "alpha": 4, "dropout": 0.0}


# -- the strategy from the config -----------------------------------------------------------------
def test_the_gpu_config_builds_bf16_compute_with_fp32_reduction_and_activation_checkpointing(tmp_path):
    strategy = instantiate(compose_config(["trainer=fsdp", "training=paper"], tmp_path).trainer.strategy)
    assert isinstance(strategy, StudentFSDPStrategy)
    assert strategy.activation_checkpointing
    mp = strategy.mixed_precision
    assert (mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype) == (torch.bfloat16, torch.float32, None)
    assert strategy._state_dict_type == "sharded" and strategy.kwargs["use_orig_params"]


def test_the_cpu_config_keeps_fp32_and_follows_the_training_config(tmp_path):
    cfg = compose_config(["trainer=fsdp_sim", "training.gradient_checkpointing=false"], tmp_path)
    strategy = instantiate(cfg.trainer.strategy)
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.devices == 2
    assert not strategy.activation_checkpointing and strategy.mixed_precision is None


def test_the_decoder_layer_class_is_the_models_own(tiny_model):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    assert decoder_layer_classes(tiny_model) == (LlamaDecoderLayer,)
    with pytest.raises(ValueError, match=r"names none .* use trainer=ddp"):
        decoder_layer_classes(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# -- wrapping a bf16 base with fp32 adapters (one process, gloo) ----------------------------------
@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _bf16_lora_module(tiny_model, gradient_checkpointing: bool) -> StudentSFTModule:
    module = StudentSFTModule.with_defaults(
        lambda: copy.deepcopy(tiny_model).to(torch.bfloat16),
        lora=LORA,
        gradient_checkpointing=gradient_checkpointing,
        **LOSS,
    )
    dtypes = {p.dtype for n, p in module.named_parameters() if "lora_" in n}
    assert dtypes == {torch.float32}  # peft keeps the adapters in fp32 on a bf16 base
    return module


def _wrap(module, tmp_path, *overrides: str) -> tuple[StudentFSDPStrategy, torch.nn.Module]:
    cfg = compose_config(["trainer=fsdp", "training=paper", *overrides], tmp_path)
    strategy = instantiate(cfg.trainer.strategy)
    strategy.parallel_devices = [torch.device("cpu")]
    return strategy, strategy._setup_model(module)


def test_a_layer_only_policy_cannot_flatten_fp32_adapters_on_a_bf16_base(tiny_model, one_process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    module = _bf16_lora_module(tiny_model, gradient_checkpointing=False)
    with pytest.raises(ValueError, match="uniform dtype"):
        FullyShardedDataParallel(
            module,
            auto_wrap_policy=ModuleWrapPolicy(set(decoder_layer_classes(module))),
            device_id=torch.device("cpu"),
            use_orig_params=True,
        )


def _lora_params(module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if "lora_" in n}


def _batch(length: int = 12):
    torch.manual_seed(1)
    ids = torch.randint(0, 100, (2, length))
    labels = ids.clone()
    labels[:, : length // 3] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _step(wrapped, module, batch):
    from pytorch_lightning.strategies.strategy import _ForwardRedirection

    return _ForwardRedirection()(wrapped, module, "_step", batch)[0]


def test_the_frozen_bf16_base_is_sharded_by_decoder_layer_and_the_fp32_adapters_replicated(
    tiny_model, one_process_group, tmp_path
):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FullyShardedDataParallel
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    module = _bf16_lora_module(tiny_model, gradient_checkpointing=True)
    adapters = _lora_params(module)
    strategy, wrapped = _wrap(module, tmp_path)
    units = FullyShardedDataParallel.fsdp_modules(wrapped)
    assert len(units) == 2 + 1  # a unit per decoder layer and the root: no unit per adapter
    layers = [u._fsdp_wrapped_module for u in units[1:]]
    assert all(
        isinstance(u, CheckpointWrapper) and isinstance(u._checkpoint_wrapped_module, LlamaDecoderLayer) for u in layers
    )
    assert not any(getattr(m, "is_gradient_checkpointing", False) for m in module.modules())  # FSDP's, not both
    for unit in units:  # the base alone, in its own dtype, frozen: its flat parameters need no gradient
        assert unit._flat_param.dtype == torch.bfloat16 and not unit._flat_param.requires_grad
    # the adapters are outside every unit (FSDP's ignored parameters), whole and fp32
    assert (
        {id(p) for p in wrapped._ignored_params}
        == {id(p) for p in adapters.values()}
        == {id(p) for p in strategy.replicated}
    )
    flat = {id(p) for u in units for p in u._flat_param._params}
    assert not flat & {id(p) for p in adapters.values()}
    assert all(p.dtype == torch.float32 for p in adapters.values())

    computed = {}  # the dtypes a base projection and an adapter hold and compute in
    q_proj = module.model.base_model.model.model.layers[0].self_attn.q_proj
    for name, part in (("base", q_proj.base_layer), ("adapter", q_proj.lora_A["default"])):
        part.register_forward_hook(lambda m, args, out, name=name: computed.update({name: (m.weight.dtype, out.dtype)}))
    loss = _step(wrapped, module, _batch())
    loss.backward()
    assert torch.isfinite(loss)
    assert computed == {"base": (torch.bfloat16, torch.bfloat16), "adapter": (torch.float32, torch.float32)}
    assert all(u._flat_param.grad is None for u in units)  # no gradient for the base, sharded or not
    with_grad = [p for p in module.parameters() if p.grad is not None]  # the wrapped module's own parameters
    assert {id(p) for p in with_grad} == {id(p) for p in adapters.values()}
    assert all(p.grad.dtype == torch.float32 for p in with_grad)


def _backward_flops(wrapped, module, batch) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    loss = _step(wrapped, module, batch) if wrapped is not module else module._step(batch)[0]
    counter = FlopCounterMode(display=False)
    with counter:
        loss.backward()
    return counter.get_total_flops()


def test_the_wrapped_student_computes_no_more_backward_flops_than_without_fsdp(tiny_model, one_process_group, tmp_path):
    """No gradient is computed for the frozen base: the backward costs what peft's LoRA costs
    unwrapped (the layout this replaced, every parameter in fp32 in one flat parameter per layer,
    computed the base's weight gradients too: more FLOPs, which this comparison sees)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from palign.training.fsdp import mixed_precision, wrap_policy

    batch = _batch(length=96)
    plain = _bf16_lora_module(tiny_model, gradient_checkpointing=False)
    unwrapped = _backward_flops(plain, plain, batch)

    module = _bf16_lora_module(tiny_model, gradient_checkpointing=False)
    _, wrapped = _wrap(module, tmp_path, "training.gradient_checkpointing=false")
    assert _backward_flops(wrapped, module, batch) == unwrapped

    module = _bf16_lora_module(tiny_model, gradient_checkpointing=False)
    for param in module.parameters():  # the fp32-cast layer units
        param.data = param.data.float()
    fp32_cast = FullyShardedDataParallel(
        module,
        auto_wrap_policy=wrap_policy(decoder_layer_classes(module)),
        mixed_precision=mixed_precision("bf16-mixed"),
        device_id=torch.device("cpu"),
        use_orig_params=True,
    )
    assert _backward_flops(fp32_cast, module, batch) > unwrapped


def test_without_lora_every_parameter_is_sharded_and_trains(tiny_model, one_process_group, tmp_path):
    from torch.distributed.fsdp import FullyShardedDataParallel

    module = StudentSFTModule.with_defaults(
        lambda: copy.deepcopy(tiny_model), lora=None, gradient_checkpointing=False, **LOSS
    )
    strategy, wrapped = _wrap(module, tmp_path)
    units = FullyShardedDataParallel.fsdp_modules(wrapped)
    assert len(units) == 2 + 1 and not strategy.replicated and not wrapped._ignored_params
    assert all(u._flat_param.requires_grad for u in units)
    _step(wrapped, module, _batch()).backward()
    assert all(u._flat_param.grad is not None for u in units)  # FSDP's sharded gradients, every parameter's


def test_a_single_process_is_refused_when_the_trainer_is_built(tmp_path):
    import pytorch_lightning as pl

    strategy = instantiate(compose_config(["trainer=fsdp_sim"], tmp_path).trainer.strategy)
    with pytest.raises(ValueError, match=r"single process .* use trainer=gpu"):
        pl.Trainer(strategy=strategy, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)


def test_the_gathered_full_state_makes_a_plain_model_again(tiny_model, smollm2_tokenizer, one_process_group, tmp_path):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FullyShardedDataParallel

    module = _bf16_lora_module(tiny_model, gradient_checkpointing=True)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    strategy, wrapped = _wrap(module, tmp_path)
    unwrap_with_state(module, gather_full_state_dict(wrapped), strategy.loaded_dtypes)  # rank 0's at the end
    assert not any(isinstance(m, (FullyShardedDataParallel, CheckpointWrapper)) for m in module.modules())
    after = dict(module.named_parameters())
    assert after.keys() == before.keys()
    for n in before:  # the loaded dtypes again (bf16 base, fp32 adapters), the same values
        assert after[n].dtype == before[n].dtype and torch.equal(after[n], before[n]), n
    assert after["model.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"].dtype == torch.bfloat16
    module.export_pretrained(tmp_path / "student", smollm2_tokenizer)  # LoRA merged into the bf16 base
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "student" / "model.safetensors")
    assert (
        not any("lora" in k for k in exported)
        and exported["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    )


# -- 2 CPU processes, end to end -------------------------------------------------------------------
RUN = [
    "experiment=tiny",
    "baseline=sft_long_cot",
    "logger=none",
    "stage=train",
    "training=paper",
    "training.gradient_checkpointing=false",
    "training.effective_batch_size=4",
    "data.micro_batch_size=1",
    "training.epochs=2",
    "trainer.precision=32-true",
]  # 2 ranks x 2 accumulated micro-batches per step
TESTS_ON_PATH = {"PYTHONPATH": str(PROJECT_ROOT)}


def _run_dir(root: Path) -> Path:
    (run_dir,) = [p for p in (root / "runs").iterdir() if p.is_dir()]
    return run_dir


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "student" / "model.safetensors")


@pytest.mark.slow
def test_an_fsdp_job_trains_like_ddp_checkpoints_shards_and_resumes_after_a_kill(tmp_path):
    from transformers import AutoModelForCausalLM

    probe = tmp_path / "probe"
    run_cli(
        [
            *RUN,
            "trainer=fsdp_sim",
            "+callbacks.units._target_=tests.helpers.rank_probes.RecordFSDPUnits",
            f"+callbacks.units.folder={probe}",
            "+callbacks.grads._target_=tests.helpers.rank_probes.RecordStepGradients",
            f"+callbacks.grads.folder={probe}",
        ],
        tmp_path / "fsdp",
        env=TESTS_ON_PATH,
    )
    fsdp = _run_dir(tmp_path / "fsdp")
    train = json.loads((fsdp / "summary.json").read_text())["train"]
    assert train["world_size"] == 2 and train["global_step"] == 6
    for rank in (0, 1):  # LoRA on: a unit per decoder layer and the root, nothing per adapter
        units = json.loads((probe / f"fsdp_rank{rank}.json").read_text())
        assert units["decoder_layers"] == 2 and units["units"] == units["decoder_layers"] + 1, units
        # the frozen base alone in the units, the adapters (every trainable parameter) outside them
        assert not units["flat_requires_grad"] and units["flat_dtypes"] == ["torch.float32"], units
        assert units["outside_units"] == units["trainable"] and all("lora_" in n for n in units["trainable"]), units

    # the first step's adapter gradients: each rank's own (different data) averaged over the ranks
    # once per step, after the accumulated micro-batches, as DDP averages them
    grads = [torch.load(probe / f"grads_rank{rank}.pt") for rank in (0, 1)]
    assert [g["backward_passes"] for g in grads] == [2, 2]  # effective batch 4 = 2 ranks x 2 micro-batches
    local0, local1 = grads[0]["local"], grads[1]["local"]
    assert local0.keys() == local1.keys() == grads[0]["stepped"].keys() and local0
    assert any(not torch.equal(local0[n], local1[n]) for n in local0)
    for name in local0:
        assert torch.equal(grads[0]["stepped"][name], grads[1]["stepped"][name]), name  # replicas stay equal
        torch.testing.assert_close(
            grads[0]["stepped"][name], (local0[name] + local1[name]) / 2, rtol=1e-6, atol=0, msg=name
        )

    last = fsdp / "checkpoints" / "last.ckpt"  # a link to a complete folder of shards, one per rank
    assert last.is_symlink() and (last / "meta.pt").is_file() and len(list(last.glob("*.distcp"))) == 2
    assert [p.name for p in last.parent.iterdir() if p.name.startswith("last.ckpt.shards-")] == [last.resolve().name]

    student = fsdp / "student"  # a plain model, LoRA merged
    model = AutoModelForCausalLM.from_pretrained(student)
    assert not any("lora" in n for n, _ in model.named_parameters())
    run_cli([*RUN, "trainer=ddp_sim"], tmp_path / "ddp")
    want, got = _weights(_run_dir(tmp_path / "ddp")), _weights(fsdp)
    assert want.keys() == got.keys()
    base = _weights_of_untrained(tmp_path)
    assert any(not torch.equal(got[k], base[k]) for k in got)  # LoRA trained and merged in
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-5, msg=k)

    crashed = tmp_path / "crashed"
    kill = [
        "+callbacks.crash._target_=tests.helpers.crash.KillAt",
        "+callbacks.crash.hook=on_train_batch_start",
        "+callbacks.crash.step=4",
        "+callbacks.crash.whole_job=true",
    ]  # mid epoch 2, after shards were saved
    run_cli_killed([*RUN, "trainer=fsdp_sim", *kill], crashed, TESTS_ON_PATH)
    run_cli([*RUN, "trainer=fsdp_sim"], crashed)
    resumed = json.loads((_run_dir(crashed) / "summary.json").read_text())["train"]
    assert resumed["resumed_from"] is not None
    for key in ("global_step", "loss_curve", "tokens_seen"):
        assert resumed[key] == train[key], key
    again = _weights(_run_dir(crashed))
    assert all(torch.equal(again[k], got[k]) for k in got)


def _weights_of_untrained(tmp_path: Path) -> dict[str, torch.Tensor]:
    from tests.conftest import stage_cache

    (folder,) = (stage_cache(tmp_path / "fsdp") / "models").glob("tiny_random*")
    from safetensors.torch import load_file

    return load_file(next(folder.rglob("model.safetensors")))
