"""The config schema: every node of a palign run, each field with its default, type and meaning.

Hydra composes `conf/` against these dataclasses (the `palign_schema` entry of Hydra's ConfigStore
is the first item of `conf/config.yaml`'s defaults list), so an unknown key anywhere (in a YAML
file or on the command line) and a value of the wrong type fail while the config is composed, with
the full key path: before any model loads and before a run folder is written. `check_values` then
refuses values of the right type outside their allowed range (the `check` of each field).

This module is the only home of each default, but for two nodes defined with their code below it
and used here as they are: the model spec (palign/llm/models.py: ModelSpec) and the sampling
settings (palign/llm/generation.py: SamplingConfig, the `Sampling` node); their fields are declared
with the same `knob` (palign/knobs.py). The YAML group options under `conf/` hold named choices (a
student, a prompt, a recipe's sizes) and list only what differs from here.

The swappable parts of stage 1 and the baseline (the prefix policy, the search, the granularity,
the judge's threshold) are `Any` nodes with a `_target_`: a new one is a class and a YAML file, with
no entry here. Each option's YAML file lists the class's options with their values (the classes
declare none), and the class checks them when it is built: the pipeline's preflight builds them
before anything loads, so a wrong option is refused naming its key.

Field metadata:
- `help`: what the field means (shown here, where it is declared);
- `identity`: False for the fields that say how a stage computes rather than what (a back end, a
  chunk size, a folder): they never enter the run's identity (palign/runs.py), every other field does;
- `check`: (what is allowed, test) for `check_values`;
- `content`: True for a field naming a local file or folder: the run identity holds what the file
  contains (a digest), never where it lies on this machine.
"""

from __future__ import annotations

from dataclasses import MISSING as MISSING_FACTORY
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from palign.knobs import FINITE, INTEGER, at_least, is_int, is_number, knob, number, one_of  # noqa: F401 (schema vocabulary)
from palign.llm.generation import SamplingConfig as Sampling
from palign.llm.models import ModelSpec

STAGES = ("all", "truncate", "align", "train", "eval", "grade", "report", "judge_chains")
TARGETS = ("long_cot", "short_cot", "prefix_continuation", "prefix_only", "student_only")
JUDGE_MODES = ("logits", "generate")  # the sufficiency judge's decision modes (palign/truncation/judge.py)
JUDGE_ENGINES = ("one_pass", "batched")  # its logits-mode scoring engines
TEACHERS = "palign.teachers.sources"


# -- shared pieces --------------------------------------------------------------------------------
@dataclass
class Grading:
    """math-verify grading in worker processes, each answer with a time limit."""

    workers: int = knob(1, "grading processes (0: in the calling process)", identity=False, check=at_least(0))
    timeout_s: float = knob(10.0, "seconds per answer before it counts as wrong", check=number(0, low_open=True))


@dataclass
class Ray:
    """Data-parallel inference through Ray Data for every stage whose `backend` is ray
    (`pip install 'palign[ray]'`; palign/llm/ray_backend.py). Each worker is a Ray actor holding
    one engine for the whole stage (the judge: one judge); a stage's missing work is sharded across
    the workers and stored as each piece comes back."""

    num_workers: int = knob(2, "actors, each holding one model (data parallelism)", identity=False, check=at_least(1))
    num_cpus_per_worker: float = knob(
        1.0, "CPUs Ray reserves per actor (also its torch threads)", identity=False, check=number(0, low_open=True)
    )
    num_gpus_per_worker: float = knob(
        0.0, "GPUs per actor (0 on CPU machines; 1 for one engine per GPU)", identity=False, check=number(0)
    )
    engine: str = knob(
        "hf",
        "what each worker holds: hf (palign's Hugging Face generation, any device) | vllm "
        "(a vLLM engine with the `vllm:` settings, GPU workers)",
        identity=False,
        check=one_of("hf", "vllm"),
    )
    address: str | None = knob(
        None,
        "null: start a local cluster on this machine; `auto`: join the cluster this node "
        "belongs to (`ray start`); ray://host:10001 for a remote head",
        identity=False,
    )
    batch_size: int = knob(
        16,
        "prompts per worker call (rounded to whole generation batches of sampling.batch_size); "
        "the judge sends one truncation.chunk_size chunk of traces per call",
        identity=False,
        check=at_least(1),
    )


@dataclass
class VLLM:
    """vLLM engine settings for every stage whose `backend` is vllm (GPU only, `pip install 'palign[vllm]'`)."""

    tensor_parallel_size: int = knob(1, "GPUs per engine", check=at_least(1))
    gpu_memory_utilization: float = knob(
        0.85, "share of the GPU each distinct engine reserves", check=number(0, 1, low_open=True)
    )
    max_model_len: int | None = knob(
        None, "context length (null: the model's)", check=at_least(1, optional="the model's")
    )
    enable_prefix_caching: bool = knob(True, "the judge's prefixes of one trace share their KV cache")
    dtype: str = knob("auto", "weights' dtype")
    seed: int = knob("${seed}", "engine seed")
    engine_kwargs: dict[str, Any] = knob(factory=dict, help="further vllm.LLM arguments, e.g. {enforce_eager: true}")


