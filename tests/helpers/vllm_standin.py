"""A stand-in for the `vllm` package (0.33.0) on CPU, as strict as the real one where palign meets it.

palign's vLLM back end (palign/llm/vllm_backend.py) only runs on CUDA machines, so its tests install
this module as `vllm` (`module()` builds one). It is not a mock that records and answers anything:
each rule below is read from vLLM 0.33.0's sources and names the file and function it mirrors, so
a call the real package refuses is refused here, with the real message, and what the real engine
decides (when a reply stops, why, which tokens and logprobs come back) is decided here the same way.

- `SamplingParams` takes exactly the real fields and runs the real `__post_init__` and
  `_verify_args`; the engine runs its `verify` and `update_from_generation_config` per request.
- `LLM(model, **kwargs)` takes exactly the real constructor's and `EngineArgs`' arguments; a
  simulated GPU (`Device`) accounts the memory each engine reserves at startup, refuses an engine
  when too little is free, and gets it back only from `llm.llm_engine.engine_core.shutdown()`.
- `LLM.generate` validates every request before any runs (a prompt too long for `max_model_len`
  fails the whole call), then decodes token by token with V1's sampler order (raw logprobs, then
  allowed_token_ids, logit bias, penalties, temperature, min-p, top-k, top-p) and the scheduler's
  stop rule (the tokenizer's eos, every eos id of the model's generation_config, max_tokens,
  max_model_len).

What it simulates is the model: a `NextTokenModel` gives the next token's logits. `HFModel` runs the
checkpoint with transformers (so scores can be compared with the Hugging Face path); `Scripted`
gives each sample of a request a scripted reply, while the engine still decides where it stops.
Features palign never uses (stop strings, structured outputs, LoRA, text prompts, ...) raise
NotImplementedError instead of being silently ignored.
"""

from __future__ import annotations

import copy
import enum
import itertools
import math
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NotRequired, Protocol, TypedDict

import torch

VERSION = "0.33.0"
GiB = 1 << 30

# vllm/sampling_params.py
_SAMPLING_EPS = 1e-5
_MAX_TEMP = 1e-2
MAX_N_SEQUENCES = 16384  # vllm/envs.py: VLLM_MAX_N_SEQUENCES' default
MAX_LOGPROBS = 20  # vllm/config/model.py: ModelConfig.max_logprobs' default
LOGPROBS_MODES = ("raw_logits", "raw_logprobs", "processed_logits", "processed_logprobs")  # ModelConfig.logprobs_mode


