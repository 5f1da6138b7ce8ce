"""ComSem: what do a feature's top activations have in common, and does that hold on others?

For each feature (SPEC §6):
1. one pass over a collected layer keeps its 2·m strongest activations (TopK: activation value;
   BAE: pre-activation of a firing bit) with their (context, position), and m seeded random rows
   where it does not fire (negatives);
2. the strongest activations alternate between an explanation set (ranks 0, 2, 4, ...) and a
   held-out set (ranks 1, 3, 5, ...), so both have the same strength profile;
3. the judge sees the explanation set in context (the token marked «like this») and names their
   common meaning; then, per held-out excerpt, answers Yes/No to "does the marked token fit?".
Score = Yes rate on the held-out activations (answers that are neither Yes nor No are counted
as invalid and left out); the Yes rate on negatives is reported as the control.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fastattn.analyze.collect import Collection
from fastattn.analyze.judge import Judge, JudgeError, parse_yes_no
from fastattn.analyze.stats import encode_fires

EXPLAIN = (
    "Each excerpt below comes from the input of a neural network; the token marked «like this» "
    "strongly activates one feature of the network. What do the marked tokens have in common "
    "(their meaning, form or role in context)? Answer with one short phrase, at most 12 words.\n\n"
)
CHECK = (
    "A feature of a neural network responds to: {explanation}\n\nExcerpt: {excerpt}\n\n"
    "Does the marked token «…» fit that description? Answer Yes or No."
)


@torch.no_grad()
def top_examples(
    coll: Collection,
    layer: int,
    model,
    features: Sequence[int],
    per_feature: int,
    negatives: int,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """feature → {"top": [(strength, context, position)] strongest first (≤ per_feature),
    "negatives": [(context, position)] (≤ negatives)}."""
    feats = torch.tensor(list(features), dtype=torch.long)
    F_ = len(feats)
    best_v = torch.full((F_, per_feature), float("-inf"))
    best_c = torch.full((F_, per_feature), -1, dtype=torch.long)
    best_p = torch.full((F_, per_feature), -1, dtype=torch.long)
    total = coll.meta["rows_per_layer"]
    cand = set(
        np.random.default_rng(seed)
        .choice(total, size=min(total, 20 * negatives + 50), replace=False)
        .tolist()
    )
    neg = {int(f): [] for f in feats}
    offset = 0
    it = coll.rows(layer)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=coll.meta["n_shards"], desc=f"top activations L{layer}", unit="shard")
    for x, rows in it:
        fires, strength = encode_fires(model, x)
        if int(feats.max()) >= fires.shape[1]:
            raise ValueError(f"feature ids must be < {fires.shape[1]}, got {int(feats.max())}")
        s = torch.where(fires[:, feats], strength[:, feats], float("-inf")).t()  # [F, B]
        v = torch.cat([best_v, s], 1)
        c = torch.cat([best_c, rows["contexts"].expand(F_, -1)], 1)
        p = torch.cat([best_p, rows["positions"].expand(F_, -1)], 1)
        k = min(per_feature, v.shape[1])
        best_v, idx = v.topk(k, dim=1)
        best_c, best_p = c.gather(1, idx), p.gather(1, idx)
        for r in sorted(i - offset for i in cand if offset <= i < offset + x.shape[0]):
            for j, f in enumerate(feats.tolist()):
                if not fires[r, f] and len(neg[f]) < negatives:
                    neg[f].append((int(rows["contexts"][r]), int(rows["positions"][r])))
        offset += x.shape[0]
    out = {}
    for j, f in enumerate(feats.tolist()):
        ok = torch.isfinite(best_v[j])
        out[f] = {
            "top": [
                (float(v), int(c), int(p)) for v, c, p in zip(best_v[j][ok], best_c[j][ok], best_p[j][ok])
            ],
            "negatives": neg[f],
        }
    return out


def render(
    vocab: Sequence[str], tokens: torch.Tensor, context: int, position: int, before: int = 12, after: int = 4
) -> str:
    """The excerpt around ``position`` of a context with its token marked «like this». WordPiece
    "##" pieces join the previous token; in byte-level BPE vocabularies (GPT-2 "Ġ", SentencePiece
    "▁" marking a leading space) unmarked tokens join the previous one."""
    row = tokens[context]
    bpe = any(v[:1] in ("Ġ", "▁") for v in vocab[:5000])
    lo, hi = max(1, position - before), min(row.numel(), position + after + 1)
    out = ""
    for i in range(lo, hi):
        t = vocab[int(row[i])]
        if t.startswith("##"):
            glue, t = True, t[2:]
        elif t[:1] in ("Ġ", "▁"):
            glue, t = False, t[1:]
        else:
            glue = bpe
        if i == position:
            t = f"«{t}»"
        out += t if glue or not out else " " + t
    return ("… " if lo > 1 else "") + out + (" …" if hi < row.numel() else "")


def comsem(
    coll: Collection,
    layer: int,
    model,
    features: Sequence[int],
    judge: Judge,
    *,
    examples: int = 10,
    negatives: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """ComSem scores of ``features`` (see the module docstring); judge failures of one feature are
    recorded under "error" and the others go on."""
    if examples < 1 or negatives < 0:
        raise ValueError("examples must be ≥ 1 and negatives ≥ 0")
    ex = top_examples(coll, layer, model, features, 2 * examples, negatives, seed, progress)
    vocab, tokens = coll.vocab(), coll.contexts()["tokens"]
    results = []
    it = features
    if progress:
        from tqdm import tqdm

        it = tqdm(features, desc="comsem", unit="feature")
    for f in it:
        top = ex[f]["top"]
        rec = {"feature": int(f), "firings_seen": len(top)}
        if len(top) < 2:
            rec["error"] = "fewer than 2 activations in the collection"
            results.append(rec)
            continue
        shown = [render(vocab, tokens, c, p) for _, c, p in top[0::2]]
        held = [render(vocab, tokens, c, p) for _, c, p in top[1::2]]
        negs = [render(vocab, tokens, c, p) for c, p in ex[f]["negatives"]]
        try:
            prompt = EXPLAIN + "\n".join(f"{i + 1}. {s}" for i, s in enumerate(shown))
            explanation = judge.ask([{"role": "user", "content": prompt}])

            def check(excerpt: str):
                content = CHECK.format(explanation=explanation, excerpt=excerpt)
                return parse_yes_no(judge.ask([{"role": "user", "content": content}], max_tokens=4))

            ans_pos = [check(s) for s in held]
            ans_neg = [check(s) for s in negs]
        except JudgeError as exc:
            rec["error"] = str(exc)
            results.append(rec)
            continue
        valid_pos = [a for a in ans_pos if a is not None]
        valid_neg = [a for a in ans_neg if a is not None]
        rec.update(
            explanation=explanation,
            shown=shown,
            heldout=held,
            negatives=negs,
            answers_heldout=ans_pos,
            answers_negative=ans_neg,
            invalid=sum(a is None for a in ans_pos + ans_neg),
            score=sum(valid_pos) / len(valid_pos) if valid_pos else None,
            negative_yes_rate=sum(valid_neg) / len(valid_neg) if valid_neg else None,
        )
        results.append(rec)
    scored = [r["score"] for r in results if r.get("score") is not None]
    neg = [r["negative_yes_rate"] for r in results if r.get("negative_yes_rate") is not None]
    return {
        "layer": layer,
        "model": coll.meta["model"],
        "judge_model": judge.model,
        "features": len(results),
        "scored": len(scored),
        "errors": sum("error" in r for r in results),
        "mean_score": float(np.mean(scored)) if scored else None,
        "mean_negative_yes_rate": float(np.mean(neg)) if neg else None,
        "judge_calls": judge.calls,
        "results": results,
    }
