#!/usr/bin/env python
"""SAELens round trips, both ways, against the installed sae-lens package.

    python bench/saelens_roundtrip.py [--out bench/results/saelens_roundtrip]

For every case of fastattn.sae.saelens_check: the file written by SAELens (or by us), loaded by
SAELens' ``SAE.load_from_disk`` and by fastattn's ``load_saelens``; both forwards on 512 rows with
elements ~ N(1, 7²). Reports max |x̂_ours − x̂_SAELens|, that error relative to max |x̂|, and the
fraction of rows with the identical set of active latents. The "before" columns load the same
files with ``load_saelens`` as of commit 85301e4 (read from git), the state the issue describes.
Writes OUT.json and OUT.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from fastattn.sae import saelens_check as C  # noqa: E402

BEFORE = "85301e4"


def _old_loader():
    """``load_saelens`` from commit BEFORE (None when git or the commit is unavailable)."""
    try:
        src = subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE}:fastattn/sae/saelens.py"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    mod = types.ModuleType("saelens_before")
    exec(compile(src, f"{BEFORE}:fastattn/sae/saelens.py", "exec"), mod.__dict__)
    return mod.load_saelens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "bench/results/saelens_roundtrip"))
    args = p.parse_args(argv)
    import sae_lens
    from sae_lens import SAE

    old = _old_loader()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i, name in enumerate(C.FROM_SAELENS):
            d = tmp / f"from{i}"
            row = {"direction": "SAELens -> fastattn", "case": name, **C.from_saelens(name, d, seed=i)}
            if old is not None:
                try:
                    with C._quiet():
                        theirs = SAE.load_from_disk(str(d))
                    x = C.inputs(seed=i + 100)
                    tx = x.reshape(x.shape[0], 4, C.D_IN // 4) if "hook_z" in name else None
                    b = C.compare(old(d), theirs, x, tx)
                    row["before_max_abs_err"], row["before_same_active_rate"] = b["max_abs_err"], b["same_active_rate"]
                except Exception as e:  # the old loader raised
                    row["before_error"] = f"{type(e).__name__}: {e}".replace(f"{d}: ", "")
            rows.append(row)
        rows.append({"direction": "SAELens -> fastattn", "case": "TopKSAE expected_average_only_in "
                     "(norm_scaling_factor=0.37; SAELens folds the same factor)", **C.expected_average(tmp / "ea")})
        for i, name in enumerate(C.TO_SAELENS):
            rows.append({"direction": "fastattn -> SAELens", "case": name,
                         **C.to_saelens(name, tmp / f"to{i}", seed=i)})
        for i, (name, (write, field)) in enumerate(C.REJECTED.items()):
            d = tmp / f"rej{i}"
            with C._quiet():
                write(d, i)
            try:
                C.load_saelens(d)
                msg = "NOT REJECTED"
            except ValueError as e:
                msg = str(e).replace(str(d) + ": ", "")
            rows.append({"direction": "rejected", "case": name, "field": field, "error": msg,
                         "names_field": field in msg})
    meta = {"sae_lens": sae_lens.__version__, "torch": torch.__version__, "d_in": C.D_IN, "d_sae": C.D_SAE,
            "k": C.K, "rows": C.ROWS, "input": "1 + 7·N(0, 1)", "before": BEFORE}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"SAELens round trips (sae-lens {meta['sae_lens']}, d_in={C.D_IN}, d_sae={C.D_SAE}, k={C.K}, "
             f"{C.ROWS} rows ~ {meta['input']}); command: `python bench/saelens_roundtrip.py`", "",
             "| direction | case | max abs err | rel err | identical active latents | before "
             f"({BEFORE}): max abs err / identical |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["direction"] == "rejected":
            continue
        before = r.get("before_error") or (f"{r['before_max_abs_err']:.3g} / {r['before_same_active_rate']:.1%}"
                                           if "before_max_abs_err" in r else "")
        lines.append(f"| {r['direction']} | {r['case']} | {r['max_abs_err']:.2g} | {r['rel_err']:.1e} | "
                     f"{r['same_active_rate']:.1%} | {before} |")
    lines += ["", "| rejected file | error (names the field) |", "|---|---|"]
    lines += [f"| {r['case']} | `{r['error']}` |" for r in rows if r["direction"] == "rejected"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
