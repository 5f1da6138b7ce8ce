"""The command line: `fastattn info` and a small `fastattn demo`."""
import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "fastattn", *args], capture_output=True, text=True,
                          timeout=300)


def test_info_lists_backends():
    r = _run("info")
    assert r.returncode == 0, r.stderr
    assert "circular_relative_attention backends:" in r.stdout
    assert "reference cpu  float32  yes" in r.stdout


def test_demo_small():
    r = _run("demo", "--L", "48", "--B", "1")
    assert r.returncode == 0, r.stderr
    for name in ("Attn", "RelAttn", "RIPO", "CirRelAttn", "CirRelAttn-H"):
        assert f"\n{name} " in r.stdout
    assert "KV-cache decoding" in r.stdout


def test_import_needs_only_torch_and_numpy():
    code = ("import sys, torch; before = set(sys.modules); import fastattn; "
            "heavy = {'symusic', 'matplotlib', 'safetensors', 'triton', 'tqdm', 'transformers'}; "
            "print(sorted(heavy & (set(sys.modules) - before)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
