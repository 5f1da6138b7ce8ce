"""Every count, size, probability and weight of `fastattn music | sae | analyze` is checked when
the command line is parsed: a bad value is one error line naming the option, exit code 2, and
nothing runs (no traceback, no file)."""
from __future__ import annotations

import pytest

from fastattn.cli import main

M, S, A = ["music"], ["sae"], ["analyze"]
BAD = [
    (M + ["train", "--eval-every", "0"], "--eval-every"),
    (M + ["train", "--batch-size", "0"], "--batch-size"),
    (M + ["train", "--steps", "-5"], "--steps"),
    (M + ["train", "--steps", "1e3"], "--steps"),
    (M + ["train", "--layers", "0"], "--layers"),
    (M + ["train", "--heads", "-1"], "--heads"),
    (M + ["train", "--dropout", "1"], "--dropout"),
    (M + ["train", "--lr", "nan"], "--lr"),
    (M + ["train", "--lr", "0"], "--lr"),
    (M + ["train", "--alpha", "inf"], "--alpha"),
    (M + ["train", "--max-shift", "200"], "--max-shift"),
    (M + ["train", "--seed", "-1"], "--seed"),
    (M + ["train", "--songs", "-2"], "--songs"),
    (M + ["train", "--patience", "-1"], "--patience"),
    (M + ["train", "--warmup", "-1"], "--warmup"),
    (M + ["train", "--log-every", "0"], "--log-every"),
    (M + ["train", "--threads", "0"], "--threads"),
    (M + ["train", "--threads", "auto:0"], "--threads"),
    (M + ["generate", "--checkpoint", "x", "--top-p", "0"], "--top-p"),
    (M + ["generate", "--checkpoint", "x", "--top-p", "1.5"], "--top-p"),
    (M + ["generate", "--checkpoint", "x", "--temperature", "-1"], "--temperature"),
    (M + ["generate", "--checkpoint", "x", "--top-k", "-3"], "--top-k"),
    (M + ["generate", "--checkpoint", "x", "--split", "validation"], "--split"),
    (M + ["generate", "--checkpoint", "x", "--n", "0"], "--n"),
    (M + ["generate", "--checkpoint", "x", "--bars", "17"], "--bars"),
    (M + ["evaluate", "--checkpoint", "x", "--split", "dev"], "--split"),
    (M + ["evaluate", "--checkpoint", "x", "--next-bar-windows", "-1"], "--next-bar-windows"),
    (M + ["demo", "--steps", "0"], "--steps"),
    (S + ["train", "--data", "x", "--epochs", "-1"], "--epochs"),
    (S + ["train", "--data", "x", "--latents", "0"], "--latents"),
    (S + ["train", "--data", "x", "--k", "0"], "--k"),
    (S + ["train", "--data", "x", "--threads", "many"], "--threads"),
    (S + ["train", "--data", "x", "--batch-size", "0"], "--batch-size"),
    (S + ["train", "--data", "x", "--alpha-entropy", "nan"], "--alpha-entropy"),
    (S + ["train", "--data", "x", "--alpha-cov", "-1e-3"], "--alpha-cov"),
    (S + ["train", "--data", "x", "--aux-coef", "inf"], "--aux-coef"),
    (S + ["train", "--data", "x", "--lr", "-1"], "--lr"),
    (S + ["train", "--data", "x", "--max-steps", "0"], "--max-steps"),
    (S + ["train", "--data", "x", "--log-every", "0"], "--log-every"),
    (S + ["train", "--data", "x", "--checkpoint-every", "0"], "--checkpoint-every"),
    (S + ["train", "--data", "x", "--dead-tokens", "0"], "--dead-tokens"),
    (S + ["train", "--data", "x", "--backend", "gpu"], "--backend"),
    (S + ["entropy-bench", "--rank", "0"], "--rank"),
    (S + ["stats", "--checkpoint", "x", "--data", "y", "--dense-frequency", "0"], "--dense-frequency"),
    (A + ["collect", "--hf", "minilm", "--out", "o", "--context", "1"], "--context"),
    (A + ["collect", "--hf", "minilm", "--out", "o", "--stride", "0"], "--stride"),
    (A + ["collect", "--hf", "minilm", "--out", "o", "--layers", "1,-2"], "--layers"),
    (A + ["collect", "--hf", "minilm", "--out", "o", "--positions", "0,4"], "--positions"),
    (A + ["collect", "--hf", "minilm", "--out", "o", "--contexts-per-shard", "0"], "--contexts-per-shard"),
    (A + ["collect", "--music", "m.pt", "--out", "o", "--split", "dev"], "--split"),
    (A + ["stats", "--collection", "c", "--layer", "-1", "--checkpoint", "x"], "--layer"),
    (A + ["stats", "--collection", "c", "--layer", "1", "--checkpoint", "x", "--threshold", "1.2"],
     "--threshold"),
    (A + ["entropy-dynamics", "--collection", "c", "--epochs", "0"], "--epochs"),
    (A + ["entropy-dynamics", "--collection", "c", "--alpha", "nan"], "--alpha"),
    (A + ["intervene", "--hf", "minilm", "--layer", "1", "--checkpoint", "x", "--features", "1",
          "--scales", "0,nan", "--out", "o"], "--scales"),
    (A + ["comsem", "--collection", "c", "--layer", "1", "--checkpoint", "x", "--out", "o",
          "--examples", "0"], "--examples"),
    (A + ["comsem", "--collection", "c", "--layer", "1", "--checkpoint", "x", "--out", "o",
          "--timeout", "0"], "--timeout"),
    (["demo", "--L", "0"], "--L"),
]


@pytest.mark.parametrize("argv,option", BAD, ids=[" ".join(a[:2] + a[-2:]) for a, _ in BAD])
def test_bad_value_is_a_one_line_usage_error(argv, option, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert f"error: argument {option}" in last, err
    assert not list(tmp_path.iterdir())  # nothing ran


@pytest.mark.parametrize("argv,message", [
    (M + ["train", "--dim", "30", "--heads", "4"], "--dim 30 is not divisible by --heads 4"),
    (M + ["generate", "--checkpoint", "x", "--prompt-bars", "8", "--bars", "4"], "--prompt-bars 8 must be below"),
    (M + ["demo", "--variants", "Attn,Fast"], "--variants: unknown ['Fast']"),
    (S + ["train", "--data", "x", "--latents", "16", "--k", "32"], "--k 32 exceeds --latents 16"),
])
def test_bad_combination_is_a_one_line_error(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"fastattn: error: {err.split('error: ', 1)[1].strip()}"]
    assert message in err and not list(tmp_path.iterdir())


def test_user_errors_are_one_line_with_exit_1(tmp_path, capsys):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    assert main(["music", "evaluate", "--checkpoint", str(tmp_path / "last.pt")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"{tmp_path / 'last.pt'}: unreadable checkpoint" in err