# -- errors: vllm/exceptions.py, vllm/v1/engine/exceptions.py -----------------------------------------
class VLLMValidationError(Exception):
    """vllm/exceptions.py: VLLMValidationError (a VLLMClientError; not a ValueError in 0.33)."""

    def __init__(self, message: str, *, parameter: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.value = value

    def __str__(self) -> str:
        base = super().__str__()
        extras = [f"{name}={v}" for name, v in (("parameter", self.parameter), ("value", self.value)) if v is not None]
        return f"{base} ({', '.join(extras)})" if extras else base


class EngineDeadError(Exception):
    """vllm/v1/engine/exceptions.py: EngineDeadError, what a client whose engine core is gone raises."""

    def __init__(self) -> None:
        super().__init__("EngineCore encountered an issue. See stack trace (above) for the root cause.")


# -- outputs and inputs: vllm/logprobs.py, vllm/outputs.py, vllm/inputs/llm.py --------------------------
@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: Any
    outputs: list[CompletionOutput]
    finished: bool


class TokensPrompt(TypedDict):
    """vllm/inputs/llm.py: TokensPrompt (a TypedDict: a plain dict at run time)."""

    prompt_token_ids: list[int]
    prompt: NotRequired[str]


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


# -- SamplingParams: vllm/sampling_params.py ----------------------------------------------------------
def _set() -> set:
    return set()


# Every field of the real msgspec Struct, in its order, with its default (a callable: a factory).
SAMPLING_FIELDS: dict[str, Any] = {
    "n": 1,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "temperature": 1.0,
    "watermarking": None,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "seed": None,
    "stop": None,
    "stop_token_ids": None,
    "ignore_eos": False,
    "max_tokens": 16,
    "min_tokens": 0,
    "logprobs": None,
    "prompt_logprobs": None,
    "prompt_logprob_token_ids": None,
    "prompt_logprob_start": None,
    "logprob_token_ids": None,
    "flat_logprobs": False,
    "detokenize": True,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "include_stop_str_in_output": False,
    "output_kind": RequestOutputKind.CUMULATIVE,
    "stream_interval": None,
    "skip_clone": False,
    "output_text_buffer_length": 0,
    "_eos_token_id": None,
    "_all_stop_token_ids": _set,
    "_watermarking_skipped": False,
    "structured_outputs": None,
    "logit_bias": None,
    "allowed_token_ids": None,
    "extra_args": None,
    "bad_words": None,
    "_bad_words_token_ids": None,
    "skip_reading_prefix_cache": None,
    "thinking_token_budget": None,
    "repetition_detection": None,
    "routed_experts_prompt_start": 0,
    "trace_decode_token_ids": None,
}
# the fields this engine implements; a request that sets another one raises NotImplementedError
_NOT_SIMULATED = (
    "prompt_logprobs",
    "prompt_logprob_token_ids",
    "logprob_token_ids",
    "structured_outputs",
    "extra_args",
    "thinking_token_budget",
    "repetition_detection",
    "trace_decode_token_ids",
    "watermarking",
)


class SamplingParams:
    """vllm/sampling_params.py: SamplingParams. A msgspec Struct there: its constructor takes the
    fields (by keyword or in order) and nothing else (msgspec's "Unexpected keyword argument"), and
    checks no types; `__post_init__` normalises and `_verify_args` refuses."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = list(SAMPLING_FIELDS)
        if len(args) > len(names):
            raise TypeError("Extra positional arguments provided")
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"Argument '{name}' given by name and position")
            kwargs[name] = value
        for name in kwargs:
            if name not in SAMPLING_FIELDS:
                raise TypeError(f"Unexpected keyword argument '{name}'")
        for name, default in SAMPLING_FIELDS.items():
            setattr(self, name, kwargs[name] if name in kwargs else default() if callable(default) else default)
        self.__post_init__()

    def __post_init__(self) -> None:  # SamplingParams.__post_init__
        if 0 < self.temperature < _MAX_TEMP:
            self.temperature = max(self.temperature, _MAX_TEMP)  # logged as a warning there
        if self.seed == -1:
            self.seed = None
        self.thinking_token_budget = _validate_thinking_token_budget(self.thinking_token_budget)
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop_token_ids = [] if self.stop_token_ids is None else list(dict.fromkeys(self.stop_token_ids))
        self.bad_words = [] if self.bad_words is None else list(dict.fromkeys(self.bad_words))
        if self.logprobs is True:
            self.logprobs = 1
        if self.prompt_logprobs is True:
            self.prompt_logprobs = 1
        if self.stop and not self.include_stop_str_in_output:
            self.output_text_buffer_length = max(len(s) for s in self.stop) - 1
        self._verify_args()
        if self.temperature < _SAMPLING_EPS:  # zero temperature means greedy sampling
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
            self._verify_greedy_sampling()
        self._all_stop_token_ids.update(self.stop_token_ids)
        if self.skip_reading_prefix_cache is None:
            self.skip_reading_prefix_cache = (
                self.prompt_logprobs is not None or self.prompt_logprob_token_ids is not None
            )

    def _verify_args(self) -> None:  # SamplingParams._verify_args, in its order and with its messages
        _verify_num_sequences(self.n, "n")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise VLLMValidationError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise VLLMValidationError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not math.isfinite(self.repetition_penalty):
            raise VLLMValidationError(f"repetition_penalty must be a finite number, got {self.repetition_penalty}.")
        if self.repetition_penalty <= 0.0:
            raise VLLMValidationError(f"repetition_penalty must be greater than zero, got {self.repetition_penalty}.")
        if not math.isfinite(self.temperature):
            raise VLLMValidationError(
                f"temperature must be a finite number, got {self.temperature}.",
                parameter="temperature",
                value=self.temperature,
            )
        if self.temperature < 0.0:
            raise VLLMValidationError(
                f"temperature must be non-negative, got {self.temperature}.",
                parameter="temperature",
                value=self.temperature,
            )
        if self.temperature > 2.0:
            raise VLLMValidationError(
                f"temperature must be in [0, 2], got {self.temperature}.",
                parameter="temperature",
                value=self.temperature,
            )
        if not 0.0 < self.top_p <= 1.0:
            raise VLLMValidationError(
                f"top_p must be in (0, 1], got {self.top_p}.", parameter="top_p", value=self.top_p
            )
        if self.top_k < -1:
            raise VLLMValidationError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        if not isinstance(self.top_k, int):
            raise VLLMValidationError(f"top_k must be an integer, got {type(self.top_k).__name__}")
        if not 0.0 <= self.min_p <= 1.0:
            raise VLLMValidationError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise VLLMValidationError(
                f"max_tokens must be at least 1, got {self.max_tokens}.", parameter="max_tokens", value=self.max_tokens
            )
        if self.min_tokens < 0:
            raise VLLMValidationError(f"min_tokens must be greater than or equal to 0, got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise VLLMValidationError(
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, got {self.min_tokens}."
            )
        if self.stream_interval is not None and self.stream_interval < 1:
            raise VLLMValidationError(
                f"stream_interval must be at least 1, got {self.stream_interval}.",
                parameter="stream_interval",
                value=self.stream_interval,
            )
        if self.logprobs is not None and self.logprobs != -1 and self.logprobs < 0:
            raise VLLMValidationError(
                f"logprobs must be non-negative or -1, got {self.logprobs}.", parameter="logprobs", value=self.logprobs
            )
        if self.prompt_logprobs is not None and self.prompt_logprobs != -1 and self.prompt_logprobs < 0:
            raise VLLMValidationError(
                f"prompt_logprobs must be non-negative or -1, got {self.prompt_logprobs}.",
                parameter="prompt_logprobs",
                value=self.prompt_logprobs,
            )
        if not all(isinstance(token, int) for token in self.stop_token_ids):
            raise VLLMValidationError(f"stop_token_ids must contain only integers, got {self.stop_token_ids}.")
        if any(not stop for stop in self.stop):
            raise VLLMValidationError("stop cannot contain an empty string.")
        if self.stop and not self.detokenize:
            raise VLLMValidationError(
                "stop strings are only supported when detokenize is True. Set detokenize=True to use stop."
            )
        if any(not word for word in self.bad_words):
            raise VLLMValidationError(f"bad_words cannot contain an empty string. Got bad_words={self.bad_words}")

    def _verify_greedy_sampling(self) -> None:
        if self.n > 1:
            raise VLLMValidationError(f"n must be 1 when using greedy sampling, got {self.n}.")

    def verify(self, model_config: ModelConfig) -> None:
        """SamplingParams.verify, run per request by vllm/v1/engine/input_processor.py:
        InputProcessor._validate_params: the checks that need the model."""
        vocab = model_config.get_vocab_size()
        if num := self.logprobs:  # _validate_logprobs
            num = vocab if num == -1 else num
            if num > model_config.max_logprobs:
                raise VLLMValidationError(
                    f"Requested sample logprobs of {num}, which is greater than max allowed: "
                    f"{model_config.max_logprobs}",
                    parameter="logprobs",
                    value=num,
                )
        for name, ids in (("logit_bias", list(self.logit_bias or ())), ("stop_token_ids", self.stop_token_ids)):
            bad = [t for t in ids if t < 0 or t >= vocab]  # _validate_logit_bias, _validate_stop_token_ids
            if bad:
                raise VLLMValidationError(
                    f"token_id(s) {bad} in {name} contain out-of-vocab token ids. Vocabulary size: {vocab}",
                    parameter=name,
                    value=bad,
                )
        if self.allowed_token_ids is not None:  # _validate_allowed_token_ids
            if len(self.allowed_token_ids) == 0:
                raise VLLMValidationError(
                    "allowed_token_ids is not None and empty!",
                    parameter="allowed_token_ids",
                    value=self.allowed_token_ids,
                )
            bad = [t for t in self.allowed_token_ids if t < 0 or t >= vocab]
            if bad:
                raise VLLMValidationError(
                    "allowed_token_ids contains out-of-vocab token id!", parameter="allowed_token_ids", value=bad
                )

    def update_from_generation_config(self, generation_config: dict[str, Any], eos_token_id: int | None = None) -> None:
        """SamplingParams.update_from_generation_config: the tokenizer's eos stops the request, and
        every other eos id of the model's generation_config joins `stop_token_ids`."""
        if not self.ignore_eos:
            self._eos_token_id = eos_token_id
        if eos_token_id is not None:
            self._all_stop_token_ids.add(eos_token_id)
        if (eos_ids := generation_config.get("eos_token_id")) is not None:
            eos_ids = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids)
            if eos_token_id is not None:
                eos_ids.discard(eos_token_id)
            if eos_ids:
                self._all_stop_token_ids.update(eos_ids)
                if not self.ignore_eos:
                    eos_ids.update(self.stop_token_ids)
                    self.stop_token_ids = list(eos_ids)

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_id

    @property
    def all_stop_token_ids(self) -> set[int]:
        return self._all_stop_token_ids

    def clone(self) -> SamplingParams:
        return copy.copy(self) if self.skip_clone else copy.deepcopy(self)

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={getattr(self, k)!r}" for k in SAMPLING_FIELDS if not k.startswith("_"))
        return f"SamplingParams({shown})"


