"""Training (loss decreases, bit-for-bit resume, Ctrl-C, DDP) and generation (constraints, KV
cache) of the music Transformer on tiny models."""
from __future__ import annotations

import os
import signal
import sys
import tempfile

import numpy as np
import pytest
import torch

from helpers import default_sigint, load_bench  # noqa: F401  (default_sigint: fixture)

from fastattn._io import CorruptFile, DirLock, DirLocked, read_jsonl
from fastattn._training import ResumeMismatch
from fastattn.music import data as D
from fastattn.music import train as M
from fastattn.music import tokens as T
from fastattn.music.generate import SamplingConfig, decode, generate, prompt_from_notes
from fastattn.music.model import ModelConfig, MusicTransformer, config_dict
from fastattn.music.synthetic import SyntheticConfig, synthetic_corpus
from fastattn.music.train import (TrainConfig, _LossModule, evaluate_nll, load_checkpoint,
                                  load_model, step_loss, train)

CORPUS = synthetic_corpus(SyntheticConfig(n_songs=10, n_bars=17))


def tiny(rep="note", variant="CirRelAttn-H", dropout=0.1, **kw):
    return ModelConfig(representation=rep, variant=variant, n_layer=1, d_model=32, n_head=2,
                       d_ff=64, dropout=dropout, max_len=384, **kw)


