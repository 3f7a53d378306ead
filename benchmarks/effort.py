"""Effort-score throughput per LLM backend: batched per-sample gradient norms vs a per-sample
loop vs a plain batched forward+backward of the same summed loss, on one model and one batch,
measured in one run after warm-up (``--backend bigrec textrec tiger``, all when omitted).

``bigrec`` model: LLaMA architecture (hidden 256, 4 layers, 4 heads, MLP 688, vocab 4096, random
seeded weights), peft LoRA r=8 on q_proj/v_proj with A and B both non-zero; batch of 32 sequences
of 128 random tokens, loss over all tokens (BIGRec train_on_inputs,
:func:`engine.llm.bigrec.prompts.per_sample_causal_lm_loss`).

``textrec`` model: the backend itself (:func:`engine.llm.get_backend`): the ``--textrec-model``
encoder (default all-MiniLM-L6-v2) + its fresh LoRA (r=8 on query/value, ``init_lora_weights=False``
so that A and B are both non-zero), on the first ``--batch`` samples of ``--data`` (a prepared
folder; default: the embedded synthetic set, prepared into a temporary folder), batch encoded by
``backend.encode_samples`` (user text + target + ``n_negatives`` fixed negatives) and loss
``backend.per_sample_loss``. Besides the three paths it prints where the effort pass's time goes,
timed inside one real ``per_sample_grad_norms`` call: the user-tower forward and the
``1 + n_negatives`` item forwards (a timing wrapper around ``encode``, hooks recording), the rest of
the loss, the backward (a timing wrapper around ``torch.autograd.grad``) and the remainder (the
per-sample norms from the recorded activations and output gradients).

``tiger`` model: the backend itself with the paper's TIGER (T5, 4 + 4 layers, 6 heads, d_model
128, MLP 1024, seeded init) over Games-shaped random semantic IDs (17,332 items, 3 x 256 codes +
the de-duplication token, 2,000 user tokens); EVERY parameter is trainable (the paper fully
fine-tunes TIGER), so the effort covers embeddings, T5LayerNorms and relative-position biases
besides the Linear layers; ``--batch`` samples with histories of 1..20 items, loss
``backend.per_sample_loss`` (mean token cross-entropy of the target tuple). (The standalone
``benchmarks/effort_tiger.py`` measures the same three paths without the memory columns.)

Peak memory: on CPU, the peak resident set size during the measured call minus the RSS just
before it (Linux: reset the high-water mark by writing 5 to /proc/self/clear_refs, read VmHWM);
on CUDA, torch.cuda.max_memory_allocated minus the allocation before the call.

Run:
    .venv/bin/python benchmarks/effort.py                 # CPU, all backends, a few minutes on 2 cores
    .venv/bin/python benchmarks/effort.py --backend tiger --threads 1 --repeats 5
    .venv/bin/python benchmarks/effort.py --backend textrec --data /tmp/games --batch 16 --threads 1
    .venv/bin/python benchmarks/effort.py --device cuda   # GPU
    .venv/bin/python benchmarks/effort.py --hidden 64 --layers 2 --repeats 1   # tiny smoke run

Full data set (engine path, one process; prints wall time and row count)::

    .venv/bin/python -m jobs.cli prepare --format dealrec-release --input ../shared/data/games --out /tmp/games
    .venv/bin/python benchmarks/effort.py --score-prepared /tmp/games [--out effort.parquet] [--limit N] \\
        [--attn sdpa] [--threads 1]

Each backend's block ends with ``effort_speedup_vs_loop[<backend>]: <x>`` (samples/s batched / loop;
goal >= 10 on a GPU) and ``effort_cost_vs_fwd_bwd[<backend>]: <x>`` (time of the effort pass / plain
fwd+bwd; goal <= 1.5).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from contextlib import contextmanager
from unittest import mock
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine.effort import per_sample_grad_norms, per_sample_grad_norms_loop  # noqa: E402
from engine.llm.bigrec.prompts import per_sample_causal_lm_loss  # noqa: E402


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_memory_mib(fn, device: torch.device) -> float:
    """Peak memory of one call of ``fn`` above the level just before it, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    base = _rss_kb("VmRSS")
    fn()
    return max(0, _rss_kb("VmHWM") - base) / 1024


