"""The prepared GPU check of the LLM half (issue 22, Part 2): one script, <= 8 minutes on one H200,
engine/ code only (the device image has torch, transformers, peft, pyarrow; no Ray, no DeepSpeed).

Parts (each in its own try/except under its own time budget; the JSON is rewritten after every
part, so a failure or a timeout loses only that part):
  effort_7b        benchmarks/effort.py's three paths on a LLaMA-7B shape (random init, bf16,
                   batch 32 x 128 tokens, LoRA r=8 on q,v): batched effort vs the per-sample
                   loop vs a plain forward+backward; tokens/s; peak memory; batched-vs-loop
                   agreement; one more effort timing at 150 tokens (Book prompts).
  effort_8layer    the same at 8 layers (128 and 150 tokens), and the projected Book-size effort
                   pass (88,000 prompts of ~150 tokens) on one GPU: from the 32-layer timing at 150
                   tokens, and from the 8-layer one scaled by the measured 32/8-layer ratio.
  influence_games  the compiled forward-mode influence pass (engine.influence.DirectionalDerivatives,
                   compile=True, micro-batches padded by engine.surrogate.pad_to_bucket, as the
                   actors run it) on the Games surrogate shape (SASRec 64-d, 2 blocks, 17,332
                   items, sampled softmax), against eager JVP, a forward and a per-sample loop.
  effort_smollm2   effort throughput of a SmolLM2-135M shape (random init, vocabulary 49,152,
                   tied embeddings) on the token lengths of 512 Games prompts
                   (games_lengths.json, lengths only), length-sorted micro-batches of 32.

Goals (issue 22): effort batched >= 10x the loop and <= 1.3x a plain forward+backward at 7B
shape; Book-size effort pass <= 20 minutes on one H200.

Run::

    bash benchmarks/gpu/run.sh                      # on the GPU machine; JSON to $OUT/gpu_results.json
    bash benchmarks/gpu/run.sh --out /tmp/gpu.json --parts effort_7b
    bash benchmarks/gpu/run.sh --dry-run --out /tmp/dry.json   # CPU, tiny shapes, ~30 s (a unit test runs it)
    .venv/bin/python benchmarks/gpu/bench.py --make-lengths PREPARED_GAMES   # rewrite games_lengths.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the checkout: engine/ and benchmarks/

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.effort import build_lora_llama, effort_paths, peak_memory_mib, random_batch, time_interleaved  # noqa: E402

LENGTHS_FILE = HERE / "games_lengths.json"
PARTS = ("effort_7b", "effort_8layer", "influence_games", "effort_smollm2")
BOOK_PROMPTS, BOOK_TOKENS = 88_000, 150
GAMES_SAMPLES, GAMES_ITEMS = 49_156, 17_332
# Modules the device image lacks: importing one would fail there.
ABSENT_ON_DEVICE = ("ray", "deepspeed")

LLAMA7B = dict(vocab=32000, hidden=4096, layers=32, heads=32, intermediate=11008)
SMOLLM2 = dict(vocab=49152, hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, tie_embeddings=True)
FULL = {
    "effort_7b": dict(model=LLAMA7B, batch=32, tokens=128, repeats=3, budget_s=170),
    "effort_8layer": dict(model=dict(LLAMA7B, layers=8), batch=32, tokens=128, repeats=3, budget_s=80),
    "influence_games": dict(items=GAMES_ITEMS, samples=1024, micro_batch=256, loop_samples=32, repeats=3,
                            compile=True, budget_s=120),
    "effort_smollm2": dict(model=SMOLLM2, micro_batch=32, n_lengths=512, loop_samples=32, repeats=2, budget_s=60),
}
TINY = dict(vocab=512, hidden=64, layers=2, heads=4, intermediate=128)
DRY = {
    "effort_7b": dict(model=TINY, batch=4, tokens=16, repeats=1, budget_s=60),
    "effort_8layer": dict(model=dict(TINY, layers=1), batch=4, tokens=16, repeats=1, budget_s=60),
    # compile=False: inductor on CPU costs ~60 s; the compiled branch runs on the GPU only
    "influence_games": dict(items=500, samples=48, micro_batch=16, loop_samples=4, repeats=1, compile=False,
                            budget_s=60),
    "effort_smollm2": dict(model=dict(SMOLLM2, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128),
                           micro_batch=4, n_lengths=8, max_tokens=24, loop_samples=4, repeats=1, budget_s=60),
}


class PartTimeout(Exception):
    """A part ran past its time budget (raised by SIGALRM between Python operations)."""


def _alarm(signum, frame):
    raise PartTimeout("ran past its time budget")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float(((a - b).abs() / b.abs().clamp_min(1e-30)).max())


def measure_effort(model, batch: dict, *, repeats: int, device: torch.device, res: dict) -> None:
    """benchmarks/effort.py's measurement, results written into ``res`` as they come."""
    B = int(batch["input_ids"].shape[0])
    tokens = int(batch["attention_mask"].sum())
    paths = effort_paths(model, batch)
    t = time.perf_counter()
    e = paths["effort"]()
    r = paths["loop"]()
    paths["fwd_bwd"]()
    _sync(device)
    res["warmup_s"] = time.perf_counter() - t
    res["agreement_max_rel_err"] = _rel(e, r)
    res["effort_finite"] = bool(torch.isfinite(e).all())
    best, _ = time_interleaved(paths, repeats, device)
    for k, v in best.items():
        res[f"{k}_s_per_batch"] = v
        res[f"{k}_samples_per_s"] = B / v
        res[f"{k}_tokens_per_s"] = tokens / v
    res["effort_speedup_vs_loop"] = best["loop"] / best["effort"]
    res["effort_cost_vs_fwd_bwd"] = best["effort"] / best["fwd_bwd"]
    for k in paths:
        res[f"{k}_peak_mib"] = peak_memory_mib(paths[k], device)


