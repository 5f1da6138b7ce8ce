"""Real SIGINTs at random times during `fastattn music train` and `fastattn sae train` run as
subprocesses, each resumed and compared bit for bit with an uninterrupted run (the CI-sized
version of bench/sigint_resume.py: 2 interrupts per trainer on its tiniest configuration)."""
from __future__ import annotations

import signal
import sys

import pytest
from helpers import load_bench

pytestmark = pytest.mark.skipif(sys.platform == "win32" or not hasattr(signal, "SIGINT"),
                                reason="POSIX signals")

bench = load_bench("sigint_resume")


@pytest.mark.parametrize("kind", ["music", "sae"])
def test_random_sigints_resume_bit_for_bit(tmp_path, kind):
    s = bench.run_bench([kind], 2, tmp_path, seed=1, music_steps=40, sae_epochs=4, sae_models=("topk",),
                        check_determinism=False, log=lambda *_: None)[kind]
    trials = [t for r in s["runs"] for t in r["trials"]]
    detail = [(t["delay_s"], t["step"], t["during"], t["differences"], t["tail"]) for t in trials]
    assert s["sigints"] == 2 and s["bit_identical"] == 2, detail
    assert all(t["rc"] in (130, -signal.SIGINT) and t["resume_rc"] == 0 for t in trials), detail
    assert s["tracebacks"] == 0, detail