def time_interleaved(fns: dict, repeats: int, device: torch.device) -> tuple[dict[str, float], dict[str, float]]:
    """Minimum wall seconds and minimum process CPU seconds of each function over ``repeats``
    interleaved rounds.

    Interleaving and the minimum make the ratios robust to other load on a shared machine; the
    CPU seconds (meaningful with ``--threads 1``) are nearly insensitive to it.
    """
    best = {k: float("inf") for k in fns}
    cpu = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t, c = time.perf_counter(), time.process_time()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[k] = min(best[k], time.perf_counter() - t)
            cpu[k] = min(cpu[k], time.process_time() - c)
    return best, cpu


def build_lora_llama(*, vocab: int, hidden: int, layers: int, heads: int, lora_r: int, device: torch.device,
                     dtype: torch.dtype, kv_heads: int | None = None, intermediate: int | None = None,
                     tie_embeddings: bool = False, attn: str = "eager", seed: int = 0):
    """A random (seeded) LLaMA-architecture causal LM with peft LoRA on q_proj/v_proj, A and B
    both non-zero, in eval mode. Built directly on ``device`` in ``dtype`` (a 7B shape is never
    materialised in float32 on the host). ``intermediate`` defaults to LLaMA's 2.6875 x hidden."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or int(hidden * 2.6875),
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                      max_position_embeddings=1024, tie_word_embeddings=tie_embeddings)
    with torch.device(device):
        base = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    base.config._attn_implementation = attn
    model = get_peft_model(base, LoraConfig(r=lora_r, lora_alpha=16, lora_dropout=0.05,
                                            target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model.to(device=device, dtype=dtype).eval()


def random_batch(batch: int, tokens: int | list[int], vocab: int, device: torch.device, seed: int = 1) -> dict:
    """Seeded random token ids, loss over every token (BIGRec train_on_inputs). ``tokens``: one
    length for all rows, or a length per row (right-padded, masked, labels -100 on padding)."""
    lengths = [tokens] * batch if isinstance(tokens, int) else list(tokens)
    T = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), T), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def effort_paths(model, batch: dict, loss_fn=per_sample_causal_lm_loss) -> dict:
    """The three measured paths on one batch: ``effort`` (batched hooks, engine.effort),
    ``loop`` (one forward+backward per sample) and ``fwd_bwd`` (a plain batched forward+backward
    of the summed per-sample losses, no per-sample quantity: the floor). ``loss_fn(model, batch)``
    gives the per-sample losses [B] (default: BIGRec's causal-LM loss)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def effort():
        return per_sample_grad_norms(model, loss_fn, batch)

    def loop():
        return per_sample_grad_norms_loop(model, loss_fn, batch)

    def fwd_bwd():
        loss = loss_fn(model, batch).sum()
        loss.backward()
        for p in params:
            p.grad = None

    return {"effort": effort, "loop": loop, "fwd_bwd": fwd_bwd}


def score_prepared(args) -> None:
    """Effort of every sample of a prepared folder with the default tiny LLM (engine path)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.data.schema import read_items, read_samples
    from engine.llm.bigrec.effort import score_effort_batch
    from engine.llm.bigrec.model import LLMConfig, load_llm
    from engine.llm.bigrec.prompts import get_prompt_config

    t0 = time.perf_counter()
    items = read_items(args.score_prepared)
    titles = items.column("title").to_pylist()
    samples = read_samples(args.score_prepared)
    if args.limit:
        samples = samples.slice(0, args.limit)
    ids = samples.column("sample_id").to_numpy()
    hist = samples.column("history").to_pylist()
    tgt = samples.column("target").to_numpy()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_llm(LLMConfig(cache_dir=args.cache_dir, attn_implementation=args.attn), titles=titles)
    cfg = get_prompt_config(args.prompt)
    t_load = time.perf_counter() - t0
    out = np.empty(len(ids), dtype=np.float64)
    t1 = time.perf_counter()
    chunk = 2048
    for s in range(0, len(ids), chunk):
        out[s:s + chunk] = score_effort_batch(model, tok, titles, hist[s:s + chunk], tgt[s:s + chunk], cfg,
                                              micro_batch_size=args.micro_batch)
        done = min(len(ids), s + chunk)
        print(f"  {done}/{len(ids)} rows, {done / (time.perf_counter() - t1):.0f} rows/s", flush=True)
    wall = time.perf_counter() - t1
    if args.out:
        pq.write_table(pa.table({"sample_id": pa.array(ids, pa.int64()), "effort": pa.array(out)}), args.out)
    finite = np.isfinite(out).all()
    print(f"effort rows: {len(ids)} (all finite: {finite}; min {out.min():.4g}, median {np.median(out):.4g}, "
          f"max {out.max():.4g})")
    print(f"setup (read + tiny model build/load): {t_load:.1f} s; scoring wall time: {wall:.1f} s "
          f"({len(ids) / wall:.0f} rows/s, micro-batch {args.micro_batch}, {torch.get_num_threads()} threads)")


def bigrec_setup(args, device: torch.device) -> tuple:
    """(model, loss_fn, batch, description) of the bigrec measurement: a random LoRA LLaMA."""
    model = build_lora_llama(vocab=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                             lora_r=args.lora_r, device=device, dtype=getattr(torch, args.dtype))
    batch = random_batch(args.batch, args.tokens, args.vocab, device)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    what = (f"LLaMA hidden={args.hidden} layers={args.layers} vocab={args.vocab}, LoRA r={args.lora_r} on q,v "
            f"({n_lora} trainable numbers); batch {args.batch} x {args.tokens} tokens; dtype={args.dtype}")
    return model, per_sample_causal_lm_loss, batch, what


def textrec_setup(args, device: torch.device) -> tuple:
    """(model, loss_fn, batch, description) of the textrec measurement: the backend's own model
    and batch on the first ``--batch`` samples of ``--data`` (default: embedded synthetic set)."""
    from engine.data.schema import read_items, read_samples
    from engine.llm import get_backend
    from engine.llm.textrec import TextRecConfig, _to

    data = args.data
    if not data:
        from engine.data.prepare import PrepareConfig, prepare

        data = os.path.join(tempfile.mkdtemp(prefix="effort-bench-"), "synthetic")
        prepare(PrepareConfig(format="synthetic", out=data, users=max(64, args.batch), items=200, seed=0))
    titles = read_items(data).sort_by("item_id").column("title").to_pylist()
    s = read_samples(data).slice(0, args.batch)
    kw = {"model": args.textrec_model} if args.textrec_model else {}
    cfg = TextRecConfig(**kw, lora_r=args.lora_r, init_lora_weights=False, n_negatives=args.negatives,
                        device=str(device))
    backend = get_backend("textrec", titles, config=cfg)
    model = backend.build_model()
    batch = _to(backend.encode_samples(s.column("sample_id").to_pylist(), s.column("history").to_pylist(),
                                       s.column("target").to_pylist()), device)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    u, i = batch["user_input_ids"], batch["item_input_ids"]
    what = (f"{'/'.join(Path(cfg.model).parts[-2:])} + LoRA r={cfg.lora_r} on {','.join(cfg.target_modules)} "
            f"({n_lora} trainable numbers); {u.shape[0]} samples of {Path(data).name}: user text {u.shape[1]} "
            f"tokens (padded), {i.shape[1]} items (target + {cfg.n_negatives} negatives) x {i.shape[2]} tokens")
    return model, backend.per_sample_loss, batch, what


def tiger_setup(args, device: torch.device) -> tuple:
    """(model, loss_fn, batch, description) of the tiger measurement: the backend itself
    (:func:`engine.llm.get_backend`) with the paper's TIGER (T5 4+4 layers, 6 heads, d_model 128,
    MLP 1024; seeded init, every parameter trainable, eval mode: dropout off as in the effort
    pass) over Games-shaped semantic IDs (``--tiger-items`` items, ``--tiger-levels`` x
    ``--tiger-codes`` random codes + the de-duplication token, 2,000 user tokens); ``--batch``
    samples with histories of 1..20 items (right-padded), loss ``backend.per_sample_loss``
    (mean token cross-entropy of the target tuple)."""
    import numpy as np

    from engine.llm import get_backend
    from engine.semantic_ids import SemanticIds, dedup_codes

    rng = np.random.default_rng(0)
    codes, dedup, _ = dedup_codes(rng.integers(0, args.tiger_codes, (args.tiger_items, args.tiger_levels)))
    sids = SemanticIds(codes=codes, level_sizes=[args.tiger_codes] * args.tiger_levels + [dedup])
    backend = get_backend("tiger", [""] * args.tiger_items, config={"device": str(device), "seed": 0},
                          semantic_ids=sids)
    model = backend.build_model().eval()
    rng = np.random.default_rng(1)
    hist = [rng.integers(0, args.tiger_items, rng.integers(1, 21)).tolist() for _ in range(args.batch)]
    tgt = rng.integers(0, args.tiger_items, args.batch).tolist()
    batch = {k: v.to(device) for k, v in backend.encode_samples(range(args.batch), hist, tgt).items()}
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kinds = sorted({type(m).__name__ for m in model.modules() if any(True for _ in m.parameters(recurse=False))})
    what = (f"TIGER T5 4+4 layers d_model 128, ALL {n:,} parameters trainable ({', '.join(kinds)}); vocab "
            f"{backend.layout.vocab_size:,} ({args.tiger_items:,} items, {args.tiger_levels} x {args.tiger_codes} "
            f"codes + dedup {dedup}); batch {args.batch} x {batch['input_ids'].shape[1]} encoder tokens (padded), "
            f"{batch['labels'].shape[1]} target tokens")
    return model, backend.per_sample_loss, batch, what


SETUPS = {"bigrec": bigrec_setup, "textrec": textrec_setup, "tiger": tiger_setup}


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(t0: tuple[float, float]) -> tuple[float, float]:
    t = _clock()
    return t[0] - t0[0], t[1] - t0[1]


def _sum(times) -> tuple[float, float]:
    return sum(t[0] for t in times), sum(t[1] for t in times)


@contextmanager
def _timed(obj, name: str, log: list):
    """Replace ``obj.name`` by a wrapper appending each call's (wall, process CPU) seconds to ``log``."""
    fn = getattr(obj, name)

    def wrapper(*a, **k):
        t = _clock()
        try:
            return fn(*a, **k)
        finally:
            log.append(_since(t))

    with mock.patch.object(obj, name, wrapper):
        yield