# -- paths, prompts, baseline ---------------------------------------------------------------------
@dataclass
class Paths:
    """Where a run reads and writes on this machine (never part of a run's identity)."""

    root: str = knob("${oc.env:PALIGN_OUTPUTS,${project_root:}/outputs}", "every file a run writes lives under here")
    runs: str = knob(
        "${paths.root}/runs", "run folders: <runs>/<run_name>-<fingerprint>; rerunning a command resumes there"
    )
    cache_dir: str = knob(
        "${oc.env:PALIGN_CACHE,${paths.root}/cache}",
        "artifacts shared between runs: converted models, tokenized data, stage stores",
    )
    shared_data: str = knob(
        "${oc.env:PALIGN_SHARED_DATA,${project_root:}/../shared/data}",
        "read-only reference data beside the repository (../shared/data)",
    )
    lock_timeout_s: float = knob(
        86400.0,
        "how long a process waits for another one computing the same cached stage "
        "(DDP ranks, SLURM tasks sharing cache_dir), then fails naming the lock",
        check=number(0),
    )


@dataclass
class PrefixMarkers:
    begin: str = knob(MISSING, "opens the teacher prefix in a P-ALIGN target")
    end: str = knob(MISSING, "closes it")


@dataclass
class Prompts:
    """The instruction and continuation prompts (conf/prompts/)."""

    instruction: str = knob(MISSING, "the inference/SFT instruction joined to each problem")
    question_separator: str = knob(MISSING, "between the problem and the instruction")
    continuation: str = knob(MISSING, "prefix alignment's prompt, with {question} and {prefix}")
    prefix_markers: PrefixMarkers = knob(factory=PrefixMarkers, help="the markers around the teacher prefix")


@dataclass
class Baseline:
    """What the student is trained on (conf/baseline/): a prefix policy, whether the student continues
    the prefixes, and the supervision target built from them."""

    name: str = knob(MISSING, "names the run and the method in result tables")
    target: str = knob(MISSING, "the supervision target (palign/data/supervision.py)", check=one_of(*TARGETS))
    prefix: Any = knob(
        MISSING,
        "how prefixes are made: a node whose `_target_` is a prefix policy of "
        "palign/truncation/prefixes.py (NoPrefix | AdaptivePrefix: the judge's search over the "
        "`truncation` node | FixedRatioPrefix with its `ratio`); its options are checked when it is "
        "built, before anything loads",
    )
    alignment: bool = knob(False, "whether the student continues the prefixes (stage 2)")


# -- stage 0: the teacher -------------------------------------------------------------------------
@dataclass
class TeacherSource:
    """Arguments every teacher source takes (palign/teachers/sources.py)."""

    only_correct: bool = knob(False, "keep only traces whose final answer math-verify grades correct")
    limit: int | None = knob(None, "keep the first N records (after filtering)", check=at_least(1, optional="all"))


@dataclass
class ChampSource(TeacherSource):
    _target_: str = f"{TEACHERS}.ChampTeacher"
    model: str = knob("GPT-4", "whose CHAMP solutions are the traces: GPT-3.5 | GPT-4 | GPT-4 Turbo | PaLM 2 Medium")
    setting: str = knob("0-Shot", "the CHAMP prompting setting")
    version: str = knob("v0", "the champ-dataset version")


@dataclass
class S1KSource(TeacherSource):
    _target_: str = f"{TEACHERS}.S1KTeacher"
    path: str = knob("simplescaling/s1K-1.1", "a Hub id, or a local file in the same schema", content=True)
    split: str = knob("train", "the dataset split")
    short_answer_chars: int = knob(
        64, "a reference solution up to this long is also the short answer", check=at_least(1)
    )


@dataclass
class JsonlSource(TeacherSource):
    _target_: str = f"{TEACHERS}.JsonlTeacher"
    path: str = knob(MISSING, "a local JSON or JSONL file", content=True)
    question_field: str = knob("question", "the record's problem")
    answer_field: str | None = knob("answer", "the gold answer (null: none)")
    long_cot_field: str = knob("long_cot", "the teacher trace (dotted path, e.g. code.0)")
    short_cot_field: str | None = knob(None, "the short solution (null: none)")
    id_field: str | None = knob(None, "a unique id (null: the line number)")
    strip_markers: list[str] = knob(factory=list, help="strings removed from the trace")
    keep_between: list[str] | None = knob(None, "[start, end]: keep only the trace between these markers")


