"""TopK sparse autoencoder and Binarized Autoencoder (SPEC §5) on the fused SAE ops.

TopKSAE (Gao et al. 2024): z = ReLU(TopK_k(W_enc (x − b_pre) + b_enc)), x̂ = W_decᵀ z + b_pre,
decoder rows at unit norm, AuxK loss on dead latents, optional input normalisation, and the
data-dependent initialisation of Gao et al. (:meth:`TopKSAE.init_from_data`: b_pre at the
geometric median of a sample, encoder = decoderᵀ).

BinaryAutoencoder (Cho, Yang, Kurkoski and Inoue, arXiv 2509.20997, following the authors' public code where the
paper is ambiguous): h = 1[x W_in + b_in > 0] ∈ {0,1}^{d'}, x̂ = h W_out + b,
loss = reconstruction + α_e·Σ_j h2(p_j) + α_c·Σ_{i≠j} |C_ij|.
Named choices (each a constructor argument):
  ste    "reference" (authors' default: incoming gradient g passed as g·(1 − g)), "identity",
         "sigmoid" (g·σ(z)(1 − σ(z)) on the pre-activation)
  recon  "mse" (mean squared error over all elements, the authors' code) or "l2" (mean per-sample
         L2 norm of the error, as the paper writes)
  entropy term: eps = 1e-10 inside the logarithms (finite gradients at p ∈ {0, 1})
  covariance: unbiased (divides by B − 1), over the batch
  init: nn.Linear defaults for encoder and decoder
  input centre: the encoder sees x − c with c a fixed buffer (zeros, the authors' code, until
         :meth:`BinaryAutoencoder.set_center` (the trainer: the training rows' mean) adds it to the
         decoder's bias: then every step is the authors' step on the centred data x − c). Not in the official
         code; with the reference estimator it decides convergence: on uncentred data (the
         synthetic benchmark's x = cM sits in a corner of the cube, LLM states have a large mean)
         every Adam step on W_in also moves all hyperplanes by ΔW_in·mean, and the codes never settle
         (README, "Entropy benchmark"). The model class is unchanged (b_in absorbs W_in c).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastattn.ops.sae import STE_MODES, binary_covariance_penalty, binary_encode, sparse_decode, topk_encode
from fastattn.sae.entropy import entropy_from_counts, entropy_loss_bits

DEAD_TOKENS = 10_000_000   # a latent is dead when it has not fired in this many tokens (Gao et al.)
DENSE_FREQUENCY = 0.1      # a latent is dense when it fires on more than this fraction of tokens
INPUT_NORMS = ("none", "constant_norm_rescale", "layer_norm")  # SAELens' names for the same maps
LAYER_NORM_EPS = 1e-5      # added to the std, as SAELens' "layer_norm" input normalisation


def geometric_median(x: Tensor, iters: int = 200, tol: float = 1e-9) -> Tensor:
    """argmin_m Σ_i ‖x_i − m‖ of the rows of x [N, d] (Weiszfeld's iteration in float64, from the
    mean; distances clamped at 1e-12 so a row at the current estimate does not divide by zero).
    Returns [d] in x's dtype."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"geometric_median: x must be [N >= 1, d], got {tuple(x.shape)}")
    xs = x.double()
    m = xs.mean(0)
    for _ in range(iters):
        w = 1.0 / (xs - m).norm(dim=1).clamp_min(1e-12)
        new = (w[:, None] * xs).sum(0) / w.sum()
        done = float((new - m).norm()) <= tol * max(float(m.norm()), 1.0)
        m = new
        if done:
            break
    return m.to(x.dtype)


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained: Σ(x − x̂)² / Σ(x − mean_batch(x))² (0-dim)."""
    denom = (x - x.mean(0, keepdim=True)).pow(2).sum()
    return (x - x_hat).pow(2).sum() / denom.clamp_min(torch.finfo(x.dtype).tiny)


class TopKSAEOutput(NamedTuple):
    x_hat: Tensor     # [N, d] reconstruction, in the input's scale
    values: Tensor    # [N, k] latent activations after ReLU (>= 0)
    indices: Tensor   # [N, k] int64 latent indices
    loss: Tensor      # fvu + aux_coef · auxk_loss
    fvu: Tensor       # fraction of variance unexplained (of the normalised input when normalising)
    auxk_loss: Tensor  # AuxK: dead latents' reconstruction of the residual, normalised like fvu; 0 without dead latents


class TopKSAE(nn.Module):
    """TopK sparse autoencoder.

    Args:
        d_in: input width d.
        n_latents: dictionary size n (32,768 in the seeds' study).
        k: active latents per token (32).
        normalize_input: False / "none"; True / "constant_norm_rescale": scale every input row to
            L2 norm √d before encoding (the bilingual study normalises); "layer_norm": subtract the
            row mean and divide by (row std (unbiased) + 1e-5) — SAELens' two run-time input
            normalisations. Losses are computed in the normalised scale, ``x_hat`` is returned in
            the input's.
        aux_k: latents in the AuxK reconstruction (default d_in // 2, as EleutherAI's sparsify).
        aux_coef: weight of the AuxK loss (1/32, Gao et al.).
        dead_tokens: tokens without firing after which a latent counts as dead (10M).
        backend: backend of the fused ops ("auto", "cpp", "triton", "reference").

    Parameters: ``W_enc`` [n, d], ``b_enc`` [n], ``W_dec`` [n, d] (unit-norm rows), ``b_pre`` [d].
    Buffer ``tokens_since_fired`` [n] int64 for dead-latent tracking (see :meth:`record_firing`).
    """

    def __init__(self, d_in: int, n_latents: int, k: int, *, normalize_input: Union[bool, str] = False,
                 aux_k: Optional[int] = None, aux_coef: float = 1 / 32, dead_tokens: int = DEAD_TOKENS,
                 backend: str = "auto", dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if not 1 <= k <= n_latents:
            raise ValueError(f"k must be in [1, n_latents = {n_latents}], got {k}")
        self.d_in, self.n_latents, self.k = d_in, n_latents, k
        modes = {False: "none", True: "constant_norm_rescale"}
        self.input_norm = modes.get(normalize_input, normalize_input) if isinstance(normalize_input, bool) \
            else normalize_input
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"normalize_input must be a bool or one of {INPUT_NORMS}, got {normalize_input!r}")
        self.normalize_input = self.input_norm != "none"
        self.aux_k = d_in // 2 if aux_k is None else aux_k
        self.aux_coef, self.dead_tokens, self.backend = aux_coef, dead_tokens, backend
        w = torch.randn(n_latents, d_in, dtype=dtype, device=device)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w)
        self.W_enc = nn.Parameter(w.clone())  # encoder initialised to the decoder (Gao et al.)
        self.b_enc = nn.Parameter(torch.zeros(n_latents, dtype=dtype, device=device))
        self.b_pre = nn.Parameter(torch.zeros(d_in, dtype=dtype, device=device))
        self.register_buffer("tokens_since_fired", torch.zeros(n_latents, dtype=torch.long, device=device))

    def preprocess(self, x: Tensor):
        """x [N, d] -> (x in the model's scale, what :meth:`postprocess` needs to undo it: None,
        the per-row factor [N, 1] ("constant_norm_rescale"), or (mean, std) [N, 1] each)."""
        if self.input_norm == "none":
            return x, None
        if self.input_norm == "constant_norm_rescale":
            norm = x.norm(dim=-1, keepdim=True).clamp_min(1e-12) / self.d_in ** 0.5
            return x / norm, norm
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        return (x - mu) / (std + LAYER_NORM_EPS), (mu, std)

    @staticmethod
    def postprocess(x_hat: Tensor, state) -> Tensor:
        """x̂ [N, d] in the model's scale -> the input's scale (``state`` from :meth:`preprocess`)."""
        if state is None:
            return x_hat
        if isinstance(state, tuple):
            return x_hat * state[1] + state[0]
        return x_hat * state

    @torch.no_grad()
    def init_from_data(self, x: Tensor, b_pre: str = "geometric_median", scale: str = "data") -> None:
        """Initialisation from a data sample x [N, d] before the first step, after Gao et al. 2024
        (their released training code, ``init_from_data_``):
        - ``b_pre`` at the sample's geometric median ("geometric_median"; "mean" is sparsify's
          choice, "zeros" leaves it at 0), in the model's scale (after input normalisation);
        - the encoder set to the decoder's transpose (``W_enc = W_dec`` in this [n, d] layout),
          b_enc = 0, then multiplied by one factor (TopK and ReLU are homogeneous, so the factor
          scales every reconstruction x̂ − b_pre): ``scale="data"`` (default) the least-squares
          factor of x − b_pre on x̂ − b_pre over the sample (the initial reconstruction with the
          least error); ``"unit"`` (Gao et al.'s code) 1 / the mean norm of x̂ − b_pre for 256
          random unit vectors placed at b_pre; ``"none"``: 1. On MiniLM (d=384, n=6144, k=32)
          "data" gives 0.60, about the scale of sparsify's encoder (0.58), and "unit" 0.93: the
          smaller encoder moves faster under Adam (sparsify's FVU at equal steps) but leaves
          more latents unused (bench/results/topk_vs_sparsify.md)."""
        if b_pre not in ("geometric_median", "mean", "zeros"):
            raise ValueError(f"b_pre must be 'geometric_median', 'mean' or 'zeros', got {b_pre!r}")
        if scale not in ("data", "unit", "none"):
            raise ValueError(f"scale must be 'data', 'unit' or 'none', got {scale!r}")
        xs, _ = self.preprocess(x.to(self.b_pre.dtype))
        if b_pre == "geometric_median":
            self.b_pre.copy_(geometric_median(xs))
        elif b_pre == "mean":
            self.b_pre.copy_(xs.mean(0))
        else:
            self.b_pre.zero_()
        self.W_enc.copy_(self.W_dec)
        self.b_enc.zero_()
        if scale == "none":
            return
        if scale == "unit":
            g = torch.Generator(device="cpu").manual_seed(0)
            xs = torch.randn(256, self.d_in, generator=g, dtype=torch.float64).to(self.W_enc)
            xs = xs / xs.norm(dim=1, keepdim=True) + self.b_pre
        e = (xs - self.b_pre).double()
        r = (self.decode(*self.encode(xs)) - self.b_pre).double()
        if scale == "unit":
            factor = 1.0 / float(r.norm(dim=1).mean().clamp_min(1e-12))
        else:
            factor = float((e * r).sum() / (r * r).sum().clamp_min(1e-300))
        self.W_enc.mul_(factor)

    def encode(self, x: Tensor):
        """x [N, d] (already preprocessed) -> (values [N, k] >= 0, indices [N, k])."""
        values, indices = topk_encode(x - self.b_pre, self.W_enc, self.b_enc, self.k, backend=self.backend)
        return F.relu(values), indices

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        """(values, indices) [N, k] -> x̂ [N, d] in the model's scale."""
        return sparse_decode(values, indices, self.W_dec, self.b_pre, backend=self.backend, check_indices=False)

    def dead_mask(self) -> Tensor:
        """[n] bool: latents that have not fired in the last ``dead_tokens`` tokens."""
        return self.tokens_since_fired >= self.dead_tokens

    @torch.no_grad()
    def record_firing(self, fired: Tensor, n_tokens: int) -> None:
        """Advance the dead-latent counters by n_tokens and reset those in ``fired`` ([n] bool)."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired] = 0

    def fired_mask(self, out: TopKSAEOutput) -> Tensor:
        """[n] bool: latents with a positive activation in ``out``."""
        fired = torch.zeros(self.n_latents, dtype=torch.bool, device=out.indices.device)
        fired[out.indices[out.values > 0]] = True
        return fired

    def _auxk(self, x: Tensor, x_hat: Tensor) -> Tensor:
        dead = self.dead_mask().nonzero().squeeze(1)
        if dead.numel() == 0 or self.aux_k == 0:
            return x.new_zeros(())
        k_aux = min(self.aux_k, dead.numel())
        # The fused encoder over the dead latents only: their [N, n_dead] pre-activations are
        # not written either; gradients reach W_enc/b_enc through the gather.
        v, i = topk_encode(x - self.b_pre, self.W_enc[dead], self.b_enc[dead], k_aux, backend=self.backend)
        e = x - x_hat.detach()
        e_hat = sparse_decode(F.relu(v), dead[i], self.W_dec, None, backend=self.backend, check_indices=False)
        return fvu(e, e_hat)

    def forward(self, x: Tensor) -> TopKSAEOutput:
        """x [N, d] -> TopKSAEOutput (AuxK only in training mode)."""
        xs, state = self.preprocess(x)
        values, indices = self.encode(xs)
        x_hat = self.decode(values, indices)
        f = fvu(xs, x_hat)
        aux = self._auxk(xs, x_hat) if self.training else xs.new_zeros(())
        return TopKSAEOutput(self.postprocess(x_hat, state), values, indices, f + self.aux_coef * aux, f, aux)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out the radial part of W_dec's gradient (the unit-norm constraint's tangent)."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)

    def after_step(self) -> None:
        """Called by the trainer after each optimizer step."""
        self.set_decoder_norm_to_unit_norm()

    def before_step(self) -> None:
        """Called by the trainer between backward and the optimizer step."""
        self.remove_gradient_parallel_to_decoder_directions()


class BAEOutput(NamedTuple):
    x_hat: Tensor         # [N, d]
    code: Tensor          # [N, d'] binary code h1 (0/1, differentiable through the STE)
    loss: Tensor          # recon + α_e · entropy_loss + α_c · cov_loss
    recon_loss: Tensor
    entropy_loss: Tensor  # Σ_j h2(p_j) of the batch, bits (the eps form; 0 when α_e = 0)
    cov_loss: Tensor      # Σ_{i≠j} |C_ij| of the batch (0 when α_c = 0)
    entropy_bits: float   # exact Σ_j h2(p_j) of the batch from the encoder's counts (no grad)
    counts: Tensor        # [d'] int64 firing counts of the batch


class BinaryAutoencoder(nn.Module):
    """Binarized autoencoder.

    Args:
        d_in: input width d.
        d_hidden: code width d' (default 4·d).
        ste: straight-through estimator, one of "reference", "identity", "sigmoid".
        recon: "mse" or "l2" (see module docstring).
        alpha_entropy, alpha_cov: α_e and α_c (1e-7 each by default).
        backend: backend of the fused ops.

    Submodules: ``encoder`` nn.Linear(d, d') (weight [d', d]), ``decoder`` nn.Linear(d', d).
    Buffer ``input_center`` [d]: subtracted from the encoder's input (module docstring).
    """

    def __init__(self, d_in: int, d_hidden: Optional[int] = None, *, ste: str = "reference",
                 recon: str = "mse", alpha_entropy: float = 1e-7, alpha_cov: float = 1e-7,
                 backend: str = "auto", dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if ste not in STE_MODES:
            raise ValueError(f"ste must be one of {STE_MODES}, got {ste!r}")
        if recon not in ("mse", "l2"):
            raise ValueError(f"recon must be 'mse' or 'l2', got {recon!r}")
        self.d_in = d_in
        self.d_hidden = 4 * d_in if d_hidden is None else d_hidden
        self.ste, self.recon, self.backend = ste, recon, backend
        self.alpha_entropy, self.alpha_cov = alpha_entropy, alpha_cov
        self.encoder = nn.Linear(d_in, self.d_hidden, dtype=dtype, device=device)
        self.decoder = nn.Linear(self.d_hidden, d_in, dtype=dtype, device=device)
        self.register_buffer("input_center", torch.zeros(d_in, dtype=dtype, device=device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the input centre existed: the authors' (uncentred) encoder.
        state_dict.setdefault(prefix + "input_center", torch.zeros_like(self.input_center))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def init_from_data(self, x: Tensor, center: str = "mean") -> None:
        """Before the first step: ``input_center`` = the mean m of a sample x [N, d] ("mean"), and
        the decoder's bias moved by +m, so that the model is the authors' model trained on x − m
        (its output + m) step for step; or nothing ("none", the authors' code on raw x)."""
        if center not in ("mean", "none"):
            raise ValueError(f"center must be 'mean' or 'none', got {center!r}")
        self.set_center(x.double().mean(0) if center == "mean" else None)

    @torch.no_grad()
    def set_center(self, mean: Optional[Tensor]) -> None:
        """``input_center`` = mean [d] (None: 0), and the decoder's bias moved by the change."""
        mean = torch.zeros_like(self.input_center) if mean is None else mean.to(self.input_center)
        # Without the decoder's share, Adam spends its first ~|m|/lr steps walking the output bias
        # to m, and the identity-like estimator feeds that large mean error into every hyperplane
        # (rank 16 of the entropy benchmark: 20.6 bits instead of the authors' 16.0 on centred data).
        self.decoder.bias.add_(mean - self.input_center)
        self.input_center.copy_(mean)

    def preactivation(self, x: Tensor) -> Tensor:
        """(x − input_center) W_inᵀ + b_in [N, d'], the value the code thresholds at 0."""
        return self.encoder(x - self.input_center)

    def encode(self, x: Tensor, return_code: bool = True):
        """x [N, d] -> BinaryCode(code [N, d'], packed [N, ⌈d'/8⌉] uint8, counts [d'])."""
        return binary_encode(x - self.input_center, self.encoder.weight, self.encoder.bias, ste=self.ste,
                             return_code=return_code, backend=self.backend)

    @torch.no_grad()
    def encode_counts(self, x: Tensor) -> Tensor:
        """Firing counts [d'] of a batch, without writing its code (the entropy reduction)."""
        return self.encode(x, return_code=False).counts

    def decode(self, code: Tensor) -> Tensor:
        return self.decoder(code)

    def forward(self, x: Tensor, alpha_entropy: Optional[float] = None,
                alpha_cov: Optional[float] = None) -> BAEOutput:
        """x [N, d] -> BAEOutput; ``alpha_*`` override the module's weights for this call
        (the training schedule keeps α_e = 0 for the first epochs)."""
        a_e = self.alpha_entropy if alpha_entropy is None else alpha_entropy
        a_c = self.alpha_cov if alpha_cov is None else alpha_cov
        code, _packed, counts = self.encode(x)
        x_hat = self.decoder(code)
        err = x_hat - x
        recon = err.pow(2).mean() if self.recon == "mse" else err.norm(dim=1).mean()
        zero = x.new_zeros(())
        ent = entropy_loss_bits(code.mean(0)) if a_e > 0 else zero
        cov = binary_covariance_penalty(code, backend=self.backend, check_finite=False) if a_c > 0 else zero
        loss = recon + a_e * ent + a_c * cov
        return BAEOutput(x_hat, code, loss, recon, ent, cov, entropy_from_counts(counts, x.shape[0]), counts)
