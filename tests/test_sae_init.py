"""TopK SAE initialisation from data (Gao et al.: b_pre at the geometric median, encoder = decoderᵀ
scaled; sparsify: b_dec at the mean), the BAE input centre, and input normalisation modes."""
from __future__ import annotations

import pytest
import torch

from fastattn.sae import BinaryAutoencoder, TopKSAE
from fastattn.sae.modules import geometric_median
from fastattn.sae.stores import TensorStore
from fastattn.sae.train import INIT_SAMPLE_ROWS, TrainConfig, init_sample, train


def test_geometric_median_hand_made():
    # Four corners of a square: the centre. One far outlier added: the median barely moves
    # (the mean moves by 20), and the result is a zero of Σ (m − x_i)/‖m − x_i‖.
    sq = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]], dtype=torch.float64)
    assert torch.allclose(geometric_median(sq), torch.tensor([1.0, 1.0], dtype=torch.float64), atol=1e-9)
    pts = torch.cat([sq, torch.tensor([[100.0, 1.0]], dtype=torch.float64)])
    m = geometric_median(pts)
    assert abs(float(pts.mean(0)[0]) - 20.8) < 1e-9 and float(m[0]) < 2.0
    grad = ((m - pts) / (m - pts).norm(dim=1, keepdim=True)).sum(0)
    assert grad.norm() < 1e-6
    # 1-D: the ordinary median; float32 in, float32 out
    assert abs(float(geometric_median(torch.tensor([[0.0], [1.0], [10.0]]))) - 1.0) < 1e-3
    assert geometric_median(torch.randn(7, 3)).dtype == torch.float32
    with pytest.raises(ValueError, match="geometric_median"):
        geometric_median(torch.zeros(0, 3))


@pytest.mark.parametrize("how", ["geometric_median", "mean", "zeros"])
@pytest.mark.parametrize("norm", ["none", "constant_norm_rescale"])
def test_init_from_data(how, norm):
    torch.manual_seed(0)
    x = torch.randn(300, 8) * 3 + 5
    sae = TopKSAE(8, 32, 4, normalize_input=norm)
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.normal_()
    sae.init_from_data(x, b_pre=how, scale="none")
    xs, _ = sae.preprocess(x)  # statistics in the model's scale
    want = {"geometric_median": geometric_median(xs), "mean": xs.mean(0), "zeros": torch.zeros(8)}[how]
    assert torch.allclose(sae.b_pre, want, atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec) and not sae.b_enc.any()
    with pytest.raises(ValueError, match="b_pre"):
        sae.init_from_data(x, b_pre="median")
    with pytest.raises(ValueError, match="scale"):
        sae.init_from_data(x, scale="norm")


def _sq_err(sae, xs, factor):
    with torch.no_grad():
        saved = sae.W_enc.clone()
        sae.W_enc.mul_(factor)
        err = float((sae.decode(*sae.encode(xs)) - xs).pow(2).sum())
        sae.W_enc.copy_(saved)
    return err


def test_init_encoder_scale_rules():
    torch.manual_seed(3)
    x = torch.randn(400, 16) @ torch.randn(16, 16) + 3  # anisotropic, off-centre
    sae = TopKSAE(16, 64, 6)
    sae.init_from_data(x, scale="data")
    f = float(sae.W_enc.detach().norm() / sae.W_dec.detach().norm())
    assert torch.allclose(sae.W_enc, f * sae.W_dec, atol=1e-6) and 0.05 < f < 5
    # the least-squares factor: the initial reconstruction error is minimal at it
    e1, e0 = _sq_err(sae, x, 1.0), [_sq_err(sae, x, c) for c in (0.9, 1.1)]
    assert e1 <= min(e0)
    # "unit" (Gao et al.'s code): random unit vectors at b_pre come back with mean norm 1
    sae.init_from_data(x, scale="unit")
    g = torch.Generator().manual_seed(0)
    u = torch.randn(256, 16, generator=g, dtype=torch.float64).float()
    u = u / u.norm(dim=1, keepdim=True) + sae.b_pre
    with torch.no_grad():
        norm = (sae.decode(*sae.encode(u)) - sae.b_pre).norm(dim=1).mean()
    assert abs(float(norm) - 1) < 1e-5