def _validate_thinking_token_budget(value: Any) -> int | None:  # vllm/sampling_params.py
    if value is None or (value == -1 and not isinstance(value, (bool, float))):
        return None
    if isinstance(value, (bool, float)) or not isinstance(value, int) or value < 0:
        raise VLLMValidationError(
            "`thinking_token_budget` must be a non-negative integer or -1 for unlimited.",
            parameter="thinking_token_budget",
            value=value,
        )
    return value


def _verify_num_sequences(value: Any, parameter_name: str) -> None:  # vllm/sampling_params.py
    if not isinstance(value, int):
        raise VLLMValidationError(f"{parameter_name} must be an int, but is of type {type(value)}")
    if value < 1:
        raise VLLMValidationError(f"{parameter_name} must be at least 1, got {value}.")
    if value > MAX_N_SEQUENCES:
        raise VLLMValidationError(
            f"{parameter_name} must be at most {MAX_N_SEQUENCES}, got {value}. To increase this "
            "limit, set the VLLM_MAX_N_SEQUENCES environment variable."
        )


# -- the engine's arguments: vllm/entrypoints/llm.py: LLM.__init__, vllm/engine/arg_utils.py: EngineArgs --
# LLM.__init__'s own named parameters that are not EngineArgs fields
LLM_ONLY_ARGS = frozenset({"chat_template"})
# EngineArgs' fields (a dataclass: any other keyword is a TypeError)
ENGINE_ARGS = frozenset(
    """
model enable_return_routed_experts return_sampling_mask model_weights served_model_name tokenizer
hf_config_path runner convert skip_tokenizer_init enable_prompt_embeds tokenizer_mode trust_remote_code
allowed_local_media_path allowed_media_domains download_dir safetensors_load_strategy
safetensors_prefetch_num_threads safetensors_prefetch_block_size load_format config_format dtype
kv_cache_dtype seed max_model_len cudagraph_capture_sizes max_cudagraph_capture_size ir_op_priority
distributed_executor_backend pipeline_parallel_size master_addr master_port nnodes node_rank
distributed_timeout_seconds cpu_distributed_timeout_seconds numa_bind numa_bind_nodes numa_bind_cpus
device_ids tensor_parallel_size prefill_context_parallel_size decode_context_parallel_size dcp_comm_backend
dcp_q_replicate dcp_kv_cache_interleave_size cp_kv_cache_interleave_size data_parallel_size data_parallel_rank
data_parallel_start_rank data_parallel_size_local data_parallel_address data_parallel_rpc_port
data_parallel_hybrid_lb data_parallel_external_lb data_parallel_multi_port_external_lb data_parallel_backend
enable_hc_sp enable_expert_parallel enable_batch_sharded_sampling enable_ep_weight_filter moe_backend
linear_backend sparse_indexer_topk_backend all2all_backend enable_elastic_ep elastic_ep_max_dp_size enable_dbo
ubatch_size dbo_decode_token_threshold dp_sync_interval dbo_prefill_token_threshold
disable_nccl_for_dp_synchronization eplb_config enable_eplb expert_placement_strategy _api_process_count
_api_process_rank max_parallel_loading_workers block_size enable_prefix_caching prefix_caching_hash_algo
prefix_cache_retention_interval disable_sliding_window disable_cascade_attn offload_backend cpu_offload_gb
cpu_offload_params offload_group_size offload_num_in_group offload_prefetch_step offload_params
gpu_memory_utilization kv_cache_memory_bytes max_num_batched_tokens max_num_scheduled_tokens
long_prefill_token_threshold long_prefill_token_threshold_adaptive max_num_seqs max_num_active_seqs
max_num_queued_reqs max_num_queued_tokens max_logprobs logprobs_mode use_fp64_gumbel enable_trace_replay
disable_log_stats aggregate_engine_logging revision code_revision hf_token hf_overrides model_class_overrides
tokenizer_revision quantization quantization_config allow_deprecated_quantization enforce_eager
disable_custom_all_reduce enable_shm_tensor_arena language_model_only limit_mm_per_prompt enable_mm_embeds
interleave_mm_strings media_io_kwargs mm_processor_kwargs mm_processor_cache_gb mm_processor_cache_type
mm_hasher_algorithm mm_shm_cache_max_object_size_mb mm_encoder_only mm_encoder_tp_mode mm_encoder_attn_backend
mm_encoder_attn_dtype mm_encoder_fp8_scale_path mm_encoder_fp8_scale_save_path
mm_encoder_fp8_scale_save_margin io_processor_plugin renderer_num_workers skip_mm_profiling video_pruning_rate
video_pruning_method mm_tensor_ipc mm_processor_device mm_ipc_gpu_memory_gb mm_device_do_normalize enable_lora
max_loras max_lora_rank default_mm_loras fully_sharded_loras max_cpu_loras lora_dtype lora_target_modules
enable_tower_connector_lora specialize_active_lora enable_mixed_moe_lora_format enable_moe_shared_loras
max_lora_cls_labels ray_workers_use_nsight num_gpu_blocks_override model_loader_extra_config ignore_patterns
enable_chunked_prefill disable_chunked_mm_input scheduler_reserve_full_isl prefill_schedule_interval watermark
disable_hybrid_kv_cache_manager structured_outputs_config aux_output_config reasoning_parser
reasoning_parser_plugin speculative_config spec_method spec_model spec_tokens watermark_config
diffusion_config show_hidden_metrics_for_version otlp_traces_endpoint collect_detailed_traces
per_request_spec_decode_metrics kv_cache_metrics kv_cache_metrics_sample custom_histogram_buckets
cudagraph_metrics enable_layerwise_nvtx_tracing enable_mfu_metrics enable_logging_iteration_details
jit_monitor_mode jit_monitor_verbose enable_mm_processor_stats scheduling_policy scheduler_cls pooler_config
compilation_config attention_config engram_config mamba_config kernel_config enable_flashinfer_autotune
monokernel worker_cls worker_extension_cls profiler_config logging_config log_level log_config_file
kv_transfer_config kv_events_config ec_transfer_config ec_manager_config reasoning_config generation_config
enable_sleep_mode sleep_mode_backend sleep_mode_offload_cudagraph sleep_preserve_parameter_names
enable_cumem_allocator enable_nccl_comm_suspend override_generation_config model_impl attention_backend
kv_cache_dtype_skip_layers mamba_cache_dtype mamba_ssm_cache_dtype mamba_block_size prefix_match_unit
mamba_cache_mode enable_mamba_shared_prefix_checkpoint replayssm_buffer_len use_replayssm mamba_backend
mamba_ssu_algorithm enable_mamba_cache_stochastic_rounding mamba_cache_philox_rounds additional_config
use_tqdm_on_load pt_load_map_location logits_processors async_scheduling stream_interval
kv_sharing_fast_prefill swa_bounded_replay optimization_level performance_mode fault_tolerance_config
enable_fault_tolerance kv_offloading_size kv_offloading_backend tokens_only shutdown_timeout watchdog_config
weight_transfer_config fail_on_environ_validation gdn_prefill_backend kda_prefill_backend kda_decode_backend
""".split()
)
# the engine arguments this stand-in acts on, or that change nothing it simulates; another one raises
# NotImplementedError rather than being ignored
_SIMULATED_ARGS = frozenset(
    {
        "gpu_memory_utilization",
        "max_model_len",
        "logprobs_mode",
        "max_logprobs",
        "tokenizer",
        "tensor_parallel_size",
        "generation_config",
        "dtype",
        "seed",
        "enable_prefix_caching",
        "enforce_eager",
        "disable_log_stats",
        "trust_remote_code",
        "max_num_seqs",
        "max_num_batched_tokens",
    }
)


