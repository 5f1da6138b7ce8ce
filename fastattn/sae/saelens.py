"""TopK SAEs in the SAELens layout (``cfg.json`` + ``sae_weights.safetensors``), both ways.

Tensors (SAELens names and shapes): W_enc [d_in, d_sae] (our ``W_enc`` transposed), b_enc [d_sae],
W_dec [d_sae, d_in], b_dec [d_in] (our ``b_pre``).

:func:`save_saelens` writes the current (SAELens >= 6) config: top-level ``architecture="topk"``,
``k``, ``rescale_acts_by_decoder_norm=False``, ``apply_b_dec_to_input=True``,
``normalize_activations`` ("none", "constant_norm_rescale" or "layer_norm": our three input
normalisations are SAELens' run-time ones) and ``metadata.sae_lens_version``, so SAELens reads it
without its pre-6.0 conversion. Our AuxK settings ride along in ``metadata.fastattn``.

:func:`load_saelens` computes what SAELens' forward computes from the same file (pinned against
sae-lens 6.54 in tests/test_saelens.py). Config fields that change the forward, and how each is
honoured (missing fields take SAELens' defaults, given first):

- ``architecture`` "topk": z = ReLU(TopK_k(pre)); "standard": z = ReLU(pre), i.e. TopK with
  k = d_sae; "jumprelu": z = ReLU(pre)·1[pre > θ], the same as "standard" when every threshold
  θ <= 0 (otherwise rejected, naming ``threshold``). Anything else is rejected.
- ``k`` (100): TopK width.
- ``apply_b_dec_to_input`` (True): when False, SAELens encodes x (not x − b_dec); folded at load
  into b_enc += W_enc·b_dec.
- ``rescale_acts_by_decoder_norm`` (False, topk only): pre *= ‖W_dec row‖ and the decoder divides
  by it again; folded at load (W_enc, b_enc scaled by the row norms, W_dec rows to unit length),
  which is SAELens' own ``fold_W_dec_norm``. A zero decoder row is rejected (SAELens divides by 0).
- ``normalize_activations`` ("none"): "constant_norm_rescale" and "layer_norm" are our input
  normalisations; "expected_average_only_in" needs the scaling factor the trainer kept outside
  the file (``norm_scaling_factor=``, folded as SAELens' ``fold_activation_norm_scaling_factor``);
  "covariance_whitening" is rejected.
- ``reshape_activations`` ("none"): "hook_z" flattens [..., heads, d_head] inputs; the loaded SAE
  takes the flattened rows [N, heads·d_head] (same math).
- ``dtype``: the weights are cast to it, as SAELens does.
- a ``scaling_factor`` tensor (pre-6.0 finetuning scale) is accepted only when all ones.
- configs without ``sae_lens_version`` (top level or in ``metadata``) or older than 6.0 go through
  SAELens' pre-6.0 rules: ``activation_fn_str`` "topk" with ``activation_fn_kwargs.k`` means
  architecture topk; other defaults: architecture "standard", boolean ``normalize_activations``
  True = "expected_average_only_in".
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Union

import torch

from fastattn import _io
from fastattn._version import __version__ as FASTATTN_VERSION
from fastattn.sae.modules import TopKSAE

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
SAELENS_FORMAT = "6.54.12"  # the SAELens release whose format we write and test against
ARCHITECTURES = ("topk", "standard", "jumprelu")
_TENSORS = {"W_enc", "b_enc", "W_dec", "b_dec"}


def save_saelens(sae: TopKSAE, directory: Union[str, Path], extra_metadata: Optional[dict] = None) -> Path:
    """Write ``sae`` to ``directory`` (created; weights written atomically); returns the directory."""
    from safetensors.torch import save

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"sae_lens_version": SAELENS_FORMAT, "sae_lens_training_version": SAELENS_FORMAT,
                "fastattn_version": FASTATTN_VERSION,
                "fastattn": {"aux_k": sae.aux_k, "aux_coef": sae.aux_coef, "dead_tokens": sae.dead_tokens},
                **(extra_metadata or {})}
    cfg = {
        "architecture": "topk",
        "d_in": sae.d_in,
        "d_sae": sae.n_latents,
        "k": sae.k,
        "rescale_acts_by_decoder_norm": False,
        "apply_b_dec_to_input": True,
        "normalize_activations": sae.input_norm,
        "reshape_activations": "none",
        "dtype": str(sae.W_enc.dtype).replace("torch.", ""),
        "device": "cpu",
        "metadata": metadata,
    }
    tensors = {"W_enc": sae.W_enc.detach().t().contiguous().cpu(), "b_enc": sae.b_enc.detach().cpu().clone(),
               "W_dec": sae.W_dec.detach().contiguous().cpu().clone(), "b_dec": sae.b_pre.detach().cpu().clone()}
    # Both files atomically (unique temp names), weights first: a kill leaves the old pair or a new
    # weights file beside the old cfg, never a partial file.
    _io.atomic_write_bytes(directory / WEIGHTS, save(tensors))
    _io.atomic_write_text(directory / CFG, json.dumps(cfg, indent=2) + "\n")
    return directory


def _major(version) -> int:
    m = re.match(r"\s*(\d+)", str(version or ""))
    return int(m.group(1)) if m else 0


def saelens_config(cfg: dict) -> dict:
    """The fields of a ``cfg.json`` that change the forward, after SAELens' version rules and
    defaults (see the module docstring); raises ValueError naming a field we cannot honour."""
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    c = dict(cfg)
    if _major(version) < 6:  # SAELens' handle_pre_6_0_config
        if "activation_fn_str" in c:
            c["activation_fn"] = c.pop("activation_fn_str")
        c.setdefault("apply_b_dec_to_input", True)
        c.setdefault("architecture", "standard")
        k = (c.get("activation_fn_kwargs") or {}).get("k")
        if c.get("activation_fn") == "topk" and k is not None:
            c["architecture"], c["k"] = "topk", k
        if isinstance(c.get("normalize_activations"), bool):
            c["normalize_activations"] = "expected_average_only_in" if c["normalize_activations"] else "none"
    out = {
        "architecture": c.get("architecture"),
        "d_in": c.get("d_in"),
        "d_sae": c.get("d_sae"),
        "k": c.get("k", 100),
        "apply_b_dec_to_input": bool(c.get("apply_b_dec_to_input", True)),
        "rescale_acts_by_decoder_norm": bool(c.get("rescale_acts_by_decoder_norm", False)),
        "normalize_activations": c.get("normalize_activations") or "none",
        "reshape_activations": c.get("reshape_activations") or "none",
        "dtype": c.get("dtype", "float32"),
    }
    if out["architecture"] not in ARCHITECTURES:
        raise ValueError(f"architecture={out['architecture']!r} is not supported (only {ARCHITECTURES})")
    if out["architecture"] != "topk":
        out["rescale_acts_by_decoder_norm"] = False  # not a field of SAELens' standard/jumprelu configs
    if out["normalize_activations"] == "covariance_whitening":
        raise ValueError("normalize_activations='covariance_whitening' is not supported: the whitening "
                         "statistics are not in the file (SAELens folds them at the end of training)")
    if out["normalize_activations"] not in ("none", "constant_norm_rescale", "layer_norm",
                                            "expected_average_only_in"):
        raise ValueError(f"normalize_activations={out['normalize_activations']!r} is not supported")
    if out["reshape_activations"] not in ("none", "hook_z"):
        raise ValueError(f"reshape_activations={out['reshape_activations']!r} is not supported")
    return out


def load_saelens(directory: Union[str, Path], backend: str = "auto", device=None, *,
                 norm_scaling_factor: Optional[float] = None, dtype: Optional[torch.dtype] = None) -> TopKSAE:
    """Read an SAE in the SAELens layout (written by us or by SAELens, any of its classes whose
    forward a TopKSAE can compute) as a :class:`TopKSAE` computing SAELens' forward; config fields
    that change the forward are folded into the weights (module docstring). ``dtype`` overrides
    the config's, as SAELens' ``load_from_disk(dtype=...)``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    raw = json.loads((directory / CFG).read_text())
    cfg = saelens_config(raw)
    t = load_file(str(directory / WEIGHTS))
    where = f"{directory}: "
    scale = t.pop("scaling_factor", None)
    if scale is not None and not torch.all(scale == 1):
        raise ValueError(where + "finetuning_scaling_factor (a 'scaling_factor' tensor not all ones) is not supported")
    threshold = t.pop("threshold", None)
    if cfg["architecture"] == "jumprelu":
        if threshold is None:
            raise ValueError(where + "architecture='jumprelu' without a 'threshold' tensor")
        if bool((threshold > 0).any()):
            raise ValueError(where + "threshold: a JumpReLU SAE with positive thresholds is not a TopK SAE "
                             f"({int((threshold > 0).sum())} of {threshold.numel()} latents)")
    elif threshold is not None:
        raise ValueError(where + f"unexpected tensor 'threshold' for architecture={cfg['architecture']!r}")
    missing, extra = _TENSORS - set(t), set(t) - _TENSORS
    if missing or extra:
        raise ValueError(where + f"tensors: missing {sorted(missing)}, unexpected {sorted(extra)}")
    d_in, d_sae = t["W_enc"].shape
    if (cfg["d_in"], cfg["d_sae"]) != (d_in, d_sae) or t["W_dec"].shape != (d_sae, d_in) \
            or t["b_enc"].shape != (d_sae,) or t["b_dec"].shape != (d_in,):
        raise ValueError(where + f"d_in={cfg['d_in']}, d_sae={cfg['d_sae']} do not match the tensors' shapes "
                         f"{ {k: tuple(v.shape) for k, v in t.items()} }")
    k = d_sae if cfg["architecture"] != "topk" else cfg["k"]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_sae:
        raise ValueError(where + f"k={k!r} must be an int in [1, d_sae = {d_sae}]")
    target = dtype or getattr(torch, str(cfg["dtype"]).replace("torch.", ""), None)
    if not isinstance(target, torch.dtype):
        raise ValueError(where + f"dtype={cfg['dtype']!r} is not a torch dtype")

    # Fold in float64: W [d_sae, d_in] (our layout), b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in].
    W = t["W_enc"].to(target).double().t()
    b_enc, W_dec, b_dec = (t[n].to(target).double() for n in ("b_enc", "W_dec", "b_dec"))
    norm_mode = cfg["normalize_activations"]
    if norm_mode == "expected_average_only_in":
        if norm_scaling_factor is None:
            raise ValueError(where + "normalize_activations='expected_average_only_in': the scaling factor "
                             "is not in the file; pass norm_scaling_factor= to fold it")
        s = float(norm_scaling_factor)
        W, W_dec, b_dec = W * s, W_dec / s, b_dec / s
        norm_mode = "none"
    elif norm_scaling_factor is not None:
        raise ValueError(where + f"norm_scaling_factor given but normalize_activations={norm_mode!r}")
    if cfg["rescale_acts_by_decoder_norm"]:
        norms = W_dec.norm(dim=1)
        if bool((norms == 0).any()):
            raise ValueError(where + "rescale_acts_by_decoder_norm with a zero decoder row: SAELens divides by 0")
        W, b_enc, W_dec = W * norms[:, None], b_enc * norms, W_dec / norms[:, None]
    if not cfg["apply_b_dec_to_input"]:
        b_enc = b_enc + W @ b_dec  # W (x − b_dec) + (b_enc + W b_dec) = W x + b_enc

    extra = (raw.get("metadata") or {}).get("fastattn") or raw.get("fastattn") or {}
    sae = TopKSAE(d_in, d_sae, int(k), normalize_input=norm_mode, aux_k=extra.get("aux_k"),
                  aux_coef=extra.get("aux_coef", 1 / 32), dead_tokens=extra.get("dead_tokens", 10_000_000),
                  backend=backend, dtype=target, device=device)
    with torch.no_grad():
        for p, v in ((sae.W_enc, W), (sae.b_enc, b_enc), (sae.W_dec, W_dec), (sae.b_pre, b_dec)):
            p.copy_(v.to(target))
    return sae
