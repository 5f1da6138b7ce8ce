"""SAELens interop: load_saelens / save_saelens against SAELens' rules written out by hand (always)
and against the real sae-lens package both ways (skipped with a reason when it is not installed)."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from fastattn.sae import TopKSAE
from fastattn.sae.saelens import SAELENS_FORMAT, load_saelens, save_saelens, saelens_config

# CI installs sae-lens; a bare checkout may not have it (found without importing: its import is slow).
SAELENS = None if importlib.util.find_spec("sae_lens") else "sae-lens is not installed (pip install sae-lens)"

needs_saelens = pytest.mark.skipif(SAELENS is not None, reason=str(SAELENS))


# ----------------------------------------------------------------------------- SAELens' rules by hand

def saelens_forward(cfg: dict, t: dict, x: torch.Tensor, threshold=None):
    """SAELens 6.54's forward as its source writes it (SAE.process_sae_in, TopKSAE/StandardSAE/
    JumpReLUSAE.encode/decode, _setup_activation_normalization), from the raw file contents.
    Returns (x̂ [N, d], activations [N, d_sae])."""
    norm = cfg.get("normalize_activations", "none")
    state = None
    if norm == "constant_norm_rescale":
        state = cfg["d_in"] ** 0.5 / x.norm(dim=-1, keepdim=True)
        x = x * state
    elif norm == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        x = x - mu
        std = x.std(-1, keepdim=True)
        x = x / (std + 1e-5)
        state = (mu, std)
    sae_in = x - t["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    rescale = cfg.get("architecture") == "topk" and cfg.get("rescale_acts_by_decoder_norm", False)
    if rescale:
        pre = pre * t["W_dec"].norm(dim=-1)
    if cfg["architecture"] == "topk":
        v, i = pre.topk(cfg.get("k", 100), dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, i, v.relu())
    else:
        acts = pre.relu() if threshold is None else pre.relu() * (pre > threshold)
    out = (acts * (1 / t["W_dec"].norm(dim=-1)) if rescale else acts) @ t["W_dec"] + t["b_dec"]
    if norm == "constant_norm_rescale":
        out = out / state
    elif norm == "layer_norm":
        out = out * state[1] + state[0]
    return out, acts


def _write(tmp_path, cfg: dict, seed=0, d_in=10, d_sae=40, unit_dec=False, extra=None):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    t = {"W_enc": torch.randn(d_in, d_sae, generator=g), "b_enc": 0.5 * torch.randn(d_sae, generator=g),
         "W_dec": torch.randn(d_sae, d_in, generator=g), "b_dec": 0.5 * torch.randn(d_in, generator=g)}
    if unit_dec:
        t["W_dec"] /= t["W_dec"].norm(dim=1, keepdim=True)
    t.update(extra or {})
    save_file(t, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": d_in, "d_sae": d_sae, **cfg}))
    return t


def _active(sae: TopKSAE, x):
    xs, _ = sae.preprocess(x)
    v, i = sae.encode(xs)
    return torch.zeros(x.shape[0], sae.n_latents, dtype=torch.bool).scatter_(1, i, v > 0)


V6 = {"metadata": {"sae_lens_version": "6.54.12"}}
HAND_CASES = {
    "topk": {"architecture": "topk", "k": 5},
    "apply_b_dec_to_input=False": {"architecture": "topk", "k": 5, "apply_b_dec_to_input": False},
    "rescale_acts_by_decoder_norm": {"architecture": "topk", "k": 5, "rescale_acts_by_decoder_norm": True},
    "rescale, no b_dec on input": {"architecture": "topk", "k": 5, "rescale_acts_by_decoder_norm": True,
                                   "apply_b_dec_to_input": False},
    "constant_norm_rescale": {"architecture": "topk", "k": 5, "normalize_activations": "constant_norm_rescale"},
    "layer_norm": {"architecture": "topk", "k": 5, "normalize_activations": "layer_norm",
                   "apply_b_dec_to_input": False},
    "standard": {"architecture": "standard"},
    "standard, no b_dec on input": {"architecture": "standard", "apply_b_dec_to_input": False},
    "k defaults to 100": {"architecture": "topk"},
}


@pytest.mark.parametrize("case", list(HAND_CASES))
def test_load_matches_saelens_rules_by_hand(tmp_path, case):
    cfg = {**HAND_CASES[case], **V6}
    d_sae = 120 if case == "k defaults to 100" else 40
    t = _write(tmp_path, cfg, d_sae=d_sae)
    x = 1.0 + 7.0 * torch.randn(257, 10, generator=torch.Generator().manual_seed(1))
    want, acts = saelens_forward(saelens_config(cfg) | {"d_in": 10}, t, x)
    sae = load_saelens(tmp_path).eval()
    assert sae.k == (d_sae if cfg["architecture"] == "standard" else cfg.get("k", 100))
    with torch.no_grad():
        got = sae(x).x_hat
        same = (_active(sae, x) == (acts > 0)).all(1).double().mean().item()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), case
    assert same == 1.0, case
    if cfg.get("rescale_acts_by_decoder_norm"):  # folded: unit decoder rows
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(d_sae), atol=1e-6)


def test_jumprelu_with_nonpositive_thresholds_is_standard(tmp_path):
    thr = -torch.rand(40, generator=torch.Generator().manual_seed(3))
    thr[:5] = 0.0
    t = _write(tmp_path, {"architecture": "jumprelu", **V6}, extra={"threshold": thr})
    x = 7.0 * torch.randn(100, 10, generator=torch.Generator().manual_seed(2))
    want, _ = saelens_forward({"architecture": "jumprelu", "d_in": 10}, t, x, threshold=thr)
    with torch.no_grad():
        got = load_saelens(tmp_path).eval()(x).x_hat
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_pre_6_0_configs_follow_saelens_conversion(tmp_path):
    # Our exporter's old format: no version, k only inside activation_fn_kwargs -> architecture topk.
    old = {"architecture": "topk", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3},
           "apply_b_dec_to_input": True, "normalize_activations": "constant_norm_rescale"}
    c = saelens_config(old)
    assert (c["architecture"], c["k"], c["normalize_activations"]) == ("topk", 3, "constant_norm_rescale")
    # No architecture and no TopK activation: "standard"; boolean normalisation True = expected average.
    c = saelens_config({"activation_fn_str": "relu", "normalize_activations": False})
    assert (c["architecture"], c["normalize_activations"], c["apply_b_dec_to_input"]) == ("standard", "none", True)
    assert saelens_config({"normalize_activations": True})["normalize_activations"] == "expected_average_only_in"
    # A 6.x config is read as is: activation_fn_kwargs ignored, k from the top level (default 100).
    c = saelens_config({"architecture": "topk", "activation_fn_kwargs": {"k": 3}, **V6})
    assert c["k"] == 100
    t = _write(tmp_path, old, unit_dec=True)
    x = torch.randn(50, 10)
    want, _ = saelens_forward({**old, "k": 3, "d_in": 10}, t, x)
    with torch.no_grad():
        assert torch.allclose(load_saelens(tmp_path).eval()(x).x_hat, want, atol=1e-5)


def test_expected_average_scaling_factor_is_folded(tmp_path):
    cfg = {"architecture": "topk", "k": 5, "normalize_activations": "expected_average_only_in", **V6}
    t = _write(tmp_path, cfg)
    with pytest.raises(ValueError, match="normalize_activations"):
        load_saelens(tmp_path)
    s = 0.37
    x = 7.0 * torch.randn(64, 10)
    # SAELens' fold_activation_norm_scaling_factor: W_enc *= s, W_dec /= s, b_dec /= s
    folded = {"W_enc": t["W_enc"] * s, "b_enc": t["b_enc"], "W_dec": t["W_dec"] / s, "b_dec": t["b_dec"] / s}
    want, _ = saelens_forward({"architecture": "topk", "k": 5, "d_in": 10}, folded, x)
    with torch.no_grad():
        got = load_saelens(tmp_path, norm_scaling_factor=s).eval()(x).x_hat
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


REJECT = {
    "architecture": ({"architecture": "gated"}, {}),
    "normalize_activations": ({"architecture": "topk", "k": 5, "normalize_activations": "covariance_whitening"}, {}),
    "reshape_activations": ({"architecture": "topk", "k": 5, "reshape_activations": "hook_q"}, {}),
    "threshold": ({"architecture": "jumprelu"}, {"threshold": torch.full((40,), 0.1)}),
    "finetuning_scaling_factor": ({"architecture": "topk", "k": 5}, {"scaling_factor": torch.full((40,), 2.0)}),
    "k=": ({"architecture": "topk", "k": 41}, {}),
    "tensors": ({"architecture": "topk", "k": 5}, {"W_skip": torch.zeros(10, 10)}),
    "d_in=": ({"architecture": "topk", "k": 5, "d_in": 11}, {}),
}


@pytest.mark.parametrize("field", list(REJECT))
def test_rejects_what_a_topk_sae_cannot_compute(tmp_path, field):
    cfg, extra = REJECT[field]
    _write(tmp_path, {**cfg, **V6}, extra=extra)
    with pytest.raises(ValueError, match=field):
        load_saelens(tmp_path)


def test_rescale_rejects_a_zero_decoder_row(tmp_path):
    t = _write(tmp_path, {"architecture": "topk", "k": 5, "rescale_acts_by_decoder_norm": True, **V6})
    t["W_dec"][7] = 0
    from safetensors.torch import save_file

    save_file(t, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match="rescale_acts_by_decoder_norm"):
        load_saelens(tmp_path)


@pytest.mark.parametrize("mode", ["none", "constant_norm_rescale", "layer_norm"])
def test_export_writes_the_current_format(tmp_path, mode):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    sae = TopKSAE(12, 50, 5, normalize_input=mode)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_pre.normal_()
    save_saelens(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 5 and "activation_fn_kwargs" not in cfg
    assert cfg["rescale_acts_by_decoder_norm"] is False and cfg["apply_b_dec_to_input"] is True
    assert cfg["normalize_activations"] == mode and cfg["metadata"]["sae_lens_version"] == SAELENS_FORMAT
    t = load_file(str(tmp_path / "sae_weights.safetensors"))
    assert t["W_enc"].shape == (12, 50) and t["W_dec"].shape == (50, 12) and t["b_dec"].shape == (12,)
    x = 3 * torch.randn(20, 12)
    want, _ = saelens_forward(cfg, t, x)
    loaded = load_saelens(tmp_path)
    assert loaded.input_norm == mode and loaded.k == 5 and loaded.aux_k == sae.aux_k
    with torch.no_grad():
        assert torch.allclose(loaded(x).x_hat, want, atol=1e-5)
        assert torch.allclose(sae(x).x_hat, want, atol=1e-5)


def test_export_is_atomic(tmp_path, monkeypatch):
    """A failed rewrite leaves the previous export whole and no temp files behind."""
    from fastattn import _io

    torch.manual_seed(0)
    old = TopKSAE(6, 16, 3)
    save_saelens(old, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real = _io.atomic_write_bytes

    def write_then_fail(path, data):
        with _io.atomic_write(path) as f:
            f.write(data[: len(data) // 2])
            raise KeyboardInterrupt  # a Ctrl-C half way through the weights

    monkeypatch.setattr(_io, "atomic_write_bytes", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        save_saelens(TopKSAE(6, 16, 4), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.setattr(_io, "atomic_write_bytes", real)
    save_saelens(TopKSAE(6, 16, 4), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert load_saelens(tmp_path).k == 4


# ----------------------------------------------------------------------------- the real package

def _check(res: dict, name: str):
    assert res["rel_err"] < 1e-5, (name, res)
    assert res["same_active_rate"] == 1.0, (name, res)


@needs_saelens
def test_files_written_by_saelens_load_identically(tmp_path):
    from fastattn.sae import saelens_check as C

    for i, name in enumerate(C.FROM_SAELENS):
        _check(C.from_saelens(name, tmp_path / f"c{i}", seed=i), name)
    _check(C.expected_average(tmp_path / "ea"), "expected_average_only_in")


@needs_saelens
def test_saelens_files_we_cannot_compute_are_rejected_by_field(tmp_path):
    from fastattn.sae import saelens_check as C

    for i, (name, (write, field)) in enumerate(C.REJECTED.items()):
        d = tmp_path / f"r{i}"
        with C._quiet():
            write(d, i)
        with pytest.raises(ValueError, match=field):
            load_saelens(d)


@needs_saelens
def test_our_files_load_in_saelens_without_its_pre_6_conversion(tmp_path, monkeypatch):
    import sae_lens.loading.pretrained_sae_loaders as loaders

    from fastattn.sae import saelens_check as C

    def no_conversion(cfg):
        raise AssertionError(f"SAELens converted our config as pre-6.0: {cfg}")

    monkeypatch.setattr(loaders, "handle_pre_6_0_config", no_conversion)
    for i, name in enumerate(C.TO_SAELENS):
        res = C.to_saelens(name, tmp_path / f"o{i}", seed=i)
        assert res["saelens_class"] == "TopKSAE"
        _check(res, name)