@dataclass
class Problems:
    kind: str = knob("champ", "where the problems come from", check=one_of("champ", "file"))
    path: str | None = knob(None, "kind=file: a JSON/JSONL file of problems", content=True)
    question_field: str = knob("problem", "kind=file: the problem field")
    answer_field: str = knob("answer", "kind=file: the gold answer field")
    id_field: str | None = knob(None, "kind=file: a unique id (null: the line number)")


@dataclass
class Remote:
    """An OpenAI-compatible server (vLLM, SGLang, DeepSeek, Zhipu GLM, OpenAI)."""

    base_url: str | None = knob(None, "e.g. http://127.0.0.1:8000/v1", identity=False)
    model: str | None = knob(None, "the model name the server knows")
    api_key_env: str | None = knob(
        "OPENAI_API_KEY",
        "the NAME of the key's environment variable (null: no authentication); "
        "the key itself is read at call time and never logged",
        identity=False,
    )
    max_concurrency: int = knob(8, "requests in flight", identity=False, check=at_least(1))
    max_retries: int = knob(
        5, "on 429, 5xx, timeouts and connection errors; other 4xx fail at once", identity=False, check=at_least(0)
    )
    backoff_s: float = knob(
        1.0, "first retry delay, doubled each time (jittered, <= 60 s)", identity=False, check=number(0)
    )
    timeout_s: float = knob(600, "seconds per request", identity=False, check=number(0, low_open=True))
    extra_body: dict[str, Any] = knob(
        factory=dict, help="extra request fields, e.g. {repetition_penalty: 1.05} for vLLM"
    )
    include_reasoning: bool = knob(False, "prepend the server's separate reasoning field to the reply")
    server: str = knob(
        "openai",
        "the kind of server: openai (the OpenAI API and hosted look-alikes: standard fields "
        "only) | vllm (vLLM's OpenAI server: token-id prompts rendered by palign's chat template, every "
        "sampling field, the judge's logits mode) | transformers (transformers serve)",
        identity=False,
        check=one_of("openai", "vllm", "transformers"),
    )
    supports_n: bool | None = knob(
        None,
        "whether one request asks for several samples with `n` (null: as the kind of "
        "server does, and one sample per request once a server returns fewer)",
        identity=False,
    )


@dataclass
class OpenAIServer(Remote):
    """`backend: openai` (conf/backend/openai.yaml): a stage's model served by an OpenAI-compatible server
    (palign/llm/openai_backend.py: OpenAIBackend). `model` null: the stage's model (its `pretrained` id or
    folder; evaluation: the trained student's folder), as `vllm serve` and `transformers serve` name it."""

    _target_: str = "palign.llm.openai_backend.OpenAIBackend"


@dataclass
class GeneratedSource(TeacherSource):
    _target_: str = f"{TEACHERS}.GeneratedTeacher"
    only_correct: bool = knob(True, "keep only generated traces whose answer math-verify grades correct")
    model: ModelSpec = knob("${student}", "the generating model (ignored when `remote` is set)")
    backend: Any = knob(
        MISSING,
        "how `model` runs: an option of conf/backend/ (hf | vllm | ray | openai | auto), chosen "
        "with backend@teacher.source.backend=NAME and set field by field (teacher.source.backend.base_url=...)",
        identity=False,
    )
    problems: Problems = knob(factory=Problems, help="the problems to generate for")
    sampling: Sampling = knob(factory=lambda: Sampling(max_new_tokens=1024), help="the teacher's sampling")
    cache_dir: str = knob("${paths.cache_dir}", "where generations are stored", identity=False)
    prompts: Prompts = knob("${prompts}", "the instruction prompts")
    problem_limit: int | None = knob(
        32, "problems to generate for (generation is the expensive part)", check=at_least(1, optional="all")
    )
    chunk_size: int = knob(32, "problems per resumable chunk", identity=False, check=at_least(1))
    grading_workers: int = knob(1, "grading processes", identity=False, check=at_least(0))
    remote: Remote | None = knob(None, "generate through a server instead of `model`")


@dataclass
class Teacher:
    """Where the long chains of thought come from (conf/teacher/)."""

    name: str = knob(MISSING, "names the run")
    source: Any = knob(MISSING, "a teacher source node (ChampSource, S1KSource, JsonlSource or GeneratedSource)")


