"""The cpp attention paths added for speed: the decoding op, the cached decoding path of the module
and KV cache, the assembled-table cache (correct under every kind of table update), the
data-dependent table shrinking, thread-count determinism, odd head dims, and non-finite inputs."""
from __future__ import annotations

import copy
import math
import sys

import pytest
import torch

import fastattn
from fastattn import _ext
from fastattn.nn import CircularRelativeAttention, KVCache
from fastattn.ops import _cra_terms
from fastattn.ops.circular_relative_attention import cached_decode
from helpers import _TERM_DEFAULTS, TOL, assemble, assert_close, grad_names, make_problem, run

pytestmark = pytest.mark.skipif(not _ext.has_backend("cpp"), reason=f"cpp backend not built: {_ext.extension_error()}")


def decode_op(q, k, v, asm, alpha, scale, causal, kpm, coords=None):
    return torch.ops.fastattn.circular_relative_attention_decode(
        q, k, v, asm.table.transpose(1, 2).contiguous(), asm.coords if coords is None else coords, asm.terms,
        alpha, scale, causal, kpm)


# ------------------------------------------------------------------------- the decoding op

@pytest.mark.parametrize("terms", ["all", "direct", "fields", "index", "none"])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_op_matches_training_op(terms, per_head, dtype):
    """Few queries against many keys (causal or not, with a padding mask): the decoding op gives
    the training kernel's forward."""
    for i, (Lq, Lk, causal) in enumerate([(1, 1, True), (1, 700, True), (3, 40, False), (16, 129, True)]):
        q, k, v, onset, pitch, kw, _ = make_problem(B=2, H=3, Lq=Lq, Lk=Lk, D=16 if dtype == torch.float64 else 32,
                                                    terms=terms, per_head=per_head, dtype=dtype, grad=False, seed=i)
        asm = assemble(q, Lk, onset, pitch, kw)
        kpm = (torch.rand(2, Lk, generator=torch.Generator().manual_seed(i)) < 0.2) if Lk > 3 else None
        want, _ = torch.ops.fastattn.circular_relative_attention(q, k, v, asm.table, asm.coords, asm.terms, 0.7, 0.3,
                                                                 causal, kpm, 0.0, 0)
        got = decode_op(q, k, v, asm, 0.7, 0.3, causal, kpm)
        assert_close(f"Lq={Lq} Lk={Lk}", got, want, TOL[dtype][0] * 10)


@pytest.mark.parametrize("Lq", [1, 2])
def test_decode_op_strided_views_and_threads(Lq):
    """Coordinates, mask, k and v as views of larger buffers (a KV cache's storage) need no
    copy; splitting the keys over threads gives the one-thread result to rounding. The range
    check of the coordinates reads the view, not the buffer's unused (out-of-range) tail.
    (Lq = 1: one query per (batch, head) split over the threads' key chunks.)"""
    q, k, v, onset, pitch, kw, _ = make_problem(B=1, H=2, Lq=Lq, Lk=3000, D=32, terms="all", grad=False)
    asm = assemble(q, 3000, onset, pitch, kw)
    cap = 3100
    cbuf = torch.full((1, asm.coords.shape[1], cap), 2**31 - 1, dtype=torch.int32)
    cbuf[:, :, :3000] = asm.coords
    mbuf = torch.ones(1, cap, dtype=torch.bool)
    mbuf[:, :3000] = torch.rand(1, 3000) < 0.1
    kbuf, vbuf = torch.randn(1, 2, cap, 32), torch.randn(1, 2, cap, 32)
    kbuf[:, :, :3000], vbuf[:, :, :3000] = k, v
    want, _ = torch.ops.fastattn.circular_relative_attention(q, k, v, asm.table, asm.coords, asm.terms, 1.0, 0.2,
                                                             True, mbuf[:, :3000].contiguous(), 0.0, 0)
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            got = decode_op(q, kbuf[:, :, :3000], vbuf[:, :, :3000], asm, 1.0, 0.2, True, mbuf[:, :3000],
                            coords=cbuf[:, :, :3000])
            assert_close(f"{threads} threads", got, want, 2e-5)
    finally:
        torch.set_num_threads(before)
    cbuf[0, -1, 2999] = 2**30 + 1
    with pytest.raises(RuntimeError, match="coords values"):
        decode_op(q, kbuf[:, :, :3000], vbuf[:, :, :3000], asm, 1.0, 0.2, True, None, coords=cbuf[:, :, :3000])


