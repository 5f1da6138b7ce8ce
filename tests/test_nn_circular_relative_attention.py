"""Tests for fastattn.nn.CircularRelativeAttention and KVCache (SPEC §3).

Small CPU shapes only. ``backend="auto"`` resolves to the C++ kernel once the extension is built
and to the reference before that; "reference" is always the pure-PyTorch oracle.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastattn.nn import (VARIANTS, CircularRelativeAttention, KVCache, sinusoidal_table,
                         variant_kwargs)

BACKENDS = ["reference", "auto"]
# Small tables so that clamping happens inside a 10-token sequence: Δn up to 9 > max_len - 1,
# Δt up to ~50 ticks > n_bar * bar_res.
SMALL = dict(max_len=8, bar_res=4, n_bar=3)
E, H = 16, 2  # head dim 8
ATOL = 1e-5


def assert_close(actual, expected, atol=ATOL, rtol=1e-5, what="output"):
    """assert_close that says where the tensors differ."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN positions differ"
    err = (actual - expected).abs()
    bad = err > atol + rtol * expected.abs()
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} of {err.numel()} elements differ, max "
                             f"abs error {err.max().item():.3g}, first at {idx}")


def make_inputs(B=2, L=10, seed=0, missing=True):
    """x [B, L, E]; onset [B, L] non-decreasing ticks; pitch [B, L] in 0..127; -1 = missing."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, E, generator=g)
    onset = torch.cumsum(torch.randint(0, 7, (B, L), generator=g), dim=1)
    pitch = torch.randint(30, 100, (B, L), generator=g)
    pitch[0, 1], pitch[-1, -1] = 0, 127  # extreme pitches: |Δp| up to 127
    if missing:
        onset[0, L // 3] = -1
        onset[-1, 0] = -1
        pitch[0, L // 2] = -1
        pitch[-1, 2 % L] = -1
    return x, onset, pitch


def make_module(variant="CirRelAttn-H", **kw):
    torch.manual_seed(0)
    return CircularRelativeAttention.from_variant(variant, E, H, **{**SMALL, **kw}).eval()


def decode(m, x, onset, pitch, chunk, key_padding_mask=None):
    """Run m over x in chunks of ``chunk`` tokens with a KV cache; returns [B, L, E]."""
    cache = m.new_kv_cache(x.shape[0], capacity=2)  # tiny capacity: exercises growth
    outs = []
    with torch.no_grad():
        for s in range(0, x.shape[1], chunk):
            sl = slice(s, s + chunk)
            kpm = None if key_padding_mask is None else key_padding_mask[:, sl]
            outs.append(m(x[:, sl], onset[:, sl], pitch[:, sl], key_padding_mask=kpm,
                          kv_cache=cache))
    assert len(cache) == x.shape[1]
    return torch.cat(outs, dim=1)


# ---------------------------------------------------------------------------------------------
# Incremental decoding equals one full causal pass.

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_matches_full_pass(variant, chunk, backend):
    m = make_module(variant, backend=backend)
    x, onset, pitch = make_inputs()
    with torch.no_grad():
        full = m(x, onset, pitch)
    assert_close(decode(m, x, onset, pitch, chunk), full, what=f"{variant} chunk={chunk}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant, extra", [
    ("CirRelAttn-H", dict(per_head_tables=True)),
    ("CirRelAttn", dict(linear=False, sinusoidal=True)),
    ("RIPO", dict(sinusoidal=True)),
    ("CirRelAttn-H", dict(bias=True, batch_first=False)),
])
def test_decode_matches_full_pass_configs(variant, extra, backend):
    m = make_module(variant, backend=backend, **extra)
    x, onset, pitch = make_inputs()
    if not m.batch_first:
        x = x.transpose(0, 1)
    with torch.no_grad():
        full = m(x, onset, pitch)
        cache = m.new_kv_cache(onset.shape[0], capacity=1)
        steps = [m(x[i:i + 1] if not m.batch_first else x[:, i:i + 1], onset[:, i:i + 1],
                   pitch[:, i:i + 1], kv_cache=cache) for i in range(onset.shape[1])]
    assert_close(torch.cat(steps, dim=0 if not m.batch_first else 1), full)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_with_key_padding_mask(backend):
    m = make_module("CirRelAttn-H", backend=backend)
    x, onset, pitch = make_inputs()
    kpm = torch.zeros(onset.shape, dtype=torch.bool)
    kpm[0, :2] = True   # left padding (query 0 of batch 0 sees no key at all)
    kpm[1, 6] = True
    with torch.no_grad():
        full = m(x, onset, pitch, key_padding_mask=kpm)
    assert torch.isfinite(full).all()
    assert_close(decode(m, x, onset, pitch, 3, key_padding_mask=kpm), full)


# ---------------------------------------------------------------------------------------------
# Variants.

def test_variant_names_and_tables():
    assert list(VARIANTS) == ["Attn", "RelAttn", "RIPO", "CirRelAttn", "CirRelAttn-H"]
    expect = {
        "Attn": set(),
        "RelAttn": {"rel_index_table"},
        "RIPO": {"rel_index_table", "time_table", "pitch_table"},
        "CirRelAttn": {"rel_index_table", "bar_table", "pos_table", "octave_table",
                       "pitch_class_table"},
        "CirRelAttn-H": {"rel_index_table", "bar_table", "pos_table", "octave_table",
                         "pitch_class_table"},
    }
    names = ("rel_index_table", "bar_table", "pos_table", "octave_table", "pitch_class_table",
             "time_table", "pitch_table")
    for variant, tables in expect.items():
        m = CircularRelativeAttention.from_variant(variant, E, H, **SMALL)
        assert {n for n in names if getattr(m, n) is not None} == tables, variant
        assert set(m.table_maps.keys()) == tables, variant  # linear=True by default
    assert CircularRelativeAttention.from_variant("CirRelAttn", E, H).combine == "add"
    assert CircularRelativeAttention.from_variant("CirRelAttn-H", E, H).combine == "hadamard"
    ripo = CircularRelativeAttention.from_variant("RIPO", E, H, **SMALL)
    assert ripo.time_table.shape == (SMALL["n_bar"] * SMALL["bar_res"], E // H)
    assert ripo.pitch_table.shape == (255, E // H)
    cir = CircularRelativeAttention.from_variant("CirRelAttn-H", E, H, **SMALL)
    assert cir.octave_table.shape == (22, E // H) and cir.pitch_class_table.shape == (12, E // H)
    assert cir.bar_table.shape == (SMALL["n_bar"], E // H)
    assert cir.pos_table.shape == (SMALL["bar_res"], E // H)
    assert cir.rel_index_table.shape == (SMALL["max_len"], E // H)


def test_variant_overrides_and_copies():
    m = CircularRelativeAttention.from_variant("RIPO", E, H, sinusoidal=True, rel_pitch=False)
    assert m.sinusoidal and m.pitch_table is None and m.time_table is not None
    kw = variant_kwargs("RelAttn")
    kw["rel_time"] = True
    assert VARIANTS["RelAttn"]["rel_time"] is False


def test_unknown_variant():
    with pytest.raises(ValueError, match="CirRelAttn-H") as info:
        CircularRelativeAttention.from_variant("CirRelAtn", E, H)
    assert "Attn" in str(info.value) and "RIPO" in str(info.value)
    with pytest.raises(ValueError, match="unknown variant"):
        variant_kwargs("nope")


# ---------------------------------------------------------------------------------------------
# Shapes, wiring, independent checks.

@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_first_layouts(backend):
    m_bf = make_module(backend=backend, batch_first=True)
    m_sf = make_module(backend=backend, batch_first=False)
    m_sf.load_state_dict(m_bf.state_dict())
    x, onset, pitch = make_inputs(B=3, L=5)
    out_bf = m_bf(x, onset, pitch)
    out_sf = m_sf(x.transpose(0, 1).contiguous(), onset, pitch)  # onset/pitch stay [B, L]
    assert out_bf.shape == (3, 5, E) and out_sf.shape == (5, 3, E)
    assert_close(out_sf.transpose(0, 1), out_bf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attn_variant_matches_sdpa(backend):
    """No relative term: the module is plain causal multi-head attention."""
    m = make_module("Attn", backend=backend, bias=True)
    with torch.no_grad():
        m.in_proj.bias.normal_()
        m.out_proj.bias.normal_()
    x, _, _ = make_inputs()
    B, L, _ = x.shape
    q, k, v = m.in_proj(x).view(B, L, 3, H, E // H).permute(2, 0, 3, 1, 4)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = m.out_proj(ref.transpose(1, 2).reshape(B, L, E))
    assert_close(m(x), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_functional_op(backend):
    """The module passes its (linearly mapped) tables and constants to the op unchanged."""
    import fastattn

    m = make_module("CirRelAttn-H", backend=backend, alpha=0.7)
    x, onset, pitch = make_inputs()
    B, L, _ = x.shape
    tables = m.relative_tables()
    for name, t in tables.items():  # linear=True: table @ W^T
        assert_close(t, getattr(m, name) @ m.table_maps[name].weight.T, what=name)
    q, k, v = m.in_proj(x).view(B, L, 3, H, E // H).permute(2, 0, 3, 1, 4)
    out = fastattn.circular_relative_attention(
        q, k, v, onset, pitch, **tables, bar_res=SMALL["bar_res"], bar_min=0, octave_min=-11,
        rel_index_min=0, combine="hadamard", alpha=0.7, causal=True, backend="reference")
    ref = m.out_proj(out.transpose(1, 2).reshape(B, L, E))
    assert_close(m(x, onset, pitch), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_relative_terms_are_translation_invariant_and_used(backend):
    m = make_module("CirRelAttn-H", backend=backend, alpha=1.0)
    x, onset, pitch = make_inputs()
    out = m(x, onset, pitch)
    shifted_onset = torch.where(onset >= 0, onset + 37, onset)
    assert_close(m(x, shifted_onset, pitch), out, what="onsets shifted")  # only Δt matters
    mid = torch.where(pitch >= 0, pitch.clamp(10, 117), pitch)  # room to transpose by ±10
    shifted = torch.where(mid >= 0, mid + 10, mid)
    assert_close(m(x, onset, shifted), m(x, onset, mid), what="transposed")  # only Δp matters
    changed = onset.clone()
    changed[:, 4:] += 5  # changes Δt across position 4
    assert not torch.allclose(m(x, changed, pitch), out, atol=1e-4)
    # The index-only variant ignores onset and pitch entirely.
    r = make_module("RelAttn", backend=backend)
    assert_close(r(x, changed, pitch), r(x, onset, pitch))
    assert_close(r(x), r(x, onset, pitch))


# ---------------------------------------------------------------------------------------------
# Gradients.

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant, extra", [
    ("RelAttn", {}), ("RIPO", {}), ("CirRelAttn", {}), ("CirRelAttn-H", {}),
    ("CirRelAttn-H", dict(per_head_tables=True)), ("CirRelAttn-H", dict(linear=False)),
    ("RIPO", dict(sinusoidal=True)),
])
def test_gradients_reach_every_parameter(variant, extra, backend):
    m = make_module(variant, backend=backend, bias=True, **extra).train()
    x, onset, pitch = make_inputs()
    x.requires_grad_(True)
    m(x, onset, pitch).square().sum().backward()
    params = dict(m.named_parameters())
    table_params = [n for n in params if n.endswith("_table") or n.startswith("table_maps.")]
    if not extra.get("sinusoidal"):
        assert table_params, "expected learned tables"
    if m.linear:
        assert any(n.startswith("table_maps.") for n in params)
    for name, p in params.items():
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {name}"
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"
    assert torch.isfinite(x.grad).all()


def test_gradcheck_float64():
    """Module-level gradcheck through the linear maps and the Hadamard combination."""
    m = CircularRelativeAttention.from_variant("CirRelAttn-H", 8, 2, max_len=4, bar_res=4,
                                               n_bar=2, backend="reference").double()
    x, onset, pitch = make_inputs(B=1, L=4)
    x = x[..., :8].double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: m(x, onset, pitch), (x,))


# ---------------------------------------------------------------------------------------------
# Errors.

def test_embed_dim_not_divisible():
    with pytest.raises(ValueError, match="embed_dim.*num_heads"):
        CircularRelativeAttention(10, 3)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="combine"):
        CircularRelativeAttention(E, H, combine="mul")
    with pytest.raises(ValueError, match="backend"):
        CircularRelativeAttention(E, H, backend="fast")
    with pytest.raises(ValueError, match="per_head_tables"):
        CircularRelativeAttention(E, H, sinusoidal=True, per_head_tables=True)


def test_missing_coordinates():
    m = make_module("CirRelAttn-H")
    x, onset, pitch = make_inputs()
    with pytest.raises(ValueError, match="onset.*rel_time"):
        m(x, pitch=pitch)
    with pytest.raises(ValueError, match="pitch.*rel_pitch"):
        m(x, onset)
    with pytest.raises(ValueError, match=r"onset must be \[B, L\]"):
        m(x, onset[:, :-1], pitch)
    with pytest.raises(ValueError, match="embed_dim"):
        m(torch.randn(2, 10, E + 2), onset, pitch)
    # Only what a term reads is required.
    assert make_module("RelAttn")(x).shape == x.shape
    assert make_module("CirRelAttn-H", rel_pitch=False)(x, onset).shape == x.shape


# ---------------------------------------------------------------------------------------------
# Sinusoidal tables.

def test_sinusoidal_tables_are_buffers():
    m = make_module("CirRelAttn-H", sinusoidal=True)
    buffers = dict(m.named_buffers())
    params = dict(m.named_parameters())
    for name in ("rel_index_table", "bar_table", "pos_table", "octave_table", "pitch_class_table"):
        assert name in buffers and name not in params
        assert not getattr(m, name).requires_grad
        assert name not in m.state_dict()  # rebuilt from the configuration
    assert all(n.startswith(("in_proj", "out_proj", "table_maps")) for n in params)
    # linear=False leaves nothing learnable in the relative terms.
    m2 = make_module("CirRelAttn-H", sinusoidal=True, linear=False)
    assert set(dict(m2.named_parameters())) == {"in_proj.weight", "out_proj.weight"}


def test_sinusoidal_rows_encode_relative_values():
    D = E // H
    m = make_module("CirRelAttn-H", sinusoidal=True)
    assert_close(m.rel_index_table, sinusoidal_table(torch.arange(8), D, 10000.0))
    assert_close(m.bar_table, sinusoidal_table(torch.arange(3), D, 7920.0))
    assert_close(m.pos_table, sinusoidal_table(torch.arange(4), D, 7920.0))
    assert_close(m.octave_table, sinusoidal_table(torch.arange(22) - 11, D, 9919.0))
    assert_close(m.pitch_class_table, sinusoidal_table(torch.arange(12), D, 9919.0))
    r = make_module("RIPO", sinusoidal=True)
    assert_close(r.time_table, sinusoidal_table(torch.arange(12), D, 7920.0))
    assert_close(r.pitch_table, sinusoidal_table(torch.arange(255) - 127, D, 9919.0))
    # FME layout: interleaved sin/cos with frequency base^(-2⌊c/2⌋/D).
    t = sinusoidal_table(torch.tensor([3]), 4, 9919.0)[0]
    w1 = 9919.0 ** (-2 / 4)
    expect = torch.tensor([torch.sin(torch.tensor(3.0)), torch.cos(torch.tensor(3.0)),
                           torch.sin(torch.tensor(3 * w1)), torch.cos(torch.tensor(3 * w1))])
    assert_close(t, expect)


# ---------------------------------------------------------------------------------------------
# Dropout and padding.

@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_train_vs_eval(backend):
    m = make_module("CirRelAttn-H", backend=backend, dropout=0.5)
    x, onset, pitch = make_inputs()
    e1, e2 = m(x, onset, pitch), m(x, onset, pitch)
    assert torch.equal(e1, e2), "eval mode must be deterministic"
    m.train()
    torch.manual_seed(1)
    t1 = m(x, onset, pitch)
    torch.manual_seed(1)
    t2 = m(x, onset, pitch)
    assert not torch.allclose(t1, e1, atol=1e-3), "dropout had no effect in training mode"
    assert_close(t1, t2, what="same torch seed, same dropout mask")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["Attn", "RIPO", "CirRelAttn-H"])
def test_key_padding_mask(variant, backend):
    m = make_module(variant, backend=backend)
    x, onset, pitch = make_inputs(L=9)
    kpm = torch.zeros(onset.shape, dtype=torch.bool)
    kpm[0, 0] = True        # left padding
    kpm[1, [2, 5]] = True   # holes
    kpm[1, -1] = True       # right padding
    out = m(x, onset, pitch, key_padding_mask=kpm)
    # Arbitrary content at padded positions must not reach any non-padded query.
    g = torch.Generator().manual_seed(5)
    x2, onset2, pitch2 = x.clone(), onset.clone(), pitch.clone()
    x2[kpm] = torch.randn(int(kpm.sum()), E, generator=g) * 10
    onset2[kpm] = torch.randint(0, 500, (int(kpm.sum()),), generator=g)
    pitch2[kpm] = torch.randint(0, 128, (int(kpm.sum()),), generator=g)
    out2 = m(x2, onset2, pitch2, key_padding_mask=kpm)
    assert torch.isfinite(out).all() and torch.isfinite(out2).all()
    assert_close(out2[~kpm], out[~kpm])
    # ... whereas without the mask they do.
    assert not torch.allclose(m(x2, onset2, pitch2)[~kpm], m(x, onset, pitch)[~kpm], atol=1e-4)


# ---------------------------------------------------------------------------------------------
# KVCache.

def test_kv_cache_growth_and_views():
    B, Hc, D = 2, 3, 4
    cache = KVCache(B, Hc, D, capacity=2)
    ks, vs, ons, kpms = [], [], [], []
    for i, L in enumerate([1, 2, 1, 4, 3]):
        k, v = torch.randn(B, Hc, L, D), torch.randn(B, Hc, L, D)
        on = torch.randint(0, 100, (B, L))
        kpm = torch.rand(B, L) > 0.5 if i >= 2 else None  # mask only from the third append
        cache.append(k, v, onset=on, key_padding_mask=kpm)
        ks.append(k), vs.append(v), ons.append(on)
        kpms.append(torch.zeros(B, L, dtype=torch.bool) if kpm is None else kpm)
        assert len(cache) == sum(t.shape[2] for t in ks)
        assert cache.capacity >= len(cache)
        assert torch.equal(cache.k, torch.cat(ks, 2)) and torch.equal(cache.v, torch.cat(vs, 2))
        assert torch.equal(cache.onset, torch.cat(ons, 1))
        assert cache.pitch is None
        if i >= 2:
            assert torch.equal(cache.key_padding_mask, torch.cat(kpms, 1))
        else:
            assert cache.key_padding_mask is None
    assert cache.capacity == 16  # 2 -> 4 -> 8 -> 16: doubling
    cache.reset()
    assert len(cache) == 0 and cache.k.shape[2] == 0 and cache.onset is None
    one = torch.ones(B, Hc, 1, D)
    cache.append(one, one, pitch=torch.ones(B, 1, dtype=torch.long))
    assert cache.onset is None and torch.equal(cache.pitch, torch.ones(B, 1, dtype=torch.long))
    assert cache.k.shape == (B, Hc, 1, D) and cache.capacity == 16  # storage reused


def test_kv_cache_errors():
    cache = KVCache(2, 2, 4)
    k = torch.randn(2, 2, 1, 4)
    with pytest.raises(ValueError, match="k must be"):
        cache.append(torch.randn(2, 3, 1, 4), k)
    cache.append(k, k, onset=torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="onset"):
        cache.append(k, k)  # onset given before, missing now
    with pytest.raises(TypeError, match="dtype|holds"):
        cache.append(k.double(), k.double(), onset=torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"onset must be \[B, L\]"):
        cache.append(k, k, onset=torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="inference"):
        cache.append(k.requires_grad_(), k, onset=torch.zeros(2, 1, dtype=torch.long))
    m = make_module("CirRelAttn-H")
    x, onset, pitch = make_inputs()
    with pytest.raises(RuntimeError, match="no_grad"):
        m(x[:, :1], onset[:, :1], pitch[:, :1], kv_cache=m.new_kv_cache(2))
    with torch.no_grad(), pytest.raises(ValueError, match="kv_cache"):
        m(x[:, :1], onset[:, :1], pitch[:, :1], kv_cache=m.new_kv_cache(3))


def test_new_kv_cache_defaults():
    m = make_module("CirRelAttn-H")
    cache = m.new_kv_cache(2)
    assert cache.capacity == m.max_len and len(cache) == 0 and cache.k is None
    x, onset, pitch = make_inputs()
    with torch.inference_mode():
        m(x, onset, pitch, kv_cache=cache)
    assert cache.k.dtype == x.dtype and cache.k.shape == (2, H, 10, E // H)


# ---------------------------------------------------------------------------------------------
# torch.compile.

@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_smoke(backend):
    """aot_eager traces forward and backward graphs; inductor also works but its CPU codegen
    takes ~30 s here, too slow for a unit test."""
    m = make_module("CirRelAttn-H", backend=backend)
    x, onset, pitch = make_inputs(B=1, L=5)
    eager = m(x, onset, pitch)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager")
    out = compiled(x, onset, pitch)
    assert_close(out, eager)
    out.sum().backward()  # gradients flow through the compiled graph
    assert m.bar_table.grad is not None and torch.isfinite(m.bar_table.grad).all()
