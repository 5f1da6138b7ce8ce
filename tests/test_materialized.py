"""The authors'-style materialising implementation equals the reference backend (fp64)."""
import pytest
import torch

import fastattn
from fastattn.reference.materialized import circular_relative_attention_materialized

TABLES = ("rel_index_table", "bar_table", "pos_table", "octave_table", "pitch_class_table")

# name: (B, H, Lq, Lk, D, causal, combine, per_head, padding, bar_res, bar_min, octave_min, rel_index_min)
CONFIGS = {
    "L1": (2, 2, 1, 1, 8, True, "hadamard", False, False, 4, 0, -11, 0),
    "L7_noncausal_add": (2, 3, 7, 7, 8, False, "add", False, True, 4, -2, -3, -3),
    "L33_causal_pad": (2, 2, 33, 33, 16, True, "hadamard", False, True, 6, 0, -4, 0),
    "L33_noncausal_perhead": (1, 3, 33, 33, 8, False, "hadamard", True, False, 5, -3, -11, -5),
    "decode_L1_of_33": (2, 2, 1, 33, 8, True, "add", True, True, 6, 0, -4, 0),
    "decode_L7_of_33": (2, 2, 7, 33, 16, True, "hadamard", False, False, 4, -1, -2, 2),
}


def make(cfg, seed=0):
    B, H, Lq, Lk, D, causal, combine, per_head, padding, bar_res, bar_min, octave_min, idx_min = cfg
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = rand(B, H, Lq, D), rand(B, H, Lk, D), rand(B, H, Lk, D)
    # Small tables so that the clamps on both sides are exercised.
    rows = {"rel_index_table": 5, "bar_table": 3, "pos_table": bar_res, "octave_table": 4,
            "pitch_class_table": 12}
    tables = {n: rand(*(((H,) if per_head else ()) + (r, D))) for n, r in rows.items()}
    steps = torch.tensor([0, 1, 2, 3, 5, 9])[torch.randint(0, 6, (B, Lk), generator=g)]
    onset = steps.cumsum(1) - steps[:, :1]
    pitch = torch.randint(21, 109, (B, Lk), generator=g)
    onset[torch.rand(B, Lk, generator=g) < 0.15] = -1
    pitch[torch.rand(B, Lk, generator=g) < 0.15] = -1
    kpm = None
    if padding:
        kpm = torch.rand(B, Lk, generator=g) < 0.3
        kpm[0, 0] = True             # with causal, the first query of batch 0 sees no key
        kpm[-1, -1] = False
    kw = dict(tables, bar_res=bar_res, bar_min=bar_min, octave_min=octave_min,
              rel_index_min=idx_min, combine=combine, alpha=0.7, scale=0.4, causal=causal,
              key_padding_mask=kpm)
    return q, k, v, onset, pitch, kw


def run_both(cfg, seed=0):
    q, k, v, onset, pitch, kw = make(cfg, seed)
    leaves = [q, k, v] + [kw[n] for n in TABLES]
    results = []
    for fn in (lambda *a, **k_: fastattn.circular_relative_attention(*a, backend="reference", **k_),
               circular_relative_attention_materialized):
        xs = [t.detach().clone().requires_grad_() for t in leaves]
        kw_ = dict(kw, **dict(zip(TABLES, xs[3:])))
        out = fn(xs[0], xs[1], xs[2], onset, pitch, **kw_)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1),
                               dtype=out.dtype)
        grads = torch.autograd.grad(out, xs, grad_out)
        results.append((out, grads))
    return results


@pytest.mark.parametrize("name", list(CONFIGS))
def test_materialized_matches_reference(name):
    (ref_out, ref_grads), (out, grads) = run_both(CONFIGS[name])
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref_out, atol=1e-9, rtol=0)
    for n, g, rg in zip(("q", "k", "v") + TABLES, grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-9, rtol=0, msg=lambda m: f"grad {n}: {m}")


def test_empty_row_is_zero_with_zero_grad():
    cfg = CONFIGS["L33_causal_pad"]
    (_, _), (out, grads) = run_both(cfg)
    assert torch.all(out[0, :, 0] == 0)          # batch 0, query 0: its only key is padded
    assert torch.all(grads[0][0, :, 0] == 0)     # so dq there is zero
