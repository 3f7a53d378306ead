"""`--backend tiger` given bad TIGER options (issue #19): every LLM-side job (prune, finetune,
evaluate, tune) refuses, before Ray starts and before anything is written, a missing
``--semantic-ids``, the semantic IDs of another catalogue (another size, or the same size with
other titles), TIGER options given to another backend, an unreadable ``--tiger-config``, a
``--tiger-checkpoint`` / ``--adapter`` trained on other semantic IDs: exit 2, the option named,
no traceback, ``--out`` absent (or the run folder unchanged)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from badinput_helpers import assert_rejected, run_cli, snapshot

TINY = {"num_layers": 1, "num_decoder_layers": 1, "d_model": 16, "d_kv": 4, "num_heads": 2, "d_ff": 32,
        "n_user_tokens": 8}


def _sids(out, titles, levels=2):
    from engine.semantic_ids import build_semantic_ids, write_semantic_ids

    s = build_semantic_ids(titles, None, {"levels": levels, "codes": 4},
                           embeddings=np.random.default_rng(0).normal(size=(len(titles), 8)))
    return write_semantic_ids(out, s)


@pytest.fixture(scope="module")
def titles(synth_data):
    from engine.data.schema import read_items

    return read_items(synth_data).column("title").to_pylist()


@pytest.fixture(scope="module")
def sid_dirs(tmp_path_factory, titles):
    """The good semantic ids of synth_data, and those of two other catalogues."""
    root = tmp_path_factory.mktemp("tiger-sids")
    other = list(titles)
    other[3] = other[3] + " (Deluxe Edition)"
    return {"good": _sids(root / "good", titles), "fewer": _sids(root / "fewer", titles[:-5]),
            "retitled": _sids(root / "retitled", other), "3-levels": _sids(root / "three", titles, levels=3)}


def _job(job, data, tmp_path, *extra):
    """A job's argv on ``data`` writing into tmp_path/out (tune: a prune run folder with scores)."""
    if job == "tune":
        run = tmp_path / "run"
        if not run.exists():
            run.mkdir()
            pq.write_table(pa.table({"sample_id": np.arange(300), "influence": np.linspace(0, 1, 300),
                                     "effort": np.linspace(1, 0, 300)}), run / "scores.parquet")
        return ["tune", "--run", run, "--data", data, "--samples", "1", "--budget", "16", *extra]
    if job == "prune":
        return ["prune", "--data", data, "--out", "out", "--budget", "16", *extra]
    if job == "finetune":
        return ["finetune", "--data", data, "--all", "--out", "out", "--strategy", "local", "--epochs", "1", *extra]
    return ["evaluate", "--data", data, "--local", "--out", "out/metrics.json", *extra]


def _rejected(tmp_path, job, data, *extra, named, fresh=False):
    argv = _job(job, data, tmp_path, *extra)
    before = snapshot(tmp_path / "run")
    res = run_cli(*argv, cwd=tmp_path, fresh=fresh)
    assert_rejected(res, *named)
    assert not (tmp_path / "out").exists()
    assert snapshot(tmp_path / "run") == before  # tune: the prune run folder unchanged
    return res


JOBS = ["prune", "finetune", "evaluate", "tune"]


@pytest.mark.parametrize("job", JOBS)
def test_tiger_without_semantic_ids(tmp_path, synth_data, job):
    _rejected(tmp_path, job, synth_data, "--backend", "tiger", named=["--semantic-ids", "dealrec semantic-ids"],
              fresh=job == "finetune")


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.parametrize("which, named", [("fewer", ["tuples for a catalogue of"]),
                                          ("retitled", ["another catalogue", "titles differ"])])
def test_semantic_ids_of_another_catalogue(tmp_path, synth_data, sid_dirs, job, which, named):
    _rejected(tmp_path, job, synth_data, "--backend", "tiger", "--semantic-ids", sid_dirs[which],
              named=["--semantic-ids", str(sid_dirs[which]), *named])


@pytest.mark.parametrize("job", JOBS)
def test_unreadable_semantic_ids_and_tiger_config(tmp_path, synth_data, job):
    (tmp_path / "sid").mkdir()
    (tmp_path / "sid" / "semantic_ids.parquet").write_bytes(b"PAR1\x00")
    res = _rejected(tmp_path, job, synth_data, "--backend", "tiger", "--semantic-ids", tmp_path / "sid",
                    "--tiger-config", '{"d_model": 16, "layers": 2', named=["--semantic-ids", "semantic_ids.parquet",
                                                                             "--tiger-config", "not valid JSON"])
    assert res.stderr.count("--tiger-config") == 1  # reported once


@pytest.mark.parametrize("job", JOBS)
def test_tiger_options_for_another_backend(tmp_path, synth_data, sid_dirs, job):
    _rejected(tmp_path, job, synth_data, "--backend", "textrec", "--semantic-ids", sid_dirs["good"],
              named=["--semantic-ids is an option of --backend tiger", "'textrec'"])


@pytest.mark.parametrize("job", ["prune", "finetune", "evaluate"])
def test_bad_tiger_config_field_named(tmp_path, synth_data, sid_dirs, job):
    _rejected(tmp_path, job, synth_data, "--backend", "tiger", "--semantic-ids", sid_dirs["good"],
              "--tiger-config", json.dumps({**TINY, "layers": 3}), named=["--tiger-config", "unknown field 'layers'"])
    cfg = tmp_path / "tiger.json"  # a JSON file works as well as an inline object
    cfg.write_text(json.dumps({**TINY, "dropout": 2, "beam_width": 0}))
    _rejected(tmp_path, job, synth_data, "--backend", "tiger", "--semantic-ids", sid_dirs["good"],
              "--tiger-config", cfg, named=["--tiger-config", "dropout=2", "beam_width=0"])


def _checkpoint(tmp_path, titles, sids):
    from engine.llm import get_backend

    be = get_backend("tiger", titles, config=TINY, semantic_ids=str(sids))
    return be.save_model(be.build_model(), tmp_path / "ckpt")


@pytest.mark.parametrize("job", ["prune", "finetune", "evaluate"])
def test_checkpoint_of_other_semantic_ids(tmp_path, synth_data, titles, sid_dirs, job):
    ckpt = _checkpoint(tmp_path, titles, sid_dirs["3-levels"])
    _rejected(tmp_path, job, synth_data, "--backend", "tiger", "--semantic-ids", sid_dirs["good"],
              "--tiger-config", json.dumps(TINY), "--tiger-checkpoint", ckpt,
              named=["--tiger-checkpoint", "other semantic ids", str(ckpt)])
    _rejected(tmp_path, job, synth_data, "--backend", "tiger", "--semantic-ids", sid_dirs["good"],
              "--tiger-checkpoint", tmp_path / "nowhere", named=["--tiger-checkpoint", "nowhere", "config.json"])


def test_evaluate_adapter_not_a_tiger_model(tmp_path, synth_data, titles, sid_dirs):
    ckpt = _checkpoint(tmp_path, titles, sid_dirs["3-levels"])
    _rejected(tmp_path, "evaluate", synth_data, "--backend", "tiger", "--semantic-ids", sid_dirs["good"],
              "--tiger-config", json.dumps(TINY), "--adapter", ckpt, named=["--adapter", "other semantic ids"])
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    _rejected(tmp_path, "evaluate", synth_data, "--backend", "tiger", "--semantic-ids", sid_dirs["good"],
              "--adapter", lora, named=["--adapter", "no config.json", "OUT/model"])
