"""Round trips between :mod:`fastattn.sae.saelens` and the real SAELens package (sae-lens >= 6).

Used by tests/test_saelens.py and bench/saelens_roundtrip.py; needs ``sae_lens`` only when called.

- :data:`FROM_SAELENS`: cases written by SAELens' own classes (inference SAEs with chosen configs,
  and ``TopKTrainingSAE`` / ``StandardTrainingSAE`` after a few of their own training steps,
  through ``save_model`` and ``save_inference_model``); :func:`from_saelens` loads each file with
  SAELens' ``SAE.load_from_disk`` and with :func:`load_saelens` and compares the forwards.
- :data:`TO_SAELENS`: our TopKSAE in each input normalisation, written by :func:`save_saelens` and
  read back by ``SAE.load_from_disk``.
- :data:`REJECTED`: SAELens files whose forward a TopKSAE cannot compute; :func:`load_saelens`
  must raise a ValueError naming the field (the value is that name).

Metrics (:func:`compare`): max |x̂_ours − x̂_SAELens| and the same relative to max |x̂|, and the
fraction of rows whose set of active latents (activation > 0) is identical.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Callable, Dict

import torch

from fastattn.sae.modules import TopKSAE
from fastattn.sae.saelens import load_saelens, save_saelens
from fastattn.sae.stats import model_states

D_IN, D_SAE, K, ROWS, SCALE = 24, 96, 6, 512, 7.0


def inputs(d_in: int = D_IN, rows: int = ROWS, seed: int = 0) -> torch.Tensor:
    """[rows, d_in] test inputs, elements ~ N(1, 7²) (activations of size ~7 with an offset)."""
    g = torch.Generator().manual_seed(seed)
    return 1.0 + SCALE * torch.randn(rows, d_in, generator=g)


@torch.no_grad()
def _randomise(sae, seed: int, dec_norm: tuple = (0.3, 3.0)) -> None:
    """Every parameter random; decoder rows of random length in ``dec_norm`` (not unit)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sae.named_parameters():
        p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.5 if name.startswith("b_") else 1.0))
    w = sae.W_dec
    lo, hi = dec_norm
    w.div_(w.norm(dim=1, keepdim=True)).mul_(lo + (hi - lo) * torch.rand(w.shape[0], 1, generator=g))
    if hasattr(sae, "threshold"):
        sae.threshold.copy_(-torch.rand(sae.threshold.shape, generator=g))  # all <= 0: plain ReLU


def _train_steps(sae, steps: int = 5, coefficients=None, seed: int = 0) -> None:
    """A few steps of SAELens' own training forward pass with Adam (weights move off their init)."""
    from sae_lens.saes.sae import TrainStepInput

    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for i in range(steps):
        out = sae.training_forward_pass(TrainStepInput(sae_in=inputs(sae.cfg.d_in, 256, seed + i),
                                                       coefficients=coefficients or {}, dead_neuron_mask=None,
                                                       n_training_steps=i, is_logging_step=False))
        opt.zero_grad()
        out.loss.backward()
        opt.step()


def _inference(arch: str, seed: int, **cfg):
    import sae_lens as sl

    classes = {"topk": (sl.TopKSAE, sl.TopKSAEConfig), "standard": (sl.StandardSAE, sl.StandardSAEConfig),
               "jumprelu": (sl.JumpReLUSAE, sl.JumpReLUSAEConfig), "gated": (sl.GatedSAE, sl.GatedSAEConfig)}
    cls, cfg_cls = classes[arch]
    if arch == "topk":
        cfg.setdefault("k", K)
    metadata = cfg.pop("metadata", None)
    c = cfg_cls(d_in=D_IN, d_sae=D_SAE, **cfg)
    if metadata:
        for key, v in metadata.items():
            c.metadata[key] = v
    sae = cls(c)
    _randomise(sae, seed)
    return sae


def _training(arch: str, seed: int, **cfg):
    import sae_lens as sl
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

    classes = {"topk": (sl.TopKTrainingSAE, sl.TopKTrainingSAEConfig, {}),
               "standard": (sl.StandardTrainingSAE, sl.StandardTrainingSAEConfig, {"l1": 1e-3}),
               "jumprelu": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, {"l0": 1e-3}),
               "batchtopk": (sl.BatchTopKTrainingSAE, sl.BatchTopKTrainingSAEConfig, {})}
    cls, cfg_cls, coef = classes[arch]
    if arch in ("topk", "batchtopk"):
        cfg.setdefault("k", K)
    torch.manual_seed(seed)
    sae = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **cfg))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.5)
    _train_steps(sae, coefficients=coef, seed=seed)
    return sae


def _saved(make: Callable, inference: bool = False) -> Callable[[Path, int], Path]:
    def write(directory: Path, seed: int) -> Path:
        sae = make(seed)
        (sae.save_inference_model if inference else sae.save_model)(str(directory))
        return directory

    return write


