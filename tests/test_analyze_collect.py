"""Activation collection: shapes, positions, BOS dropped, normalisation, resumable writing."""

import json
import time

import pytest
import torch
from analyze_helpers import LAYERS, POS, D, tiny_contexts, tiny_music, tiny_subject

from fastattn.analyze.collect import Collection, collect, layer_dir, parse_positions, select_position
from fastattn.analyze.hooks import add_to_residual, capture_residual, run_captured
from fastattn.analyze.subjects import id_contexts

pytest.importorskip("transformers")
pytest.importorskip("safetensors")


def test_id_contexts_bos_and_stride():
    ctx = id_contexts(list(range(1, 31)), 6, bos_id=0, stride=5)
    assert ctx.inputs.shape == (6, 6)
    assert (ctx.inputs[:, 0] == 0).all()
    assert ctx.inputs[1, 1:].tolist() == [6, 7, 8, 9, 10]
    assert id_contexts(list(range(1, 31)), 6, 0, stride=2).inputs[1, 1:].tolist() == [3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="context"):
        id_contexts([1, 2], 1, 0)
    with pytest.raises(ValueError, match="fewer than one context"):
        id_contexts([1, 2], 8, 0)


def test_parse_positions():
    assert parse_positions("pow2", 20) == [1, 2, 4, 8, 16]
    assert parse_positions("all", 4) == [1, 2, 3]
    assert parse_positions("3,1", 8) == [1, 3]
    with pytest.raises(ValueError, match="BOS"):
        parse_positions([0, 2], 8)
    with pytest.raises(ValueError, match="positions"):
        parse_positions([8], 8)


def test_collect_matches_hidden_states(tmp_path):
    subject, ctx = tiny_subject(), tiny_contexts(300, 16)
    meta = collect(
        subject, ctx, tmp_path, [0, 1, LAYERS], [1, 4, 15], contexts_per_shard=7, batch_size=3, progress=False
    )
    coll = Collection(tmp_path)
    assert meta["rows_per_layer"] == len(ctx) * 3 and meta["n_shards"] == -(-len(ctx) // 7)
    with torch.no_grad():
        out = subject.model(input_ids=ctx.inputs, output_hidden_states=True)
    pos = torch.tensor([1, 4, 15])
    for L in (0, 1, LAYERS):
        x = torch.cat([a for a, _ in coll.rows(L)])
        rows = {k: torch.cat([r[k] for _, r in coll.rows(L)]) for k in ("positions", "contexts", "tokens")}
        assert x.shape == (len(ctx) * 3, D)
        assert (rows["positions"] != 0).all()  # BOS dropped
        assert rows["positions"].tolist() == pos.repeat(len(ctx)).tolist()
        assert rows["contexts"].tolist() == torch.arange(len(ctx)).repeat_interleave(3).tolist()
        assert torch.equal(rows["tokens"], ctx.inputs[:, pos].reshape(-1))
        ref = out.hidden_states[L][:, pos].reshape(-1, D)
        if L == LAYERS:  # HF applies the final LayerNorm to its last hidden state; we store the residual
            assert not torch.allclose(x, ref, atol=1e-3)
            ref = subject.model.transformer.ln_f(x)
            torch.testing.assert_close(ref, out.hidden_states[L][:, pos].reshape(-1, D), atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-5)
    assert select_position(coll, 1, 4).shape == (len(ctx), D)
    assert coll.store(1).d == D and len(coll.store(1)) == len(ctx) * 3  # readable by fastattn.sae


def test_normalize(tmp_path):
    collect(tiny_subject(), tiny_contexts(100, 8), tmp_path, [1], "all", normalize=True, progress=False)
    x = torch.cat([a for a, _ in Collection(tmp_path).rows(1)])
    torch.testing.assert_close(x.norm(dim=1), torch.full((x.shape[0],), D**0.5), atol=1e-4, rtol=1e-4)


class Counting:
    """Wraps a subject and counts forward passes."""

    def __init__(self, subject):
        self.s, self.calls = subject, 0

    def __getattr__(self, name):
        return getattr(self.s, name)

    def forward(self, ctx, idx):
        self.calls += 1
        return self.s.forward(ctx, idx)


def test_resume_rewrites_only_missing_shards(tmp_path):
    ctx = tiny_contexts(300, 16)
    collect(tiny_subject(), ctx, tmp_path, [1, 2], "all", contexts_per_shard=5, batch_size=5, progress=False)
    files = sorted(p for L in (1, 2) for p in layer_dir(tmp_path, L).iterdir())
    before = {p: p.read_bytes() for p in files}
    # Interrupted run: one layer's shard missing, metadata not marked complete.
    files[1].unlink()
    meta = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(ValueError, match="incomplete"):
        Collection(tmp_path)
    counting = Counting(tiny_subject())
    collect(counting, ctx, tmp_path, [1, 2], "all", contexts_per_shard=5, batch_size=5, progress=False)
    assert counting.calls == 1  # one shard of 5 contexts, one batch
    assert {p: p.read_bytes() for p in files} == before
    with pytest.raises(ValueError, match="differs"):
        collect(
            tiny_subject(), ctx, tmp_path, [1, 2], "all", normalize=True, contexts_per_shard=5, progress=False
        )


def test_bad_inputs(tmp_path):
    subject = tiny_subject()
    with pytest.raises(ValueError, match="layers must be in 0"):
        collect(subject, tiny_contexts(), tmp_path, [LAYERS + 1], progress=False)
    with pytest.raises(ValueError, match="exceeds the model"):
        collect(subject, tiny_contexts(400, POS + 1), tmp_path, [1], progress=False)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        Collection(tmp_path / "nothing")
    with pytest.raises(ValueError, match="width"), add_to_residual(subject.model, 1, torch.ones(D + 1)):
        subject.model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="1-D"), add_to_residual(subject.model, 1, torch.ones(1, D)):
        pass