def test_decode_op_rejects_bad_layouts():
    q, k, v, onset, pitch, kw, _ = make_problem(Lq=1, Lk=9, terms="all", grad=False)
    asm = assemble(q, 9, onset, pitch, kw)
    with pytest.raises(RuntimeError, match="coords"):
        decode_op(q, k, v, asm, 1.0, 0.2, True, None, coords=asm.coords.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(RuntimeError, match="table_t"):
        torch.ops.fastattn.circular_relative_attention_decode(q, k, v, asm.table.transpose(1, 2), asm.coords,
                                                              asm.terms, 1.0, 0.2, True, None)
    with pytest.raises(RuntimeError, match="terms"):
        torch.ops.fastattn.circular_relative_attention_decode(q, k, v, asm.table.transpose(1, 2).contiguous(),
                                                              asm.coords, [9] * 9, 1.0, 0.2, True, None)


def test_coordinate_channels_op():
    """The per-token channel op: floor division, modulo then step, missing values, range errors."""
    onset = torch.tensor([[0, 47, 48, 100, -1]])
    pitch = torch.tensor([[60, 59, -1, 127, 0]], dtype=torch.int32)
    spec = [0, 1, 48, 1, 0, 2, 48, 6, 1, 0, 1, 2]  # onset // 48, (onset % 48) // 6, pitch // 2
    got = torch.ops.fastattn.coordinate_channels([onset, pitch], spec, 1, 5, [-1, -1], [2**30, 127], ["onset", "pitch"])
    assert got.dtype == torch.int32 and got.tolist() == [[[0, 0, 1, 2, -1], [0, 7, 0, 0, -1], [30, 29, -1, 63, 0]]]
    with pytest.raises(ValueError, match="pitch has values above 127"):
        torch.ops.fastattn.coordinate_channels([onset, pitch + 1], spec, 1, 5, [-1, -1], [2**30, 127], ["onset", "pitch"])
    with pytest.raises(ValueError, match="onset has values below -1"):
        torch.ops.fastattn.coordinate_channels([onset - 1, pitch], spec, 1, 5, [-1, -1], [2**30, 127], ["onset", "pitch"])



def test_decode_op_reused_scores_buffer_has_no_stale_values():
    """The q·E buffer is kept between calls and only its unwritten columns are zeroed: a call
    with many finite scores, then one whose keys miss coordinates (they read the zero column)
    and whose index rows start elsewhere, still equals the training op."""
    for i, (Lk, terms) in enumerate([(900, "all"), (40, "all"), (900, "direct"), (7, "fields"), (129, "all")]):
        q, k, v, onset, pitch, kw, _ = make_problem(B=2, H=2, Lq=1, Lk=Lk, D=32, terms=terms, grad=False, seed=10 + i)
        q = q * 50  # large q·E products left behind for the next call
        if i % 2:
            onset[:, ::3], pitch[:, 1::4] = -1, -1
        asm = assemble(q, Lk, onset, pitch, kw)
        want, _ = torch.ops.fastattn.circular_relative_attention(q, k, v, asm.table, asm.coords, asm.terms, 1.0, 0.02,
                                                                 True, None, 0.0, 0)
        assert_close(f"call {i}", decode_op(q, k, v, asm, 1.0, 0.02, True, None), want, 2e-5)


def test_kv_storage_op():
    """KV-cache storage: zeroed, 2 MiB aligned from 2 MiB on (huge pages), plain below; argument
    errors raise; a KV cache grown past 2 MiB keeps its tokens."""
    big = torch.ops.fastattn.kv_storage([1, 2, 8200, 32], torch.float32)
    assert big.shape == (1, 2, 8200, 32) and big.dtype == torch.float32 and big.is_contiguous()
    assert (big.data_ptr() % (2 << 20) == 0 or sys.platform != "linux") and not big.any()
    big.fill_(3.0)
    assert big.sum().item() == 3.0 * big.numel()
    small = torch.ops.fastattn.kv_storage([3, 0, 5], torch.float64)
    assert small.shape == (3, 0, 5) and small.dtype == torch.float64
    for size, dtype, match in [([2, -1], torch.float32, "sizes must be >= 0"), ([4], torch.int32, "floating"),
                               ([2**40, 2**40], torch.float32, "too large")]:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.fastattn.kv_storage(size, dtype)
    cache = KVCache(1, 2, 32, capacity=4000)
    k, v = torch.randn(1, 2, 9000, 32), torch.randn(1, 2, 9000, 32)
    with torch.no_grad():
        cache.append(k[:, :, :3000], v[:, :, :3000])
        cache.append(k[:, :, 3000:], v[:, :, 3000:])  # 4000 -> 9000 tokens: 2.3 MB buffers
    assert cache.capacity == 9000 and (cache._k.data_ptr() % (2 << 20) == 0 or sys.platform != "linux")
    assert torch.equal(cache.k, k) and torch.equal(cache.v, v)


# ------------------------------------------------------------------- the cached decoding path

def _module(**kw):
    torch.manual_seed(0)
    return CircularRelativeAttention.from_variant("CirRelAttn-H", 32, 4, max_len=16, bar_res=12, n_bar=4,
                                                  backend="cpp", **kw).eval()


def _notes(L, seed=0):
    g = torch.Generator().manual_seed(seed)
    onset = torch.cumsum(torch.randint(0, 7, (2, L), generator=g), 1)
    pitch = torch.randint(20, 100, (2, L), generator=g)
    onset[0, min(3, L - 1)], pitch[1, min(5, L - 1)] = -1, -1
    return torch.randn(2, L, 32, generator=g), onset, pitch


def _decode(m, x, onset, pitch, cache=None):
    cache = cache or m.new_kv_cache(2, capacity=3)
    with torch.no_grad():
        return torch.cat([m(x[:, i:i + 1], onset[:, i:i + 1], pitch[:, i:i + 1], kv_cache=cache)
                          for i in range(x.shape[1])], 1), cache


@pytest.mark.parametrize("convention", ["slides", "authors"])
def test_module_decoding_uses_the_cached_path(monkeypatch, convention):
    """Step by step decoding takes one decoding-op call per step and layer, converts each
    token's coordinates once, and equals the full pass; in both conventions (the authors' one
    reads bar/position fields and mirrors pitches)."""
    m = _module(convention=convention)
    x, onset, pitch = _notes(20)
    if convention == "authors":
        fields = dict(bar=torch.where(onset < 0, -1, onset // 12), position=torch.where(onset < 0, -1, onset % 12),
                      pitch=pitch)
    else:
        fields = dict(onset=onset, pitch=pitch)

    def run(lo, hi, cache=None):
        return m(x[:, lo:hi], kv_cache=cache, **{n: t[:, lo:hi] for n, t in fields.items()})

    calls = {"decode": 0, "channels": 0}
    real_decode, real_channels = cached_decode.__globals__["decode_op"], _cra_terms.token_channels

    def count_decode(*a, **k):
        calls["decode"] += 1
        return real_decode(*a, **k)

    def count_channels(lay, coords, B, n, *a, **k):
        calls["channels"] += n
        return real_channels(lay, coords, B, n, *a, **k)

    monkeypatch.setitem(cached_decode.__globals__, "decode_op", count_decode)
    monkeypatch.setattr(_cra_terms, "token_channels", count_channels)
    cache = m.new_kv_cache(2, capacity=3)
    with torch.no_grad():
        got = torch.cat([run(i, i + 1, cache) for i in range(20)], 1)
    assert calls == {"decode": 20, "channels": 20}
    with torch.no_grad():
        assert_close("decode", got, run(0, 20), 1e-5)
    cache.truncate(12)  # drop 8 tokens and decode them again: their channels are rebuilt
    calls["channels"] = 0
    with torch.no_grad():
        again = torch.cat([run(i, i + 1, cache) for i in range(12, 20)], 1)
    assert_close("after truncate", again, got[:, 12:], 1e-6)
    assert calls["channels"] == 8


def test_decoding_checks_new_coordinates():
    m = _module()
    x, onset, pitch = _notes(4)
    cache = m.new_kv_cache(2)
    with torch.no_grad():
        m(x[:, :2], onset[:, :2], pitch[:, :2], kv_cache=cache)
        with pytest.raises(ValueError, match="pitch has values above 127"):
            m(x[:, 2:3], onset[:, 2:3], pitch[:, 2:3] + 200, kv_cache=cache)


@pytest.mark.parametrize("update", ["data", "no_grad", "optimizer", "load_state_dict", "data_assign"])
def test_table_cache_follows_every_update(update):
    """Decoding reuses the assembled (and linear-mapped) tables while the parameters hold the same
    values; every way of changing them is noticed, including writes through .data, which leave
    the version counter alone (error 2.9 of the hardening review)."""
    m = _module()
    x, onset, pitch = _notes(10)
    before, _ = _decode(m, x, onset, pitch)
    other = _module()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    if update == "data":
        m.bar_table.data.mul_(1.5)
        m.table_maps["rel_index_table"].weight.data.add_(0.1)
    elif update == "data_assign":
        m.pitch_class_table.data = m.pitch_class_table.data * 3.0
    elif update == "no_grad":
        with torch.no_grad():
            m.octave_table.mul_(-1.0)
    elif update == "optimizer":
        opt = torch.optim.Adam(m.parameters(), lr=0.1)
        m.train()
        m(x, onset, pitch).square().sum().backward()
        opt.step()
        m.eval()
    else:
        m.load_state_dict(other.state_dict())
    after, _ = _decode(m, x, onset, pitch)
    with torch.no_grad():
        want = m(x, onset, pitch)  # the public op without caching of the decoding path
        ref = copy.deepcopy(m).to(torch.float64)
        ref.backend = "reference"
        want64 = ref(x.double(), onset, pitch).float()
    assert not torch.allclose(after, before, atol=1e-4)
    assert_close(f"after {update}", after, want, 1e-5)
    assert_close(f"after {update} vs reference", after, want64, 1e-4)


def test_op_level_table_cache():
    """The public op without gradients reuses the assembled table while the tables hold the same
    bytes (identity and version are not trusted), and never caches tables that need gradients."""
    q, k, v, onset, pitch, kw, _ = make_problem(Lq=3, Lk=9, terms="all", grad=False)
    _cra_terms._TABLE_CACHE.clear()
    f = lambda: fastattn.circular_relative_attention(q, k, v, onset, pitch, backend="cpp", **kw)  # noqa: E731
    ref = lambda: fastattn.circular_relative_attention(q, k, v, onset, pitch, backend="reference", **kw)  # noqa: E731
    with torch.no_grad():
        a = f()
        entry = _cra_terms._TABLE_CACHE[-1]
        assert torch.equal(f(), a) and _cra_terms._TABLE_CACHE[-1] is entry and len(_cra_terms._TABLE_CACHE) == 1
        kw["bar_table"].data.mul_(2.0)  # no version bump
        assert_close("after .data write", f(), ref(), 1e-5)
        with torch.inference_mode():
            made = {n: (t * 1.0 if n == "pos_table" else t) for n, t in kw.items()}
            assert torch.equal(fastattn.circular_relative_attention(q, k, v, onset, pitch, backend="cpp", **made), f())
    kw["bar_table"].requires_grad_(True)
    n = len(_cra_terms._TABLE_CACHE)
    f().sum().backward()
    assert len(_cra_terms._TABLE_CACHE) == n and kw["bar_table"].grad is not None
    for D, dtype in ((16, torch.float64), (8, torch.float64), (8, torch.float32)):  # no table: keyed on D, dtype
        no_tables = make_problem(Lq=2, Lk=5, D=D, terms="none", grad=False, dtype=dtype)
        with torch.no_grad():
            got = fastattn.circular_relative_attention(*no_tables[:5], backend="cpp")
        assert got.dtype == dtype and got.shape[-1] == D


def test_kv_cache_derived_channels():
    """KVCache.derived converts each token once, grows with the cache, and forgets on reset."""
    cache = KVCache(1, 1, 2, capacity=2)
    seen = []

    def fn(coords, n):
        seen.append(n)
        return (coords["onset"] * 10).to(torch.int32).unsqueeze(1)

    with torch.no_grad():
        for t in range(5):
            cache.append(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), onset=torch.tensor([[t]]))
            got = cache.derived("x", fn)
    assert got.tolist() == [[[0, 10, 20, 30, 40]]] and seen == [1, 1, 1, 1, 1] and cache.capacity >= 5
    cache.reset()
    with torch.no_grad():
        cache.append(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), onset=torch.tensor([[7, 8]]))
    assert cache.derived("x", fn).tolist() == [[[70, 80]]] and seen[-1] == 2
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(3)