# -- stage 1: adaptive prefix truncation ----------------------------------------------------------
@dataclass
class Judge:
    """The sufficiency judge (palign/truncation/judge.py)."""

    model: ModelSpec = knob("${student}", "the judging model (self-judging: the student)")
    mode: str = knob(
        "logits",
        "logits: [ENOUGH] vs [NOT_ENOUGH] log-odds | generate: the authors' generate and parse",
        check=one_of(*JUDGE_MODES),
    )
    backend: Any = knob(
        MISSING,
        "how the judge runs: an option of conf/backend/ (hf | vllm | ray | openai | auto), chosen "
        "with backend@truncation.judge.backend=NAME and set field by field (truncation.judge.backend.base_url=...)",
        identity=False,
    )
    max_new_tokens: int = knob(256, "generate mode: reply tokens", check=at_least(1))
    max_context_tokens: int | None = knob(
        None,
        "tokens a probe's prompt and reply may take together (null: the judge "
        "model's context, config.json's max_position_embeddings); a longer probe is not "
        "sent to the judge and counts as not sufficient (counted as probes_over_context), "
        "so every trace is searched and no request exceeds the context",
        check=at_least(2, optional="the model's context"),
    )
    batch_size: int = knob(8, "sequences per forward (batched engine, generate mode)", check=at_least(1))
    engine: str = knob(
        "one_pass",
        "logits mode: one_pass scores every prefix from one forward over the trace; batched "
        "scores each requested prefix as its own sequence (same scores)",
        identity=False,
        check=one_of(*JUDGE_ENGINES),
    )
    max_tail_tokens: int = knob(4096, "one_pass: verdict-tail tokens per forward", identity=False, check=at_least(1))
    threshold: Any = knob(
        MISSING,
        "when a logits score counts as sufficient: a node whose `_target_` is a threshold "
        "of palign/truncation/judge.py with its options (conf/truncation/judge/threshold/: "
        "absolute, relative_to_full, quantile)",
    )


@dataclass
class JudgePrompt:
    """The judge's prompt (conf/truncation/judge_prompt/)."""

    name: str = knob(MISSING, "names the prompt in tables")
    enough: str = knob("[ENOUGH]", "the verdict for a sufficient prefix")
    not_enough: str = knob("[NOT_ENOUGH]", "the verdict for an insufficient one")
    template: str = knob(
        MISSING,
        "the prompt, with {question} and {reasoning_part}",
        check=(
            "a template holding {question} and {reasoning_part}",
            lambda v: "{question}" in v and "{reasoning_part}" in v,
        ),
    )


@dataclass
class Truncation:
    """Stage 1 (conf/truncation/, mirroring palign/truncation/); builds itself with the run's tokenizer."""

    _target_: str = "palign.truncation.stage.PrefixTruncation.from_config"
    granularity: Any = knob(
        MISSING,
        "the units a trace is split into: a node whose `_target_` is a Splitter of "
        "palign/truncation/units.py with its options (conf/truncation/granularity/)",
    )
    search: Any = knob(
        MISSING,
        "how the shortest sufficient prefix is searched: a node whose `_target_` is a "
        "PrefixSearch of palign/truncation/search.py, `_partial_: true` (one search per trace) and its "
        "options (conf/truncation/search/)",
    )
    judge: Judge = knob(MISSING, "conf/truncation/judge/")
    judge_prompt: JudgePrompt = knob(MISSING, "conf/truncation/judge_prompt/")
    chunk_size: int = knob(
        32, "traces per resumable chunk (all traces in a chunk advance together)", identity=False, check=at_least(1)
    )


# -- stage 2: prefix alignment --------------------------------------------------------------------
@dataclass
class Alignment:
    """The student continues each prefix; only correct continuations are kept (PAPER.md §2.2)."""

    _target_: str = "palign.alignment.continuation.PrefixContinuation.from_config"
    model: ModelSpec = knob("${student}", "the continuing model (the student)")
    filter: str = knob(
        "correct",
        "correct: keep continuations graded correct (Eq. 9) | none: keep all",
        check=one_of("correct", "none"),
    )
    backend: Any = knob(
        MISSING,
        "how the continuation runs: an option of conf/backend/ (hf | vllm | ray | openai | auto), chosen "
        "with backend@alignment.backend=NAME and set field by field (alignment.backend.base_url=...)",
        identity=False,
    )
    sampling: Sampling = knob(factory=lambda: Sampling(batch_size=32), help="the authors' continuation sampling")
    chunk_size: int = knob(32, "examples per resumable chunk", identity=False, check=at_least(1))
    grading: Grading = knob(factory=Grading, help="grading of the continuations")


