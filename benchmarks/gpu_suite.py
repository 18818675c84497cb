"""The GPU suite: bf16 correctness, pretraining MFU and decoding throughput, in one run that writes one JSON
and one Markdown table.

    python -m benchmarks.gpu_suite --out DIR            # on a CUDA machine: the ~1B Llama 2 shape
    python -m benchmarks.gpu_suite --tiny --out DIR     # anywhere (CPU in the tests): toy shapes, same code

Sections
  bf16      logits of the same weights in fp32 and in bf16 (autocast, and bf16 weights) on the device; the
            stated tolerance is a mean absolute difference of at most 2% of the fp32 logits' std.
  pretrain  training tokens/s of the engine's step (bf16 autocast, fused AdamW, clipping) at 4096 tokens,
            torch.compile per block off and on; MFU against the card's dense bf16 peak (datasheet) and
            against a bf16 matmul measured in the same run.
  decode    batch-1 and batch-64 greedy decoding of 128 new tokens: our generator (CUDA-graph steps and
            plain eager) and `transformers`' `generate`, same bf16 weights; tokens of all three compared.
  ppo       PPO iterations of the real stage (`llama2.stages.ppo`) on a ~1B policy (the 1B shape with a
            4,096-piece toy tokenizer), split into generation, the rest of the rollout, and the update;
            with rollouts sampled from the fp32 policy and from its bf16 copy (`models.rollout_dtype`).

Sections run in the order given by `--sections`; the JSON and the table are rewritten after each one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import markdown_table
from llama2 import ModelArgs, Transformer
from llama2.generation.generator import generate
from llama2.model.checkpoint import save_hf
from llama2.training.parallel import apply_compile

# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s), by a substring of the device name.
DATASHEET_BF16_PEAK = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclass
class SuiteShape:
    args: ModelArgs
    seq_len: int
    micro_batch: int
    train_steps: int
    decode_tokens: int
    big_batch: int


FULL = SuiteShape(ModelArgs.from_preset("1B", max_seq_len=4096), seq_len=4096, micro_batch=4, train_steps=10,
                  decode_tokens=128, big_batch=64)
TINY = SuiteShape(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=16,
                            max_seq_len=256), seq_len=128, micro_batch=2, train_steps=2, decode_tokens=8,
                  big_batch=4)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def datasheet_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DATASHEET_BF16_PEAK.items() if key in name), None)


def measured_matmul_peak(device: torch.device, size: int) -> float:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = _timed(lambda: a @ b, device, repeats=10)
    return 2 * size**3 / seconds


def new_model(shape: SuiteShape, device: torch.device, seed: int = 0) -> Transformer:
    model = Transformer(shape.args)
    model.init_weights(seed=seed)
    return model.to(device)


# --- bf16 ---------------------------------------------------------------------------------------------------


def check_bf16(shape: SuiteShape, device: torch.device) -> dict:
    model = new_model(shape, device).eval()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape.args.vocab_size, (2, min(512, shape.seq_len)), generator=gen).to(device)
    autocast_dtype = torch.bfloat16
    with torch.no_grad():
        ref = model(tokens)
        with torch.autocast(device.type, dtype=autocast_dtype):
            auto = model(tokens)
        bf16 = model.to(torch.bfloat16)(tokens)
    scale = ref.std().item()
    result = {"logit_std_fp32": scale}
    for name, logits in (("autocast", auto), ("bf16_weights", bf16)):
        diff = (logits - ref).abs()
        result[f"{name}_max_abs_diff"] = diff.max().item()
        result[f"{name}_mean_abs_diff_over_std"] = diff.mean().item() / scale
        result[f"{name}_top1_agreement"] = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    result["tolerance_mean_abs_diff_over_std"] = 0.02
    result["within_tolerance"] = all(result[f"{n}_mean_abs_diff_over_std"] <= 0.02
                                     for n in ("autocast", "bf16_weights"))
    return result


# --- pretraining ----------------------------------------------------------------------------------------------


def bench_pretrain(shape: SuiteShape, device: torch.device, compile: bool, peak: float | None,
                   matmul_peak: float) -> dict:
    """Tokens/s of full training steps: bf16 autocast forward/backward, clip at 1.0, fused AdamW."""
    torch.manual_seed(0)
    model = new_model(shape, device).train()
    if compile:
        apply_compile(model)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1,
                            fused=fused)
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, shape.args.vocab_size, (shape.micro_batch, shape.seq_len + 1), generator=gen)
    x, y = batch[:, :-1].to(device), batch[:, 1:].to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    losses = []

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    start = time.perf_counter()
    step()  # compile (when on) and allocator warm-up
    _sync(device)
    warmup_s = time.perf_counter() - start
    seconds = _timed(step, device, repeats=shape.train_steps)
    tokens_per_s = x.numel() / seconds
    flops = shape.args.flops_per_token(shape.seq_len) * tokens_per_s
    result = {
        "compile": compile,
        "params": shape.args.num_params(),
        "tokens_per_step": x.numel(),
        "step_seconds": seconds,
        "first_step_seconds": warmup_s,
        "tokens_per_s": tokens_per_s,
        "model_tflops": flops / 1e12,
        "mfu_vs_measured_matmul": flops / matmul_peak,
        "loss_first": losses[0].item(),
        "loss_last": losses[-1].item(),
    }
    if peak is not None:
        result["mfu_vs_datasheet"] = flops / peak
    if device.type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return result


def pretrain_rows(shape: SuiteShape, device: torch.device, peak: float | None, matmul_peak: float) -> list[dict]:
    """Compile off, then on (GPU only); halves the micro-batch once if it does not fit in memory."""
    rows = []
    for compile in (False, True) if device.type == "cuda" else (False,):
        try:
            rows.append(bench_pretrain(shape, device, compile, peak, matmul_peak))
            continue
        except torch.cuda.OutOfMemoryError:
            pass  # retried below, outside the handler, so the failed attempt's tensors are freed first
        torch.cuda.empty_cache()
        shape = dataclasses.replace(shape, micro_batch=shape.micro_batch // 2)
        rows.append(bench_pretrain(shape, device, compile, peak, matmul_peak))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# --- decoding -------------------------------------------------------------------------------------------------


def _decode_batch(model: Transformer, hf, prompts: torch.Tensor, n: int, device: torch.device) -> list[dict]:
    outputs: dict[str, list[list[int]]] = {}
    prompt_lists = prompts.tolist()

    def ours(graph: bool, key: str) -> Callable[[], None]:
        def fn() -> None:
            outputs[key] = generate(model, prompt_lists, n, stop_ids=[], temperature=0, cuda_graph=graph).tokens
        return fn

    def theirs() -> None:
        with torch.inference_mode():
            out = hf.generate(prompts.to(device), attention_mask=torch.ones_like(prompts).to(device),
                              max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        outputs["transformers"] = out[:, prompts.shape[1]:].tolist()

    impls = [("transformers", theirs), ("llama2 eager", ours(False, "llama2 eager"))]
    if device.type == "cuda":
        impls.append(("llama2 cuda graph", ours(True, "llama2 cuda graph")))
    times = {name: _timed(fn, device, repeats=3) for name, fn in impls}
    rows = []
    batch = prompts.shape[0]
    for name, seconds in times.items():
        same = sum(a == b for a, b in zip(outputs[name], outputs["transformers"], strict=True))
        same_eager = sum(a == b for a, b in zip(outputs[name], outputs["llama2 eager"], strict=True))
        rows.append({"batch": batch, "impl": name, "new_tokens": n, "seconds": seconds,
                     "tokens_per_s": batch * n / seconds, "speedup_vs_transformers": times["transformers"] / seconds,
                     "rows_equal_to_transformers": f"{same}/{batch}",
                     "rows_equal_to_llama2_eager": f"{same_eager}/{batch}"})
    return rows


def check_cuda_graph_decoding(device: torch.device) -> dict:
    """Exactness of graph replay: a small fp32 model with peaked logits, ragged prompts, graph vs eager."""
    args = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=512)
    model = Transformer(args)
    model.init_weights(seed=3)
    with torch.no_grad():
        model.output.weight.mul_(20)
    model = model.to(device).eval()
    gen = torch.Generator().manual_seed(4)
    prompts = [[1] + torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 17, 9, 30)]
    eager = generate(model, prompts, 40, stop_ids=[2], temperature=0, cuda_graph=False).tokens
    graph = generate(model, prompts, 40, stop_ids=[2], temperature=0, cuda_graph=True).tokens
    again = generate(model, prompts[:2], 40, stop_ids=[2], temperature=0, cuda_graph=True).tokens
    return {"rows": len(prompts), "graph_equals_eager": graph == eager, "reused_graph_equals_eager": again == eager[:2]}


def bench_decode(shape: SuiteShape, device: torch.device) -> list[dict]:
    from transformers import LlamaForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = new_model(shape, device).to(dtype).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, tmp)
        hf = LlamaForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
    gen = torch.Generator().manual_seed(2)
    rows = []
    for batch in (1, shape.big_batch):
        prompts = torch.randint(3, shape.args.vocab_size, (batch, 32), generator=gen)
        prompts[:, 0] = 1
        rows += _decode_batch(model, hf, prompts, shape.decode_tokens, device)
    return rows


# --- PPO ---------------------------------------------------------------------------------------------------


@dataclass
class PPOShape:
    args: ModelArgs
    vocab: int
    prompts: int
    max_gen_len: int
    iterations: int


PPO_FULL = PPOShape(ModelArgs.from_preset("1B", max_seq_len=1024), vocab=4096, prompts=64, max_gen_len=128,
                    iterations=3)
PPO_TINY = PPOShape(TINY.args, vocab=512, prompts=8, max_gen_len=8, iterations=2)


def bench_ppo(shape: PPOShape, device: torch.device, work: Path) -> dict:
    """Time PPO iterations of the real stage; the reward is the share of even token ids (a known optimum),
    so no reward model is needed and the timing is the policy's own."""
    from dataclasses import replace

    from llama2.data.formats import dumps
    from llama2.data.toyworld import ToyWorld
    from llama2.stages import ppo
    from llama2.tokenizer.tokenizer import Tokenizer
    from llama2.tokenizer.train import train_tokenizer

    world = ToyWorld(0)
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(world.pretraining_corpus(2_000_000 if shape is PPO_FULL else 100_000)))
    tokenizer = Tokenizer(train_tokenizer([corpus], work / "tok", shape.vocab))
    model = Transformer(replace(shape.args, vocab_size=tokenizer.n_words))
    model.init_weights(seed=0)
    policy = save_hf(model, work / "policy", tokenizer_model=tokenizer.model_path)
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(dumps({"messages": p.messages}) + "\n"
                               for p in world.eval_prompts("helpful", shape.prompts)))

    def even_share(prompts, texts, ids):
        return ppo.Scores(torch.tensor([sum(t % 2 == 0 for t in r) / max(len(r), 1) for r in ids]), None)

    micro = min(16, shape.prompts)
    result = {"params": model.args.num_params(), "prompts_per_iteration": shape.prompts,
              "max_gen_len": shape.max_gen_len, "rollouts": []}
    for dtype in ("fp32", "bf16"):
        run_dir = work / f"run_{dtype}"
        cfg = ppo.Config(out_dir=str(run_dir), device=device.type, checkpoint_every=0,
                         models=ppo.Models(policy=str(policy), rollout_dtype=dtype),
                         prompts=ppo.Prompts(files=[str(prompts)]),
                         ppo=ppo.PPOHyper(iterations=shape.iterations, batch_size=shape.prompts,
                                          mini_batch_size=micro, micro_batch_size=micro,
                                          generation_batch_size=shape.prompts, max_gen_len=shape.max_gen_len))
        ppo.run(cfg, scorer=even_share)
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        last = rows[-1]  # the first iteration captures the decoding graphs
        result["rollouts"].append({
            "rollout_dtype": dtype, "mean_response_length": last["response_length"],
            "iteration_seconds": last["seconds"], "generation_seconds": last["seconds_generation"],
            "rollout_seconds": last["seconds_rollout"], "update_seconds": last["seconds_update"],
            "generation_share": last["seconds_generation"] / last["seconds"],
            "generation_logprob_max_diff": last["generation_logprob_max_diff"],
            "iterations": [{k: r[k] for k in ("seconds", "seconds_generation", "seconds_update")} for r in rows]})
    return result


