"""Burstiness, top-10 active features, the 1-bit flip codec, frequency statistics (SAELens I/O: test_saelens.py)."""
from __future__ import annotations

import json
import math

import torch

from fastattn.sae import BinaryAutoencoder, TopKSAE
from fastattn.sae.stores import TensorStore
from fastattn.sae.stats import (burstiness, decode_flips, encode_flips, feature_activity, feature_frequencies,
                                frequency_histogram, top_active_features)


def test_burstiness_hand_made():
    h = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1]])
    p = torch.tensor([0.5, 0.0, 0.75, 0.125])
    beta = burstiness(h, p)
    want = [[math.log2(0.5 + 1e-6), math.log2(1e-6), math.log2(0.25 + 1e-6), math.log2(0.125 + 1e-6)],
            [math.log2(0.5 + 1e-6), math.log2(1e-6), math.log2(0.25 + 1e-6), math.log2(0.875 + 1e-6)]]
    assert torch.allclose(beta, torch.tensor(want, dtype=torch.float64))


def test_top_active_features_hand_made():
    # 12 latents; token 0 carries the rare latents 3 and 7 and misses the common latent 0.
    p = torch.full((12,), 0.5)
    p[3], p[7], p[0] = 0.01, 0.05, 0.9
    h = torch.zeros(2, 12)
    h[0, 3] = h[0, 7] = 1
    h[1, 0] = 1
    beta, idx = top_active_features(h, p, k=10)
    assert idx.shape == (2, 10)
    # |1 - 0.01| > |1 - 0.05| > |0 - 0.9| > the 0.5s (ties: lower index first)
    assert idx[0].tolist() == [3, 7, 0, 1, 2, 4, 5, 6, 8, 9]
    # token 1 is typical: the 0.5s first, then latent 0 (|1 - 0.9|); 7 and 3 are least active
    assert idx[1].tolist() == [1, 2, 4, 5, 6, 8, 9, 10, 11, 0]
    assert (beta[:, :-1] >= beta[:, 1:]).all()


def test_flip_codec_round_trip():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(300, generator=g)
    p[:5] = 0.5  # the tie case: 1s are stored as flips
    h = torch.rand(257, 300, generator=g) < p
    code = encode_flips(h, p)
    assert torch.equal(decode_flips(code), h)
    flips = (h.double() - p.double()).abs() > 0.5
    flips[:, :5] = h[:, :5]
    assert code.bits() == int(flips.sum())  # stores exactly the flips
    # own statistics, an empty matrix, all-zero rows
    assert torch.equal(decode_flips(encode_flips(h)), h)
    z = torch.zeros(3, 9, dtype=torch.bool)
    c = encode_flips(z)
    assert c.bits() == 0 and torch.equal(decode_flips(c), z)
    assert torch.equal(decode_flips(encode_flips(h[:0], p)), h[:0])


def test_flip_codec_is_smaller_than_the_code_for_skewed_latents():
    g = torch.Generator().manual_seed(1)
    p = torch.rand(512, generator=g) ** 4  # mostly rare latents
    h = torch.rand(1000, 512, generator=g) < p
    assert encode_flips(h, p).bits() < 0.2 * h.numel()