# -- stage 3: SFT ---------------------------------------------------------------------------------
@dataclass
class Data:
    """Supervised examples and batches (palign/data/); builds the stage's LightningDataModule."""

    _target_: str = "palign.data.datamodule.PrefixAlignmentDataModule"
    max_length: int = knob(
        32768, "tokens per example; longer ones are dropped and counted, never truncated", check=at_least(1)
    )
    micro_batch_size: int = knob(1, "examples (or packed bins) per forward", check=at_least(1))
    val_size: int = knob(0, "problems held out for validation loss", check=at_least(0))
    train_limit: int | None = knob(
        None, "cap on training problems (after the validation split)", check=at_least(1, optional="all")
    )
    num_workers: int = knob(0, "DataLoader workers", identity=False, check=at_least(0))
    group_by_length: bool = knob(True, "micro-batches of similar length (less padding), in a shuffled order")
    packing: bool = knob(False, "padding-free packing: several examples per row, positions restart per example")
    pack_length: int | None = knob(
        None,
        "tokens per packed bin (a micro-batch flattens micro_batch_size bins into one row)",
        check=at_least(1, optional="max_length"),
    )


@dataclass
class Lora:
    """LoRA adapters (peft); conf/training/paper.yaml holds the paper's (PAPER.md §5)."""

    r: int = knob(MISSING, "rank", check=at_least(1))
    alpha: int = knob(MISSING, "scale numerator", check=at_least(1))
    dropout: float = knob(MISSING, "dropout on the LoRA input", check=number(0, 1, high_open=True))
    target_modules: Any = knob(MISSING, "peft target modules: all-linear or a list of module names")


@dataclass
class Training:
    """The optimizer and schedule (PAPER.md §5: AdamW, lr 5e-5, cosine, warmup 0.1, 3 epochs, batch 32);
    builds the LightningModule with the run's student (the loop's fields size the Trainer)."""

    _target_: str = "palign.training.module.StudentSFTModule.from_config"
    learning_rate: float = knob(5e-5, "peak learning rate", check=number(0, low_open=True))
    weight_decay: float = knob(0.0, "AdamW weight decay", check=number(0))
    betas: list[float] = knob(
        factory=lambda: [0.9, 0.999],
        help="AdamW betas",
        check=("two numbers in [0, 1)", lambda v: len(v) == 2 and all(is_number(b) and 0 <= b < 1 for b in v)),
    )
    warmup_ratio: float = knob(0.1, "share of optimizer steps warming up, then cosine decay", check=number(0, 1))
    epochs: int = knob(3, "passes over the training set", check=at_least(1))
    max_steps: int = knob(
        -1,
        "-1: no limit; else stop after this many optimizer steps",
        check=("-1 (no limit) or an integer >= 1", lambda v: is_int(v) and (v == -1 or v >= 1)),
    )
    effective_batch_size: int = knob(
        32, "examples per optimizer step (gradient accumulation makes it up)", check=at_least(1)
    )
    lora: Lora | None = knob(None, "null: full fine-tuning; training=paper for the paper's LoRA")
    gradient_checkpointing: bool = knob(
        False, "recompute activations in the backward pass (less memory)", identity=False
    )
    checkpoint_every_n_steps: int = knob(
        50, "optimizer steps between checkpoints (plus one per epoch end)", identity=False, check=at_least(1)
    )
    loss_kernel: str = knob(
        "auto",
        "the cross-entropy over supervised tokens: chunked (logits of one chunk at a "
        "time, memory flat in the vocabulary), liger (Liger's fused linear cross-entropy, GPU), "
        "auto (liger where installed and on a GPU, else chunked)",
        identity=False,
        check=one_of("auto", "chunked", "liger"),
    )
    loss_chunk_tokens: int = knob(
        1024,
        "supervised tokens per chunk of the chunked cross-entropy (1024 x Qwen's "
        "152k vocabulary: 0.6 GB of fp32 logits)",
        identity=False,
        check=at_least(1),
    )


@dataclass
class Trainer:
    """Lightning's Trainer: the arguments palign sets (conf/trainer/). Epochs, steps and accumulation
    come from `training`, loggers from `logger`."""

    _target_: str = "pytorch_lightning.Trainer"
    accelerator: str = knob("auto", "cpu | gpu | auto", identity=False)
    devices: Any = knob(1, "devices per node: a count, -1 for all, or a list", identity=False)
    num_nodes: int = knob(1, "nodes", identity=False, check=at_least(1))
    strategy: Any = knob("auto", "auto | ddp | fsdp | a Lightning strategy", identity=False)
    precision: str = knob(
        "${native_bf16_precision:${.accelerator}}",
        "bf16-mixed where the hardware has native bf16, else 32-true (it changes results)",
    )
    gradient_clip_val: float | None = knob(1.0, "gradient norm clip (null: none)")
    deterministic: Any = knob(False, "torch deterministic algorithms (true | false | warn)")
    limit_train_batches: Any = knob(None, "train on this many batches (or this share) per epoch (null: all)")
    limit_val_batches: Any = knob(None, "validation batches (null: all)", identity=False)
    log_every_n_steps: int = knob(1, "logging interval in optimizer steps", identity=False, check=at_least(1))
    num_sanity_val_steps: int = knob(0, "validation batches before training", identity=False, check=at_least(0))
    enable_progress_bar: bool = knob(True, "Lightning's progress bar", identity=False)
    enable_model_summary: bool = knob(True, "Lightning's model summary", identity=False)


