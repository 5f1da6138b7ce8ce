"""BAE entropy dynamics on a tiny collection: one BAE per (layer, position), JSON and PNG."""

import pytest
import torch
from analyze_helpers import tiny_contexts, tiny_subject

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    from fastattn.analyze.collect import Collection, collect

    root = tmp_path_factory.mktemp("pos")
    collect(tiny_subject(), tiny_contexts(1200, 9, stride=2), root, [0, 2], "pow2", progress=False)
    return Collection(root)


def test_entropy_dynamics(collection, tmp_path):
    from fastattn.analyze.entropy_dynamics import entropy_dynamics, plot_entropy

    assert collection.meta["positions"] == [1, 2, 4, 8]
    res = entropy_dynamics(
        collection, tmp_path, positions=[1, 8], d_hidden=16, epochs=2, batch_size=64, progress=False
    )
    assert set(res["entropy_bits"]) == {"0", "2"} and set(res["entropy_bits"]["2"]) == {"1", "8"}
    n = collection.meta["n_contexts"]
    assert res["samples"] == n
    for L in ("0", "2"):
        for p in ("1", "8"):
            # Σ_j h2(p_j) of 16 latents lies in [0, 16] bits
            assert 0 <= res["entropy_bits"][L][p] <= 16
            assert res["heldout_fvu"][L][p] >= 0
    assert (tmp_path / "L00_p0001" / "checkpoint.pt").exists()
    plot_entropy(res, tmp_path / "e.png")
    assert (tmp_path / "e.png").stat().st_size > 0


def test_entropy_dynamics_bad_inputs(collection, tmp_path):
    from fastattn.analyze.collect import Collection, collect, select_position
    from fastattn.analyze.entropy_dynamics import entropy_dynamics

    with pytest.raises(ValueError, match="position 3 not collected"):
        select_position(collection, 0, 3)
    small = tmp_path / "small"
    collect(tiny_subject(), tiny_contexts(40, 9), small, [1], "pow2", progress=False)
    with pytest.raises(ValueError, match="collect more contexts"):
        entropy_dynamics(Collection(small), tmp_path / "e", epochs=1, progress=False)
    assert torch.is_tensor(select_position(collection, 2, 4))
