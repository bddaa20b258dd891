"""Model back ends on real local files: the GGUF conversion, the cached folder, the tiny model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from palign.llm.chat import render_user_turn
from palign.llm.models import ModelSpec, load_model, load_tokenizer, resolve_model_path


@pytest.mark.slow
def test_gguf_package_converts_to_a_plain_folder_with_identical_logits(student_specs, tmp_path):
    from transformers import AutoModelForCausalLM

    spec = ModelSpec.from_config(student_specs["smollm2_135m"])
    folder = resolve_model_path(spec, tmp_path)
    assert (tmp_path / "models").is_dir() and folder.startswith(str(tmp_path / "models"))
    tokenizer = load_tokenizer(spec, tmp_path)
    converted = load_model(spec, tmp_path)
    from palign.llm.models import _package_dir

    original = AutoModelForCausalLM.from_pretrained(_package_dir(spec.package), gguf_file=spec.gguf_file)
    ids = tokenizer(render_user_turn(tokenizer, "What is 2+3?"), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        assert torch.equal(converted(**ids).logits, original(**ids).logits)
    assert resolve_model_path(spec, tmp_path) == folder  # second call reuses the folder


def test_two_processes_building_the_same_model_agree(student_specs, cache_dir, tmp_path):
    """Two processes start together on an empty cache: one builds, the other waits and reuses."""
    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(student_specs["tiny_random"])
    spec["seed"] = 123  # a model no other test builds, so the cache starts empty
    spec["tokenizer_from"] = dict(spec["tokenizer_from"])
    script = (
        "import sys, json; from palign.llm.models import resolve_model_path; "
        "print(resolve_model_path(json.loads(sys.argv[1]), sys.argv[2]))"
    )
    import json
    import shutil

    # the tiny model's tokenizer comes from the converted SmolLM2: share it, isolate the rest
    (tmp_path / "models").mkdir()
    src = resolve_model_path(student_specs["smollm2_135m"], cache_dir)
    shutil.copytree(src, tmp_path / "models" / src.rsplit("/", 1)[-1])
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, json.dumps(spec), str(tmp_path)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]
    built = [p for p in (tmp_path / "models").iterdir() if p.name.startswith("tiny_random") and p.is_dir()]
    assert len(built) == 1 and (built[0] / "model.safetensors").exists()
    assert not list((tmp_path / "models").glob(".*.tmp"))  # no half-written folder left behind


def test_tiny_random_is_deterministic_and_uses_the_smollm2_template(
    tiny_model, smollm2_tokenizer, student_specs, cache_dir
):
    tokenizer = load_tokenizer(student_specs["tiny_random"], cache_dir)
    assert tokenizer.chat_template == smollm2_tokenizer.chat_template
    assert tiny_model.config.num_hidden_layers == 2
    assert tiny_model.config.vocab_size == len(smollm2_tokenizer)
    again = load_model(student_specs["tiny_random"], cache_dir)
    for a, b in zip(tiny_model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_hub_source_passes_the_id_through_and_local_checks_the_folder(tmp_path):
    assert (
        resolve_model_path({"name": "q", "source": "hub", "pretrained": "Qwen/Qwen2.5-7B-Instruct"}, tmp_path)
        == "Qwen/Qwen2.5-7B-Instruct"
    )
    with pytest.raises(FileNotFoundError, match="no model folder"):
        resolve_model_path({"name": "x", "source": "local", "pretrained": str(tmp_path / "missing")}, tmp_path)
    with pytest.raises(ValueError, match="unknown keys"):
        ModelSpec.from_config({"name": "x", "sourze": "hub"})


# -- where inference runs ----------------------------------------------------------------------
def test_inference_placement_auto_is_cuda_when_there_is_one_else_the_cpu(monkeypatch):
    import torch

    from palign.llm.models import ModelSpec, inference_dtype, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device; use device=auto or cpu"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="not a device"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="has 2 CUDA devices"):
        resolve_device("cuda:2")
    spec = ModelSpec(name="m")  # dtype float32, the training default
    assert inference_dtype(spec, torch.device("cuda")) == torch.bfloat16  # bf16 on a GPU
    assert inference_dtype(spec, torch.device("cpu")) == torch.float32
    assert inference_dtype(ModelSpec(name="m", dtype="float16"), torch.device("cuda")) == torch.float16  # as configured


def test_inference_models_load_on_their_device_in_eval_mode(student_specs, cache_dir):
    import torch

    from palign.llm.models import ModelSpec, load_inference_model, placement

    spec = ModelSpec.from_config(student_specs["tiny_random"])
    model = load_inference_model(spec, cache_dir)
    assert not model.training and next(model.parameters()).device == torch.device("cpu")
    assert next(model.parameters()).dtype == torch.float32
    assert placement(spec) == {"device": "cpu", "dtype": "float32"}
    assert "device" not in spec.identity()  # where a model runs never names a cached stage