def test_training_initialises_b_pre_from_the_first_rows(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(INIT_SAMPLE_ROWS + 1000, 6) * 2 + torch.arange(6.0)
    store = TensorStore(x)
    cfg = TrainConfig(model="topk", n_latents=24, k=3, batch_size=512, init_b_pre="mean", lr=1e-12, max_steps=1,
                      out_dir=str(tmp_path / "run"), progress=False)
    sample = init_sample(store, cfg)
    assert sample.shape == (INIT_SAMPLE_ROWS, 6)
    assert torch.equal(sample[:512], next(store.batches(512, 0, cfg.seed)))  # epoch 0's plan, from its start
    model = train(cfg, store, resume=False)
    assert torch.allclose(model.b_pre, sample.mean(0), atol=1e-5)
    # the default is the geometric median
    cfg = TrainConfig(model="topk", n_latents=24, k=3, batch_size=512, lr=1e-12, max_steps=1,
                      out_dir=str(tmp_path / "run2"), progress=False)
    assert cfg.init_b_pre == "geometric_median"
    model = train(cfg, store, resume=False)
    assert torch.allclose(model.b_pre, geometric_median(sample), atol=1e-5)


def test_layer_norm_input_mode():
    torch.manual_seed(2)
    x = torch.randn(40, 9) * 4 + 2
    sae = TopKSAE(9, 30, 5, normalize_input="layer_norm")
    xs, (mu, std) = sae.preprocess(x)
    assert torch.allclose(mu, x.mean(1, keepdim=True)) and torch.allclose(std, x.std(1, keepdim=True))
    assert torch.allclose(xs, (x - mu) / (std + 1e-5))
    out = sae(x)
    assert torch.allclose(out.x_hat, sae.decode(out.values, out.indices) * std + mu, atol=1e-6)
    assert TopKSAE(9, 30, 5, normalize_input=True).input_norm == "constant_norm_rescale"
    assert TopKSAE(9, 30, 5).input_norm == "none" and not TopKSAE(9, 30, 5).normalize_input
    with pytest.raises(ValueError, match="normalize_input"):
        TopKSAE(9, 30, 5, normalize_input="rms")


def test_bae_input_center(tmp_path):
    torch.manual_seed(4)
    x = torch.randn(300, 6) + 10
    bae = BinaryAutoencoder(6, 24)
    W, b = bae.encoder.weight.detach(), bae.encoder.bias.detach()
    b_out = bae.decoder.bias.detach().clone()
    assert not bae.input_center.any()  # the authors' (uncentred) encoder until initialised
    assert torch.allclose(bae.preactivation(x), x @ W.t() + b)
    bae.init_from_data(x)
    assert torch.allclose(bae.input_center, x.mean(0))
    assert torch.allclose(bae.decoder.bias, b_out + x.mean(0))  # the centre is the output's too
    bae.init_from_data(x + 1)  # a second call moves both by the difference
    assert torch.allclose(bae.decoder.bias, b_out + x.mean(0) + 1, atol=1e-5)
    bae.init_from_data(x, center="none")
    assert not bae.input_center.any() and torch.allclose(bae.decoder.bias, b_out, atol=1e-5)
    bae.init_from_data(x)
    code = bae.encode(x).code
    assert torch.equal(code, ((x - x.mean(0)) @ W.t() + b > 0).to(code.dtype))
    assert torch.equal(code.bool(), bae.preactivation(x) > 0)
    assert torch.equal(bae.encode_counts(x), code.sum(0).long())
    with pytest.raises(ValueError, match="center"):
        bae.init_from_data(x, center="median")
    # checkpoints written before the centre existed load as the uncentred encoder
    sd = bae.state_dict()
    del sd["input_center"]
    old = BinaryAutoencoder(6, 24)
    old.input_center.fill_(5.0)
    old.load_state_dict(sd)
    assert not old.input_center.any()
    # train() centres on the mean of every training row, across shards (or not, with
    # bae_center="none"), not on a sample's: the first rows' mean is off by ~1/sqrt(4096) here
    rows = torch.randn(INIT_SAMPLE_ROWS + 3000, 6) + 4
    store = TensorStore(rows, shard_rows=2500)
    assert torch.allclose(store.mean(), rows.double().mean(0), atol=1e-12, rtol=0)
    for center in ("mean", "none"):
        cfg = TrainConfig(model="bae", n_latents=24, batch_size=512, bae_center=center, lr=1e-12, max_steps=1,
                          out_dir=str(tmp_path / center), progress=False)
        model = train(cfg, store, resume=False)
        want = rows.mean(0) if center == "mean" else torch.zeros(6)
        assert torch.allclose(model.input_center, want, atol=1e-6, rtol=0)
        if center == "mean":
            assert (init_sample(store, cfg).mean(0) - want).abs().max() > 1e-3


class _SignS(torch.autograd.Function):
    """The authors' default binarisation ("sign_s"), written from its definition: forward 1[z > 0],
    backward g·(1 − g) of the incoming gradient g."""
    @staticmethod
    def forward(ctx, z):
        return (z > 0).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        return g * (1 - g)


def test_centred_bae_is_the_authors_step_on_centred_data():
    # The authors' model (nn.Linear encoder and decoder, "sign_s", loss = mean squared error +
    # α_e·Σ h2(p) with 1e-10 inside the logs + α_c·Σ_{i≠j} |cov|, torch.cov) trained on x − m must
    # be ours with input_center = m, step for step, with our decoder bias = theirs + m. (SGD: Adam
    # would turn float noise in gradients that are ~0 into steps of size lr.) Without the decoder's
    # share of the centre the first steps differ by the mean error (the reason for the rule).
    torch.manual_seed(0)
    x = (torch.randint(0, 2, (256, 3)).float() @ torch.linalg.qr(torch.randn(8, 3))[0].t()) + 3.0
    m = x.mean(0)
    ours = BinaryAutoencoder(8, 32, alpha_entropy=1e-2, alpha_cov=1e-2)
    enc, dec = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)
    enc.load_state_dict(ours.encoder.state_dict())
    dec.load_state_dict(ours.decoder.state_dict())
    ours.init_from_data(x)
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.2)
    opt_b = torch.optim.SGD([*enc.parameters(), *dec.parameters()], lr=0.2)
    for step in range(6):
        # batches of a prime size: no covariance is exactly 0 by coincidence (ours is exact there,
        # with gradient 0; torch.cov's rounding gives it a random sign) except constant columns
        xb = x[step * 41:(step + 1) * 41]
        opt_a.zero_grad()
        ours(xb).loss.backward()
        opt_a.step()
        xc = xb - m
        h = _SignS.apply(enc(xc))
        p = h.mean(0)
        ent = -(p * torch.log2(p + 1e-10) + (1 - p) * torch.log2(1 - p + 1e-10)).sum()
        cov = torch.cov(h.t())
        loss = (dec(h) - xc).pow(2).mean() + 1e-2 * ent + 1e-2 * (cov.abs().sum() - cov.diagonal().abs().sum())
        opt_b.zero_grad()
        loss.backward()
        opt_b.step()
    torch.testing.assert_close(ours.encoder.weight, enc.weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.encoder.bias, enc.bias, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.decoder.weight, dec.weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.decoder.bias, dec.bias + m, atol=1e-5, rtol=0)