def _llama(shape: dict, device, dtype, attn):
    return build_lora_llama(vocab=shape["vocab"], hidden=shape["hidden"], layers=shape["layers"],
                            heads=shape["heads"], kv_heads=shape.get("kv_heads"), intermediate=shape["intermediate"],
                            tie_embeddings=shape.get("tie_embeddings", False), lora_r=8, device=device, dtype=dtype,
                            attn=attn)


def part_effort_7b(p: dict, device, dtype, attn, res: dict, ctx: dict) -> None:
    model = _llama(p["model"], device, dtype, attn)
    res["parameters"] = sum(x.numel() for x in model.parameters())
    res["lora_parameters"] = sum(x.numel() for x in model.parameters() if x.requires_grad)
    res["shape"] = dict(p["model"], batch=p["batch"], tokens=p["tokens"])
    measure_effort(model, random_batch(p["batch"], p["tokens"], p["model"]["vocab"], device),
                   repeats=p["repeats"], device=device, res=res)
    ctx["t32_128"] = res["effort_s_per_batch"]
    # Book prompts are ~150 tokens: one more timing of the effort path at that length
    fn = effort_paths(model, random_batch(p["batch"], BOOK_TOKENS, p["model"]["vocab"], device))["effort"]
    fn()
    best, _ = time_interleaved({"effort": fn}, p["repeats"], device)
    res[f"effort_s_per_batch_T{BOOK_TOKENS}"] = ctx["t32_150"] = best["effort"]
    del model, fn


def part_effort_8layer(p: dict, device, dtype, attn, res: dict, ctx: dict) -> None:
    model = _llama(p["model"], device, dtype, attn)
    res["shape"] = dict(p["model"], batch=p["batch"], tokens=p["tokens"])
    measure_effort(model, random_batch(p["batch"], p["tokens"], p["model"]["vocab"], device),
                   repeats=p["repeats"], device=device, res=res)
    b150 = random_batch(p["batch"], BOOK_TOKENS, p["model"]["vocab"], device)
    fns = effort_paths(model, b150)
    fns["effort"]()
    best, _ = time_interleaved({"effort": fns["effort"]}, p["repeats"], device)
    t8_150 = res[f"effort_s_per_batch_T{BOOK_TOKENS}"] = best["effort"]
    res[f"effort_peak_mib_T{BOOK_TOKENS}"] = peak_memory_mib(fns["effort"], device)
    n_batches = math.ceil(BOOK_PROMPTS / p["batch"])
    proj = {"prompts": BOOK_PROMPTS, "tokens": BOOK_TOKENS, "batch": p["batch"], "batches": n_batches,
            "from_8_layers_x4_s": n_batches * t8_150 * 4}
    if "t32_128" in ctx:
        scale = ctx["t32_128"] / res["effort_s_per_batch"]
        proj["layer_scale_32_over_8_measured"] = scale
        proj["from_8_layers_x_measured_scale_s"] = n_batches * t8_150 * scale
    if "t32_150" in ctx:
        proj["from_32_layers_direct_s"] = n_batches * ctx["t32_150"]
    best_est = proj.get("from_32_layers_direct_s", proj.get("from_8_layers_x_measured_scale_s",
                                                            proj["from_8_layers_x4_s"]))
    proj["projected_s"] = best_est
    proj["projected_min"] = best_est / 60
    res["book_projection"] = proj
    del model, fns