# -- stage 4: evaluation --------------------------------------------------------------------------
@dataclass
class Benchmark:
    """One benchmark (conf/benchmark/; the arguments of palign.evaluation.benchmarks.load_benchmark)."""

    name: str = knob(MISSING, "names the benchmark in tables")
    local_path: str | None = knob(None, "a local .jsonl/.json file, which must exist (null: hub_id)", content=True)
    hub_id: str | None = knob(None, "a Hub dataset, read when local_path is null")
    hub_split: str = knob("test", "its split")
    problem_field: str = knob("problem", "the problem field")
    answer_field: str = knob("answer", "the gold answer field")
    id_field: str | None = knob(None, "a unique id field (null: the line number)")
    limit: int | None = knob(None, "the first N problems (null: all)", check=at_least(1, optional="all"))
    package: str | None = knob(None, "an installed data package instead of a file (champ)")
    numeric_answers_only: bool = knob(False, "keep problems whose answer is a number")
    exclude_training: bool = knob(
        False,
        "leave out every problem of the teacher's data set, which holds the run's "
        "training problems whatever the seed (held-out evaluation)",
    )


@dataclass
class Evaluation:
    """Pass@1 and Pass@k on the benchmarks (PAPER.md §3, §7); each setting names its own result folder."""

    _target_: str = "palign.evaluation.harness.evaluate_student"
    benchmarks: dict[str, Benchmark | None] = knob(factory=dict, help="name -> benchmark (null: left out)")
    limit: int | None = knob(
        None,
        "at most this many problems of each benchmark (null: each benchmark's own limit)",
        check=at_least(1, optional="no cap"),
    )
    model_path: str | None = knob(None, "evaluate this folder instead of the run's trained student")
    backend: Any = knob(
        MISSING,
        "how evaluation's generation runs: an option of conf/backend/ (hf | vllm | ray | openai | auto), chosen "
        "with backend@evaluation.backend=NAME and set field by field (evaluation.backend.base_url=...)",
        identity=False,
    )
    sampling: Sampling = knob(
        factory=lambda: Sampling(num_samples=3, batch_size=16), help="n=3, T=0.6, top-p 0.9, rep 1.05"
    )
    pass_k: int = knob(
        "${.sampling.num_samples}",
        "k of Pass@k (at most sampling.num_samples; by default all of them, "
        "so a smaller sampling.num_samples takes Pass@k with it)",
        check=at_least(1),
    )
    grading: Grading = knob(factory=lambda: Grading(workers=2), help="grading of the samples")
    chunk_size: int = knob(64, "problems per resumable chunk of predictions", identity=False, check=at_least(1))
    intervals: Intervals = knob(
        "${report.intervals}", "the intervals logged with the results (the run's `report.intervals`)", identity=False
    )


@dataclass
class ChainJudge:
    """stage=judge_chains: an LLM judge compares two supervision targets in both orders (PAPER.md §4, §8);
    builds itself with the run's records and stages."""

    _target_: str = "palign.analysis.chain_judge.judge_training_chains"
    name: str = knob(MISSING, "names the judge")
    backend: Any = knob(
        MISSING,
        "how the judge runs: an option of conf/backend/ (hf runs `model`; openai: a server and "
        "the model name it knows, in the option's fields), chosen with backend@chain_judge.backend=NAME",
    )
    model: ModelSpec = knob(
        "${student}",
        "the judging model (by default the student); on a server, the tokenizer and template switches it is sent with",
    )
    chain_a: str = knob("prefix_continuation", "the target whose rates are reported", check=one_of(*TARGETS))
    chain_b: str = knob("long_cot", "the target it is compared with", check=one_of(*TARGETS))
    limit: int | None = knob(64, "training problems to judge", check=at_least(1, optional="all"))
    chunk_size: int = knob(64, "judgments per resumable chunk", identity=False, check=at_least(1))
    sampling: Sampling = knob(
        factory=lambda: Sampling(max_new_tokens=1024, do_sample=False, repetition_penalty=1.0, batch_size=4),
        help="greedy: the same chains get the same verdict",
    )
    verdicts: dict[str, str] = knob(
        factory=lambda: {"first": "[[A]]", "second": "[[B]]", "tie": "[[TIE]]"},
        help="the reply's last verdict counts; none = unparseable",
    )
    prompt: str = knob(MISSING, "the judge's prompt, with {question}, {chain_1}, {chain_2}")