def tcfg(out, **kw):
    base = dict(lr=3e-3, warmup_steps=2, decay_steps=50, batch_size=4, max_steps=4,
                eval_every=2, eval_windows=4, log_every=1, out_dir=str(out), progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("rep", ["note", "event"])
def test_loss_decreases(tmp_path, rep):
    mc = tiny(rep, dropout=0.0)
    torch.manual_seed(0)
    before = evaluate_nll(MusicTransformer(mc), CORPUS, "valid", max_windows=4)["loss"]
    r = train(mc, tcfg(tmp_path, max_steps=12, eval_every=12, lr=1e-2, max_shift=0), CORPUS)
    assert r.stopped == "max_steps" and r.step == 12
    assert r.last_val < before - 0.5, (before, r.last_val)
    assert (tmp_path / "best.pt").exists() and (tmp_path / "log.jsonl").read_text().count("\n") > 12


def _params(path):
    return load_checkpoint(path)["model"]


# ---------------------------------------------------------------------------------------------
# Interrupts: real signals (os.kill on this process) at the points where a signal used to leave
# an inconsistent checkpoint, each run resumed and compared bit for bit with an uninterrupted one.
sigint_resume = load_bench("sigint_resume")

RESUME_CFG = dict(max_steps=7, eval_every=3, eval_windows=6, patience=0, log_every=2)
RESUME_CORPUS = synthetic_corpus(SyntheticConfig(n_songs=20, n_bars=18))  # 6 valid windows: 2 batches


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    train(tiny("note", dropout=0.2), tcfg(out, **RESUME_CFG), RESUME_CORPUS)  # dropout: RNG state matters
    return sigint_resume.load_result("music", out)


def _interrupt_at(monkeypatch, point: str, nth: int):
    """Arrange for SIGINT to reach this process the ``nth`` time ``point`` is passed."""
    calls = {"n": 0}

    def fire(*_):
        calls["n"] += 1
        if calls["n"] == nth:
            os.kill(os.getpid(), signal.SIGINT)

    if point in ("forward", "validation"):
        training = point == "forward"
        real = MusicTransformer.loss_parts

        def loss_parts(self, *a, **k):
            if self.training == training:
                fire()
            return real(self, *a, **k)
        monkeypatch.setattr(MusicTransformer, "loss_parts", loss_parts)
    elif point == "optimizer":  # after opt.step(), before the step counter moves
        from torch.optim.optimizer import register_optimizer_step_post_hook

        handle = register_optimizer_step_post_hook(fire)
        monkeypatch.undo = lambda h=handle, u=monkeypatch.undo: (h.remove(), u())
    elif point == "checkpoint":
        real_save = M.atomic_save
        monkeypatch.setattr(M, "atomic_save", lambda obj, path: (fire(), real_save(obj, path)))


@pytest.mark.usefixtures("default_sigint")
@pytest.mark.parametrize("point,nth", [("forward", 2), ("forward", 6), ("optimizer", 4),
                                       ("validation", 3), ("checkpoint", 2)])
def test_sigint_anywhere_resumes_bit_for_bit(tmp_path, monkeypatch, reference, point, nth):
    mc, out = tiny("note", dropout=0.2), tmp_path / "run"
    _interrupt_at(monkeypatch, point, nth)
    r = train(mc, tcfg(out, **RESUME_CFG), RESUME_CORPUS)
    monkeypatch.undo()
    assert r.stopped == "interrupted" and 0 < r.step < 7
    ck = load_checkpoint(out / "last.pt")
    # A validation due at the interrupted step is left to the resumed run (marked pending).
    due = r.step % RESUME_CFG["eval_every"] == 0
    assert ck["step"] == r.step and ck["pending_eval"] == (point == "validation" or
                                                           point == "forward" and due)
    # The log covers exactly the finished steps (and no record of the abandoned validation).
    assert max(rec["step"] for rec in read_jsonl(out / "log.jsonl")) <= r.step
    assert train(mc, tcfg(out, **RESUME_CFG), RESUME_CORPUS).step == 7
    assert sigint_resume.differences(reference, sigint_resume.load_result("music", out)) == []
    assert not list(out.glob(".*.tmp")) and not (out / "fastattn.lock").exists()


@pytest.mark.usefixtures("default_sigint")
def test_second_sigint_during_a_checkpoint_write_aborts_and_keeps_the_old_one(tmp_path, monkeypatch,
                                                                            reference):
    mc, out = tiny("note", dropout=0.2), tmp_path / "run"
    real_save, calls = M.atomic_save, {"n": 0}

    def save(obj, path):  # both signals arrive while the 3rd checkpoint is being written
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        real_save(obj, path)

    monkeypatch.setattr(M, "atomic_save", save)
    with pytest.raises(KeyboardInterrupt):
        train(mc, tcfg(out, **RESUME_CFG), RESUME_CORPUS)
    monkeypatch.undo()
    assert load_checkpoint(out / "last.pt")["step"] == 3  # the previous checkpoint, whole
    assert not list(out.glob(".*.tmp"))
    with open(out / "log.jsonl", "ab") as f:  # and a log line cut short by the abort
        f.write(b'{"step": 7, "tr')
    assert train(mc, tcfg(out, **RESUME_CFG), RESUME_CORPUS).step == 7
    assert sigint_resume.differences(reference, sigint_resume.load_result("music", out)) == []


def test_resume_refuses_changed_settings_and_corrupt_checkpoints(tmp_path, capsys):
    mc = tiny("note", dropout=0.0)
    train(mc, tcfg(tmp_path, max_steps=2, eval_every=2), CORPUS)
    for change in ({"seed": 1}, {"lr": 1e-3}, {"batch_size": 2}, {"eval_windows": 2}):
        with pytest.raises(ResumeMismatch, match=f"{next(iter(change))}: .* in the checkpoint"):
            train(mc, tcfg(tmp_path, max_steps=4, eval_every=2, **change), CORPUS)
    other = synthetic_corpus(SyntheticConfig(n_songs=10, n_bars=17, seed=5))
    with pytest.raises(ResumeMismatch, match="corpus_fingerprint"):
        train(mc, tcfg(tmp_path, max_steps=4, eval_every=2), other)
    capsys.readouterr()
    assert train(mc, tcfg(tmp_path, max_steps=4, eval_every=2), CORPUS).step == 4  # may change
    assert "max_steps changed from 2 to 4" in capsys.readouterr().err
    (tmp_path / "last.pt").write_bytes((tmp_path / "last.pt").read_bytes()[:1000])
    with pytest.raises(CorruptFile, match=rf"{tmp_path / 'last.pt'}: unreadable.*--fresh"):
        train(mc, tcfg(tmp_path, max_steps=4, eval_every=2), CORPUS)
    with pytest.raises(CorruptFile, match="best.pt"):  # evaluate/generate: the file is named too
        (tmp_path / "best.pt").write_bytes(b"junk")
        load_model(tmp_path / "best.pt")
    r = train(mc, tcfg(tmp_path, max_steps=2, eval_every=2), CORPUS, resume=False)  # --fresh
    assert r.step == 2 and load_checkpoint(tmp_path / "last.pt")["step"] == 2
    assert [rec["step"] for rec in read_jsonl(tmp_path / "log.jsonl")] == [1, 2, 2]
    with DirLock(tmp_path, command="another run"):
        with pytest.raises(DirLocked, match="another run"):
            train(mc, tcfg(tmp_path, max_steps=4, eval_every=2), CORPUS)


def test_no_validation_windows_means_no_validation(tmp_path, capsys):
    no_valid = D.WindowCorpus(CORPUS.songs, CORPUS.names,
                              {**CORPUS.windows, "valid": np.zeros((0, 2), np.int64)})
    assert np.isnan(evaluate_nll(MusicTransformer(tiny()), no_valid, "valid")["loss"])
    r = train(tiny(dropout=0.0), tcfg(tmp_path, max_steps=4, eval_every=2, patience=1), no_valid)
    assert "no validation windows" in capsys.readouterr().err
    assert r.stopped == "max_steps" and r.step == 4  # patience 1 does not stop it
    assert np.isnan(r.best_val) and r.history == [] and not (tmp_path / "best.pt").exists()
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 4
    assert not any("val_loss" in rec for rec in read_jsonl(tmp_path / "log.jsonl"))


def test_cli_train_without_validation_windows_says_so(tmp_path, capsys):
    from fastattn.music.cli import main

    (tmp_path / "midi").mkdir()
    for k in range(4):  # 4 songs split 80/10/10: 3 train, 0 valid, 1 test
        T.write_midi(np.array([[b, 12 * k, 2, 60 + k, 12] for b in range(20)]),
                     tmp_path / "midi" / f"s{k}.mid")
    assert main(["train", "--data", str(tmp_path / "midi"), "--cache", str(tmp_path / "cache"),
                 "--layers", "1", "--dim", "16", "--heads", "2", "--ff", "16", "--max-len", "64",
                 "--steps", "2", "--eval-every", "1", "--batch-size", "2", "--no-progress",
                 "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "no validation set (0 validation windows)" in out and "0.0000" not in out


def _ddp_worker(rank, world, init_file, out_dir, batch_idx):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        model = MusicTransformer(tiny("event", dropout=0.0))
        net = torch.nn.parallel.DistributedDataParallel(_LossModule(model))
        per = len(batch_idx) // world
        batch = D.corpus_batch(CORPUS, "train", batch_idx[rank * per:(rank + 1) * per], "event",
                               256, convention=model.cfg.convention)
        step_loss(net, batch, world).backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.named_parameters()}, f"{out_dir}/ddp_grad.pt")
        # The whole loop too: two steps of train() on 2 ranks.
        train(tiny("event", dropout=0.0), tcfg(f"{out_dir}/ddp_run", max_steps=2, eval_every=2),
              CORPUS)
        # Both ranks finish their collectives before either leaves.
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Everything is saved: leave without C++ teardown. gloo's background threads occasionally
    # abort a process at exit ("terminate called without an active exception", about 1 run in
    # 5 here), which would fail the test after the work it checks is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_ddp_two_process_gloo_matches_single_process(tmp_path):
    import torch.multiprocessing as mp
    # Windows of different lengths: per-rank token counts differ, so a per-rank mean would not
    # reproduce the global mean; the global-count normalisation must.
    batch_idx = [0, 2, 9, 15]
    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_ddp_worker, args=(2, init_file, str(tmp_path), batch_idx), nprocs=2, join=True)
    torch.manual_seed(0)
    model = MusicTransformer(tiny("event", dropout=0.0))
    batch = D.corpus_batch(CORPUS, "train", batch_idx, "event", 256,
                           convention=model.cfg.convention)
    step_loss(_LossModule(model), batch, 1).backward()
    ddp = torch.load(tmp_path / "ddp_grad.pt", weights_only=True)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)
    single = train(tiny("event", dropout=0.0), tcfg(tmp_path / "single", max_steps=2,
                                                    eval_every=2), CORPUS)
    a = _params(tmp_path / "single" / "last.pt")
    b = _params(tmp_path / "ddp_run" / "last.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    assert single.history[-1]["val_loss"] == pytest.approx(
        load_checkpoint(tmp_path / "ddp_run" / "last.pt")["last_val"], rel=1e-5)


