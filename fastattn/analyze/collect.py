"""Activation collection into sharded on-disk stores (SPEC §6).

Layout of a collection directory::

    meta.json                 model, layers, positions, context, normalisation, shard plan, fingerprint
    contexts.safetensors      tokens [n, C] (statistics vocabulary) and extras [n, C] of every context
    vocab.json                token strings of the statistics vocabulary
    embeddings.safetensors    ids [V'] and their input embeddings [V', d] (tokens that occur)
    layer_LL/shard_SSSSS.safetensors   per shard: activations [rows, d] float32 and per-row
                              tokens, positions, contexts, x_<extra> (int64 [rows])

Each layer directory holds shards only, so ``open_store(dir/layer_LL)`` and ``fastattn sae train
--data dir/layer_LL`` read it directly. Rows are ordered by (context, position); the BOS
position 0 is never stored. Shard s covers contexts [s·P, (s + 1)·P) (P = contexts per shard);
every file is written atomically, so an interrupted run resumes at the first shard missing from
any layer, after checking that meta.json describes the same collection.

Normalisation (optional, named choice): every row scaled to L2 norm √d, the TopKSAE convention.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from fastattn.analyze.hooks import capture_residual, check_layers, run_captured
from fastattn.analyze.subjects import Contexts

META = "meta.json"
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


def _save_atomic(tensors: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _write_side_files(out: Path, subject, ctx: Contexts) -> None:
    _save_atomic(
        {"tokens": ctx.tokens, **{f"x_{k}": v for k, v in ctx.extras.items()}}, out / "contexts.safetensors"
    )
    ids = torch.unique(ctx.tokens[:, 1:])
    _save_atomic({"ids": ids, "embeddings": subject.embeddings(ids)}, out / "embeddings.safetensors")
    (out / "vocab.json").write_text(json.dumps(subject.vocab(), ensure_ascii=False))


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
    meta_path = out / META
    if not meta_path.exists():
        resume = False  # shards without metadata cannot be checked against this collection: rewrite
    if resume:
        old = json.loads(meta_path.read_text())
        diff = sorted(k for k in meta if old.get(k) != meta[k])
        if diff:
            raise ValueError(
                f"{out}: an existing collection differs in {diff}; use another directory "
                "or resume=False (--fresh) to overwrite"
            )
    out.mkdir(parents=True, exist_ok=True)
    for L in layers:
        layer_dir(out, L).mkdir(exist_ok=True)
        if not resume:
            for f in layer_dir(out, L).glob("shard_*.safetensors"):
                f.unlink()
    meta_path.write_text(json.dumps({**meta, "complete": False}, indent=1))
    _write_side_files(out, subject, ctx)

    def done(s: int) -> bool:
        return all((layer_dir(out, L) / f"shard_{s:05d}.safetensors").exists() for L in layers)

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
            _save_atomic({"activations": x, **rows}, layer_dir(out, L) / f"shard_{s:05d}.safetensors")
    if bar is not None:
        bar.close()
    meta["complete"] = True
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


class Collection:
    """Read access to a collection directory written by :func:`collect`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / META).exists():
            raise FileNotFoundError(
                f"{self.root}: no {META} (not a collection written by `fastattn analyze collect`)"
            )
        self.meta = json.loads((self.root / META).read_text())
        if not self.meta.get("complete"):
            raise ValueError(f"{self.root}: collection incomplete; run collect again to resume it")

    def check_layer(self, layer: int) -> Path:
        if layer not in self.meta["layers"]:
            raise ValueError(f"layer {layer} not collected in {self.root} (layers {self.meta['layers']})")
        return layer_dir(self.root, layer)

    def rows(self, layer: int) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        """(activations [r, d] float32, per-row dict: tokens, positions, contexts, x_<extra>) per
        shard, in storage order (contexts, then positions, increasing)."""
        from safetensors.torch import load_file

        d = self.check_layer(layer)
        for s in range(self.meta["n_shards"]):
            t = load_file(str(d / f"shard_{s:05d}.safetensors"))
            yield t.pop("activations").float(), t

    def store(self, layer: int):
        from fastattn.sae.stores import open_store

        return open_store(self.check_layer(layer))

    def contexts(self) -> dict[str, Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.root / "contexts.safetensors"))

    def vocab(self) -> list[str]:
        return json.loads((self.root / "vocab.json").read_text())

    def embeddings(self) -> tuple[Tensor, Tensor]:
        """(ids [V'], embeddings [V', d]) of the tokens that occur in the contexts."""
        from safetensors.torch import load_file

        t = load_file(str(self.root / "embeddings.safetensors"))
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