@dataclass
class Logger:
    """Where metrics go (conf/logger/)."""

    kind: str = knob(MISSING, "wandb | csv | none", check=one_of("wandb", "csv", "none"))
    project: str = knob("palign", "W&B project")
    entity: str | None = knob(None, "W&B entity (null: your default)")
    mode: str = knob(
        "auto",
        "W&B mode: auto (offline without an API key) | online | offline | disabled",
        check=one_of("auto", "online", "offline", "disabled"),
    )


# -- the report -----------------------------------------------------------------------------------
@dataclass
class Intervals:
    """The intervals on every Pass@k cell and the paired tests between runs (palign/evaluation/metrics.py,
    palign/reporting/comparisons.py: which methods and why): the report's, and the evaluation's W&B summary."""

    confidence_level: float = knob(
        0.95, "coverage of every interval", check=number(0, 1, low_open=True, high_open=True)
    )
    resamples: int = knob(
        9999, "bootstrap resamples per interval, and permutations per paired test", check=at_least(100)
    )
    seed: int = knob(
        0, "seed of the resampling: the same runs always get the same intervals and p-values", check=at_least(0)
    )


@dataclass
class Report:
    """stage=report and experiments/make_table.py: Table 1 and the ablation tables of finished runs, with
    intervals, paired differences from a reference row, seeds pooled, and published rows beside the runs
    (palign/reporting/). Never part of a run's identity."""

    reference: str = knob(
        "sft_long_cot",
        "Table 1's reference: each row is compared with its student's run of this "
        "baseline (paired differences over the problems both evaluated)",
    )
    ablation_reference: dict[str, str] = knob(
        factory=dict,
        help="ablation knob -> the value its arms are compared with, "
        "e.g. {search: binary} (a knob left out: its value in this config, i.e. the "
        "recipe's own, else the table's first arm)",
    )
    published_file: str | None = knob(
        None, "published results to show beside the runs (null: palign's own, palign/reporting/published.yaml)"
    )
    published: list[str] = knob(
        factory=list,
        help="rows of published_file shown beside the runs of their student, each "
        "cell marked reproduced (inside the run's interval), below or above it; the paper recipes "
        "name the paper's own row",
    )
    pass1: str = knob(
        "pass@1",
        "the Pass@1 columns: pass@1 (mean over samples) or pass@1_first (the first sample only); "
        "the paper does not say which it reports (PAPER.md §7.4)",
        check=one_of("pass@1", "pass@1_first"),
    )
    pass_k: int | None = knob(
        None,
        "k of the Pass@k columns (null: the runs' number of samples when they agree, else 3)",
        check=at_least(1, optional="the runs' number of samples"),
    )
    intervals: Intervals = knob(factory=Intervals, help="how intervals and paired tests are computed")


# -- the run --------------------------------------------------------------------------------------
@dataclass
class Config:
    """One run = one (student, teacher, baseline) through the stages the baseline needs."""

    paths: Paths = knob(factory=Paths, help="folders on this machine", identity=False)
    prompts: Prompts = knob(MISSING, "conf/prompts/")
    student: ModelSpec = knob(MISSING, "conf/student/ (palign/llm/models.py: ModelSpec documents the fields)")
    teacher: Teacher = knob(MISSING, "conf/teacher/")
    baseline: Baseline = knob(MISSING, "conf/baseline/")
    truncation: Truncation = knob(factory=Truncation, help="stage 1, conf/truncation/")
    alignment: Alignment = knob(factory=Alignment, help="stage 2, conf/alignment/")
    data: Data = knob(factory=Data, help="stage 3's data, conf/data/")
    training: Training = knob(factory=Training, help="stage 3's optimizer, conf/training/")
    trainer: Trainer = knob(factory=Trainer, help="conf/trainer/")
    evaluation: Evaluation = knob(
        factory=Evaluation, help="stage 4, conf/evaluation/ (names its own result folders)", identity=False
    )
    chain_judge: ChainJudge = knob(
        MISSING, "stage=judge_chains, conf/chain_judge/ (names its own artifact)", identity=False
    )
    logger: Logger = knob(MISSING, "conf/logger/", identity=False)
    report: Report = knob(
        factory=Report, help="stage=report: tables, intervals, comparisons (palign/reporting/)", identity=False
    )
    vllm: VLLM = knob(factory=VLLM, help="vLLM engines", identity=False)
    ray: Ray = knob(factory=Ray, help="Ray Data workers, for every stage whose backend is ray", identity=False)
    stage: str = knob(
        "all",
        "all (the baseline's pipeline: truncate -> align -> train -> eval), truncate, align, train, "
        "eval, grade (with predictions=PATH), report (tables and figures of all runs under paths.runs), "
        "judge_chains",
        identity=False,
        check=one_of(*STAGES),
    )
    seed: int = knob(0, "the run's seed", check=INTEGER)
    predictions: str | None = knob(
        None, "stage=grade: a JSONL prediction file with `answer` and a list of `output`s", identity=False
    )
    run_name: str = knob(
        "${student.name}-${baseline.name}-${teacher.name}",
        "readable part of the run id; the fingerprint of the run's identity follows it",
        identity=False,
    )
    group: str = knob("${run_name}", "the sweep a run belongs to (W&B group)", identity=False)
    tags: list[str] = knob(factory=list, help="W&B tags", identity=False)
    callbacks: dict[str, Any] = knob(
        factory=dict,
        help="extra Lightning callbacks: {name: {_target_: ..., ...}}, e.g. "
        "+callbacks.swa._target_=pytorch_lightning.callbacks.StochasticWeightAveraging",
    )


