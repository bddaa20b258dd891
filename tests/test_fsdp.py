"""Fully sharded training (palign/training/fsdp.py).

Claims tested: the strategy built from the config wraps a unit per decoder layer (the model's own
class) and nothing else, LoRA or not: fp32 adapters on a bf16 base cannot share a layer's unit as
they are (a layer-only policy fails), so the strategy stores every parameter in fp32 and computes in
bf16; it checkpoints activations per decoder layer for training.gradient_checkpointing (and turns
transformers' own off); bf16-mixed computes in bf16 and reduces in fp32, and only the adapters get
gradients; the full weights gathered on rank 0 make a plain model again, in the dtypes it was loaded
in. End to end with 2 CPU processes on gloo (`trainer=fsdp_sim`, fp32: bf16 runs on the GPU check):
a LoRA job wraps decoder layers + root on every rank, trains, checkpoints as a link to a folder of
shards, exports a `from_pretrained` folder with LoRA merged equal to a DDP job's, and a job killed
mid-epoch and rerun resumes from the shards and ends where the uninterrupted one does.
"""

from __future__ import annotations

import copy
import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import PROJECT_ROOT, cli_command, cli_env, compose_config, run_cli
from hydra.utils import instantiate

from palign.training.fsdp import StudentFSDPStrategy, decoder_layer_classes, gather_full_state_dict, unwrap_with_state
from palign.training.module import StudentSFTModule

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
    with pytest.raises(ValueError, match="names none .* use trainer=ddp"):
        decoder_layer_classes(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# -- wrapping a bf16 base with fp32 adapters (one process, gloo) ----------------------------------
@pytest.fixture
def one_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _bf16_lora_module(tiny_model, gradient_checkpointing: bool) -> StudentSFTModule:
    module = StudentSFTModule.with_defaults(lambda: copy.deepcopy(tiny_model).to(torch.bfloat16), lora=LORA,
                                            gradient_checkpointing=gradient_checkpointing, **LOSS)
    dtypes = {p.dtype for n, p in module.named_parameters() if "lora_" in n}
    assert dtypes == {torch.float32}  # peft keeps the adapters in fp32 on a bf16 base
    return module


def _wrap(module, tmp_path) -> tuple[StudentFSDPStrategy, torch.nn.Module]:
    cfg = compose_config(["trainer=fsdp", "training=paper"], tmp_path)
    strategy = instantiate(cfg.trainer.strategy)
    strategy.parallel_devices = [torch.device("cpu")]
    return strategy, strategy._setup_model(module)


def test_a_layer_only_policy_cannot_flatten_fp32_adapters_on_a_bf16_base(tiny_model, one_process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    module = _bf16_lora_module(tiny_model, gradient_checkpointing=False)
    with pytest.raises(ValueError, match="uniform dtype"):
        FullyShardedDataParallel(module, auto_wrap_policy=ModuleWrapPolicy(set(decoder_layer_classes(module))),
                                 device_id=torch.device("cpu"), use_orig_params=True)


def test_the_strategy_wraps_decoder_layers_only_checkpoints_them_and_trains_adapters_in_bf16(tiny_model, one_process_group, tmp_path):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FullyShardedDataParallel
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from pytorch_lightning.strategies.strategy import _ForwardRedirection

    module = _bf16_lora_module(tiny_model, gradient_checkpointing=True)
    _, wrapped = _wrap(module, tmp_path)
    units = FullyShardedDataParallel.fsdp_modules(wrapped)
    assert len(units) == 2 + 1  # a unit per decoder layer and the root: no unit per adapter
    layers = [u._fsdp_wrapped_module for u in units[1:]]
    assert all(isinstance(u, CheckpointWrapper) and isinstance(u._checkpoint_wrapped_module, LlamaDecoderLayer)
               for u in layers)
    assert {u._flat_param.dtype for u in units} == {torch.float32}  # one dtype: the base stored in fp32
    assert not any(getattr(m, "is_gradient_checkpointing", False) for m in module.modules())  # FSDP's, not both

    computed = []  # the dtype a base projection and an adapter compute in
    q_proj = module.model.base_model.model.model.layers[0].self_attn.q_proj
    for part in (q_proj.base_layer, q_proj.lora_A["default"]):
        part.register_forward_hook(lambda m, args, out: computed.append((m.weight.dtype, out.dtype)))
    ids = torch.randint(0, 100, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    loss, _, _ = _ForwardRedirection()(wrapped, module, "_step", batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert computed[:2] == [(torch.bfloat16, torch.bfloat16)] * 2  # mixed precision: bf16 compute
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n and g.dtype == torch.float32 for n, g in grads.items())  # fp32 reduction
    assert {n for n, p in module.named_parameters() if p.requires_grad} == set(grads)  # every adapter trains


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
    assert not any("lora" in k for k in exported) and exported["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16


# -- 2 CPU processes, end to end -------------------------------------------------------------------
RUN = ["experiment=tiny", "baseline=sft_long_cot", "logger=none", "stage=train", "training=paper",
       "training.gradient_checkpointing=false", "training.effective_batch_size=4", "training.epochs=2",
       "trainer.precision=32-true"]
TESTS_ON_PATH = {"PYTHONPATH": str(PROJECT_ROOT / "tests")}


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
    run_cli([*RUN, "trainer=fsdp_sim", "+callbacks.units._target_=rank_probes.RecordFSDPUnits",
             f"+callbacks.units.folder={probe}"], tmp_path / "fsdp", env=TESTS_ON_PATH)
    fsdp = _run_dir(tmp_path / "fsdp")
    train = json.loads((fsdp / "summary.json").read_text())["train"]
    assert train["world_size"] == 2 and train["global_step"] == 6
    for rank in (0, 1):  # LoRA on: a unit per decoder layer and the root, nothing per adapter
        units = json.loads((probe / f"fsdp_rank{rank}.json").read_text())
        assert units["decoder_layers"] == 2 and units["units"] == units["decoder_layers"] + 1, units

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
    kill = ["+callbacks.crash._target_=crash.KillAt", "+callbacks.crash.hook=on_train_batch_start",
            "+callbacks.crash.step=4", "+callbacks.crash.whole_job=true"]  # mid epoch 2, after shards were saved
    proc = subprocess.run(cli_command([*RUN, "trainer=fsdp_sim", *kill]), cwd=PROJECT_ROOT,
                          env=cli_env(crashed, TESTS_ON_PATH), capture_output=True, text=True, timeout=900,
                          start_new_session=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    run_cli([*RUN, "trainer=fsdp_sim"], crashed)
    resumed = json.loads((_run_dir(crashed) / "summary.json").read_text())["train"]
    assert resumed["resumed_from"] is not None
    for key in ("global_step", "loss_curve", "tokens_seen"):
        assert resumed[key] == train[key], key
    again = _weights(_run_dir(crashed))
    assert all(torch.equal(again[k], got[k]) for k in got)


def _weights_of_untrained(tmp_path: Path) -> dict[str, torch.Tensor]:
    from conftest import stage_cache

    (folder,) = (stage_cache(tmp_path / "fsdp") / "models").glob("tiny_random*")
    from safetensors.torch import load_file

    return load_file(next(folder.rglob("model.safetensors")))
