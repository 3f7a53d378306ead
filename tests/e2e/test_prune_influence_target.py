"""`dealrec prune` with the influence options of issue #20, through ``jobs.cli.main``:

- ``--influence-source llm`` (textrec, tiny encoder): the surrogate is skipped, u is computed once
  (stage ``llm_target``) and the effort actors emit ``llm_influence``; the column equals per-sample
  gradients (one backward per sample, each encoded alone) dotted with a u computed by a naive loop
  over the validation pairs, rel. err <= 1e-4; ``influence`` holds the same values (what the
  selection and `dealrec tune` use); the manifest and report record the source; an unchanged rerun
  skips everything and switching back to the surrogate source is refused without --overwrite.
- ``--influence-target valid`` (surrogate): with the identity solver, v is exactly the validation
  g_bar of the saved surrogate (naive loop); the target is in the manifest, and resuming with the
  training target is refused (the iHVP's fingerprint).
- the stage fingerprints (no Ray): the default hashes as before the options existed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.e2e.test_prune_backend import synthetic_data, tiny_encoder  # noqa: F401 (the same fixtures)
from tests.e2e.test_prune_job import FAST, prune_args

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def prune(data, out, *extra, cache) -> int:
    from jobs.cli import main

    return main(["prune", "--data", str(data), "--out", str(out), *FAST, "--effort-micro-batch", "5",
                 "--llm-cache", str(cache), "--budget", "24", "--groups", "4", *extra])


def _alone_grad(backend, model, sid, hist, tgt) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    loss = backend.per_sample_loss(model, backend.encode_samples([int(sid)], [list(hist)], [int(tgt)]))[0]
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double() for g, p in zip(gs, params)])


def test_llm_source_scores_equal_the_naive_loop(ray_cluster, one_torch_thread, synthetic_data, tiny_encoder,
                                                tmp_path):
    from engine.data.schema import read_items, read_samples, read_split
    from actors.content_effort import content_seeds
    from engine.llm import get_backend

    out, cache = tmp_path / "run", tmp_path / "cache"
    args = ("--backend", "textrec", "--textrec-model", str(tiny_encoder), "--influence-source", "llm")
    assert prune(synthetic_data, out, *args, cache=cache) == 0
    man = json.loads((out / "manifest.json").read_text())
    st = man["stages"]
    assert man["influence_source"] == "llm" and man["influence_target"] == {"surrogate": None, "llm": "valid"}
    assert not any(st.get(s, {}).get("done") for s in ("surrogate", "ihvp", "surrogate_scores"))
    valid = read_split(synthetic_data, "valid")
    users = [(h, t) for h, t in zip(valid.column("history").to_pylist(), valid.column("targets").to_pylist()) if t]
    assert st["llm_target"]["done"] and st["llm_target"]["n_target_users"] == len(users) > 0
    assert st["llm_target"]["n_target_pairs"] == sum(len(t) for _, t in users)
    assert st["effort"]["llm_influence"] is True and st["select"]["influence_source"] == "llm"
    scores = pq.read_table(out / "scores.parquet").sort_by("sample_id").to_pandas()
    assert {"influence", "effort", "llm_influence", "score"} <= set(scores.columns)
    assert "surrogate_influence" not in scores.columns
    np.testing.assert_array_equal(scores["influence"], scores["llm_influence"])
    assert (out / "report" / "hist_llm_influence.png").exists()
    assert "influence: LLM-side" in (out / "report" / "index.html").read_text()

    # naive ground truth on the driver: the backend the run recorded, one backward per pair / sample
    titles = read_items(synthetic_data).sort_by("item_id").column("title").to_pylist()
    backend = get_backend("textrec", titles, **man["backend"]["options"])
    model = backend.build_model()
    samples = read_samples(synthetic_data).sort_by("sample_id")
    n = samples.num_rows
    u, k = 0, n
    for h, ts in users:  # pair ids n, n+1, ... in file order (validation_pairs)
        for t in ts:
            u = u + _alone_grad(backend, model, k, h, t) / (len(users) * len(ts))
            k += 1
    u_run = np.load(out / "llm_target" / "u.npy")
    assert float(np.abs(u_run - u.numpy()).max() / u.abs().max()) <= 1e-5
    # the effort actors seed each sample's fixed negatives by its content key, not its row id
    seeds = content_seeds({c: samples.column(c).to_numpy(zero_copy_only=False)
                           for c in ("user_id", "history", "target")})
    ref = np.array([float(_alone_grad(backend, model, s, h, t) @ u) for s, h, t in zip(
        seeds.tolist(), samples.column("history").to_pylist(), samples.column("target").to_pylist())])
    got = scores["llm_influence"].to_numpy()
    assert np.abs(ref).max() > 0 and float(np.abs(got - ref).max() / np.abs(ref).max()) <= 1e-4

    # unchanged: every stage skipped; the surrogate source: refused (exit 2), nothing changed
    stamps = {s: v["finished_at"] for s, v in st.items() if v.get("done")}
    assert prune(synthetic_data, out, *args, cache=cache) == 0
    again = json.loads((out / "manifest.json").read_text())["stages"]
    assert {s: v["finished_at"] for s, v in again.items() if v.get("done")} == stamps
    before = (out / "manifest.json").read_bytes()
    assert prune(synthetic_data, out, *args[:4], cache=cache) == 2
    assert (out / "manifest.json").read_bytes() == before


def test_valid_target_v_is_the_naive_validation_gradient(ray_cluster, one_torch_thread, synthetic_data, tmp_path):
    from engine.data.schema import read_split
    from engine.errors import ResumeError
    from engine.influence import trainable_params
    from engine.surrogate import load_surrogate, make_batches
    from jobs.prune import config_from_args, run_prune

    out = tmp_path / "run"

    def run(*extra):
        cfg = config_from_args(prune_args(synthetic_data, out, "--method", "influence-only", "--budget", "24",
                                          "--groups", "4", "--solver", "identity", "--llm-cache",
                                          str(tmp_path / "c"), *extra))
        return run_prune(cfg, log=lambda m: None)

    man = run("--influence-target", "valid")
    ihvp = man["stages"]["ihvp"]
    assert ihvp["target"] == "valid" and man["influence_target"] == {"surrogate": "valid", "llm": None}
    assert man["config"]["influence"]["target"] == "valid" and not man["stages"].get("effort", {}).get("done")
    model = load_surrogate(out / "surrogate").double()
    params = list(trainable_params(model).values())
    valid = read_split(synthetic_data, "valid")
    users = [(h, t) for h, t in zip(valid.column("history").to_pylist(), valid.column("targets").to_pylist()) if t]
    assert ihvp["n_target_users"] == len(users)
    g = 0
    model.eval()
    for h, ts in users:
        for t in ts:
            import pyarrow as pa

            one = pa.table({"history": pa.array([h], pa.list_(pa.int32())), "targets": pa.array([[t]], pa.list_(pa.int32()))})
            (b,) = make_batches(one, batch_size=1, max_len=model.cfg.max_len)
            loss = torch.nn.functional.cross_entropy(model.score_next(b), torch.tensor([t]))
            gs = torch.autograd.grad(loss, params, allow_unused=True)
            g = g + torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1)
                               for x, p in zip(gs, params)]) / (len(users) * len(ts))
    v = np.load(out / "ihvp" / "v.npy")
    np.testing.assert_allclose(v, g.numpy(), rtol=1e-4, atol=1e-6 * float(g.abs().max()))
    with pytest.raises(ResumeError, match="ihvp"):
        run()  # the training target on the same run folder
    assert json.loads((out / "manifest.json").read_text())["stages"]["ihvp"]["target"] == "valid"


def test_stage_fingerprints(tmp_path):
    """The default run hashes every stage as before issue #20; the target changes the iHVP and
    what follows it; --llm-influence changes effort (not the surrogate); the LLM source changes
    effort and select (not the surrogate); --influence-valid-users changes llm_target only where used."""
    from engine.config import stable_hash, to_dict
    from jobs.prune import config_from_args, stage_hashes

    (tmp_path / "d").mkdir()

    def h(*extra):
        return stage_hashes(config_from_args(prune_args(tmp_path / "d", tmp_path / "o", *extra)), "fp")

    base = h()
    cfg = config_from_args(prune_args(tmp_path / "d", tmp_path / "o"))
    old_inf = {k: v for k, v in to_dict(cfg.influence).items() if k not in ("target", "target_users")}
    assert base["ihvp"] == stable_hash({"up": base["surrogate"], "influence": old_inf})
    assert base["effort"] == stable_hash({"data": "fp", "llm": cfg.llm, "prompt": cfg.prompt})
    assert base["select"] == stable_hash({"up": [base["surrogate_scores"], base["effort"]],
                                          "selection": cfg.selection})
    val = h("--influence-target", "valid")
    assert val["surrogate"] == base["surrogate"] and val["effort"] == base["effort"]
    assert all(val[s] != base[s] for s in ("ihvp", "surrogate_scores", "select"))
    assert h("--influence-target", "valid", "--influence-valid-users", "5")["ihvp"] != val["ihvp"]
    assert h("--influence-valid-users", "5")["ihvp"] == base["ihvp"]  # train target: not used
    flag = h("--llm-influence")
    assert flag["ihvp"] == base["ihvp"] and flag["effort"] != base["effort"] and flag["select"] != base["select"]
    llm = h("--influence-source", "llm")
    assert llm["surrogate"] == base["surrogate"] and llm["effort"] == flag["effort"]
    assert llm["select"] != flag["select"]
    assert h("--influence-source", "llm", "--influence-valid-users", "5")["effort"] != llm["effort"]
    c = config_from_args(prune_args(tmp_path / "d", tmp_path / "o", "--influence-source", "llm"))
    assert c.needed_stages() == (False, True, True) and c.influence.target == "train"
    c = config_from_args(prune_args(tmp_path / "d", tmp_path / "o", "--influence-source", "llm", "--method", "ccs"))
    assert c.needed_stages() == (True, False, False)  # ccs selects on EL2N: no influence term at all
    c = config_from_args(prune_args(tmp_path / "d", tmp_path / "o", "--method", "effort-only", "--llm-influence"))
    assert c.needed_stages() == (False, True, True)