def test_capture_stops_early_and_hooks_are_removed():
    subject = tiny_subject()
    ids = tiny_contexts().inputs[:2]
    with capture_residual(subject.model, [1]) as hs:
        run_captured(lambda: subject.model(input_ids=ids))
    assert hs[1].shape == (2, 16, D)
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in subject.model.transformer.h)


@pytest.mark.parametrize("representation", ["note", "event"])
def test_music_collection(tmp_path, representation):
    subject, corpus = tiny_music(representation)
    ctx = subject.contexts(corpus, "train", 24, max_contexts=6)
    assert ctx.inputs.shape[:2] == (6, 24)
    assert set(ctx.extras) == {"onset", "pitch", "bar", "position", "track"}
    assert (ctx.tokens[:, 0] == subject.bos_id).all()
    collect(subject, ctx, tmp_path, [0, 1], "all", progress=False)
    coll = Collection(tmp_path)
    x, rows = next(coll.rows(1))
    assert x.shape == (6 * 23, 16) and (rows["positions"] >= 1).all()
    assert torch.equal(rows["x_pitch"], ctx.extras["pitch"][:, 1:].reshape(-1))
    if representation == "note":  # every stored note token has a pitch, a track and an onset
        assert (rows["x_pitch"] >= 0).all() and (rows["x_track"] >= 0).all()
        assert torch.equal(rows["tokens"], rows["x_track"] * 128 + rows["x_pitch"])
    vocab = coll.vocab()
    assert len(vocab) == (386 if representation == "note" else 224)