def _model(rep, variant="CirRelAttn-H", **kw):
    torch.manual_seed(0)
    m = MusicTransformer(tiny(rep, variant, dropout=0.0, **kw)).eval()
    with torch.no_grad():  # make the end token unlikely so that sequences get long
        if rep == "note":
            m.heads[0].bias[T.TYPE_EOS] = -6.0
        else:
            m.heads.bias[T.EOS] = -6.0
            m.heads.bias[T.BAR_OFFSET:T.POS_OFFSET] = -3.0  # and a new bar rarer than a note
    return m


@pytest.mark.parametrize("rep", ["note", "event"])
@pytest.mark.parametrize("variant, convention", [("Attn", "authors"), ("RIPO", "authors"),
                                                 ("CirRelAttn-H", "authors"),
                                                 ("CirRelAttn-H", "slides")])
def test_kv_cache_generation_equals_recomputation(rep, variant, convention):
    m = _model(rep, variant, convention=convention)
    prompt = prompt_from_notes(CORPUS.window("train", 0), rep, 2)
    runs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(3)
        runs.append(generate(m, prompt, sampling=SamplingConfig(max_new_tokens=24, top_p=0.95),
                             generator=g, use_cache=use_cache, return_logits=True))
    a, b = runs
    assert len(a.tokens) - a.n_prompt == 24 and a.stop == "max_tokens"
    np.testing.assert_array_equal(a.tokens, b.tokens)
    for la, lb in zip(a.logits, b.logits):
        for x, y in zip(la if rep == "note" else [la], lb if rep == "note" else [lb]):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rep", ["note", "event"])
