"""Save and load TopK SAEs in the SAELens layout: ``cfg.json`` + ``sae_weights.safetensors``.

Tensors (SAELens names and shapes): W_enc [d_in, d_sae] (our ``W_enc`` transposed), b_enc [d_sae],
W_dec [d_sae, d_in], b_dec [d_in] (our ``b_pre``: subtracted from the input, added to the
output, i.e. ``apply_b_dec_to_input=True``). The config names the TopK activation with its k;
our input normalisation (rows scaled to norm √d, undone on the output) is SAELens'
``normalize_activations="constant_norm_rescale"``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch

from fastattn.sae.modules import TopKSAE

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"


def save_saelens(sae: TopKSAE, directory: Union[str, Path], extra_cfg: Optional[dict] = None) -> Path:
    """Write ``sae`` to ``directory`` (created); returns the directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architecture": "topk",
        "d_in": sae.d_in,
        "d_sae": sae.n_latents,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": sae.k},
        "apply_b_dec_to_input": True,
        "normalize_activations": "constant_norm_rescale" if sae.normalize_input else "none",
        "dtype": str(sae.W_enc.dtype).replace("torch.", ""),
        "device": "cpu",
        "finetuning_scaling_factor": False,
        "fastattn": {"aux_k": sae.aux_k, "aux_coef": sae.aux_coef, "dead_tokens": sae.dead_tokens},
        **(extra_cfg or {}),
    }
    tensors = {"W_enc": sae.W_enc.detach().t().contiguous().cpu(), "b_enc": sae.b_enc.detach().cpu().clone(),
               "W_dec": sae.W_dec.detach().contiguous().cpu().clone(), "b_dec": sae.b_pre.detach().cpu().clone()}
    tmp = directory / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, directory / WEIGHTS)
    (directory / CFG).write_text(json.dumps(cfg, indent=2) + "\n")
    return directory


def load_saelens(directory: Union[str, Path], backend: str = "auto", device=None) -> TopKSAE:
    """Read a TopK SAE in the SAELens layout (written by us or by SAELens)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = json.loads((directory / CFG).read_text())
    arch = cfg.get("architecture", cfg.get("activation_fn_str"))
    if arch != "topk" and cfg.get("activation_fn_str") != "topk":
        raise ValueError(f"{directory}: not a TopK SAE (architecture {arch!r})")
    k = (cfg.get("activation_fn_kwargs") or {}).get("k") or cfg.get("k")
    if k is None:
        raise ValueError(f"{directory}: cfg.json has no TopK k")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None, "constant_norm_rescale"):
        raise ValueError(f"{directory}: normalize_activations={norm!r} is not supported")
    t = load_file(str(directory / WEIGHTS))
    d_in, d_sae = t["W_enc"].shape
    extra = cfg.get("fastattn", {})
    sae = TopKSAE(d_in, d_sae, int(k), normalize_input=norm == "constant_norm_rescale",
                  aux_k=extra.get("aux_k"), aux_coef=extra.get("aux_coef", 1 / 32),
                  dead_tokens=extra.get("dead_tokens", 10_000_000), backend=backend,
                  dtype=t["W_enc"].dtype, device=device)
    with torch.no_grad():
        sae.W_enc.copy_(t["W_enc"].t())
        sae.b_enc.copy_(t["b_enc"])
        sae.W_dec.copy_(t["W_dec"])
        sae.b_pre.copy_(t["b_dec"])
    return sae