def _lengths(p: dict, key: str) -> list[int]:
    lengths = json.loads(LENGTHS_FILE.read_text())[key]
    return [min(int(x), p.get("max_tokens", 10**9)) for x in lengths]


def part_influence_games(p: dict, device, dtype, attn, res: dict, ctx: dict) -> None:
    import pyarrow as pa

    from engine.influence import DirectionalDerivatives, flatten_params, split_direction, trainable_params
    from engine.surrogate import SurrogateConfig, build_surrogate, make_batches, pad_to_bucket, surrogate_loss

    del dtype, attn, ctx  # the surrogate runs in float32, as the influence actors run it
    rng = np.random.default_rng(0)
    hist_lens = _lengths(p, "history_items")
    lens = [max(1, hist_lens[i % len(hist_lens)]) for i in range(p["samples"])]
    samples = pa.table({"sample_id": pa.array(np.arange(p["samples"]), pa.int64()),
                        "history": pa.array([rng.integers(0, p["items"], k).tolist() for k in lens], pa.list_(pa.int32())),
                        "target": pa.array(rng.integers(0, p["items"], p["samples"]), pa.int32())})
    model = build_surrogate(p["items"], SurrogateConfig(loss="sampled")).to(device).eval()
    params = trainable_params(model)
    m = sum(x.numel() for x in params.values())
    res["shape"] = {"items": p["items"], "parameters": m, "samples": p["samples"], "micro_batch": p["micro_batch"],
                    "loss": "sampled", "history_lengths": "games_lengths.json history_items"}
    v = (torch.randn(m, generator=torch.Generator().manual_seed(0)) / m ** 0.5).to(device)
    vs = split_direction(model, v)

    def dev(b):
        return {k: (x.to(device) if torch.is_tensor(x) else x) for k, x in b.items()}

    micro = [dev(b) for b in make_batches(samples, batch_size=p["micro_batch"], max_len=50, order="length")]
    rows = [len(b["sample_id"]) for b in micro]
    eager = DirectionalDerivatives(model, surrogate_loss, vs)

    def fwd():
        with torch.no_grad():
            for b in micro:
                surrogate_loss(model, b)

    def jvp_eager():
        return torch.cat([eager(b) for b in micro])

    plist = list(params.values())
    first = micro[0]
    n_loop = min(p["loop_samples"], rows[0])

    def loop():
        out = []
        for i in range(n_loop):
            b = {k: (x[i:i + 1] if torch.is_tensor(x) else x) for k, x in first.items()}
            out.append(flatten_params(torch.autograd.grad(surrogate_loss(model, b).sum(), plist)) @ v)
        return torch.stack(out)

    want = jvp_eager()
    res["jvp_vs_loop_max_rel_err"] = _rel(want[:n_loop], loop())
    fns = {"forward": fwd, "jvp_eager": jvp_eager, "loop": loop}
    if p["compile"]:
        padded = [pad_to_bucket(b, p["micro_batch"], 50) for b in micro]
        t = time.perf_counter()
        compiled = DirectionalDerivatives(model, surrogate_loss, vs, compile=True)
        got = torch.cat([compiled(b)[:r] for b, r in zip(padded, rows)])
        _sync(device)
        res["compile_and_first_pass_s"] = time.perf_counter() - t
        res["compiled_vs_eager_max_rel_diff"] = float((got - want).abs().max() / want.abs().max())
        res["compiled_shapes"] = sorted({tuple(b["seq"].shape) for b in padded})
        fns["jvp_compiled"] = lambda: [compiled(b) for b in padded]
    best, _ = time_interleaved(fns, p["repeats"], device)
    n = p["samples"]
    for k in ("forward", "jvp_eager", "jvp_compiled"):
        if k in best:
            res[f"{k}_s"] = best[k]
            res[f"{k}_samples_per_s"] = n / best[k]
    res["loop_samples_per_s"] = n_loop / best["loop"]
    pass_ = "jvp_compiled" if "jvp_compiled" in best else "jvp_eager"
    res["influence_pass"] = pass_
    res["influence_speedup_vs_loop"] = res[f"{pass_}_samples_per_s"] / res["loop_samples_per_s"]
    res["influence_cost_vs_eager_forward"] = best[pass_] / best["forward"]
    res["games_pass_projected_s"] = GAMES_SAMPLES / res[f"{pass_}_samples_per_s"]
    res["book_pass_projected_s"] = BOOK_PROMPTS / res[f"{pass_}_samples_per_s"]


