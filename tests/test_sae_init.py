"""TopK SAE initialisation from data (Gao et al.: b_pre at the geometric median, encoder = decoderᵀ;
sparsify: b_dec at the mean) and input normalisation modes."""
from __future__ import annotations

import pytest
import torch

from fastattn.sae import TopKSAE
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
    sae.init_from_data(x, b_pre=how)
    xs, _ = sae.preprocess(x)  # statistics in the model's scale
    want = {"geometric_median": geometric_median(xs), "mean": xs.mean(0), "zeros": torch.zeros(8)}[how]
    assert torch.allclose(sae.b_pre, want, atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec) and not sae.b_enc.any()
    with pytest.raises(ValueError, match="b_pre"):
        sae.init_from_data(x, b_pre="median")


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