# --- the suite ------------------------------------------------------------------------------------------------


def run_suite(tiny: bool, out_dir: Path, sections: list[str]) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    shape = TINY if tiny else FULL
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    report: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "shape": {**shape.args.to_dict(), "params": shape.args.num_params(), "seq_len": shape.seq_len},
        "command": f"python -m benchmarks.gpu_suite{' --tiny' if tiny else ''} --out {out_dir}",
    }
    peak = datasheet_peak(device)
    report["datasheet_bf16_peak_tflops"] = peak / 1e12 if peak else None
    matmul_peak = measured_matmul_peak(device, 8192 if device.type == "cuda" else 256)
    report["measured_matmul_tflops"] = matmul_peak / 1e12
    jobs: dict[str, Callable[[], object]] = {
        "bf16": lambda: check_bf16(shape, device),
        "pretrain": lambda: pretrain_rows(shape, device, peak, matmul_peak),
        "decode": lambda: bench_decode(shape, device),
        "ppo": lambda: bench_ppo(PPO_TINY if tiny else PPO_FULL, device, Path(tempfile.mkdtemp())),
    }
    if device.type == "cuda":
        jobs["graph_check"] = lambda: check_cuda_graph_decoding(device)
    order = [n for n in sections if n in jobs] + (["graph_check"] if "graph_check" in jobs and "decode" in sections
                                                   else [])
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in order:
        job = jobs[name]
        start = time.perf_counter()
        try:
            report[name] = job()
        except Exception as exc:  # one failing section must not lose the others' numbers
            report[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        print(f"[gpu_suite] {name} done in {time.perf_counter() - start:.0f}s", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # written after every section, so a run stopped by a time limit keeps what it measured
        (out_dir / "gpu_suite.json").write_text(json.dumps(report, indent=2) + "\n")
        (out_dir / "gpu_suite.md").write_text(render_markdown(report))
    return report


def render_markdown(report: dict) -> str:
    lines = [f"GPU suite on **{report['device']}** (torch {report['torch']}), `{report['command']}`", ""]
    peak = report.get("datasheet_bf16_peak_tflops")
    lines.append(f"bf16 matmul measured here: {report['measured_matmul_tflops']:.0f} TFLOP/s"
                 + (f"; datasheet dense bf16 peak: {peak:.0f} TFLOP/s" if peak else ""))
    errors = {k: v["error"] for k, v in report.items() if isinstance(v, dict) and "error" in v}
    for name, error in errors.items():
        lines += ["", f"**{name} failed:** `{error}`"]
    if "bf16" in report and "bf16" not in errors:
        b = report["bf16"]
        lines += ["", f"bf16 vs fp32 logits (tolerance: mean abs diff <= 2% of the fp32 std "
                      f"{b['logit_std_fp32']:.3f}): within tolerance = {b['within_tolerance']}", "",
                  markdown_table([{"mode": m, "max abs diff": b[f"{m}_max_abs_diff"],
                                   "mean abs diff / std": b[f"{m}_mean_abs_diff_over_std"],
                                   "top-1 agreement": b[f"{m}_top1_agreement"]}
                                  for m in ("autocast", "bf16_weights")])]
    if "pretrain" in report and "pretrain" not in errors:
        rows = [{"compile": r["compile"], "tokens/s": r["tokens_per_s"], "step s": r["step_seconds"],
                 "MFU (datasheet)": r.get("mfu_vs_datasheet", float("nan")),
                 "MFU (measured matmul)": r["mfu_vs_measured_matmul"],
                 "peak mem GiB": r.get("max_memory_gib", float("nan"))} for r in report["pretrain"]]
        lines += ["", f"Pretraining, {report['shape']['params']:,} parameters, {report['shape']['seq_len']} tokens "
                      "per sequence, bf16 autocast, fused AdamW:", "", markdown_table(rows)]
    if "decode" in report and "decode" not in errors:
        lines += ["", "Greedy decoding, same bf16 weights:", "", markdown_table(report["decode"])]
    if "ppo" in report and "ppo" not in errors:
        p = report["ppo"]
        rows = [{"rollouts": r["rollout_dtype"], "iteration s": r["iteration_seconds"],
                 "generation s": r["generation_seconds"], "generation share": f"{r['generation_share']:.0%}",
                 "rest of rollout s": r["rollout_seconds"] - r["generation_seconds"],
                 "update s": r["update_seconds"], "mean response tokens": r["mean_response_length"],
                 "max log-prob diff vs trainer": r["generation_logprob_max_diff"]} for r in p["rollouts"]]
        lines += ["", f"PPO, one iteration ({p['params']:,}-parameter fp32 policy, {p['prompts_per_iteration']} "
                      f"prompts, up to {p['max_gen_len']} new tokens; the last of the run's iterations):", "",
                  markdown_table(rows)]
    if "graph_check" in report and "graph_check" not in errors:
        lines += ["", f"CUDA-graph decoding exactness (fp32, ragged batch): {report['graph_check']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy shapes on CPU (what the tests run)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="where the JSON and table go")
    parser.add_argument("--sections", default="bf16,pretrain,decode,ppo", help="comma-separated subset to run")
    args = parser.parse_args(argv)
    report = run_suite(args.tiny, args.out, args.sections.split(","))
    print(render_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
