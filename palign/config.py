"""What Hydra needs before it composes conf/, registered on import: the OmegaConf resolvers the
YAML files use and the config schema (palign/schema.py) in Hydra's ConfigStore."""

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
    native = any(
        getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return "bf16-mixed" if native else "32-true"


OmegaConf.register_new_resolver("native_bf16_precision", native_bf16_precision, replace=True)


from palign.schema import register as _register_schema  # noqa: E402  (after the resolvers the schema's defaults use)

_register_schema()
