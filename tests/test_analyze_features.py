"""Feature statistics on hand-made codes: spans, group rates, monosemanticity; then end to end."""

import itertools
import json
import math

import pytest
import torch
from analyze_helpers import D, tiny_contexts, tiny_subject

from fastattn.analyze.features import FeatureAccumulator, group_assignment, token_clusters
from fastattn.analyze.stats import script_of


def _rows():
    """2 contexts × positions 1…5, 3 features, tokens 0…4 cycling."""
    ctx = torch.tensor([0] * 5 + [1] * 5)
    pos = torch.tensor([1, 2, 3, 4, 5] * 2)
    fires = torch.zeros(10, 3, dtype=torch.bool)
    fires[[0, 1, 2, 5, 6], 0] = True  # runs: ctx0 pos1-3, ctx1 pos1-2 → 5 firings, 2 runs
    fires[[0, 2, 4, 9], 1] = True  # four runs of length 1
    fires[[4, 5], 2] = True  # ctx0 pos5 then ctx1 pos1: not contiguous → 2 runs
    return fires, ctx, pos, torch.arange(10) % 5


@pytest.mark.parametrize("cuts", [[], [1], [3, 5], [5, 6, 7]])
def test_span_lengths_across_batches(cuts):
    fires, ctx, pos, tok = _rows()
    acc = FeatureAccumulator(3, 5)
    edges = [0, *cuts, 10]
    for a, b in itertools.pairwise(edges):
        acc.add(fires[a:b], ctx[a:b], pos[a:b], tok[a:b])
    st = acc.result()
    assert st.counts.tolist() == [5, 4, 2]
    assert st.runs.tolist() == [2, 4, 2]
    assert st.mean_span().tolist() == [2.5, 1.0, 1.0]
    assert st.tokens == 10


def test_dead_feature_has_nan_span_and_r():
    acc = FeatureAccumulator(2, 3)
    acc.add(torch.tensor([[True, False]]), torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    st = acc.result()
    assert math.isnan(st.mean_span()[1])
    r, _, _ = st.monosemanticity(torch.arange(3))
    assert r[0] == 1 and math.isnan(r[1])


def test_group_rates_and_threshold():
    n_rows = 10
    fires = torch.zeros(n_rows, 4, dtype=torch.bool)
    groups = torch.tensor([0] * 9 + [1])  # nine "ja" rows, one "en" row
    fires[:, 0] = True  # 9/10 ja → ja at 90 %
    fires[1:, 1] = True  # 8/9 ja = 0.89 → mixed
    fires[9, 2] = True  # only en → en
    acc = FeatureAccumulator(4, 1, {"script": 2})
    acc.add(
        fires,
        torch.zeros(n_rows, dtype=torch.long),
        torch.arange(1, n_rows + 1),
        torch.zeros(n_rows, dtype=torch.long),
        {"script": groups},
    )
    st = acc.result()
    assert st.group_counts["script"].tolist() == [[9, 1], [8, 1], [0, 1], [0, 0]]
    assert st.group_rows["script"].tolist() == [9, 1]
    ga = group_assignment(st.group_counts["script"], ("ja", "en"), 0.9)
    assert ga["labels"] == ["ja", "mixed", "en", "unlabelled"]
    assert ga["counts"] == {"ja": 1, "en": 1, "mixed": 1, "unlabelled": 1}
    # unlabelled rows (−1) do not count
    acc2 = FeatureAccumulator(1, 1, {"script": 2})
    acc2.add(
        torch.ones(3, 1, dtype=torch.bool),
        torch.zeros(3, dtype=torch.long),
        torch.arange(1, 4),
        torch.zeros(3, dtype=torch.long),
        {"script": torch.tensor([-1, -1, 1])},
    )
    assert acc2.result().group_counts["script"].tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="threshold"):
        group_assignment(st.group_counts["script"], ("ja", "en"), 0.4)
    with pytest.raises(ValueError, match="schemes"):
        acc2.add(
            torch.ones(1, 1, dtype=torch.bool),
            torch.zeros(1, dtype=torch.long),
            torch.ones(1, dtype=torch.long),
            torch.zeros(1, dtype=torch.long),
        )