FROM_SAELENS: Dict[str, Callable[[Path, int], Path]] = {
    "TopKSAE": _saved(lambda s: _inference("topk", s)),
    "TopKSAE apply_b_dec_to_input=False": _saved(lambda s: _inference("topk", s, apply_b_dec_to_input=False)),
    "TopKSAE rescale_acts_by_decoder_norm=True": _saved(
        lambda s: _inference("topk", s, rescale_acts_by_decoder_norm=True)),
    "TopKSAE rescale + apply_b_dec_to_input=False": _saved(
        lambda s: _inference("topk", s, rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=False)),
    "TopKSAE constant_norm_rescale": _saved(
        lambda s: _inference("topk", s, normalize_activations="constant_norm_rescale")),
    "TopKSAE layer_norm": _saved(lambda s: _inference("topk", s, normalize_activations="layer_norm")),
    "TopKSAE hook_z": _saved(lambda s: _inference("topk", s, reshape_activations="hook_z",
                                                  metadata={"hook_name": "blocks.0.attn.hook_z"})),
    "TopKTrainingSAE.save_model": _saved(lambda s: _training("topk", s)),
    "TopKTrainingSAE.save_inference_model": _saved(lambda s: _training("topk", s), inference=True),
    "TopKTrainingSAE.save_model apply_b_dec_to_input=False": _saved(
        lambda s: _training("topk", s, apply_b_dec_to_input=False)),
    "StandardSAE": _saved(lambda s: _inference("standard", s)),
    "StandardSAE apply_b_dec_to_input=False": _saved(lambda s: _inference("standard", s, apply_b_dec_to_input=False)),
    "StandardTrainingSAE.save_model": _saved(lambda s: _training("standard", s)),
    "JumpReLUSAE thresholds <= 0": _saved(lambda s: _inference("jumprelu", s)),
}

REJECTED: Dict[str, tuple] = {
    # name: (writer, the field the error must name)
    "JumpReLUTrainingSAE (thresholds > 0)": (_saved(lambda s: _training("jumprelu", s), inference=True), "threshold"),
    "BatchTopKTrainingSAE.save_model": (_saved(lambda s: _training("batchtopk", s)), "architecture"),
    "GatedSAE": (_saved(lambda s: _inference("gated", s)), "architecture"),
    "TopKSAE covariance_whitening": (
        _saved(lambda s: _inference("topk", s, normalize_activations="covariance_whitening")), "normalize_activations"),
    "TopKSAE expected_average_only_in (no factor)": (
        _saved(lambda s: _inference("topk", s, normalize_activations="expected_average_only_in")),
        "normalize_activations"),
}


def _ours(mode: str, seed: int) -> TopKSAE:
    sae = TopKSAE(D_IN, D_SAE, K, normalize_input=mode)
    _randomise(sae, seed)
    return sae


TO_SAELENS: Dict[str, Callable[[int], TopKSAE]] = {
    "TopKSAE": lambda s: _ours("none", s),
    "TopKSAE normalize_input=True (constant_norm_rescale)": lambda s: _ours("constant_norm_rescale", s),
    "TopKSAE layer_norm": lambda s: _ours("layer_norm", s),
}


def _active_ours(sae: TopKSAE, x: torch.Tensor) -> torch.Tensor:
    return model_states(sae, x)[0]


@torch.no_grad()
def compare(ours: TopKSAE, theirs, x: torch.Tensor, theirs_x: torch.Tensor = None) -> dict:
    """Forward of both on x [N, d] (``theirs_x``: the same rows in SAELens' input shape)."""
    ours.eval()
    tx = x if theirs_x is None else theirs_x
    want = theirs(tx).reshape(x.shape).double()
    got = ours(x).x_hat.double()
    active_theirs = (theirs.encode(tx) > 0).reshape(x.shape[0], -1)
    same = (_active_ours(ours, x) == active_theirs).all(1)
    err = (got - want).abs().max().item()
    return {"max_abs_err": err, "rel_err": err / max(want.abs().max().item(), 1e-30),
            "same_active_rate": same.double().mean().item(), "rows": x.shape[0],
            "mean_active": active_theirs.sum(1).double().mean().item()}


@contextlib.contextmanager
def _quiet():
    """SAELens warns about deprecations and hook_z reshaping on load; not ours to report."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def from_saelens(name: str, directory: Path, seed: int = 0) -> dict:
    """Write case ``name`` with SAELens, load it both ways, compare on :func:`inputs`."""
    from sae_lens import SAE

    with _quiet():
        FROM_SAELENS[name](Path(directory), seed)
        theirs = SAE.load_from_disk(str(directory))
    ours = load_saelens(directory)
    x = inputs(seed=seed + 100)
    tx = x.reshape(x.shape[0], 4, D_IN // 4) if "hook_z" in name else None
    return compare(ours, theirs, x, tx)


def expected_average(directory: Path, seed: int = 0, factor: float = 0.37) -> dict:
    """A TopKSAE saved with normalize_activations="expected_average_only_in" (weights trained on
    inputs scaled by ``factor``): SAELens' loader with its own ``fold_activation_norm_scaling_factor``
    against ours with ``norm_scaling_factor=factor``."""
    from sae_lens import SAE

    with _quiet():
        _saved(lambda s: _inference("topk", s, normalize_activations="expected_average_only_in"))(directory, seed)
        theirs = SAE.load_from_disk(str(directory))
        theirs.fold_activation_norm_scaling_factor(factor)
    return compare(load_saelens(directory, norm_scaling_factor=factor), theirs, inputs(seed=seed + 100))


def to_saelens(name: str, directory: Path, seed: int = 0) -> dict:
    """Write our case ``name`` with :func:`save_saelens`, read it with SAELens, compare."""
    from sae_lens import SAE

    ours = TO_SAELENS[name](seed)
    save_saelens(ours, directory)
    with _quiet():
        theirs = SAE.load_from_disk(str(directory))
    res = compare(ours, theirs, inputs(seed=seed + 100))
    res["saelens_class"] = type(theirs).__name__
    return res