def effort_breakdown(model, loss_fn, batch, repeats: int) -> dict[str, tuple[float, float]]:
    """Where one effort pass (:func:`engine.effort.per_sample_grad_norms`) spends its time: the
    forward (``loss_fn``; for a text-encoder model split into the first ``encode`` call = user
    tower, the other calls = item forwards, the rest = loss), the backward (the
    ``torch.autograd.grad`` call) and the remainder (the per-sample norms). Minimum over
    ``repeats`` passes of each piece, as (wall, process CPU) seconds."""
    best: dict[str, tuple[float, float]] = {}
    enc = getattr(model, "encode", None)
    for _ in range(repeats):
        fwd, grad, encs = [], [], []

        def timed_loss(m, b):
            t = _clock()
            out = loss_fn(m, b)
            fwd.append(_since(t))
            return out

        t = _clock()
        with _timed(torch.autograd, "grad", grad):
            if enc is not None:
                with _timed(model, "encode", encs):
                    per_sample_grad_norms(model, timed_loss, batch)
            else:
                per_sample_grad_norms(model, timed_loss, batch)
        total, f, g = _since(t), fwd[0], _sum(grad)
        parts = {"forward (loss_fn, hooks recording)": f}
        if encs:
            e = _sum(encs)
            parts = {"  user-tower forward (1 call)": encs[0],
                     f"  item forwards ({len(encs) - 1} calls)": _sum(encs[1:]),
                     "  rest of the loss (logits, logsumexp)": (f[0] - e[0], f[1] - e[1]),
                     "forward (loss_fn, hooks recording)": f}
        parts["backward (autograd.grad to the hooked outputs)"] = g
        parts["per-sample norms + hook overhead (rest)"] = (total[0] - f[0] - g[0], total[1] - f[1] - g[1])
        parts["effort pass total"] = total
        for k, v in parts.items():
            old = best.get(k, (float("inf"), float("inf")))
            best[k] = (min(old[0], v[0]), min(old[1], v[1]))
    return best


