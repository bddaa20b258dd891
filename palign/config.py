"""OmegaConf resolvers used by conf/ (registered on import, before Hydra composes)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "conf"

OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)


def native_bf16_precision(accelerator: str = "auto") -> str:
    """Lightning precision for this machine: bf16 autocast where the hardware computes in bf16
    natively (a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX), else full fp32.

    On the 2-core AVX512-BF16 CPU of this project's machines, bf16 autocast trains SmolLM2 1.5x
    faster than fp32 (`experiments/bench/sft.py`); on a CPU without it, bf16 is emulated and slower.
    Weights and optimizer state stay fp32 either way.
    """
    import torch

    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "32-true"
    cpu = getattr(torch, "cpu", None)
    native = any(getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return "bf16-mixed" if native else "32-true"


OmegaConf.register_new_resolver("native_bf16_precision", native_bf16_precision, replace=True)


# -- checks before anything runs -----------------------------------------------------------------
class ConfigError(ValueError):
    """A config value of the wrong type or out of range: names the key, the value and what is allowed."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    import math

    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


# key -> (what is allowed, test). Keys absent from the composed config (a group that lacks them)
# are not checked; `null` passes only where the text says so.
_CHECKS: dict[str, tuple[str, object]] = {
    "seed": ("an integer", _is_int),
    "data.max_length": ("an integer >= 1 (tokens)", lambda v: _is_int(v) and v >= 1),
    "data.micro_batch_size": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "data.val_size": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "data.train_limit": ("null or an integer >= 1", lambda v: v is None or (_is_int(v) and v >= 1)),
    "data.num_workers": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "data.pack_length": ("null or an integer >= 1", lambda v: v is None or (_is_int(v) and v >= 1)),
    "training.learning_rate": ("a number > 0", lambda v: _is_number(v) and v > 0),
    "training.weight_decay": ("a number >= 0", lambda v: _is_number(v) and v >= 0),
    "training.warmup_ratio": ("a number in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1),
    "training.epochs": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "training.max_steps": ("-1 (no limit) or an integer >= 1", lambda v: _is_int(v) and (v == -1 or v >= 1)),
    "training.effective_batch_size": ("an integer >= 1 (examples per optimizer step)", lambda v: _is_int(v) and v >= 1),
    "training.checkpoint_every_n_steps": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "training.betas": ("two numbers in [0, 1)", lambda v: len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v)),
    "teacher.source.limit": ("null or an integer >= 1", lambda v: v is None or (_is_int(v) and v >= 1)),
    "judge.batch_size": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "judge.max_new_tokens": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "judge.max_trace_tokens": ("null (no cap) or an integer >= 1 (tokens)", lambda v: v is None or (_is_int(v) and v >= 1)),
    "search.chunk_size": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "alignment.chunk_size": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "evaluation.chunk_size": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "evaluation.pass_k": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "baseline.ratio": ("a number in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1),
}
_SAMPLING_CHECKS: dict[str, tuple[str, object]] = {
    "max_new_tokens": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "num_samples": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "batch_size": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "temperature": ("a number >= 0", lambda v: _is_number(v) and v >= 0),
    "top_p": ("a number in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1),
    "top_k": ("null, 0 (off) or an integer >= 1", lambda v: v is None or (_is_int(v) and v >= 0)),
    "repetition_penalty": ("a number > 0", lambda v: _is_number(v) and v > 0),
    "seed": ("an integer", _is_int),
}
for _node in ("alignment.sampling", "evaluation.sampling", "teacher.source.sampling", "chain_judge.sampling"):
    _CHECKS.update({f"{_node}.{key}": check for key, check in _SAMPLING_CHECKS.items()})


def check_config(cfg) -> None:
    """Refuse wrong-typed or out-of-range values before any model loads or any run folder is written.

    Raises ConfigError naming every bad key, its value and what is allowed.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    problems = []
    for key, (allowed, test) in _CHECKS.items():
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True)
        except OmegaConfBaseException as err:
            problems.append(f"{key}: cannot be resolved ({err})")
            continue
        if value is None and OmegaConf.select(cfg, key, default="<absent>") == "<absent>":
            continue
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        try:
            ok = bool(test(value))
        except TypeError:
            ok = False
        if not ok:
            problems.append(f"{key}={value!r}: must be {allowed}")
    samples = OmegaConf.select(cfg, "evaluation.sampling.num_samples")
    pass_k = OmegaConf.select(cfg, "evaluation.pass_k")
    if _is_int(samples) and _is_int(pass_k) and pass_k > samples:
        problems.append(f"evaluation.pass_k={pass_k}: must be at most evaluation.sampling.num_samples={samples} "
                        "(pass@k needs k samples per problem)")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