def part_effort_smollm2(p: dict, device, dtype, attn, res: dict, ctx: dict) -> None:
    del ctx
    shape = p["model"]
    model = _llama(shape, device, dtype, attn)
    lengths = sorted(_lengths(p, "prompt_tokens")[: p["n_lengths"]])  # length-sorted, as score_effort_batch
    mb = p["micro_batch"]
    batches = [random_batch(len(lengths[s:s + mb]), lengths[s:s + mb], shape["vocab"], device, seed=s)
               for s in range(0, len(lengths), mb)]
    res["shape"] = dict(shape, micro_batch=mb, prompts=len(lengths), mean_tokens=float(np.mean(lengths)),
                        max_tokens=max(lengths), padded_tokens=sum(int(b["input_ids"].numel()) for b in batches))
    paths = [effort_paths(model, b) for b in batches]
    # agreement on the longest micro-batch (most padding-sensitive), loop over its first rows
    last = batches[-1]
    k = min(p["loop_samples"], int(last["input_ids"].shape[0]))
    sub = {key: x[:k] for key, x in last.items()}
    sub_paths = effort_paths(model, sub)
    res["agreement_max_rel_err"] = _rel(sub_paths["effort"](), sub_paths["loop"]())
    fns = {"effort": lambda: [pp["effort"]() for pp in paths], "fwd_bwd": lambda: [pp["fwd_bwd"]() for pp in paths],
           "loop_one_batch": sub_paths["loop"]}
    fns["effort"]()
    best, _ = time_interleaved(fns, p["repeats"], device)
    real = sum(lengths)
    res["effort_s"] = best["effort"]
    res["effort_samples_per_s"] = len(lengths) / best["effort"]
    res["effort_tokens_per_s"] = real / best["effort"]
    res["fwd_bwd_s"] = best["fwd_bwd"]
    res["effort_cost_vs_fwd_bwd"] = best["effort"] / best["fwd_bwd"]
    res["loop_samples_per_s"] = k / best["loop_one_batch"]
    res["effort_speedup_vs_loop"] = res["effort_samples_per_s"] / res["loop_samples_per_s"]
    res["effort_peak_mib_longest_batch"] = peak_memory_mib(paths[-1]["effort"], device)
    res["games_pass_projected_s"] = GAMES_SAMPLES / res["effort_samples_per_s"]
    del model, paths, sub_paths, fns


RUNNERS = {"effort_7b": part_effort_7b, "effort_8layer": part_effort_8layer,
           "influence_games": part_influence_games, "effort_smollm2": part_effort_smollm2}