def test_generation_constraints(rep):
    m = _model(rep)
    w = CORPUS.window("train", 0)
    prompt = prompt_from_notes(w, rep, 2)
    with pytest.raises(ValueError, match="max_len"):
        generate(m, prompt_from_notes(w, rep, 16) if rep == "event" else
                 T.Tokens(np.zeros((384, 6), np.int64), np.zeros(384, np.int64),
                          np.zeros(384, np.int64)))
    g = generate(m, prompt, end_bar=5, sampling=SamplingConfig(max_new_tokens=150, top_k=20),
                 generator=torch.Generator().manual_seed(0))
    new = g.tokens[g.n_prompt:]
    assert len(new) <= 150 and np.array_equal(g.tokens[:g.n_prompt], prompt.tokens)
    notes = decode(rep, g.tokens)
    assert notes[:, T.BAR].max() < 5 and len(notes) > len(w[w[:, T.BAR] < 2])
    slides = T.coordinates(g.tokens, rep, "slides").onset
    assert (np.diff(slides[slides >= 0]) >= 0).all()  # time never goes back
    coords = T.coordinates(g.tokens, rep, m.cfg.convention)  # Generation carries the model's
    for name in T.Coords._fields:
        np.testing.assert_array_equal(getattr(coords, name), getattr(g, name))
    assert set(np.diff(np.unique(notes[:, T.BAR]))) <= {1}  # no bar skipped
    if rep == "note":
        assert (new[:, 0] != T.TYPE_SOS).all()
        for f, size in enumerate(T.FIELD_SIZES):
            assert new[new[:, 0] == T.TYPE_NOTE][:, f].max() < size
    else:
        assert new.max() < T.EVENT_VOCAB
        kinds = T.event_kind(g.tokens)
        for prev, nxt in zip(kinds[:-1], kinds[1:]):
            assert (prev, nxt) in {(0, 1), (1, 1), (1, 2), (5, 1), (5, 2), (2, 3), (3, 4), (4, 5),
                                   (1, 0), (5, 0)}
        bars = g.tokens[kinds == 1] - T.BAR_OFFSET
        assert (np.diff(bars) == 1).all()
    # Greedy next-bar completion only writes into the requested bar.
    if rep == "event":
        return  # a 15-bar event prompt does not fit the tiny max_len; the note-based one does
    nb = generate(m, prompt_from_notes(w, rep, 15), end_bar=16, min_bar=15,
                  sampling=SamplingConfig(temperature=0, max_new_tokens=40))
    out = decode(rep, nb.tokens)
    assert set(out[:, T.BAR].tolist()) <= set(range(16))
    assert (out[out[:, T.BAR] < 15] == w[w[:, T.BAR] < 15]).all()