# ------------------------------------------------------------------------- training kernel

@pytest.mark.parametrize("time_mode", ["quotient", "fields"])
def test_shrunk_tables_are_exact(time_mode):
    """Onsets on a 6-tick grid and a narrow pitch range: the cpp path keeps only the rows the
    coordinates reach, with the same outputs and gradients as the reference."""
    terms = "all" if time_mode == "quotient" else "fields"
    q, k, v, onset, pitch, kw, leaves = make_problem(B=2, H=2, Lq=70, Lk=70, D=16, terms=terms, dtype=torch.float64)
    onset.copy_(torch.where(onset < 0, onset, onset // 6 * 6))
    pitch.clamp_(40, 80)
    if time_mode == "fields":
        kw["bar"].copy_(torch.where(onset < 0, -1, onset // 48))
        kw["position"].copy_(torch.where(onset < 0, -1, onset % 48))
    full = {**kw, "time_mode": time_mode}
    big = assemble(q, 70, onset, pitch, kw, time_mode=time_mode)
    small = _cra_terms.assemble(q, 70, onset, pitch, {**_TERM_DEFAULTS, **kw}, "hadamard", time_mode, shrink=True)
    assert small.table.shape[1] < big.table.shape[1] - 200
    kw.pop("time_mode", None)
    out_r, g_r = run("reference", q, k, v, onset, pitch, full, leaves)
    out_c, g_c = run("cpp", q, k, v, onset, pitch, full, leaves)
    assert_close("out", out_c, out_r, 1e-10)
    for name, a, b in zip(grad_names(full), g_c, g_r):
        assert_close(name, a, b, 1e-9)


@pytest.mark.parametrize("D", [1, 7, 40])
def test_odd_head_dims(D):
    """Register-block edges of the GEMM loops: head dims that are not multiples of the vector width."""
    prob = make_problem(B=1, H=2, Lq=70, Lk=75, D=D, terms="all", dtype=torch.float64, kpm=True)
    out_r, g_r = run("reference", *prob)
    out_c, g_c = run("cpp", *prob)
    assert_close("out", out_c, out_r, 1e-10)
    for name, a, b in zip(grad_names(prob[5]), g_c, g_r):
        assert_close(name, a, b, 1e-9)


def test_gradients_deterministic_per_thread_count():
    """Work is split into chunks fixed by the problem and the thread count: repeated runs with
    the same count are bit-identical, and every count matches the reference."""
    prob = make_problem(B=1, H=3, Lq=200, Lk=200, terms="all", kpm=True)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out1, g1 = run("cpp", *prob)
            out2, g2 = run("cpp", *prob)
            assert torch.equal(out1, out2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    finally:
        torch.set_num_threads(before)
    out_r, g_r = run("reference", *prob)
    for name, a, b in zip(["out"] + grad_names(prob[5]), [out1] + g1, [out_r] + g_r):
        assert_close(name, a, b, 1e-4)


# ------------------------------------------------------------------------ non-finite values

def _hostile(case, L=9):
    q, k, v, onset, pitch, kw, leaves = make_problem(B=2, H=2, Lq=L, Lk=L, D=16, terms="all")
    with torch.no_grad():
        if case == "nan_q":
            q[0, 1, 4, 3] = math.nan
        elif case == "overflow":
            q[1, 0, 2].fill_(1e20)
            k[1, 0].fill_(1e20)
        elif case == "nan_table":
            kw["pos_table"][0, 0] = math.nan  # row of Δt mod bar_res = 0 (read by every diagonal pair)
        elif case == "nan_index_row":
            kw["rel_index_table"][2, 1] = math.nan
    return q, k, v, onset, pitch, kw, leaves


@pytest.mark.parametrize("case", ["nan_q", "overflow", "nan_table", "nan_index_row"])
def test_non_finite_inputs_propagate(case):
    """NaN in q, logits that overflow, a NaN table row: the output has NaN exactly where the
    reference has, and every gradient that is NaN in the reference holds NaN too (divergence
    is never turned into zeros)."""
    prob = _hostile(case)
    out_r, g_r = run("reference", *prob)
    out_c, g_c = run("cpp", *prob)
    assert out_r.isnan().any()
    assert torch.equal(out_c.isnan(), out_r.isnan()), case
    assert_close("finite outputs", out_c.nan_to_num(0.0), out_r.nan_to_num(0.0), 1e-5)
    for name, a, b in zip(grad_names(prob[5]), g_c, g_r):
        assert bool(a.isnan().any()) == bool(b.isnan().any()), f"{case}: {name}"
    with torch.no_grad():  # the decoding op: the same output rows
        q, k, v, onset, pitch, kw, _ = prob
        last = fastattn.circular_relative_attention(q[:, :, -1:], k, v, onset, pitch, backend="cpp", **kw)
        assert torch.equal(last.isnan(), out_r[:, :, -1:].isnan())


def test_huge_logits_stay_finite_where_the_reference_is():
    """Logits near 1e21 in rows that do not overflow: the backward's probabilities come from the
    saved log-sum-exp, a few ulps off at that size, and must not overflow into NaN gradients."""
    prob = _hostile("overflow", L=300)
    out_r, g_r = run("reference", *prob)
    out_c, g_c = run("cpp", *prob)
    assert torch.equal(out_c.isnan(), out_r.isnan())
    for name, a, b in zip(grad_names(prob[5]), g_c, g_r):
        if name != "dv":  # the reference's NaN probability row also reaches keys after the causal edge
            assert torch.equal(a.isnan(), b.isnan()), name