def run_backend(name: str, args, argv: list[str], device: torch.device) -> None:
    model, loss_fn, batch, what = SETUPS[name](args, device)
    paths = effort_paths(model, batch, loss_fn)
    if args.mem_child:
        # Fresh process per path: the first call's peak is the path's own footprint (RSS of an
        # earlier, larger call would otherwise hide it). The loop's footprint does not depend on B.
        if args.mem_child == "loop":
            small = {k: v[:4] for k, v in batch.items()}
            paths["loop"] = lambda: per_sample_grad_norms_loop(model, loss_fn, small)
        print(f"peak_mib {peak_memory_mib(paths[args.mem_child], device):.1f}")
        return
    B = next(v.shape[0] for v in batch.values() if torch.is_tensor(v))
    print(f"== backend {name}: {what}; device={device} threads={torch.get_num_threads()}")

    # Warm-up (allocator, kernels) and an agreement check.
    e = paths["effort"]()
    r = paths["loop"]()
    paths["fwd_bwd"]()
    rel = float(((e.cpu() - r.cpu()).abs() / r.cpu()).max())
    print(f"agreement batched vs loop: max relative error {rel:.2e}")

    best, cpu = time_interleaved(paths, args.repeats, device)
    mem = {k: float("nan") for k in paths}
    if args.memory:
        for k in paths:
            cmd = [sys.executable, os.path.abspath(__file__), *argv, "--backend", name, "--mem-child", k]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("peak_mib")]
            mem[k] = float(line[-1].split()[1]) if line else float("nan")
    how = ("peak RSS minus RSS before the call, one call in a fresh process (VmHWM reset via "
           "/proc/self/clear_refs)" if device.type == "cpu" else "torch.cuda.max_memory_allocated above the pre-call level")
    print(f"timing: minimum of {args.repeats} interleaved rounds after warm-up; memory: "
          f"{how if args.memory else 'not measured (--no-memory)'}")
    print(f"{'path':<32}{'s/batch':>10}{'s/sample':>10}{'samples/s':>11}{'cpu s':>9}{'peak MiB':>10}")
    for k, label in (("effort", "effort batched (hooks)"), ("loop", "per-sample loop"),
                     ("fwd_bwd", "plain fwd+bwd (no per-sample)")):
        print(f"{label:<32}{best[k]:>10.3f}{best[k] / B:>10.4f}{B / best[k]:>11.1f}{cpu[k]:>9.3f}{mem[k]:>10.1f}")
    if name == "textrec" or args.breakdown:
        parts = effort_breakdown(model, loss_fn, batch, args.repeats)
        tot = parts["effort pass total"]
        print(f"effort pass breakdown (minimum of {args.repeats} timed passes, each piece its own minimum):")
        print(f"  {'piece':<50}{'wall s':>8}{'s/sample':>10}{'cpu s':>8}{'cpu s/sample':>13}{'cpu %':>7}")
        for k, (w, c) in parts.items():
            print(f"  {k:<50}{w:>8.3f}{w / B:>10.4f}{c:>8.3f}{c / B:>13.4f}{100 * c / tot[1]:>6.0f}%")
    print(f"cpu-time ratios: loop/effort {cpu['loop'] / cpu['effort']:.2f}, "
          f"effort/fwd_bwd {cpu['effort'] / cpu['fwd_bwd']:.2f}")
    print(f"effort_speedup_vs_loop[{name}]: {best['loop'] / best['effort']:.2f}")
    print(f"effort_cost_vs_fwd_bwd[{name}]: {best['effort'] / best['fwd_bwd']:.2f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", nargs="+", choices=sorted(SETUPS), default=sorted(SETUPS),
                    help="backends to measure (default: all)")
    ap.add_argument("--hidden", type=int, default=256, help="bigrec: LLaMA hidden size")
    ap.add_argument("--layers", type=int, default=4, help="bigrec: LLaMA layers")
    ap.add_argument("--heads", type=int, default=4, help="bigrec: attention heads")
    ap.add_argument("--vocab", type=int, default=4096, help="bigrec: vocabulary size")
    ap.add_argument("--batch", type=int, default=32, help="samples per measured batch")
    ap.add_argument("--tokens", type=int, default=128, help="bigrec: tokens per sequence")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--data", default=None, help="textrec (and --score-prepared): a prepared folder whose first "
                    "--batch samples are scored (default: the embedded synthetic set)")
    ap.add_argument("--textrec-model", default=None, help="textrec: encoder folder (default: all-MiniLM-L6-v2)")
    ap.add_argument("--negatives", type=int, default=15, help="textrec: fixed negatives per sample")
    ap.add_argument("--tiger-items", type=int, default=17332, help="tiger: catalogue size (Games: 17,332)")
    ap.add_argument("--tiger-levels", type=int, default=3, help="tiger: content code levels")
    ap.add_argument("--tiger-codes", type=int, default=256, help="tiger: codes per level")
    ap.add_argument("--breakdown", action="store_true", help="also break down the bigrec / tiger effort pass")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                    help="measure each path's peak memory in a fresh process")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mem-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--score-prepared", default=None, help="score every sample of this prepared folder instead")
    ap.add_argument("--prompt", default="games", help="prompt preset for --score-prepared")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--out", default=None, help="Parquet file for the scores of --score-prepared")
    ap.add_argument("--cache-dir", default=".cache/dealrec")
    ap.add_argument("--attn", default="eager", help="attention kernel for --score-prepared (sdpa is ~30%% faster "
                    "on CPU; the hook method is exact with any kernel)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default); 1 is faster on a "
                    "loaded machine")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    if args.score_prepared:
        return score_prepared(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for name in dict.fromkeys(args.backend):
        run_backend(name, args, argv, device)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
