"""The reproduction driver (fastattn.music.reproduce): paired verdicts by hand, the 1/8 subset,
the report, and a tiny end-to-end run through the CLI (resumable)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from fastattn.music import reproduce as R
from fastattn.music.synthetic import SyntheticConfig, synthetic_corpus


def test_paired_verdicts_by_hand():
    ref = {0: 1.0, 1: 1.0, 2: 1.0}
    # NLL (lower is better): the other is worse by 0.1, 0.2, 0.3 → CirRelAttn-H better by
    # 0.2 ± 0.1; 0.2 > 2 · 0.1 / √3.
    p = R.paired(ref, {0: 1.1, 1: 1.2, 2: 1.3}, lower_is_better=True)
    assert p["d"] == pytest.approx(0.2) and p["std"] == pytest.approx(0.1)
    assert (p["agree"], p["n"], p["verdict"]) == (3, 3, "better")
    # Similarity (higher is better): the other is higher on every seed → worse.
    p = R.paired(ref, {0: 1.1, 1: 1.2, 2: 1.3}, lower_is_better=False)
    assert p["d"] == pytest.approx(-0.2) and (p["agree"], p["verdict"]) == (3, "worse")
    # Mixed signs: 2 of 3 seeds favour the reference.
    p = R.paired(ref, {0: 1.3, 1: 1.2, 2: 0.9}, lower_is_better=True)
    assert p["d"] == pytest.approx(0.4 / 3) and (p["agree"], p["verdict"]) == (2, "no clear difference")
    # All agree but the spread is large: 0.01, 0.01, 1.0 → mean 0.34, std 0.57, 2·SE = 0.66.
    p = R.paired(ref, {0: 1.01, 1: 1.01, 2: 2.0}, lower_is_better=True)
    assert p["agree"] == 3 and p["verdict"] == "no clear difference"
    # Only shared seeds are compared; one seed never gives a verdict.
    p = R.paired({0: 1.0, 5: 2.0}, {0: 1.5, 7: 0.0}, lower_is_better=True)
    assert p["seeds"] == [0] and p["n"] == 1 and p["verdict"] == "no clear difference"
    assert R.paired({0: 1.0}, {1: 1.0}, True) is None


def test_eighth_keeps_an_eighth_of_the_training_songs():
    c = synthetic_corpus(SyntheticConfig(n_songs=80, n_bars=18))
    e = R.eighth(c, seed=0)
    train_songs = np.unique(c.windows["train"][:, 0])
    kept = np.unique(e.windows["train"][:, 0])
    assert len(kept) == round(len(train_songs) / 8) and set(kept) <= set(train_songs)
    # Every window of a kept song stays; validation and test are unchanged.
    assert len(e.windows["train"]) == np.isin(c.windows["train"][:, 0], kept).sum()
    assert all(np.array_equal(e.windows[s], c.windows[s]) for s in ("valid", "test"))
    assert np.array_equal(R.eighth(c, seed=0).windows["train"], e.windows["train"])
    assert not np.array_equal(R.eighth(c, seed=1).windows["train"], e.windows["train"])
    assert e.stats["train_songs"] == len(kept)


def test_model_config_and_budgets():
    mc = R.model_config("RIPO", R.BUDGETS["paper"])
    assert (mc.n_layer, mc.d_model, mc.n_head, mc.d_ff, mc.dropout) == (4, 256, 8, 1024, 0.2)
    paper = R.BUDGETS["paper"]
    assert (paper.batch_size, paper.steps, paper.lr, paper.warmup) == (32, 50000, 8e-5, 5000)
    assert (mc.convention, R.model_config("Attn", paper, "slides").convention) == ("authors", "slides")
    # A new step count keeps the schedule's shape (cpu: warm-up 10 %, decay over the run).
    b = R.budget_from("cpu", steps=800, device=None)
    assert (b.steps, b.warmup, b.decay_steps, b.eval_every) == (800, 80, 800, 300)
    assert R.budget_from("cpu", steps=100).eval_every == 100
    assert R.budget_from("cpu", steps=800, warmup=5).warmup == 5
    assert R.budget_from("paper") == paper and paper.device == "auto"
    with pytest.raises(ValueError, match="budget"):
        R.budget_from("huge")
    with pytest.raises(ValueError, match="data"):
        R.load("pop909", None)


def _record(variant, seed, nll, f1):
    return {"corpus": "c", "variant": variant, "seed": seed, "convention": "slides",
            "budget": {"n_layer": 1, "d_model": 8, "n_head": 1, "batch_size": 2, "steps": 3,
                       "lr": 0.1}, "train_windows": 10,
            "valid_nll": nll + 0.5, "test_nll": nll, "test_nll_fields": {"pitch": nll / 2},
            "next_bar": {"note_f1": f1}, "rep": {"4": 0.5}, "rep_truth": {"4": 0.75}}


def test_report_and_markdown_by_hand():
    recs = [_record("CirRelAttn-H", s, 1.0 + 0.01 * s, 0.5) for s in range(3)]
    recs += [_record("Attn", s, 1.2 + 0.02 * s, 0.5 + 0.1 * (s - 1)) for s in range(3)]
    rep = R.report(recs)["c"]
    assert rep["order_by_test_nll"] == ["CirRelAttn-H", "Attn"]
    m, s, n = rep["variants"]["Attn"]["test_nll"]
    assert (m, n) == (pytest.approx(1.22), 3) and s == pytest.approx(0.02)
    p = rep["pairs"]["Attn"]["test_nll"]
    assert p["d"] == pytest.approx(0.21) and p["std"] == pytest.approx(0.01) and p["verdict"] == "better"
    assert rep["pairs"]["Attn"]["note_f1"]["verdict"] == "no clear difference"
    assert "rep@4" not in rep["pairs"]["Attn"]                  # reported, not judged
    assert rep["rep_truth"]["4"][0] == pytest.approx(0.75)
    md = R.markdown(R.report(recs))
    assert ("c: CirRelAttn-H better than Attn on test_nll by +0.2100 ± 0.0100, seeds agree 3/3"
            in md)
    assert "| Attn | 3 | 1.720 ± 0.020 | 1.220 ± 0.020 | 0.610 ± 0.010 |" in md
    assert R.report(recs + recs[:2]) == R.report(recs)          # a run logged twice counts once


def test_reproduce_cli_tiny_end_to_end(tmp_path):
    from fastattn.music.cli import main
    out = tmp_path / "rep"
    args = ["reproduce", "--budget", "tiny", "--variants", "Attn,CirRelAttn-H", "--seeds", "0",
            "--out", str(out)]
    assert main(args) == 0
    runs = R.read_runs(out / "runs.jsonl")
    assert [(r["variant"], r["seed"]) for r in runs] == [("Attn", 0), ("CirRelAttn-H", 0)]
    r = runs[1]
    assert set(r["test_nll_fields"]) == {"type", "bar", "position", "track", "pitch", "duration"}
    assert math.isfinite(r["test_nll"]) and 0 <= r["next_bar"]["note_f1"] <= 1
    assert set(r["rep"]) == {"4", "8", "12"} and r["rep_truth"]["4"] > 0.3
    res = json.loads((out / "results.json").read_text())
    assert "Attn" in res["synthetic"]["pairs"] and (out / "results.md").exists()
    assert main(args) == 0                                      # finished runs are skipped
    assert len(R.read_runs(out / "runs.jsonl")) == 2


def test_reproduce_paper_flag_resolves_the_authors_configuration(capsys):
    """One flag turns the CPU run into the paper's (4 × 256, batch 32, 50k steps, on a GPU when
    there is one); --dry-run shows it without training."""
    from fastattn.music.cli import main
    assert main(["reproduce", "--paper", "--dry-run", "--corpora", "pop909,pop909-eighth"]) == 0
    plan = json.loads(capsys.readouterr().out)
    b = plan["budget"]
    assert (b["n_layer"], b["d_model"], b["n_head"], b["d_ff"], b["batch_size"], b["steps"],
            b["device"]) == (4, 256, 8, 1024, 32, 50000, "auto")
    assert plan["convention"] == "authors" and plan["seeds"] == [0, 1, 2]


POP909 = Path(os.environ.get("FASTATTN_POP909",
                             Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pop909"))


@pytest.mark.skipif(not (POP909 / "001" / "001.mid").exists(), reason=f"POP909 not at {POP909}")
def test_pop909_eighth_on_real_songs(tmp_path):
    pytest.importorskip("symusic")
    full = R.load("pop909", str(POP909), songs=16, cache_dir=tmp_path)
    e = R.load("pop909-eighth", str(POP909), songs=16, cache_dir=tmp_path)
    train_songs = np.unique(full.windows["train"][:, 0])
    assert len(train_songs) == 13 and len(np.unique(e.windows["train"][:, 0])) == 2
    assert 0 < e.n_windows("train") < full.n_windows("train")
    assert all(np.array_equal(e.windows[s], full.windows[s]) for s in ("valid", "test"))
    # The diagnosis probes label real windows too: POP909 repeats bars as well.
    from fastattn.music import diagnose as G
    ps = G.probe_set(full, "train", [0, 5], "note", 1024)
    assert (ps.cls == G.CLASSES.index("lag4")).sum() > 0 and (ps.cls == G.CLASSES.index("none")).sum() > 0


def test_logs_survive_a_write_cut_short(tmp_path):
    """A kill in the middle of appending a record leaves a partial last line: the experiment's
    table and the reproduction's reader drop it (that run is redone) instead of crashing."""
    from fastattn.music import experiment as E
    rec = {"corpus": "synthetic", "variant": "Attn", "seed": 0, "val_nll": 2.0,
           "val_nll_pitch": 1.0}
    (tmp_path / "synthetic.jsonl").write_text(json.dumps(rec) + "\n" + '{"corpus": "synth')
    assert "| synthetic | Attn | 1 | 2.000 ± 0.000 | 1.000 ± 0.000 |" in E.table(tmp_path)
    (tmp_path / "runs.jsonl").write_text(json.dumps(rec) + "\n" + '{"corpus": "synth')
    assert R.read_runs(tmp_path / "runs.jsonl") == [rec]