def register() -> None:
    """Put the schema into Hydra's ConfigStore: the top node and one entry per teacher source."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="palign_schema", node=Config)
    for name, node in (
        ("champ", ChampSource),
        ("s1k", S1KSource),
        ("jsonl", JsonlSource),
        ("generate", GeneratedSource),
    ):
        store.store(group="schema/teacher_source", name=name, node=node)
    store.store(group="schema/backend", name="openai", node=OpenAIServer)


def defaults(node: type, **overrides: Any) -> dict[str, Any]:
    """The schema's default of each field of `node` that has a concrete one (not MISSING, not an
    interpolation into the run's config), without `_target_`, updated with `overrides` (which must
    be fields of `node`): the arguments of a stage built outside a composed run (tests, benchmarks),
    so the schema stays the one home of each default."""
    names = {f.name for f in fields(node)}
    unknown = set(overrides) - names
    if unknown:
        raise TypeError(f"not fields of {node.__name__} (palign/schema.py): {sorted(unknown)}")
    out: dict[str, Any] = {}
    for spec in fields(node):
        if spec.name == "_target_":
            continue
        value = spec.default_factory() if spec.default_factory is not MISSING_FACTORY else spec.default
        if value is MISSING or (isinstance(value, str) and "${" in value):
            continue
        out[spec.name] = OmegaConf.to_container(OmegaConf.structured(value)) if is_dataclass(value) else value
    return {**out, **overrides}


# -- checks after composition ---------------------------------------------------------------------
class ConfigError(ValueError):
    """A config value out of its allowed range: names the key, the value and what is allowed."""


def schema_fields(node: Any):
    """(name, dataclass field) of a typed config node; nothing for a plain dict or a value."""
    kind = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    return [(f.name, f) for f in fields(kind)] if kind is not None and is_dataclass(kind) else []


def check_values(cfg: DictConfig) -> None:
    """Refuse values outside their allowed range (each field's `check`), naming every bad key.

    Types and unknown keys were already checked when Hydra composed the config against the schema;
    this also refuses keys added with `+` to a typed node, which composition lets through.
    """
    from omegaconf.errors import OmegaConfBaseException

    problems: list[str] = []
    try:
        plain = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=False)
        OmegaConf.merge(OmegaConf.structured(Config), plain)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config: {err}") from err

    def walk(node: Any, prefix: str) -> None:
        for name, spec in schema_fields(node):
            key = f"{prefix}{name}"
            try:
                value = node[name]
            except OmegaConfBaseException as err:
                problems.append(f"{key}: cannot be resolved ({err})")
                continue
            if isinstance(value, DictConfig):
                walk(value, key + ".")
            check = spec.metadata.get("check")
            if check is None or OmegaConf.is_missing(node, name):
                continue
            allowed, test = check
            plain = (
                OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value
            )
            try:
                ok = bool(test(plain))
            except TypeError:
                ok = False
            if not ok:
                problems.append(f"{key}={plain!r}: must be {allowed}")
        if (
            isinstance(node, DictConfig)
            and OmegaConf.get_type(node) is Sampling
            and node.get("do_sample") is False
            and is_int(node.get("num_samples"))
            and node.num_samples > 1
        ):
            # vLLM refuses it (vllm/sampling_params.py: _verify_greedy_sampling): greedy samples are all alike
            problems.append(
                f"{prefix}num_samples={node.num_samples}: must be 1 when {prefix}do_sample=false "
                "(greedy decoding gives one answer)"
            )
        if isinstance(node, DictConfig) and not schema_fields(node):
            for name in node:  # a plain dict of typed nodes, e.g. evaluation.benchmarks
                child = node[name]
                if isinstance(child, DictConfig):
                    walk(child, f"{prefix}{name}.")

    walk(cfg, "")
    samples, pass_k = cfg.evaluation.sampling.num_samples, cfg.evaluation.pass_k
    if is_int(samples) and is_int(pass_k) and pass_k > samples:
        problems.append(
            f"evaluation.pass_k={pass_k}: must be at most evaluation.sampling.num_samples={samples} "
            "(pass@k needs k samples per problem)"
        )
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
