"""SAE modules, activation stores and the training loop: losses, constraints, resume, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastattn.ops import sae as ops
from fastattn.sae import BinaryAutoencoder, TopKSAE, fvu, random_direction_data
from fastattn.sae.entropy import binary_entropy_bits, entropy_from_counts, estimate_entropy_bits
from fastattn.sae.stores import NpyStore, SafetensorsStore, TensorStore, open_store, write_shards
from fastattn.sae.train import TrainConfig, load_checkpoint, train
from helpers import default_sigint, load_bench  # noqa: F401  (default_sigint: fixture)

from fastattn._io import CorruptFile, DirLock, DirLocked, read_jsonl
from fastattn._training import ResumeMismatch, TrainingInterrupted

BACKENDS = ["reference"] + (["cpp"] if ops.HAVE_COMPILED else [])


def low_rank_data(N=1024, d=16, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, r, generator=g) @ torch.randn(r, d, generator=g)) + 0.05 * torch.randn(N, d, generator=g)


# ----------------------------------------------------------------------------- modules

@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_sae_forward(backend):
    torch.manual_seed(0)
    sae = TopKSAE(16, 64, 4, backend=backend)
    x = low_rank_data(N=50)
    out = sae(x)
    assert out.x_hat.shape == (50, 16) and out.values.shape == (50, 4) and out.indices.shape == (50, 4)
    assert (out.values >= 0).all()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64))
    assert torch.allclose(out.fvu, fvu(x, out.x_hat)) and torch.allclose(out.loss, out.fvu)  # no dead latents yet
    # the fused path equals dense linear + topk + relu + matmul
    z = (x - sae.b_pre) @ sae.W_enc.t() + sae.b_enc
    dense = torch.zeros_like(z).scatter(1, z.topk(4).indices, z.topk(4).values.relu())
    assert torch.allclose(out.x_hat, dense @ sae.W_dec + sae.b_pre, atol=1e-5)


def test_topk_sae_dead_latents_and_auxk():
    torch.manual_seed(0)
    sae = TopKSAE(16, 64, 4, dead_tokens=100, aux_k=8)
    x = low_rank_data(N=64)
    out = sae(x)
    sae.record_firing(sae.fired_mask(out), 64)
    assert not sae.dead_mask().any()
    sae.record_firing(sae.fired_mask(out), 64)  # 128 tokens: latents that never fired are dead
    dead = sae.dead_mask()
    assert dead.any() and not dead[out.indices[out.values > 0]].any()
    out2 = sae(x)
    assert out2.auxk_loss > 0 and torch.allclose(out2.loss, out2.fvu + out2.auxk_loss / 32)
    out2.auxk_loss.backward()
    # AuxK trains only dead latents' encoder rows
    assert sae.W_enc.grad[~dead].abs().sum() == 0 and sae.W_enc.grad[dead].abs().sum() > 0


def test_topk_sae_normalize_input_and_decoder_projection():
    torch.manual_seed(0)
    sae = TopKSAE(8, 32, 3, normalize_input=True)
    x = low_rank_data(N=20, d=8) * 100
    out = sae(x)
    xs, norm = sae.preprocess(x)
    assert torch.allclose(xs.norm(dim=1), torch.full((20,), 8 ** 0.5))
    assert torch.allclose(out.x_hat, sae.decode(out.values, out.indices) * norm)
    out.loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recon", ["mse", "l2"])
def test_bae_loss_terms(backend, recon):
    torch.manual_seed(0)
    bae = BinaryAutoencoder(8, recon=recon, alpha_entropy=0.01, alpha_cov=0.001, backend=backend)
    x = low_rank_data(N=64, d=8)
    out = bae(x)
    h = (x @ bae.encoder.weight.t() + bae.encoder.bias > 0).float()
    assert torch.equal(out.code.detach(), h) and bae.d_hidden == 32
    err = bae.decoder(h) - x
    want_recon = err.pow(2).mean() if recon == "mse" else err.norm(dim=1).mean()
    p = h.mean(0)
    C = torch.cov(h.t())
    assert torch.allclose(out.recon_loss, want_recon, atol=1e-6)
    assert torch.allclose(out.cov_loss, C.abs().sum() - C.diagonal().abs().sum(), rtol=1e-5)
    assert abs(out.entropy_bits - binary_entropy_bits(p.double()).sum().item()) < 1e-9
    assert torch.allclose(out.entropy_loss, binary_entropy_bits(p).sum(), atol=1e-4)
    assert torch.allclose(out.loss, out.recon_loss + 0.01 * out.entropy_loss + 0.001 * out.cov_loss)
    out.loss.backward()
    assert bae.encoder.weight.grad.abs().sum() > 0


def test_entropy_helpers():
    assert binary_entropy_bits(torch.tensor([0.0, 0.5, 1.0])).tolist() == [0.0, 1.0, 0.0]
    assert entropy_from_counts(torch.tensor([0, 2, 4, 1]), 4) == pytest.approx(1.0 + 0.8112781244591328)
    data = random_direction_data(5, 12, samples=1000, seed=1)
    assert torch.allclose(data.basis @ data.basis.t(), torch.eye(5), atol=1e-6)
    assert data.n_train == 800 and torch.allclose(data.x, data.coins.float() @ data.basis, atol=1e-5)

    class Oracle:  # a perfect binary code of the coins: exactly the empirical entropy of each coin
        def encode_counts(self, x):
            return (x @ data.basis.t() > 0.5).sum(0)

    est = estimate_entropy_bits(Oracle(), data.x.split(300))
    want = binary_entropy_bits(data.coins.double().mean(0)).sum().item()
    assert est == pytest.approx(want, abs=1e-9) and abs(est - 5) < 0.01


# ----------------------------------------------------------------------------- stores

def test_stores_agree_and_cover_every_row(tmp_path):
    x = torch.arange(530 * 3, dtype=torch.float32).reshape(530, 3)
    paths = write_shards(x, tmp_path / "st", shard_rows=200)
    assert len(paths) == 3
    np_dir = tmp_path / "np"
    np_dir.mkdir()
    for i, chunk in enumerate(x.split(150)):
        np.save(np_dir / f"part{i}.npy", chunk.numpy())
    stores = {"tensor": TensorStore(x, shard_rows=128), "safetensors": open_store(tmp_path / "st"),
              "npy": open_store(np_dir)}
    assert isinstance(stores["safetensors"], SafetensorsStore) and isinstance(stores["npy"], NpyStore)
    for name, store in stores.items():
        assert len(store) == 530 and store.d == 3
        rows = torch.cat(list(store.batches(64, epoch=2, seed=7)))
        assert torch.equal(rows[:, 0].sort().values, x[:, 0]), name  # a permutation of all rows
        again = torch.cat(list(store.batches(64, epoch=2, seed=7)))
        assert torch.equal(rows, again)  # deterministic per (seed, epoch)
        skipped = torch.cat(list(store.batches(64, epoch=2, seed=7, skip=3)))
        assert torch.equal(skipped, rows[3 * 64:])
        assert not torch.equal(rows, torch.cat(list(store.batches(64, epoch=3, seed=7))))
        ranks = [torch.cat(list(store.batches(64, 0, 7, rank=r, world=2, drop_last=True))) for r in range(2)]
        assert ranks[0].shape == ranks[1].shape == (4 * 64, 3)
        assert not set(ranks[0][:, 0].tolist()) & set(ranks[1][:, 0].tolist())
        assert torch.equal(torch.cat(list(store.iter_rows(100))), x)


def test_store_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        open_store(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .safetensors or .npy"):
        open_store(tmp_path / "empty")
    with pytest.raises(ValueError, match="2-D"):
        TensorStore(torch.zeros(3))
    paths = write_shards(low_rank_data(N=300), tmp_path / "st", shard_rows=100)
    data = open(paths[1], "rb").read()
    open(paths[1], "wb").write(data[: len(data) // 2])  # a truncated shard is named
    with pytest.raises(CorruptFile, match="shard_00001.safetensors"):
        open_store(tmp_path / "st")
    np.save(tmp_path / "a.npy", np.zeros((10, 4), np.float32))
    (tmp_path / "a.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:100])
    with pytest.raises(CorruptFile, match="a.npy"):
        open_store(tmp_path / "a.npy")


# ----------------------------------------------------------------------------- training

def _cfg(tmp_path, **kw):
    base = dict(model="topk", n_latents=64, k=4, batch_size=128, epochs=3, log_every=4, checkpoint_every=5,
                out_dir=str(tmp_path), progress=False, lr=3e-3, dead_tokens=600)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("model", ["topk", "bae"])
def test_training_loss_decreases(tmp_path, model):
    x = low_rank_data(N=1024)
    kw = dict(model=model, epochs=4) if model == "topk" else dict(model=model, epochs=4, alpha_entropy=1e-3,
                                                                  alpha_cov=1e-4, entropy_off_epochs=1)
    train(_cfg(tmp_path, **kw), TensorStore(x))
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["step"] == 32 and len(recs) == 8
    assert recs[-1]["loss"] < 0.6 * recs[0]["loss"], [r["loss"] for r in recs]
    for key in ("fvu", "explained_variance", "l0", "dead_frac", "dense_frac"):
        assert key in recs[-1]
    if model == "bae":
        assert "entropy_bits" in recs[-1] and recs[-1]["entropy_bits"] > 0
    else:
        assert recs[-1]["l0"] <= 4


def test_bae_cov_off_too_switches_the_covariance_term_with_the_entropy_term(tmp_path):
    """cov_off_too: α_c = 0 during the entropy-off epochs (bit-identical to α_c = 0 there), on after."""
    x = low_rank_data(N=512)
    kw = dict(model="bae", epochs=2, alpha_entropy=1e-2, alpha_cov=1e-2, entropy_off_epochs=1)

    def run(name, **over):
        return train(_cfg(tmp_path / name, **{**kw, **over}), TensorStore(x)).state_dict()

    off_phase = run("a", cov_off_too=True, epochs=1)
    no_cov = run("b", alpha_cov=0.0, epochs=1)
    kept_on = run("c", epochs=1)
    assert all(torch.equal(off_phase[k], no_cov[k]) for k in off_phase)
    assert not all(torch.equal(off_phase[k], kept_on[k]) for k in off_phase)
    # after the off epochs α_c is back: epoch 2 differs from a run with α_c = 0 throughout
    full = run("d", cov_off_too=True)
    full_no_cov = run("e", alpha_cov=0.0)
    assert not all(torch.equal(full[k], full_no_cov[k]) for k in full)


def test_lr_decay_schedule_and_resume(tmp_path, monkeypatch):
    """lr_decay = f: lr constant for the first (1 − f) of the planned steps, then linear to 0 (the
    last step's lr is base/decay_steps); a run cut by max_steps follows the same schedule (prefix),
    and resuming it reproduces the uninterrupted run bit for bit."""
    x = low_rank_data(N=512)  # 4 batches of 128 per epoch, 3 epochs: 12 steps, decay over the last 6
    seen = []
    real_step = torch.optim.Adam.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    full = train(_cfg(tmp_path / "full", lr_decay=0.5), TensorStore(x))
    assert seen == pytest.approx([3e-3] * 7 + [3e-3 * (6 - i) / 6 for i in range(1, 6)])
    seen.clear()
    train(_cfg(tmp_path / "part", lr_decay=0.5, max_steps=8), TensorStore(x))
    assert seen == pytest.approx([3e-3] * 7 + [2.5e-3])
    resumed = train(_cfg(tmp_path / "part", lr_decay=0.5), TensorStore(x))
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_weight_decay_reaches_adam(tmp_path):
    """weight_decay is Adam's coupled decay (the authors' --weight_decay): with a decay that swamps
    the loss gradient, Adam's first step moves every weight by lr towards 0; 0 leaves that to the loss."""
    x = low_rank_data(N=128)
    cfg = dict(model="bae", n_latents=16, epochs=1, lr=1e-3, seed=3, bae_center="none")
    torch.manual_seed(3)
    start = BinaryAutoencoder(x.shape[1], 16).encoder.weight.detach().clone()  # train() seeds the same way
    big = train(_cfg(tmp_path / "wd", weight_decay=1e6, **cfg), TensorStore(x)).encoder.weight.detach()
    torch.testing.assert_close(big, start - 1e-3 * start.sign(), atol=1e-6, rtol=0)
    plain = train(_cfg(tmp_path / "nowd", **cfg), TensorStore(x)).encoder.weight.detach()
    assert (plain.abs() < start.abs()).float().mean() < 0.9
    with pytest.raises(ValueError, match="weight_decay"):
        train(_cfg(tmp_path / "bad", weight_decay=-1.0, **cfg), TensorStore(x))