def test_feature_frequencies_and_histogram(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(300, 8)
    sae = TopKSAE(8, 40, 3)
    s = feature_frequencies(sae, x.split(100), dense_frequency=0.2)
    assert s.tokens == 300 and s.frequency.shape == (40,)
    assert abs(float(s.frequency.sum()) - 3.0) < 1e-9  # k latents per token (ReLU keeps positives here)
    q = torch.minimum(s.frequency, 1 - s.frequency)  # the minority-state rule (feature_activity)
    assert s.dead == int((q == 0).sum()) and s.dense == int((q > 0.2).sum())
    bae = BinaryAutoencoder(8)
    b = feature_frequencies(bae, x.split(64))
    want = ((x @ bae.encoder.weight.t() + bae.encoder.bias) > 0).double().mean(0)
    assert torch.allclose(b.frequency, want)
    frequency_histogram({"topk": s, "bae": b}, str(tmp_path / "h.png"))
    assert (tmp_path / "h.png").stat().st_size > 1000
    assert json.loads(json.dumps(s.as_dict()))["latents"] == 40


def _bae_emitting(codes: torch.Tensor) -> tuple:
    """A BAE whose code of input row i is codes[i] (encoder = identity, bias −0.5)."""
    n = codes.shape[1]
    bae = BinaryAutoencoder(n, n)
    with torch.no_grad():
        bae.encoder.weight.copy_(torch.eye(n))
        bae.encoder.bias.fill_(-0.5)
    return bae, codes.float()


def test_feature_activity_minority_state_hand_made():
    # 20 tokens, 6 latents: always 1, never 1, 1 on 19 tokens, 1 on 10, 1 on 1, 1 on 3.
    codes = torch.zeros(20, 6)
    codes[:, 0] = 1
    codes[:19, 2] = 1
    codes[:10, 3] = 1
    codes[5, 4] = 1
    codes[[2, 7, 11], 5] = 1
    bae, x = _bae_emitting(codes)
    a = feature_activity(bae, list(x.split(7)), top=2)
    assert torch.allclose(a.state_rate, torch.tensor([1, 0, 0.95, 0.5, 0.05, 0.15], dtype=torch.float64))
    assert torch.allclose(a.minority_rate, torch.tensor([0, 0, 0.05, 0.5, 0.05, 0.15], dtype=torch.float64))
    d = a.as_dict(dense=0.1, min_tokens=3)
    # dead: latents 0 and 1 never leave their state (latent 0 is 1 everywhere: as dead as latent 1)
    assert (d["dead"], d["ever_active"], d["dense"], d["dense_state_1"]) == (2, 4, 2, 4)
    assert a.state_on_per_token == float(codes.sum()) / 20
    assert a.minority_per_token == (1 + 10 + 1 + 3) / 20  # token 19's 0 on latent 2, then the rare 1s
    # top-2 by β = log2(|h − p| + 1e-6), ties to the lower index: token 5 has latent 4's rare 1
    # (|1 − 0.05|) then latent 5's 0 (|0 − 0.15|)... recomputed here from the definition
    beta = torch.log2((codes.double() - a.state_rate).abs() + 1e-6)
    want = torch.zeros(6, dtype=torch.long)
    for row in beta:
        want[torch.sort(row, descending=True, stable=True).indices[:2]] += 1
    assert torch.equal(a.top_beta, want)
    assert a.top_beta[4] == 1 and a.top_beta[2] >= 1  # latent 2's rare 0 (token 19) is a top activation
    assert d["features_activated_top10_beta"] == int((want >= 3).sum())
    assert a.top_value is None and "features_activated_top10_value" not in d


def test_feature_activity_topk_same_rules():
    torch.manual_seed(0)
    sae = TopKSAE(8, 24, 3)
    x = torch.randn(200, 8)
    a = feature_activity(sae, lambda: x.split(64), top=2)
    xs, _ = sae.preprocess(x)
    v, i = sae.encode(xs)
    fired = torch.zeros(200, 24, dtype=torch.bool).scatter_(1, i, v > 0)
    assert torch.allclose(a.state_rate, fired.double().mean(0))
    assert a.state_on_per_token == float(fired.sum()) / 200
    want = torch.zeros(24, dtype=torch.long)  # top-2 by activation value (positive ones)
    want += torch.bincount(i[:, :2][v[:, :2] > 0], minlength=24)
    assert torch.equal(a.top_value, want)
    d = a.as_dict()
    assert d["dead"] == int((fired.sum(0) == 0).sum()) + int((fired.sum(0) == 200).sum())
    assert d["dense"] == int((torch.minimum(a.state_rate, 1 - a.state_rate) > 0.1).sum())


def test_compare_on_checkpoints(tmp_path, capsys):
    from fastattn.sae.compare import main as compare_main
    from fastattn.sae.stores import write_shards
    from fastattn.sae.train import TrainConfig, train

    torch.manual_seed(0)
    x = torch.randn(600, 8) @ torch.randn(8, 8) + 2
    write_shards(x, tmp_path / "acts", shard_rows=256)
    store = TensorStore(x)
    for model in ("topk", "bae"):
        train(TrainConfig(model=model, n_latents=32, k=3, max_steps=3, batch_size=128, progress=False,
                          out_dir=str(tmp_path / model)), store, resume=False)
    assert compare_main(["--data", str(tmp_path / "acts"), "--checkpoint", f"topk k=3={tmp_path}/topk/checkpoint.pt",
                         "--checkpoint", f"bae={tmp_path}/bae/checkpoint.pt", "--out-dir", str(tmp_path / "cmp")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(res["models"]) == {"topk k=3", "bae"} and res["meta"]["rows"] == 600
    for r in res["models"].values():
        assert r["tokens"] == 600 and r["dead"] + r["ever_active"] == 32 and 0 <= r["fvu"]
    assert res["models"]["topk k=3"]["state_on_per_token"] <= 3
    assert (tmp_path / "cmp" / "summary.md").read_text().count("\n|") == 4  # header, rule, 2 models
    assert (tmp_path / "cmp" / "minority_rate.png").stat().st_size > 1000
