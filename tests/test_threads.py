"""--threads auto: the governor's arithmetic on scripted CPU readings, /proc/stat parsing on a
hand-written file, a real busy core seen through /proc/stat, and the trainers' wiring."""
import os
import subprocess
import sys
import time

import pytest
import torch

from fastattn._threads import ThreadGovernor, read_cpu_ticks, resolve_threads, thread_policy, valid_threads


class Script:
    """Scripted readings: each tick advances the wall clock by ``dt`` and the machine's busy and
    our own CPU seconds by what the test says."""

    def __init__(self):
        self.t = self.busy = self.own = 0.0
        self.set_calls = []

    def advance(self, dt, ours, others):
        self.t += dt
        self.own += ours * dt
        self.busy += (ours + others) * dt

    def governor(self, max_threads=2, cpus=(0, 1), interval_s=0.25):
        return ThreadGovernor(max_threads, interval_s, cpus=cpus, reader=lambda c: self.busy,
                              own=lambda: self.own, clock=lambda: self.t, set_threads=self.set_calls.append)


def test_governor_drops_to_the_free_cores_and_comes_back():
    s = Script()
    g = s.governor()
    assert g.enabled and g.threads == 2 and s.set_calls == [2]
    # Idle machine, we use both cores: stay at 2.
    s.advance(0.3, ours=2.0, others=0.0)
    assert g.tick() == 2
    # A competitor gets 2/3 of a core beside our two threads: 2 - 0.67 + 0.35 -> 1 thread.
    s.advance(0.3, ours=1.33, others=0.67)
    assert g.tick() == 1 and g.others == pytest.approx(0.67) and s.set_calls == [2, 1]
    # At 1 thread the competitor has its whole core: 2 - 1 -> still 1.
    s.advance(0.3, ours=1.0, others=1.0)
    assert g.tick() == 1
    # It leaves: back to 2.
    s.advance(0.3, ours=1.0, others=0.0)
    assert g.tick() == 2 and g.changes == 2 and s.set_calls == [2, 1, 2]


def test_governor_ignores_background_noise_and_waits_for_its_interval():
    s = Script()
    g = s.governor()
    s.advance(0.3, ours=2.0, others=0.3)   # 2 - 0.3 + 0.35 = 2.05 -> 2
    assert g.tick() == 2
    s.advance(0.1, ours=0.0, others=2.0)   # too soon after the last reading: not looked at
    assert g.tick() == 2 and g.changes == 0
    s.advance(0.2, ours=0.0, others=2.0)   # now 0.3 s of which 2/3 fully busy: 2 - 1.33 -> 1
    assert g.tick() == 1


def test_governor_respects_its_cap_and_its_floor():
    s = Script()
    g = s.governor(max_threads=1)
    s.advance(1.0, ours=0.0, others=0.0)
    assert g.tick() == 1
    s = Script()
    g = s.governor(max_threads=4, cpus=(0, 1, 2, 3))
    s.advance(1.0, ours=0.0, others=4.0)   # every core busy: never below 1
    assert g.tick() == 1
    s.advance(1.0, ours=1.0, others=2.0)   # 4 - 2 + 0.35 -> 2
    assert g.tick() == 2
    # Our CPU time can run ahead of /proc/stat's ticks: others is clamped at 0, not negative.
    s.own += 5.0
    s.advance(1.0, ours=2.0, others=0.0)
    assert g.tick() == 4 and g.others == 0.0


def test_governor_without_proc_stat_does_nothing():
    calls = []
    g = ThreadGovernor(2, cpus=(0, 1), reader=lambda c: None, set_threads=calls.append)
    assert not g.enabled and g.tick() == 2 and calls == []


def test_read_cpu_ticks_hand_computed(tmp_path):
    f = tmp_path / "stat"
    f.write_text("cpu  9 9 9 9 9 9 9 9 9 9\n"
                 "cpu0 100 5 20 1000 7 1 2 3 50 0\n"      # busy = 100+5+20+1+2+3 = 131
                 "cpu1 40 0 10 900 100 0 0 0 0 0\n"       # busy = 50
                 "cpu2 999 0 0 0 0 0 0 0 0 0\n"
                 "intr 1 2 3\n")
    hz = os.sysconf("SC_CLK_TCK")
    assert read_cpu_ticks([0, 1], str(f)) == pytest.approx(181 / hz)
    assert read_cpu_ticks([1], str(f)) == pytest.approx(50 / hz)
    assert read_cpu_ticks([0], str(tmp_path / "missing")) is None