def test_finished_collection_detects_truncated_and_damaged_files(tmp_path, capsys, monkeypatch):
    from fastattn._io import CorruptFile, DirLock, DirLocked

    ctx = tiny_contexts(420, 8)  # 60 contexts: 3 shards of 20
    collect(tiny_subject(), ctx, tmp_path, [1, 2], "all", contexts_per_shard=20, progress=False)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert set(meta["files"]) >= {"layer_01/shard_00002.safetensors", "contexts.safetensors"}
    assert not (tmp_path / "manifest.jsonl").exists()
    shard = layer_dir(tmp_path, 2) / "shard_00001.safetensors"
    good = shard.read_bytes()
    shard.write_bytes(good[:-100])  # truncated: refused when the collection is opened
    with pytest.raises(CorruptFile, match=rf"{shard}: .*bytes, meta.json records"):
        Collection(tmp_path)
    flipped = bytearray(good)
    flipped[-5] ^= 1
    shard.write_bytes(bytes(flipped))  # same size, one bit off: refused when it is read
    coll = Collection(tmp_path)
    assert len(list(coll.rows(1))) == 3
    with pytest.raises(CorruptFile, match=rf"{shard}: contents differ from meta.json's SHA-256"):
        list(coll.rows(2))
    shard.unlink()  # as the message says: delete it and collect again; only that shard is redone
    counting = Counting(tiny_subject())
    collect(counting, ctx, tmp_path, [1, 2], "all", contexts_per_shard=20, batch_size=20, progress=False)
    assert counting.calls == 1 and shard.read_bytes() == good
    # A shard that passed is not hashed again on the next sweep, unless it changed on disk since.
    import fastattn.analyze.collect as C
    hashed = []
    real = C.hashlib.sha256
    monkeypatch.setattr(C.hashlib, "sha256", lambda data=b"": hashed.append(1) or real(data))
    coll = Collection(tmp_path)
    list(coll.rows(2))
    list(coll.rows(2))
    assert len(hashed) == 3
    time.sleep(0.05)  # the file system's timestamps are coarse
    shard.write_bytes(bytes(flipped))
    with pytest.raises(CorruptFile, match="contents differ"):
        list(coll.rows(2))
    shard.write_bytes(good)
    monkeypatch.undo()
    # meta.json cut short (older versions wrote it in place): resuming rewrites the collection.
    (tmp_path / "meta.json").write_text('{"format": 1, "model"')
    with pytest.raises(CorruptFile, match="meta.json"):
        Collection(tmp_path)
    collect(tiny_subject(), ctx, tmp_path, [1, 2], "all", contexts_per_shard=20, progress=False)
    assert "unreadable" in capsys.readouterr().err and Collection(tmp_path).meta["complete"]
    with DirLock(tmp_path, command="another collect"), pytest.raises(DirLocked, match="another collect"):
        collect(tiny_subject(), ctx, tmp_path, [1, 2], "all", contexts_per_shard=20, progress=False)


def test_resume_after_a_kill_uses_the_manifest(tmp_path):
    ctx = tiny_contexts(420, 8)  # 60 contexts: 3 shards of 20
    collect(tiny_subject(), ctx, tmp_path, [1], "all", contexts_per_shard=20, progress=False)
    # A run killed after two of three shards: meta incomplete, a manifest with a cut last line,
    # a temp file of the third shard.
    meta = json.loads((tmp_path / "meta.json").read_text())
    files = meta.pop("files")
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    (layer_dir(tmp_path, 1) / "shard_00002.safetensors").unlink()
    lines = [json.dumps({"file": f, **files[f]}) for f in ("layer_01/shard_00000.safetensors",
                                                          "layer_01/shard_00001.safetensors")]
    (tmp_path / "manifest.jsonl").write_text(lines[0] + "\n" + lines[1] + "\n" + '{"file": "lay')
    (layer_dir(tmp_path, 1) / ".shard_00002.safetensors.x1.tmp").write_bytes(b"partial")
    counting = Counting(tiny_subject())
    collect(counting, ctx, tmp_path, [1], "all", contexts_per_shard=20, batch_size=20, progress=False)
    assert counting.calls == 1
    assert sorted(p.name for p in layer_dir(tmp_path, 1).iterdir()) == [f"shard_0000{i}.safetensors" for i in range(3)]
    assert json.loads((tmp_path / "meta.json").read_text())["files"] == files
