"""Activation collection into sharded on-disk stores (SPEC §6).

Layout of a collection directory::

    meta.json                 model, layers, positions, context, normalisation, shard plan, fingerprint
    contexts.safetensors      tokens [n, C] (statistics vocabulary) and extras [n, C] of every context
    vocab.json                token strings of the statistics vocabulary
    embeddings.safetensors    ids [V'] and their input embeddings [V', d] (tokens that occur)
    layer_LL/shard_SSSSS.safetensors   per shard: activations [rows, d] float32 and per-row
                              tokens, positions, contexts, x_<extra> (int64 [rows])

    manifest.jsonl            size and SHA-256 of every shard written so far (while collecting)

Each layer directory holds shards only, so ``open_store(dir/layer_LL)`` and ``fastattn sae train
--data dir/layer_LL`` read it directly. Rows are ordered by (context, position); the BOS
position 0 is never stored. Shard s covers contexts [s·P, (s + 1)·P) (P = contexts per shard).
Every file is written atomically and one process at a time writes a directory (lock file). An
interrupted run resumes, after checking that meta.json describes the same collection, by writing
every shard that the manifest does not list with its current size. A finished collection's
meta.json records each file's size and SHA-256: ``Collection`` refuses a file of the wrong size
when it opens and one with the wrong hash when it reads it, naming the file.

Normalisation (optional, named choice): every row scaled to L2 norm √d, the TopKSAE convention.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from fastattn import _io
from fastattn._training import ResumeMismatch
from fastattn.analyze.hooks import capture_residual, check_layers, run_captured
from fastattn.analyze.subjects import Contexts

META = "meta.json"
MANIFEST = "manifest.jsonl"
ROW_KEYS = ("tokens", "positions", "contexts")


def parse_positions(spec: str | Sequence[int], context: int) -> list[int]:
    """ "all" (1 … C − 1), "pow2" (1, 2, 4, … < C) or explicit positions, each in 1 … C − 1."""
    if isinstance(spec, str):
        if spec == "all":
            return list(range(1, context))
        if spec == "pow2":
            return [1 << i for i in range(context.bit_length()) if (1 << i) < context]
        spec = [int(p) for p in spec.split(",") if p.strip()]
    pos = sorted({int(p) for p in spec})
    if not pos or pos[0] < 1 or pos[-1] >= context:
        raise ValueError(f"positions must be in 1 … {context - 1} (0 is BOS, dropped), got {pos}")
    return pos


def layer_dir(root: str | Path, layer: int) -> Path:
    return Path(root) / f"layer_{layer:02d}"


def _fingerprint(ctx: Contexts) -> str:
    h = hashlib.sha256(ctx.inputs.contiguous().numpy().tobytes())
    h.update(str(tuple(ctx.inputs.shape)).encode())
    return h.hexdigest()[:16]


def _save_atomic(tensors: dict[str, Tensor], path: Path) -> dict:
    """Write a safetensors file atomically; returns its {"bytes", "sha256"} record."""
    from safetensors.torch import save

    data = save({k: v.contiguous() for k, v in tensors.items()})
    _io.atomic_write_bytes(path, data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _write_side_files(out: Path, subject, ctx: Contexts) -> dict:
    files = {}
    files["contexts.safetensors"] = _save_atomic(
        {"tokens": ctx.tokens, **{f"x_{k}": v for k, v in ctx.extras.items()}}, out / "contexts.safetensors"
    )
    ids = torch.unique(ctx.tokens[:, 1:])
    files["embeddings.safetensors"] = _save_atomic(
        {"ids": ids, "embeddings": subject.embeddings(ids)}, out / "embeddings.safetensors"
    )
    _io.atomic_write_text(out / "vocab.json", json.dumps(subject.vocab(), ensure_ascii=False))
    return files


def _shard_name(layer: int, s: int) -> str:
    return f"{layer_dir('', layer)}/shard_{s:05d}.safetensors"


def _check_shard(path: Path, rows: int, d: int) -> dict | None:
    """The {"bytes", "sha256"} record of a shard that loads with ``rows`` × ``d`` activations."""
    from safetensors.torch import load

    data = path.read_bytes()
    try:
        ok = tuple(load(data)["activations"].shape) == (rows, d)
    except Exception:
        ok = False
    if not ok:
        _io.notice(f"{path}: damaged or from another collection; writing it again")
        return None
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _read_meta(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise _io.CorruptFile(f"{path}: unreadable ({e})") from None


@torch.no_grad()
def collect(
    subject,
    ctx: Contexts,
    out_dir: str | Path,
    layers: Sequence[int],
    positions: str | Sequence[int] = "all",
    *,
    normalize: bool = False,
    batch_size: int = 16,
    contexts_per_shard: int = 256,
    resume: bool = True,
    progress: bool = True,
    source: str = "",
) -> dict:
    """Run ``subject`` over ``ctx`` and write the residual stream of ``layers`` at ``positions``
    (see the module docstring). Returns the metadata dict (also in ``out_dir/meta.json``)."""
    out = Path(out_dir)
    layers = check_layers(subject.model, layers)
    positions = parse_positions(positions, ctx.length)
    if subject.max_len and ctx.length > subject.max_len:
        raise ValueError(f"context {ctx.length} exceeds the model's {subject.max_len} positions")
    if batch_size < 1 or contexts_per_shard < 1:
        raise ValueError("batch_size and contexts_per_shard must be positive")
    n = len(ctx)
    n_shards = -(-n // contexts_per_shard)
    meta = {
        "format": 1,
        "model": subject.name,
        "subject": subject.source,
        "source": source,
        "layers": layers,
        "positions": positions,
        "context": ctx.length,
        "d": subject.d_model,
        "normalize": normalize,
        "normalization": "rows scaled to L2 norm sqrt(d)" if normalize else None,
        "bos_dropped": True,
        "n_contexts": n,
        "contexts_per_shard": contexts_per_shard,
        "n_shards": n_shards,
        "rows_per_layer": n * len(positions),
        "extras": sorted(ctx.extras),
        "fingerprint": _fingerprint(ctx),
    }
    with _io.DirLock(out):
        return _collect(subject, ctx, out, layers, positions, meta, resume, normalize, batch_size,
                        contexts_per_shard, progress)


def _collect(subject, ctx, out, layers, positions, meta, resume, normalize, batch_size,
             contexts_per_shard, progress) -> dict:
    meta_path, manifest_path = out / META, out / MANIFEST
    n, n_shards = meta["n_contexts"], meta["n_shards"]
    if not meta_path.exists():
        resume = False  # shards without metadata cannot be checked against this collection: rewrite
    if resume:
        try:
            old = _read_meta(meta_path)
        except _io.CorruptFile as e:
            _io.notice(f"{e}; rewriting the collection")
            old, resume = None, False
        if old is not None:
            diff = sorted(k for k in meta if old.get(k) != meta[k])
            if diff:
                raise ResumeMismatch(
                    f"{out}: an existing collection differs in {diff}; use another directory "
                    "or resume=False (--fresh) to overwrite"
                )
    # What is on disk and whole: recorded files (a finished run's meta.json, this run's
    # manifest) that have their recorded size, and unrecorded shards that load with the right
    # number of rows (collections of earlier versions).
    written = {}
    if resume:
        records = [{"file": k, **v} for k, v in (old or {}).get("files", {}).items()]
        for r in records + _io.read_jsonl(manifest_path, repair=True):
            f = out / r["file"]
            if f.exists() and f.stat().st_size == r["bytes"]:
                written[r["file"]] = {"bytes": r["bytes"], "sha256": r["sha256"]}
        for L in layers:
            for s in range(n_shards):
                name = _shard_name(L, s)
                if name not in written and (out / name).exists():
                    rows = (min(n, (s + 1) * contexts_per_shard) - s * contexts_per_shard) * len(positions)
                    rec = _check_shard(out / name, rows, meta["d"])
                    if rec is not None:
                        written[name] = rec
    out.mkdir(parents=True, exist_ok=True)
    _io.remove_stale_temps(out)
    for L in layers:
        layer_dir(out, L).mkdir(exist_ok=True)
        _io.remove_stale_temps(layer_dir(out, L))
        if not resume:
            for f in layer_dir(out, L).glob("shard_*.safetensors"):
                f.unlink()
    if not resume:
        manifest_path.unlink(missing_ok=True)
    _io.atomic_write_json(meta_path, {**meta, "complete": False}, indent=1)
    side = _write_side_files(out, subject, ctx)

    def done(s: int) -> bool:
        return all(_shard_name(L, s) in written for L in layers)

    todo = [s for s in range(n_shards) if not done(s)]
    pos_t = torch.tensor(positions)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=n,
            initial=n - sum(min(contexts_per_shard, n - s * contexts_per_shard) for s in todo),
            desc=f"collect {subject.name}",
            unit="ctx",
            dynamic_ncols=True,
        )
    for s in todo:
        lo, hi = s * contexts_per_shard, min(n, (s + 1) * contexts_per_shard)
        acts: dict[int, list[Tensor]] = {L: [] for L in layers}
        for b in range(lo, hi, batch_size):
            idx = slice(b, min(hi, b + batch_size))
            with capture_residual(subject.model, layers) as hs:
                run_captured(lambda idx=idx: subject.forward(ctx, idx))
            for L in layers:
                acts[L].append(hs[L][:, pos_t].float().reshape(-1, subject.d_model))
            if bar is not None:
                bar.update(idx.stop - idx.start)
        rows = {
            "tokens": ctx.tokens[lo:hi][:, pos_t].reshape(-1),
            "positions": pos_t.repeat(hi - lo),
            "contexts": torch.arange(lo, hi).repeat_interleave(len(positions)),
            **{f"x_{k}": v[lo:hi][:, pos_t].reshape(-1) for k, v in ctx.extras.items()},
        }
        for L in layers:
            x = torch.cat(acts[L])
            if normalize:
                x = x * (subject.d_model**0.5 / x.norm(dim=1, keepdim=True).clamp_min(1e-12))
            name = _shard_name(L, s)
            written[name] = _save_atomic({"activations": x, **rows}, out / name)
            _io.append_jsonl(manifest_path, {"file": name, **written[name]})
    if bar is not None:
        bar.close()
    files = {**side, **{_shard_name(L, s): written[_shard_name(L, s)] for L in layers for s in range(n_shards)}}
    meta = {**meta, "complete": True, "files": files}
    _io.atomic_write_json(meta_path, meta, indent=1)
    manifest_path.unlink(missing_ok=True)
    return meta


class Collection:
    """Read access to a collection directory written by :func:`collect`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._verified: dict[str, tuple] = {}
        if not (self.root / META).exists():
            raise FileNotFoundError(
                f"{self.root}: no {META} (not a collection written by `fastattn analyze collect`)"
            )
        self.meta = _read_meta(self.root / META)
        if not self.meta.get("complete"):
            raise ValueError(f"{self.root}: collection incomplete; run collect again to resume it")
        for name, rec in self.meta.get("files", {}).items():
            f = self.root / name
            size = f.stat().st_size if f.exists() else None
            if size != rec["bytes"]:
                got = "missing" if size is None else f"{size:,} bytes"
                raise _io.CorruptFile(
                    f"{f}: {got}, meta.json records {rec['bytes']:,} bytes (truncated or replaced); "
                    "run the same `fastattn analyze collect` command again to rewrite it"
                )

    def _load(self, name: str) -> dict[str, Tensor]:
        """A safetensors file of the collection, checked against meta.json's SHA-256."""
        from safetensors.torch import load

        f = self.root / name
        data = f.read_bytes()
        rec = self.meta.get("files", {}).get(name)
        # Analyses that sweep positions re-read every shard many times: hash a file once, and again
        # only when its size or modification time changed since it passed.
        st = f.stat()
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        if rec is not None and self._verified.get(name) != stamp:
            if hashlib.sha256(data).hexdigest() != rec["sha256"]:
                raise _io.CorruptFile(
                    f"{f}: contents differ from meta.json's SHA-256 (damaged or replaced); "
                    "run the same `fastattn analyze collect` command again to rewrite it"
                )
            self._verified[name] = stamp
        try:
            return load(data)
        except Exception as e:
            raise _io.CorruptFile(f"{f}: unreadable ({e})") from None

    def check_layer(self, layer: int) -> Path:
        if layer not in self.meta["layers"]:
            raise ValueError(f"layer {layer} not collected in {self.root} (layers {self.meta['layers']})")
        return layer_dir(self.root, layer)

    def rows(self, layer: int) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """(activations [r, d] float32, per-row dict: tokens, positions, contexts, x_<extra>) per
        shard, in storage order (contexts, then positions, increasing)."""
        self.check_layer(layer)
        for s in range(self.meta["n_shards"]):
            t = self._load(_shard_name(layer, s))
            yield t.pop("activations").float(), t

    def store(self, layer: int):
        from fastattn.sae.stores import open_store

        return open_store(self.check_layer(layer))

    def contexts(self) -> dict[str, Tensor]:
        return self._load("contexts.safetensors")

    def vocab(self) -> list[str]:
        return json.loads((self.root / "vocab.json").read_text())

    def embeddings(self) -> tuple[Tensor, Tensor]:
        """(ids [V'], embeddings [V', d]) of the tokens that occur in the contexts."""
        t = self._load("embeddings.safetensors")
        return t["ids"], t["embeddings"]


def select_position(coll: Collection, layer: int, position: int) -> Tensor:
    """Activations [n_contexts, d] of one token position at one layer."""
    if position not in coll.meta["positions"]:
        raise ValueError(f"position {position} not collected (positions {coll.meta['positions']})")
    parts = [x[rows["positions"] == position] for x, rows in coll.rows(layer)]
    return torch.cat(parts)


def texts_from_files(paths: Sequence[str | Path]) -> list[str]:
    """Non-empty lines of text files; a line "a<TAB>b" (a translation pair) gives two texts."""
    out: list[str] = []
    for p in paths:
        for line in Path(p).read_text(encoding="utf-8").splitlines():
            out += [part.strip() for part in line.split("\t") if part.strip() and not part.startswith("#")]
    if not out:
        raise ValueError(f"no text in {list(map(str, paths))}")
    return out


def bundled_corpus() -> Path:
    """The small English/Japanese corpus shipped with fastattn (translation pairs and
    code-switched sentences, written for these analyses)."""
    return Path(__file__).parent / "data" / "bilingual.txt"