def _pydantic_range_error(model: str, name: str, value: Any, gt: float, le: float) -> ValueError:
    """The pydantic ValidationError (a ValueError) a `Field(gt=..., le=...)` of a vLLM config raises."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        line = (
            f"Input should be a valid number [type=float_type, input_value={value!r}, "
            f"input_type={type(value).__name__}]"
        )
    elif not value > gt:
        line = (
            f"Input should be greater than {gt} [type=greater_than, input_value={value!r}, "
            f"input_type={type(value).__name__}]"
        )
    else:
        line = (
            f"Input should be less than or equal to {le} [type=less_than_equal, input_value={value!r}, "
            f"input_type={type(value).__name__}]"
        )
    return ValueError(f"1 validation error for {model}\n{name}\n  {line}")


# -- the simulated GPU: vllm/v1/worker/utils.py: request_memory ------------------------------------------
def format_gib(b: int) -> str:  # vllm/utils/mem_utils.py
    return f"{round(b / GiB, 2)}"


class Device:
    """One GPU: `total` bytes, of which `used_elsewhere` are held by other processes and each live
    engine holds what it reserved at startup."""

    def __init__(self, total: int = 80 * GiB, used_elsewhere: int = 0, name: str = "cuda:0") -> None:
        self.total, self.used_elsewhere, self.name = total, used_elsewhere, name
        self.reservations: dict[int, int] = {}  # id(engine core) -> bytes

    @property
    def free(self) -> int:
        return self.total - self.used_elsewhere - sum(self.reservations.values())

    def request_memory(self, gpu_memory_utilization: float) -> int:
        """request_memory (vllm/v1/worker/utils.py), run by the GPU worker's init_device
        (vllm/v1/worker/gpu_worker.py) in the engine core process: the engine needs
        `gpu_memory_utilization` of the whole device free at startup, and then holds that much."""
        requested = math.ceil(self.total * gpu_memory_utilization)
        if self.free < requested:
            raise ValueError(
                f"Free memory on device {self.name} ({format_gib(self.free)}/{format_gib(self.total)} GiB) on startup "
                f"is less than desired GPU memory utilization ({gpu_memory_utilization}, {format_gib(requested)} GiB). "
                "Decrease GPU memory utilization or reduce GPU memory used by other processes."
            )
        return requested


class EngineCoreClient:
    """vllm/v1/engine/core_client.py: SyncMPClient, the LLM's handle on its engine core process;
    `shutdown()` ends that process (idempotent, as the real one's finalizer), which frees its GPU memory.
    A client whose core is gone raises EngineDeadError."""

    def __init__(self, device: Device, reserved: int) -> None:
        self.device = device
        self.shut_down = False
        device.reservations[id(self)] = reserved

    def shutdown(self, timeout: float | None = None) -> None:
        if not self.shut_down:
            self.shut_down = True
            del self.device.reservations[id(self)]

    def ensure_alive(self) -> None:
        if self.shut_down:
            raise EngineDeadError()


@dataclass
class ModelConfig:
    """The parts of vllm/config/model.py: ModelConfig the request checks read."""

    model: str
    max_model_len: int
    vocab_size: int
    max_logprobs: int = MAX_LOGPROBS
    logprobs_mode: str = "raw_logprobs"
    generation_config: dict[str, Any] = field(default_factory=dict)

    def get_vocab_size(self) -> int:
        return self.vocab_size


@dataclass
class LLMEngine:
    """vllm/v1/engine/llm_engine.py: LLMEngine, as far as palign reaches into it."""

    engine_core: EngineCoreClient
    model_config: ModelConfig


# -- the model the engine serves --------------------------------------------------------------------
class NextTokenModel(Protocol):
    def __call__(self, prompt: list[int], output: list[int], sample: int) -> torch.Tensor:
        """Logits of the next token (1-D, the model's vocabulary) after `prompt` and the `output`
        so far, for the `sample`-th sample of its request."""


ModelFactory = Callable[["LLM"], NextTokenModel]


class HFModel:
    """The checkpoint at the engine's `model` path, run with transformers in float32."""

    def __init__(self, llm: LLM) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(llm.engine_args["model"], dtype=torch.float32).eval()

    def __call__(self, prompt: list[int], output: list[int], sample: int) -> torch.Tensor:
        with torch.no_grad():
            return self.model(torch.tensor([prompt + output])).logits[0, -1].float()


class Scripted:
    """A model whose `sample`-th reply to any prompt is `replies[sample % len(replies)]`, token by
    token; the engine decides where it stops. Use as `module(Scripted.factory(replies))`."""

    def __init__(self, llm: LLM, replies: list[list[int]]) -> None:
        self.vocab_size, self.replies = llm.model_config.vocab_size, replies

    @classmethod
    def factory(cls, replies: list[list[int]]) -> ModelFactory:
        return lambda llm: cls(llm, replies)

    def __call__(self, prompt: list[int], output: list[int], sample: int) -> torch.Tensor:
        reply = self.replies[sample % len(self.replies)]
        position = len(output)
        if position >= len(reply):
            raise AssertionError(
                f"the scripted reply {reply} ran out: the engine asked for its token {position + 1} "
                "(script a reply that stops, or one as long as max_tokens)"
            )
        logits = torch.full((self.vocab_size,), -1e4)
        logits[reply[position]] = 0.0
        return logits


# -- LLM: vllm/entrypoints/llm.py ----------------------------------------------------------------------
class LLM:
    """vllm/entrypoints/llm.py: LLM. `calls` (the stand-in's own record, for tests): the prompts and
    SamplingParams of each `generate` call, as the caller passed them."""

    device: Device
    model_factory: ModelFactory
    default_logprobs_mode = "raw_logprobs"
    started: list[LLM]
    _tokenizers: dict[str, Any]

    def __init__(self, model: str, **kwargs: Any) -> None:
        for name in kwargs:
            if name not in ENGINE_ARGS and name not in LLM_ONLY_ARGS:
                raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument '{name}'")
        self.engine_args = {"model": model, **kwargs}
        for name, value in kwargs.items():
            if name not in _SIMULATED_ARGS:
                raise NotImplementedError(f"the stand-in vLLM does not simulate the engine argument {name}={value!r}")
        # vllm/config/cache.py: CacheConfig.gpu_memory_utilization = Field(default=0.92, gt=0, le=1), checked
        # when vllm/engine/arg_utils.py: EngineArgs.create_engine_config builds it, in this process
        utilization = kwargs.get("gpu_memory_utilization", 0.92)
        if isinstance(utilization, bool) or not isinstance(utilization, (int, float)) or not 0 < utilization <= 1:
            raise _pydantic_range_error("CacheConfig", "gpu_memory_utilization", utilization, gt=0, le=1)
        if kwargs.get("tensor_parallel_size", 1) != 1:
            raise NotImplementedError("the stand-in vLLM simulates one GPU (tensor_parallel_size=1)")
        logprobs_mode = kwargs.get("logprobs_mode", self.default_logprobs_mode)
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode={logprobs_mode!r}: not one of {LOGPROBS_MODES}")
        if logprobs_mode not in ("raw_logprobs", "processed_logprobs"):
            raise NotImplementedError(f"the stand-in vLLM does not simulate logprobs_mode={logprobs_mode!r}")
        if kwargs.get("generation_config", "auto") not in ("auto", "vllm"):
            raise NotImplementedError("the stand-in vLLM reads the generation config from the model folder only")

        from transformers import AutoConfig

        text_config = AutoConfig.from_pretrained(model)
        text_config = getattr(text_config, "get_text_config", lambda: text_config)()
        derived = int(text_config.max_position_embeddings)
        max_model_len = kwargs.get("max_model_len") or derived
        if max_model_len > derived:  # vllm/config/model.py: _get_and_verify_max_len
            raise ValueError(
                f"User-specified max_model_len ({max_model_len}) is greater than the derived max_model_len "
                f"(max_position_embeddings={derived} or model_max_length=None in model's config.json). "
                "To allow overriding this maximum, set the env var VLLM_ALLOW_LONG_MAX_MODEL_LEN=1."
            )
        self.model_config = ModelConfig(
            model,
            max_model_len,
            int(text_config.vocab_size),
            kwargs.get("max_logprobs", MAX_LOGPROBS),
            logprobs_mode,
            _generation_config_fields(model),
        )
        self.tokenizer = self._tokenizer(kwargs.get("tokenizer") or model)

        # the engine core process starts; its GPU worker asks for its memory. There a ValueError ends
        # the process, and the LLM constructor reports the failed start (vllm/v1/engine/utils.py:
        # wait_for_engine_startup), the worker's message logged above it
        try:
            reserved = self.device.request_memory(utilization)
        except ValueError as err:
            raise RuntimeError(
                "Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}"
            ) from err
        self.llm_engine = LLMEngine(EngineCoreClient(self.device, reserved), self.model_config)
        self.model = self.model_factory(self)
        self.request_counter = itertools.count()
        self.calls: list[tuple[list[Any], list[SamplingParams]]] = []
        self.started.append(self)

    def _tokenizer(self, path: str):
        if path not in self._tokenizers:
            from transformers import AutoTokenizer

            self._tokenizers[path] = AutoTokenizer.from_pretrained(path)
        return self._tokenizers[path]

    def get_tokenizer(self):
        return self.tokenizer

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        *,
        use_tqdm: Any = True,
        lora_request: Any = None,
        priority: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        mm_processor_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """LLM.generate -> vllm/entrypoints/common/offline.py: OfflineInferenceMixin._run_completion:
        every request is rendered and validated, and added, before the engine runs any; a request
        that fails validation fails the whole call (the ones added before it are aborted)."""
        self.llm_engine.engine_core.ensure_alive()
        if lora_request is not None or priority is not None or tokenization_kwargs or mm_processor_kwargs:
            raise NotImplementedError("the stand-in vLLM does not simulate LoRA, priorities or tokenization overrides")
        if sampling_params is None:
            sampling_params = SamplingParams()  # get_default_sampling_params, for a model without sampling defaults
        prompts = [prompts] if isinstance(prompts, (str, bytes, dict)) else list(prompts)  # prompt_to_seq
        if isinstance(sampling_params, (list, tuple)):  # _params_to_seq
            if len(sampling_params) != len(prompts):
                raise VLLMValidationError(
                    f"The lengths of prompts ({len(prompts)}) and params ({len(sampling_params)}) must be the same."
                )
            params = list(sampling_params)
        else:
            params = [sampling_params] * len(prompts)
        self.calls.append((prompts, params))
        requests = [self._add_request(prompt, p) for prompt, p in zip(prompts, params)]
        return [self._run(str(next(self.request_counter)), ids, p) for ids, p in requests]

    # -- rendering and validation -----------------------------------------------------------------------
    def _add_request(self, prompt: Any, params: SamplingParams) -> tuple[list[int], SamplingParams]:
        if not isinstance(prompt, dict) or "prompt_token_ids" not in prompt:
            raise NotImplementedError(f"the stand-in vLLM takes TokensPrompt prompts only, got {prompt!r}")
        ids = list(prompt["prompt_token_ids"])
        max_model_len = self.model_config.max_model_len
        # vllm/renderers/params.py: TokenizeParams._token_len_check (max_input_tokens = max_model_len
        # for LLM.generate: vllm/renderers/base.py: default_cmpl_tok_params)
        if len(ids) > max_model_len:
            qualifier = "at least " if len(ids) == max_model_len + 1 else ""
            raise VLLMValidationError(
                f"This model's maximum context length is {max_model_len} tokens. However, your "
                f"prompt contains {qualifier}{len(ids)} input tokens, which exceeds this limit even "
                "without any output tokens. Please reduce the length of the input prompt.",
                parameter="input_tokens",
                value=len(ids),
            )
        # OfflineInferenceMixin._add_request: the caller's params object is set to FINAL_ONLY
        params.output_kind = RequestOutputKind.FINAL_ONLY
        # vllm/v1/engine/input_processor.py: InputProcessor.process_inputs
        params.verify(self.model_config)
        if len(ids) == 0:  # _validate_prompt_len
            raise VLLMValidationError("The decoder prompt cannot be empty")
        if len(ids) == max_model_len:
            raise VLLMValidationError(
                f"The decoder prompt (length {len(ids)}) plus the number of requested output tokens "
                f"(at least 1) is longer than the maximum model length of {max_model_len}. Make sure "
                "that `max_model_len` is no smaller than the number of text tokens (prompt + "
                "requested output tokens)."
            )
        # vllm/renderers/base.py: BaseRenderer.validate_token_ids
        max_token_id = max(len(self.tokenizer) - 1, self.model_config.vocab_size - 1)
        if min(ids) < 0:
            raise VLLMValidationError(f"Token id {min(ids)} is out of vocabulary")
        if max(ids) > max_token_id:
            raise VLLMValidationError(f"Token id {max(ids)} is out of vocabulary")
        request = params.clone()
        if request.max_tokens is None:
            request.max_tokens = max_model_len - len(ids)
        request.update_from_generation_config(self.model_config.generation_config, self.tokenizer.eos_token_id)
        for name in _NOT_SIMULATED:
            if getattr(request, name) is not None:
                raise NotImplementedError(f"the stand-in vLLM does not simulate SamplingParams.{name}")
        if request.stop or request.bad_words or request.detokenize:
            raise NotImplementedError(
                "the stand-in vLLM returns token ids only (detokenize=False), without stop strings or bad words"
            )
        return ids, request

    # -- decoding -------------------------------------------------------------------------------------------
    def _run(self, request_id: str, prompt: list[int], params: SamplingParams) -> RequestOutput:
        """One request: n samples (vllm/v1/engine/parallel_sampling.py: each a child request whose
        seed is the parent's plus its index), in order."""
        outputs = [self._sample(prompt, params, index) for index in range(params.n)]
        return RequestOutput(request_id, None, prompt, None, outputs, True)

    def _sample(self, prompt: list[int], params: SamplingParams, index: int) -> CompletionOutput:
        generator = None
        if params.temperature >= _SAMPLING_EPS and params.seed is not None:  # SamplingType.RANDOM_SEED
            generator = torch.Generator().manual_seed(params.seed + index)
        out: list[int] = []
        steps: list[dict[int, Logprob]] = []
        while True:
            logits = self.model(prompt, out, index).float()
            token, step = self._sample_token(logits, prompt, out, params, generator)
            out.append(token)
            if step is not None:
                steps.append(step)
            # vllm/v1/core/sched/utils.py: check_stop, in its order
            if token == params.eos_token_id:
                return self._completion(index, out, steps, params, "stop", None)
            if token in params.stop_token_ids:
                return self._completion(index, out, steps, params, "stop", token)
            if len(prompt) + len(out) >= self.model_config.max_model_len or len(out) >= params.max_tokens:
                return self._completion(index, out, steps, params, "length", None)

    @staticmethod
    def _completion(index, out, steps, params, reason, stop_reason) -> CompletionOutput:
        logprobs = steps if params.logprobs is not None else None
        cumulative = sum(step[t].logprob for step, t in zip(steps, out)) if logprobs is not None else None
        return CompletionOutput(index, "", list(out), cumulative, logprobs, reason, stop_reason)

    def _sample_token(
        self,
        logits: torch.Tensor,
        prompt: list[int],
        out: list[int],
        params: SamplingParams,
        generator: torch.Generator | None,
    ) -> tuple[int, dict[int, Logprob] | None]:
        """vllm/v1/sample/sampler.py: Sampler.forward, steps 1-8 (its docstring lists them)."""
        raw = torch.log_softmax(logits, -1) if params.logprobs is not None else None  # 1. raw logprobs
        if params.allowed_token_ids is not None:  # 3. allowed token ids
            mask = torch.full_like(logits, float("-inf"))
            mask[params.allowed_token_ids] = 0.0
            logits = logits + mask
        if len(out) < params.min_tokens and params.all_stop_token_ids:  # 5a. min tokens
            logits[list(params.all_stop_token_ids)] = float("-inf")
        for token, bias in (params.logit_bias or {}).items():  # 5b. logit bias
            logits[token] += bias
        if params.repetition_penalty != 1.0:  # 6. penalties
            seen = torch.tensor(sorted(set(prompt) | set(out)), dtype=torch.long)
            chosen = logits[seen]
            logits[seen] = torch.where(
                chosen > 0, chosen / params.repetition_penalty, chosen * params.repetition_penalty
            )
        if out and (params.frequency_penalty or params.presence_penalty):
            counts = torch.bincount(torch.tensor(out), minlength=logits.numel()).float()
            logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
        if params.temperature < _SAMPLING_EPS:  # 7a. greedy
            token = int(logits.argmax())
        else:  # 7b-e
            logits = logits / params.temperature
            probs = torch.softmax(logits, -1)
            if params.min_p > 0:
                logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
            if 0 < params.top_k < logits.numel():
                logits = logits.masked_fill(logits < logits.topk(params.top_k).values[-1], float("-inf"))
            if params.top_p < 1.0:
                ordered, order = torch.softmax(logits, -1).sort(descending=True)
                drop = ordered.cumsum(-1) - ordered > params.top_p  # keep the smallest set reaching top_p
                logits[order[drop]] = float("-inf")
            token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        if params.logprobs is None:
            return token, None
        source = raw if self.model_config.logprobs_mode == "raw_logprobs" else torch.log_softmax(logits, -1)
        k = source.numel() if params.logprobs == -1 else params.logprobs  # 8. top-k and the sampled token
        chosen = [token] + [int(t) for t in source.topk(k).indices if int(t) != token] if k else [token]
        return token, {t: Logprob(float(source[t]), int((source > source[t]).sum()) + 1) for t in chosen}


def _generation_config_fields(model: str) -> dict[str, Any]:
    """vllm/config/model.py: ModelConfig.try_get_generation_config with generation_config="auto":
    the non-default fields of the model folder's generation_config.json, else of the one transformers
    derives from config.json (vllm/transformers_utils/config.py: try_get_generation_config)."""
    from transformers import AutoConfig, GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(model)
    except OSError:
        config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model))
    return config.to_diff_dict()


def module(
    model: ModelFactory = HFModel, *, device: Device | None = None, default_logprobs_mode: str = "raw_logprobs"
) -> types.ModuleType:
    """A fresh `vllm` module whose engines serve `model` on `device` (by default an 80 GiB GPU that
    nothing else uses). `default_logprobs_mode`: what an engine started without `logprobs_mode`
    returns (vLLM 0.33: raw_logprobs; "processed_logprobs" plays an engine that processes them).

    Besides the real names, the module has `device` and `started` (the LLMs started, in order)."""
    device = device or Device()
    started: list[LLM] = []
    engine = type(
        "LLM",
        (LLM,),
        {
            "device": device,
            "model_factory": staticmethod(model),
            "started": started,
            "default_logprobs_mode": default_logprobs_mode,
            "_tokenizers": {},
            "__module__": "vllm.entrypoints.llm",
        },
    )
    vllm = types.ModuleType("vllm")
    vllm.__version__ = VERSION
    vllm.LLM = engine
    vllm.SamplingParams = SamplingParams
    vllm.TokensPrompt = TokensPrompt
    vllm.RequestOutput = RequestOutput
    vllm.CompletionOutput = CompletionOutput
    vllm.device = device
    vllm.started = started
    return vllm