@pytest.mark.parametrize("model", ["topk", "bae"])
def test_resume_bit_for_bit(tmp_path, model):
    x = low_rank_data(N=700)
    extra = {"alpha_entropy": 1e-3, "entropy_off_epochs": 1} if model == "bae" else {}
    full = train(_cfg(tmp_path / "full", model=model, **extra), TensorStore(x))
    # interrupted after 7 steps (mid-epoch: 6 batches per epoch), then resumed from step 5's checkpoint
    train(_cfg(tmp_path / "part", model=model, max_steps=7, **extra), TensorStore(x))
    state = load_checkpoint(tmp_path / "part" / "checkpoint.pt")
    assert state["step"] == 7 and state["epoch"] == 1 and state["step_in_epoch"] == 1
    resumed = train(_cfg(tmp_path / "part", model=model, **extra), TensorStore(x))
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [4, 7, 8, 12, 16, 18]  # 7: the interrupted run's last step


def test_checkpoint_is_atomic_and_weights_only(tmp_path):
    train(_cfg(tmp_path, epochs=1), TensorStore(low_rank_data(N=256)))
    assert not list(tmp_path.glob("*.tmp"))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["config"]["model"] == "topk" and state["d_in"] == 16


def test_cli_train_and_stats(tmp_path, capsys):
    from fastattn.sae.cli import main

    write_shards(low_rank_data(N=600), tmp_path / "acts", shard_rows=256)
    assert main(["train", "--data", str(tmp_path / "acts"), "--model", "bae", "--epochs", "1",
                 "--batch-size", "100", "--out-dir", str(tmp_path / "run"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["stats", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--data",
                 str(tmp_path / "acts")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["model"] == "bae" and res["latents"] == 64 and res["tokens"] == 600 and res["entropy_bits"] > 0


def test_cli_entropy_bench_prints_json(tmp_path, capsys):
    from fastattn.sae.cli import main

    assert main(["entropy-bench", "--rank", "2", "--dim", "8", "--samples", "1024", "--epochs", "2",
                 "--out-dir", str(tmp_path), "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["rank"] == 2 and res["losses"] is True and res["estimated_bits"] > 0
    assert res["d_hidden"] == 32


# ----------------------------------------------------------------------------- interrupts

def _sigint_at_step(monkeypatch, n):
    """A real SIGINT to this process during the n-th optimizer step (between its parameter
    updates and the step counter)."""
    import os
    import signal

    from torch.optim.optimizer import register_optimizer_step_post_hook

    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGINT)

    h = register_optimizer_step_post_hook(hook)
    monkeypatch.undo = lambda u=monkeypatch.undo: (h.remove(), u())


@pytest.mark.usefixtures("default_sigint")
@pytest.mark.parametrize("model,at", [("topk", 8), ("bae", 7)])  # mid-window, mid-epoch
def test_sigint_saves_at_the_step_boundary_and_resumes_bit_for_bit(tmp_path, monkeypatch, model, at):
    bench = load_bench("sigint_resume")
    x = low_rank_data(N=700)
    extra = {"alpha_entropy": 1e-3, "entropy_off_epochs": 1} if model == "bae" else {}
    train(_cfg(tmp_path / "full", model=model, log_every=3, **extra), TensorStore(x))
    _sigint_at_step(monkeypatch, at)
    with pytest.raises(TrainingInterrupted, match=f"interrupted at step {at};") as e:
        train(_cfg(tmp_path / "part", model=model, log_every=3, **extra), TensorStore(x))
    monkeypatch.undo()
    assert isinstance(e.value, KeyboardInterrupt) and e.value.step == at
    assert load_checkpoint(tmp_path / "part" / "checkpoint.pt")["step"] == at
    with open(tmp_path / "part" / "metrics.jsonl", "ab") as f:  # plus a record cut short by a kill
        f.write(b'{"step": 12, "loss": 0.')
    train(_cfg(tmp_path / "part", model=model, log_every=3, **extra), TensorStore(x))
    full, part = bench.load_result("sae", tmp_path / "full"), bench.load_result("sae", tmp_path / "part")
    assert bench.differences(full, part) == []
    assert not (tmp_path / "part" / "fastattn.lock").exists()


@pytest.mark.usefixtures("default_sigint")
def test_cli_ctrl_c_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    from fastattn.sae.cli import main

    write_shards(low_rank_data(N=600), tmp_path / "acts", shard_rows=256)
    args = ["train", "--data", str(tmp_path / "acts"), "--model", "topk", "--latents", "32", "--k", "4",
            "--batch-size", "50", "--out-dir", str(tmp_path / "run"), "--no-progress"]
    _sigint_at_step(monkeypatch, 3)
    assert main(args) == 130
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "fastattn: interrupted at step 3; checkpoint saved to" in err
    assert main(args) == 0
    # A changed k: refused with exit code 1 and the difference; k > latents: a usage error (2).
    assert main(args[:-1] + ["--k", "8", "--no-progress"]) == 1
    assert "k: 4 in the checkpoint, 8 now" in capsys.readouterr().err
    assert main(args[:-1] + ["--k", "64", "--no-progress"]) == 2
    assert "--k 64 exceeds --latents 32" in capsys.readouterr().err


def test_resume_refuses_changed_settings_and_names_corrupt_files(tmp_path, capsys):
    x = low_rank_data(N=300)
    train(_cfg(tmp_path, epochs=1), TensorStore(x))
    for change in ({"seed": 1}, {"lr": 1e-3}, {"batch_size": 64}, {"k": 8}, {"model": "bae"}):
        with pytest.raises(ResumeMismatch, match=f"{next(iter(change))}: .* in the checkpoint"):
            train(_cfg(tmp_path, epochs=2, **change), TensorStore(x))
    with pytest.raises(ResumeMismatch, match="shard_sizes"):  # other data of the same width
        train(_cfg(tmp_path, epochs=2), TensorStore(low_rank_data(N=400)))
    capsys.readouterr()
    train(_cfg(tmp_path, epochs=2), TensorStore(x))
    assert "epochs changed from 1 to 2" in capsys.readouterr().err
    ck = tmp_path / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:500])
    with pytest.raises(CorruptFile, match=rf"{ck}: unreadable checkpoint.*--fresh"):
        train(_cfg(tmp_path, epochs=2), TensorStore(x))
    train(_cfg(tmp_path, epochs=1), TensorStore(x), resume=False)
    assert load_checkpoint(ck)["step"] == 3 and [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [3]
    with DirLock(tmp_path, command="the other trainer"):
        with pytest.raises(DirLocked, match="the other trainer"):
            train(_cfg(tmp_path, epochs=2), TensorStore(x))