def test_monosemanticity_known_values():
    # tokens 0 and 1 share a direction, 2 and 3 are orthogonal to them and to each other
    emb = torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    clusters = token_clusters(emb, 0.5)
    assert clusters.tolist() == [0, 0, 1, 2]
    tokens = torch.tensor([0, 1, 0, 2, 2, 0, 1, 2, 2, 3])
    fires = torch.zeros(10, 5, dtype=torch.bool)
    fires[[0, 1], 0] = True  # tokens 0, 1 (same cluster): H_tok 1, H_sem 0 → R = 1
    fires[[2, 3], 1] = True  # tokens 0, 2 (different clusters): R = 0
    fires[[3, 4], 2] = True  # token 2 only: H_tok = 0 → R = 1
    fires[[5, 6, 7, 8], 3] = True  # tokens 0, 1, 2, 2: H_tok 1.5, H_sem 1 → R = 1/3
    acc = FeatureAccumulator(5, 4)
    acc.add(fires[:4], torch.zeros(4, dtype=torch.long), torch.arange(1, 5), tokens[:4])
    acc.add(fires[4:], torch.zeros(6, dtype=torch.long), torch.arange(5, 11), tokens[4:])
    r, h_tok, h_sem = acc.result().monosemanticity(clusters)
    torch.testing.assert_close(h_tok[:4], torch.tensor([1.0, 1.0, 0.0, 1.5], dtype=torch.float64))
    torch.testing.assert_close(h_sem[:4], torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(r[:4], torch.tensor([1.0, 0.0, 1.0, 1 / 3], dtype=torch.float64))
    assert math.isnan(r[4])


def test_token_clusters_threshold_and_bad_input():
    emb = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])  # cos(0,1) = 0.8, cos(1,2) = 0.6
    assert token_clusters(emb, 0.9).tolist() == [0, 1, 2]
    assert token_clusters(emb, 0.7).tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="cosine"):
        token_clusters(emb, 2.0)


def test_accumulator_bad_inputs():
    acc = FeatureAccumulator(3, 5)
    z = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="fires"):
        acc.add(torch.zeros(2, 4, dtype=torch.bool), z, z, z)
    with pytest.raises(ValueError, match="token ids"):
        acc.add(torch.zeros(2, 3, dtype=torch.bool), z, z, z + 7)
    with pytest.raises(ValueError, match="positions"):
        acc.add(torch.zeros(2, 3, dtype=torch.bool), z, z[:1], z)


def test_script_of():
    assert [
        script_of(t) for t in ["猫", "##ッ", "か", "cat", "##ing", "[UNK]", "[CLS]", ".", "12", "<s>"]
    ] == [0, 0, 0, 1, 1, -1, -1, -1, -1, -1]


def test_stats_cli_end_to_end(tmp_path):
    """Collect from the tiny GPT-2, train a TopK SAE and a BAE for a few steps, run `analyze stats`."""
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    from fastattn.analyze.cli import main
    from fastattn.analyze.collect import Collection, collect
    from fastattn.sae.train import TrainConfig, train

    coll_dir = tmp_path / "coll"
    collect(tiny_subject(), tiny_contexts(600, 16), coll_dir, [1], "all", progress=False)
    store = Collection(coll_dir).store(1)
    for cfg in (
        TrainConfig(
            model="topk",
            n_latents=32,
            k=4,
            max_steps=5,
            batch_size=64,
            dead_tokens=10**9,
            out_dir=str(tmp_path / "topk"),
            progress=False,
        ),
        TrainConfig(
            model="bae",
            n_latents=32,
            max_steps=5,
            batch_size=64,
            out_dir=str(tmp_path / "bae"),
            progress=False,
        ),
    ):
        train(cfg, store, resume=False)
    out = tmp_path / "stats"
    assert (
        main(
            [
                "stats",
                "--collection",
                str(coll_dir),
                "--layer",
                "1",
                "--checkpoint",
                f"topk={tmp_path / 'topk' / 'checkpoint.pt'}",
                "--checkpoint",
                str(tmp_path / "bae" / "checkpoint.pt"),
                "--groups",
                "",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    res = json.loads((out / "stats.json").read_text())
    assert set(res["models"]) == {"topk", "bae"}
    rows = len(store)
    topk = res["models"]["topk"]
    assert topk["tokens"] == rows and topk["latents"] == 32
    assert topk["l0"] <= 4 + 1e-9  # at most k latents per token
    assert 0 <= topk["monosemanticity"]["mean"] <= 1
    assert topk["mean_span"]["mean"] >= 1
    for png in res["png"]:
        assert (out / png.split("/")[-1]).exists()
    with pytest.raises(ValueError, match="layer 2 not collected"):
        main(
            [
                "stats",
                "--collection",
                str(coll_dir),
                "--layer",
                "2",
                "--checkpoint",
                str(tmp_path / "bae" / "checkpoint.pt"),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
    with pytest.raises(ValueError, match="unknown group scheme"):
        main(
            [
                "stats",
                "--collection",
                str(coll_dir),
                "--layer",
                "1",
                "--checkpoint",
                str(tmp_path / "bae" / "checkpoint.pt"),
                "--groups",
                "colour",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
    assert D == store.d