@pytest.mark.skipif(not os.path.exists("/proc/stat") or not hasattr(os, "sched_setaffinity"),
                    reason="needs Linux /proc/stat and CPU affinity")
def test_a_real_busy_core_is_seen():
    cpu = max(os.sched_getaffinity(0))
    spinner = subprocess.Popen([sys.executable, "-c",
                                f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])
    try:
        time.sleep(0.3)  # let it start spinning
        g = ThreadGovernor(1, interval_s=0.05, cpus=[cpu], set_threads=lambda n: None)
        time.sleep(0.6)
        g.tick()
        assert g.others > 0.6  # one process spinning on the core we watch
    finally:
        spinner.kill()
        spinner.wait()


@pytest.mark.parametrize("value, expected", [(None, (None, False)), (3, (3, False)), ("2", (2, False)),
                                             ("auto", (None, True)), (" AUTO:3 ", (3, True))])
def test_resolve_threads(value, expected):
    assert resolve_threads(value) == expected


@pytest.mark.parametrize("bad", [0, -1, "0", "auto:0", "auto:", "two", "1.5", True, 2.0])
def test_bad_thread_settings_are_refused(bad):
    assert not valid_threads(bad)


def test_thread_policy_restores_torchs_count():
    before = torch.get_num_threads()
    with thread_policy(1) as gov:
        assert gov is None and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with thread_policy("auto:1") as gov:
        assert gov.max_threads == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with thread_policy(None) as gov:
        assert gov is None and torch.get_num_threads() == before


def test_trainers_refuse_bad_threads_and_accept_auto():
    from fastattn.music.train import TrainConfig as MusicConfig
    from fastattn.music.train import check_config as music_check
    from fastattn.sae.train import TrainConfig as SAEConfig
    from fastattn.sae.train import check_config as sae_check
    for cfg, check in ((MusicConfig, music_check), (SAEConfig, sae_check)):
        check(cfg(threads="auto"))
        with pytest.raises(ValueError, match="threads"):
            check(cfg(threads=0))


def test_music_training_with_auto_threads_logs_them_and_resumes_at_a_fixed_count(tmp_path):
    from fastattn._io import read_jsonl
    from fastattn.music.model import ModelConfig
    from fastattn.music.synthetic import SyntheticConfig, synthetic_corpus
    from fastattn.music.train import TrainConfig, train

    corpus = synthetic_corpus(SyntheticConfig(n_songs=10, n_bars=17))
    mc = ModelConfig(n_layer=1, d_model=16, n_head=2, d_ff=32, dropout=0.0, max_len=384)
    base = dict(batch_size=2, eval_every=2, eval_windows=2, log_every=1, out_dir=str(tmp_path), progress=False)
    before = torch.get_num_threads()
    r = train(mc, TrainConfig(max_steps=2, threads="auto", **base), corpus)
    assert r.step == 2 and torch.get_num_threads() == before
    logged = [rec["threads"] for rec in read_jsonl(tmp_path / "log.jsonl") if "train_loss" in rec]
    assert len(logged) == 2 and all(1 <= t <= before for t in logged)
    # How many threads a run uses may change on resume (it is where it runs, not what it computes).
    r = train(mc, TrainConfig(max_steps=3, threads=1, **base), corpus)
    assert r.step == 3 and torch.get_num_threads() == before


def test_sae_training_ticks_the_governor_once_per_step(tmp_path, monkeypatch):
    from fastattn.sae.stores import TensorStore
    from fastattn.sae.train import TrainConfig, train

    ticks = []
    real = ThreadGovernor.tick
    monkeypatch.setattr(ThreadGovernor, "tick", lambda self: ticks.append(1) or real(self))
    before = torch.get_num_threads()
    x = torch.randn(300, 8)
    train(TrainConfig(model="topk", n_latents=16, k=2, max_steps=3, batch_size=100, progress=False,
                      threads="auto", out_dir=str(tmp_path)), TensorStore(x), resume=False)
    assert len(ticks) == 3 and torch.get_num_threads() == before
