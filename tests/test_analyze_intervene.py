"""Interventions: a zero direction changes nothing; known directions change logits as expected."""

import pytest
import torch
from analyze_helpers import LAYERS, D, tiny_contexts, tiny_music, tiny_subject

from fastattn.analyze.hooks import add_to_residual, capture_residual, run_captured
from fastattn.analyze.intervene import feature_direction, intervene, perplexity
from fastattn.analyze.subjects import HFSubject

pytest.importorskip("transformers")


def test_zero_direction_changes_nothing():
    subject, ctx = tiny_subject(), tiny_contexts(200, 12)
    ids = ctx.inputs[:4]
    with torch.no_grad():
        ref = subject.model(input_ids=ids).logits
        with add_to_residual(subject.model, 1, torch.zeros(D)):
            out = subject.model(input_ids=ids).logits
    assert torch.equal(ref, out)
    r = intervene(subject, ctx, 1, torch.zeros(D), [0.0, 1.0, 5.0])
    assert all(x["ppl"] == r["base"]["ppl"] and x["delta_nll"] == 0.0 for x in r["results"])
    assert r["reference_norm"] > 0


def test_layer0_direction_equals_shifted_embeddings():
    """Adding v at layer 0 (positions ≥ 1) is the same as adding v to the token embeddings there."""
    subject, ctx = tiny_subject(), tiny_contexts(200, 12)
    ids = ctx.inputs[:3]
    v = torch.randn(D, generator=torch.Generator().manual_seed(1))
    m = subject.model
    with torch.no_grad():
        emb = m.transformer.wte(ids)
        emb[:, 1:] += v
        expected = m(inputs_embeds=emb).logits
        with add_to_residual(m, 0, v):
            got = m(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[:, 0], m(input_ids=ids).logits[:, 0].detach())  # BOS position untouched


def test_last_layer_direction_goes_through_final_norm_and_head():
    subject, ctx = tiny_subject(), tiny_contexts(200, 12)
    ids = ctx.inputs[:3]
    m = subject.model
    v = 3.0 * torch.randn(D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with capture_residual(m, [LAYERS], stop_after=False) as hs:
            run_captured(lambda: m(input_ids=ids))
        h = hs[LAYERS].clone()
        h[:, 1:] += v
        expected = m.lm_head(m.transformer.ln_f(h))
        with add_to_residual(m, LAYERS, v):
            got = m(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    r = intervene(subject, ctx, LAYERS, v, [4.0])
    assert r["results"][0]["delta_nll"] != 0.0


def test_perplexity_matches_cross_entropy():
    subject, ctx = tiny_subject(), tiny_contexts(200, 12)
    with torch.no_grad():
        logits = subject.model(input_ids=ctx.inputs).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ctx.inputs[:, 1:].flatten())
    r = perplexity(subject, ctx, batch_size=3)
    assert r["tokens"] == ctx.inputs[:, 1:].numel()
    assert abs(r["nll"] - float(ce)) < 1e-5


def test_feature_directions_and_bad_inputs():
    from fastattn.sae.modules import BinaryAutoencoder, TopKSAE

    torch.manual_seed(0)
    topk, bae = TopKSAE(D, 32, 4), BinaryAutoencoder(D, 24)
    assert torch.equal(feature_direction(topk, 5), topk.W_dec[5].detach())
    assert torch.equal(feature_direction(bae, 7), bae.decoder.weight[:, 7].detach())
    with pytest.raises(ValueError, match="feature must be in"):
        feature_direction(bae, 24)
    subject, ctx = tiny_subject(), tiny_contexts(200, 12)
    with pytest.raises(ValueError, match="direction must be"):
        intervene(subject, ctx, 1, torch.ones(D + 1), [1.0])
    with pytest.raises(ValueError, match="NaN"):
        intervene(subject, ctx, 1, torch.full((D,), float("nan")), [1.0])
    encoder = HFSubject(subject.model.transformer, name="encoder-only", causal=False)
    with pytest.raises(ValueError, match="language-model head"):
        perplexity(encoder, ctx)


def test_music_intervention():
    subject, corpus = tiny_music()
    ctx = subject.contexts(corpus, "train", 24, max_contexts=4)
    r = intervene(subject, ctx, 1, torch.zeros(16), [0.0, 2.0])
    assert r["results"][1]["ppl"] == r["base"]["ppl"]
    v = torch.randn(16, generator=torch.Generator().manual_seed(0))
    r = intervene(subject, ctx, 1, v, [0.0, 2.0])
    assert r["results"][0]["delta_nll"] == 0.0 and r["results"][1]["delta_nll"] != 0.0


def test_cli_collect_and_intervene_from_a_saved_model(tmp_path):
    """`analyze collect --hf DIR` and `analyze intervene --hf DIR` on a saved tiny GPT-2 with a
    word-level tokenizer (everything offline)."""
    import json

    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    from fastattn.analyze.cli import main
    from fastattn.sae.stores import open_store
    from fastattn.sae.train import TrainConfig, train

    words = ["<bos>", "<unk>"] + [f"w{i}" for i in range(95)]
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    model_dir = tmp_path / "model"
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>").save_pretrained(
        model_dir
    )
    tiny_subject().model.save_pretrained(model_dir)
    g = torch.Generator().manual_seed(0)
    text = tmp_path / "text.txt"
    text.write_text(
        "\n".join(" ".join(f"w{int(i)}" for i in torch.randint(0, 95, (20,), generator=g)) for _ in range(30))
    )
    coll = tmp_path / "coll"
    assert (
        main(
            [
                "collect",
                "--hf",
                str(model_dir),
                "--text",
                str(text),
                "--context",
                "16",
                "--layers",
                "1",
                "--out",
                str(coll),
                "--no-progress",
            ]
        )
        == 0
    )
    meta = json.loads((coll / "meta.json").read_text())
    assert meta["n_contexts"] == 600 // 15 and meta["subject"] == "hf" and meta["layers"] == [1]
    vocab = json.loads((coll / "vocab.json").read_text())
    assert vocab[:3] == ["<bos>", "<unk>", "w0"]
    train(
        TrainConfig(
            model="topk",
            n_latents=32,
            k=4,
            max_steps=3,
            batch_size=64,
            out_dir=str(tmp_path / "sae"),
            progress=False,
        ),
        open_store(coll / "layer_01"),
        resume=False,
    )
    out = tmp_path / "iv"
    assert (
        main(
            [
                "intervene",
                "--hf",
                str(model_dir),
                "--text",
                str(text),
                "--context",
                "16",
                "--layer",
                "1",
                "--checkpoint",
                str(tmp_path / "sae" / "checkpoint.pt"),
                "--features",
                "0,5",
                "--scales",
                "0,1",
                "--random",
                "1",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    res = json.loads((out / "intervene.json").read_text())
    assert set(res["features"]) == {"feature 0", "feature 5"} and len(res["random"]) == 1
    for r in res["features"].values():
        assert r["results"][0]["delta_nll"] == 0.0 and r["results"][1]["delta_nll"] != 0.0
    assert (out / "intervene.png").exists()
