"""Diagnostic probes (fastattn.music.diagnose): repeat labels, attention replay, attention mass,
the ablations, and the probe-training loop against ``train.train``."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastattn.music import data as D
from fastattn.music import diagnose as G
from fastattn.music import tokens as T
from fastattn.music.model import ModelConfig
from fastattn.music.synthetic import SyntheticConfig, synthetic_corpus
from fastattn.music.train import TrainConfig, load_checkpoint, train
from fastattn.nn import CircularRelativeAttention
from helpers import n

CORPUS = synthetic_corpus(SyntheticConfig(n_songs=10, n_bars=17))



def piece():
    # bar 0: A, B; bar 4: A (copy of bar 0), C; bar 8: B (copy at lag 8 only), A (lag 4? no:
    # bar 4 has A → copy at lag 4); bar 9: D (nothing at bar 5 or 1).
    A, B, C, Dn = (0, 0, 60, 12), (12, 1, 48, 24), (24, 2, 64, 12), (36, 0, 70, 6)
    return n((0, *A), (0, *B), (4, *A), (4, *C), (8, *A), (8, *B), (9, *Dn))


def test_copyable_and_classes_by_hand():
    p = T.canonical(piece())
    cp = G.copyable(p, (4, 8))
    cls = G.note_classes(p, (4, 8))
    names = G.classes_for((4, 8))
    assert names == G.CLASSES
    got = {tuple(r): (tuple(c), names[k]) for r, c, k in zip(p.tolist(), cp.tolist(), cls)}
    assert got[(0, 0, 0, 60, 12)] == ((False, False), "head")
    assert got[(4, 0, 0, 60, 12)] == ((True, False), "lag4")
    assert got[(4, 24, 2, 64, 12)] == ((False, False), "none")
    assert got[(8, 0, 0, 60, 12)] == ((True, True), "lag4")    # smallest lag wins
    assert got[(8, 12, 1, 48, 24)] == ((False, True), "lag8")
    assert got[(9, 36, 0, 70, 6)] == ((False, False), "none")
    # A different duration (or track) is not a copy.
    q = n((0, 0, 0, 60, 12), (4, 0, 0, 60, 24), (4, 12, 1, 60, 12))
    assert not G.copyable(q, (4,)).any()


def _corpus_of(p):
    return D.WindowCorpus([p], ["p"], {s: np.array([[0, 0]]) for s in D.SPLITS}, window_bars=16)


@pytest.mark.parametrize("rep", ["note", "event"])
def test_probe_set_labels_targets(rep):
    p = T.canonical(piece())
    ps = G.probe_set(_corpus_of(p), "valid", [0], rep, 1024)
    cls = G.note_classes(p)
    tk = D.encode(p, rep)
    L = len(tk.tokens) - 1
    got = ps.cls[0, :L].numpy()
    if rep == "note":
        # Target i is token i + 1: note i for i < N, then EOS (no class).
        assert list(got) == list(cls) + [-1]
        assert ps.target_onset[0, :L].tolist() == list(tk.onset[1:])
    else:
        kinds = T.event_kind(tk.tokens[1:])
        assert (got[kinds == 1] == -1).all() and got[-1] == -1   # Bar tokens and EOS
        note_tokens = got[np.isin(kinds, [2, 3, 4, 5])]
        assert list(note_tokens) == list(np.repeat(cls, 4))
    assert ps.copy[0, :L].sum().item() == (G.copyable(p).sum() * (1 if rep == "note" else 4))
    per_note = 1 if rep == "note" else 4
    assert (ps.track[0, :L] >= 0).sum().item() == per_note * len(p)
    assert sorted(ps.track[0, :L][ps.track[0, :L] >= 0].tolist()) == sorted(np.repeat(p[:, 2], per_note).tolist())


def _module_and_inputs(time_mode="quotient", variant="CirRelAttn-H", L=37):
    torch.manual_seed(0)
    m = CircularRelativeAttention.from_variant(
        variant, 32, 2, max_len=64, time_mode="fields" if time_mode == "fields" else None)
    x = torch.randn(2, L, 32)
    onset = torch.sort(torch.randint(0, 16 * 48, (2, L)), dim=1).values
    onset[:, 0] = -1
    pitch = torch.randint(30, 90, (2, L))
    pitch[:, 0] = -1
    return m, x, onset, pitch


@pytest.mark.parametrize("time_mode,variant", [("quotient", "CirRelAttn-H"), ("quotient", "RIPO"),
                                               ("fields", "CirRelAttn"), ("quotient", "Attn")])
def test_replayed_probabilities_reproduce_the_module(time_mode, variant):
    m, x, onset, pitch = _module_and_inputs(time_mode, variant)
    m.eval()
    with torch.no_grad(), G.recorded_attention() as calls:
        y = m(x, onset, pitch, bar=torch.where(onset >= 0, onset // 48, -1),
              position=torch.where(onset >= 0, onset % 48, -1))
    assert len(calls) == 1
    P = G.replay_probabilities(calls[0])                          # [B, H, L, L]
    B, L = onset.shape
    assert torch.allclose(P.sum(-1), torch.ones(B, 2, L), atol=1e-5)
    assert (P.triu(1) == 0).all()                                   # causal
    # out_proj(P · v) is the module's output.
    v = calls[0][0][2]
    out = m.out_proj((P @ v).transpose(1, 2).reshape(B, L, 32))
    assert torch.allclose(out, y, atol=1e-5)


def test_fields_ablation_uses_the_modules_fields_time():
    mc = ModelConfig(variant="CirRelAttn-H", n_layer=1, d_model=32, n_head=2, d_ff=64,
                     max_len=64, convention="slides")
    m = G.build_model(mc, G.Ablation(time_mode="fields"))
    attn = m.blocks[0].attn
    assert attn.time_mode == "fields" and attn.coordinate_names == ("bar", "position", "pitch")
    assert attn.pos_table.shape == (2 * 48 - 1, 16)
    assert G.build_model(mc).blocks[0].attn.time_mode == "onset"

def test_attention_sums_by_hand():
    # One window, 4 tokens at onsets 0, 24, 192, 216 (bars 0, 0, 4, 4); L = 4, one head.
    onset = torch.tensor([[0, 24, 192, 216]])
    target = torch.tensor([[24, 192, 216, -1]])
    copy = torch.tensor([[[False], [False], [True], [False]]])
    P = torch.zeros(1, 1, 4, 4)
    P[0, 0, 2] = torch.tensor([0.2, 0.5, 0.3, 0.0])   # query at 192 (target onset 216)
    s = G._attention_sums(P, onset, target, copy, (4,), 48)
    mass, chance, nq = s["same4"]        # keys at 192 - 192 = 0: token 0 → 0.2; 1 of 3 visible
    assert nq == 1 and mass.item() == pytest.approx(0.2) and chance == pytest.approx(1 / 3)
    mass, chance, nq = s["source4"]      # keys at 216 - 192 = 24: token 1 → 0.5
    assert mass.item() == pytest.approx(0.5) and chance == pytest.approx(1 / 3)


def test_probe_reports_every_class_and_layer():
    mc = ModelConfig(variant="CirRelAttn-H", n_layer=2, d_model=32, n_head=2, d_ff=64,
                     max_len=384)
    model = G.build_model(mc)
    ps = G.probe_set(CORPUS, "valid", [0, 1], "note", 384)
    r = G.probe(model, ps, batch_size=1)
    assert set(r["acc"]) == set(G.CLASSES) and set(r["acc"]["lag4"]) == set(G.NOTE_FIELDS) | {"note"}
    assert sum(r["count"].values()) == int((ps.cls >= 0).sum())
    assert sum(sum(t.values()) for t in r["count_by_track"].values()) == int((ps.cls >= 0).sum())
    assert len(r["attn"]) == 2 and 0 <= r["attn"][0]["source4"] <= 1
    # Untrained: attention is near uniform, so the mass is near chance.
    assert abs(r["attn"][0]["source4"] - r["attn"][0]["source4_chance"]) < 0.05
    ev = G.probe(model, ps, attention=False)
    assert "attn" not in ev and ev["nll_per_note"] == pytest.approx(r["nll_per_note"])


def test_ablations():
    mc = ModelConfig(variant="CirRelAttn-H", n_layer=1, d_model=32, n_head=2, d_ff=64, max_len=384)
    base = G.build_model(mc, seed=3)
    big = G.build_model(mc, G.Ablation(table_scale=4.0), seed=3)
    assert torch.allclose(big.blocks[0].attn.bar_table, 4 * base.blocks[0].attn.bar_table)
    assert torch.equal(big.blocks[0].attn.in_proj.weight, base.blocks[0].attn.in_proj.weight)
    mixed = G.build_model(mc, G.Ablation(table_scale=2.0, index_scale=4.0), seed=3)
    assert torch.allclose(mixed.blocks[0].attn.rel_index_table, 4 * base.blocks[0].attn.rel_index_table)
    assert torch.allclose(mixed.blocks[0].attn.octave_table, 2 * base.blocks[0].attn.octave_table)
    small = G.build_model(mc, G.Ablation(n_bar=9))
    assert small.blocks[0].attn.bar_table.shape[0] == 9
    hid = G.build_model(mc, G.Ablation(hide_fields=("bar", "position")))
    assert (hid.embed[1].weight == 0).all() and not hid.embed[2].weight.requires_grad
    with pytest.raises(ValueError, match="time_mode"):
        G.build_model(mc, G.Ablation(time_mode="bars"))


def test_train_with_probes_matches_train(tmp_path):
    """The probe loop is train.train's loop: same weights after the same steps (dropout on)."""
    mc = ModelConfig(variant="CirRelAttn-H", n_layer=1, d_model=32, n_head=2, d_ff=64,
                     dropout=0.2, max_len=384)
    tc = TrainConfig(lr=3e-3, warmup_steps=2, decay_steps=10, batch_size=4, max_steps=3,
                     eval_every=100, eval_windows=2, out_dir=str(tmp_path), progress=False)
    train(mc, tc, CORPUS)
    want = load_checkpoint(tmp_path / "last.pt")["model"]
    ps = G.probe_set(CORPUS, "valid", [0], "note", 384)
    log = tmp_path / "probes.jsonl"
    model, recs = G.train_with_probes(mc, tc, CORPUS, ps, probe_every=2, log_path=log,
                                      tag={"name": "t"})
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert [r["step"] for r in recs] == [0, 2, 3] and all(r["name"] == "t" for r in recs)
    assert log.read_text().count("\n") == 3