def _meta(device: torch.device, args) -> dict:
    import importlib.metadata as md

    def ver(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    meta = {"dry_run": args.dry_run, "device": str(device), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": ver("transformers"), "peft": ver("peft"),
            "dtype": args.dtype, "attn": args.attn, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
        meta["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
        meta["cuda"] = torch.version.cuda
    return meta


def _goals(parts: dict) -> dict:
    e7, e8 = parts.get("effort_7b", {}), parts.get("effort_8layer", {})
    proj = e8.get("book_projection", {}).get("projected_s")
    return {
        "effort_speedup_vs_loop_7b>=10": None if "effort_speedup_vs_loop" not in e7 else e7["effort_speedup_vs_loop"] >= 10,
        "effort_cost_vs_fwd_bwd_7b<=1.3": None if "effort_cost_vs_fwd_bwd" not in e7 else e7["effort_cost_vs_fwd_bwd"] <= 1.3,
        "book_effort_pass<=20min": None if proj is None else proj <= 1200,
    }


def _write(path: Path, out: dict) -> None:
    out["goals"] = _goals(out["parts"])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=2, default=str))
    os.replace(tmp, path)


def _print_part(name: str, res: dict) -> None:
    keys = [k for k in res if isinstance(res[k], (int, float)) and not isinstance(res[k], bool)]
    print(f"[{name}] " + ", ".join(f"{k}={res[k]:.4g}" for k in keys), flush=True)
    if "book_projection" in res:
        print(f"[{name}] book projection: {res['book_projection']}", flush=True)
    if res.get("error"):
        print(f"[{name}] ERROR: {res['error']}", flush=True)


def make_lengths(prepared: str, n: int = 512) -> None:
    """Rewrite games_lengths.json from a prepared Games folder (SmolLM2 tokenizer, seed 0)."""
    from transformers import AutoTokenizer

    from engine.data.schema import read_items, read_samples
    from engine.llm.bigrec.effort import encode_effort_samples
    from engine.llm.bigrec.model import LLMConfig, resolve_base
    from engine.llm.bigrec.prompts import get_prompt_config

    titles = read_items(prepared).column("title").to_pylist()
    s = read_samples(prepared)
    rows = np.sort(np.random.default_rng(0).choice(s.num_rows, n, replace=False))
    hist = [s.column("history")[int(i)].as_py() for i in rows]
    tgt = [s.column("target")[int(i)].as_py() for i in rows]
    tok = AutoTokenizer.from_pretrained(resolve_base(LLMConfig(model="smollm2",
                                                               cache_dir=os.environ.get("DEALREC_CACHE", ".cache/dealrec"))))
    cfg = get_prompt_config("games")
    lengths = [len(e["input_ids"]) for e in encode_effort_samples(tok, titles, hist, tgt, cfg)]
    LENGTHS_FILE.write_text(json.dumps({
        "what": f"Games (DEALRec release): token lengths of {n} seeded-random training samples as effort prompts "
                f"(engine.llm.bigrec.effort.encode_effort_samples, prompt preset 'games', cutoff_len {cfg.cutoff_len}) under the "
                "SmolLM2-135M-Instruct tokenizer, and the same samples' history lengths in items (surrogate input). "
                "Lengths only: no titles or ids.",
        "made_by": "benchmarks/gpu/bench.py --make-lengths PREPARED_GAMES (seed 0)",
        "prompt_tokens": lengths, "history_items": [len(h) for h in hist]}))
    print(f"{LENGTHS_FILE}: {n} prompts, mean {np.mean(lengths):.1f} tokens, max {max(lengths)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (what the unit test runs)")
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu_results.json, else ./gpu_results.json)")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="default: bfloat16 (float32 dry)")
    ap.add_argument("--attn", default="sdpa", help="attention kernel of the LLaMA shapes (hooks are exact with any)")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time budget")
    ap.add_argument("--make-lengths", default=None, metavar="PREPARED_GAMES", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.make_lengths:
        make_lengths(args.make_lengths)
        return 0
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    args.dtype = args.dtype or ("float32" if args.dry_run else "bfloat16")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --dry-run (CPU, tiny shapes) or on the GPU machine", file=sys.stderr)
        return 2
    shapes = DRY if args.dry_run else FULL
    path = Path(args.out or Path(os.environ.get("OUT", ".")) / "gpu_results.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {"meta": _meta(device, args), "parts": {}}
    ctx: dict = {}
    t_all = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    for name in args.parts:
        p = shapes[name]
        res: dict = {"error": None, "budget_s": p["budget_s"] * args.budget_scale}
        out["parts"][name] = res
        t = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, res["budget_s"])
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            RUNNERS[name](p, device, dtype, args.attn, res, ctx)
        except PartTimeout as e:
            res["error"] = f"timeout: {e} ({res['budget_s']:.0f} s); the figures above it were measured"
        except Exception as e:  # one part's failure must not lose the others
            res["error"] = f"{type(e).__name__}: {e}"
            res["traceback"] = traceback.format_exc()[-4000:]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        res["seconds"] = time.perf_counter() - t
        _free(device)
        _print_part(name, res)
        _write(path, out)
    out["meta"]["total_s"] = time.perf_counter() - t_all
    out["meta"]["imported_but_absent_on_device"] = [m for m in ABSENT_ON_DEVICE if m in sys.modules]
    _write(path, out)
    print(f"goals: {out['goals']}")
    print(f"wrote {path} ({out['meta']['total_s']:.0f} s)")
    return 0 if not any(r.get("error") for r in out["parts"].values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