@pytest.mark.parametrize("rep", ["note", "event"])
def test_continuations_never_write_into_the_prompt(rep):
    """Many continuations (4 bars given, 16 in all; sampled with end tokens unlikely): the
    prompt's notes come back unchanged and every new note lies after the prompt."""
    from fastattn.music.evaluate import continue_piece
    m = _model(rep)
    gen = torch.Generator().manual_seed(0)
    new_notes = 0
    for k in range(8):
        w = CORPUS.window("train", k)
        out = continue_piece(m, w, prompt_bars=4, total_bars=6, generator=gen,
                             sampling=SamplingConfig(top_k=0, max_new_tokens=40))
        head = out[out[:, T.BAR] < 4]
        np.testing.assert_array_equal(head, w[w[:, T.BAR] < 4])
        assert out[:, T.BAR].max() < 6
        new_notes += len(out) - len(head)
    assert new_notes > 30  # the continuations did write notes (after the prompt)


@pytest.mark.parametrize("rep", ["note", "event"])
def test_authors_preset_end_to_end(tmp_path, rep):
    """A tiny model in the authors' preset trains a few steps (loss falls), reloads from its
    checkpoint with the preset, and generates with the KV cache as without it."""
    from fastattn.music.train import load_model
    mc = tiny(rep, dropout=0.0)
    assert mc.convention == "authors"
    torch.manual_seed(0)
    before = evaluate_nll(MusicTransformer(mc), CORPUS, "valid", max_windows=4)["loss"]
    r = train(mc, tcfg(tmp_path, max_steps=6, eval_every=6, lr=1e-2, max_shift=0), CORPUS)
    assert r.last_val < before - 0.3, (before, r.last_val)
    m = load_model(tmp_path / "last.pt")
    assert m.cfg.convention == "authors" and m.blocks[0].attn.convention == "authors"
    assert m.coordinate_names == ("bar", "position", "pitch")
    prompt = prompt_from_notes(CORPUS.window("valid", 0), rep, 2, "authors")
    runs = [generate(m, prompt, sampling=SamplingConfig(max_new_tokens=20, top_p=0.9),
                     generator=torch.Generator().manual_seed(1), use_cache=c, return_logits=True)
            for c in (True, False)]
    np.testing.assert_array_equal(runs[0].tokens, runs[1].tokens)
    for la, lb in zip(runs[0].logits, runs[1].logits):
        for x, y in zip(la if rep == "note" else [la], lb if rep == "note" else [lb]):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_old_checkpoints_load_in_the_slides_convention(tmp_path):
    from fastattn.music.train import atomic_save, load_model
    m = MusicTransformer(tiny("note", convention="slides"))
    cfg = {k: v for k, v in config_dict(m.cfg).items() if k != "convention"}
    atomic_save({"model_config": cfg, "model": m.state_dict()}, tmp_path / "old.pt")
    assert load_model(tmp_path / "old.pt").cfg.convention == "slides"
