"""rsnl.pretrain: the stand-in VLM's recipe, its exact shortcuts, determinism, and how its tag loads.

The full stand-in (1,000 steps) is built once per test session by the `standin` fixture (conftest.py)
and checked in test_method.py; here short recipes run the same code.
"""

import dataclasses
import functools

import numpy as np
import pytest
import torch
from PIL import Image

from rsnl import pretrain
from rsnl.data import FASHION_MNIST_CLASSES, _find_fashion_mnist
from rsnl.models import ModelError, check_backbone, load_clip

needs_data = pytest.mark.skipif(
    _find_fashion_mnist(None) is None,
    reason="Fashion-MNIST not found: apt-get install dataset-fashion-mnist (.ci/run installs it)")
SHORT = dataclasses.replace(pretrain.Recipe(), steps=3, batch_size=32)


@functools.lru_cache(maxsize=1)
def simple_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer
    return SimpleTokenizer()  # reads its BPE merges: a second or so each time


def word_pieces(tokenizer, text: str) -> set[str]:
    """The tokenizer's pieces of `text` with 3+ letters (punctuation and 't' carry no class meaning)."""
    st = simple_tokenizer()
    return {p for p in (st.decoder[i].replace("</w>", "") for i in st.encode(text)) if len(p) >= 3}


@pytest.mark.parametrize("share", [0.0, 0.1])
def test_a_rare_name_occurs_only_in_its_share_of_captions(tiny_clip, share):
    """The recipe's premise: outside `known_names`, a class's own name names it in `rare_name_share` of
    its captions (never at 0) and shares no word piece with its other words; no class's words use another
    class's name; the words are drawn with the table's probabilities."""
    recipe = dataclasses.replace(pretrain.Recipe(), rare_name_share=share)
    words = pretrain.caption_words(FASHION_MNIST_CLASSES, recipe)
    tokens, word_cdf, width = pretrain.caption_table(FASHION_MNIST_CLASSES, recipe, tiny_clip.tokenizer)
    assert tokens.shape[0] == len(FASHION_MNIST_CLASSES) * width * len(pretrain.TEMPLATES)
    y = torch.arange(len(FASHION_MNIST_CLASSES)).repeat_interleave(20000)
    drawn = pretrain.draw_words(word_cdf, y, torch.Generator().manual_seed(0)).view(len(FASHION_MNIST_CLASSES), -1)
    for c, (name, table) in enumerate(zip(FASHION_MNIST_CLASSES, words)):
        probs = dict(table)
        assert sum(probs.values()) == pytest.approx(1.0)
        assert probs.get(name, 0.0) == pytest.approx(0.2 if name in recipe.known_names else share)
        freq = torch.bincount(drawn[c], minlength=width)[: len(table)].double() / drawn.shape[1]
        assert torch.allclose(freq, torch.tensor([p for _, p in table], dtype=torch.float64), atol=0.01), name
        own = word_pieces(tiny_clip.tokenizer, name)
        others = set().union(*(word_pieces(tiny_clip.tokenizer, w) for w in pretrain.SYNONYMS[name]))
        if name not in recipe.known_names:
            assert not own & others, (name, own & others)
        for other in FASHION_MNIST_CLASSES:
            if other != name:
                assert not word_pieces(tiny_clip.tokenizer, other) & others, (name, other)


def test_cut_caption_encoding_equals_open_clip(tiny_clip):
    texts = ["vintage sneaker.", "a handbag in black and white.", "cheap chelsea, free shipping."]
    full = tiny_clip.tokenizer(texts)
    cut = full[:, : int(full.argmax(-1).max()) + 1]
    with torch.no_grad():
        ref = tiny_clip.model.encode_text(full, normalize=True)
        ours = pretrain.encode_tokens(tiny_clip.model, cut)
    assert cut.shape[1] < 20 and torch.allclose(ours, ref, atol=1e-6)


def test_pretraining_pixels_equal_the_models_preprocess(tiny_clip):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    batch = pretrain._normaliser(tiny_clip.preprocess)(pretrain._pixels(images, tiny_clip.preprocess))
    ref = torch.stack([tiny_clip.preprocess(Image.fromarray(x).convert("RGB")) for x in images])
    assert batch.shape == ref.shape and torch.allclose(batch, ref, atol=1e-6)


@needs_data
@pytest.mark.parametrize("backbone", sorted({b for b, _ in pretrain.STANDINS}))
def test_same_recipe_gives_the_same_file_bytes(tmp_path, backbone):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    pretrain.pretrain(backbone, SHORT, a, progress=False)
    pretrain.pretrain(backbone, SHORT, b, progress=False)
    assert a.read_bytes() == b.read_bytes()
    pretrain.pretrain(backbone, dataclasses.replace(SHORT, seed=SHORT.seed + 1), b, progress=False)
    assert a.read_bytes() != b.read_bytes()
    # it loads through the same path as a user's checkpoint file, and is no longer the random init
    trained = load_clip(backbone, str(a)).model.state_dict()
    random = load_clip(backbone, None).model.state_dict()
    assert any(not torch.equal(trained[k], random[k]) for k in trained)


def test_recipe_digest_names_the_file():
    r = pretrain.STANDINS["rsnl-tiny", "fashion-mnist"]
    assert r.digest("rsnl-tiny") == dataclasses.replace(r).digest("rsnl-tiny")
    assert r.digest("rsnl-tiny") != dataclasses.replace(r, steps=r.steps + 1).digest("rsnl-tiny")
    # the temperature it ships with is part of the recipe: another one is another file
    assert r.final_logit_scale is not None
    assert r.digest("rsnl-tiny") != dataclasses.replace(r, final_logit_scale=None).digest("rsnl-tiny")
    path = pretrain.standin_path("rsnl-tiny", "fashion-mnist", "/c")
    assert str(path) == f"/c/standin/rsnl-tiny-fashion-mnist-{r.digest('rsnl-tiny')}.safetensors"


def test_tag_belongs_to_the_standin_backbones_only():
    check_backbone("rsnl-tiny", "fashion-mnist")  # cheap: nothing is built by a check
    check_backbone("rsnl-t4x128", "fashion-mnist")
    with pytest.raises(ModelError) as e:
        load_clip("RN50", "fashion-mnist")
    msg = str(e.value)
    assert "\n" not in msg and "'fashion-mnist' is not a tag of RN50" in msg
    assert "exists for rsnl-tiny, rsnl-t4x128" in msg
    with pytest.raises(ModelError) as e:
        load_clip("rsnl-tiny", "fashion-mnsit")
    assert "fashion-mnist (rsnl's stand-in VLM" in str(e.value)


@pytest.mark.parametrize("args, message", [
    (["--seeds", "1,x"], "--seeds: '1,x' is not a comma-separated list of seeds"),
    (["--recipe", "steps=5"], "--steps/--seed/--recipe change the recipe: give --out"),
    (["--recipe", "known_names=Bag", "--out", "x.safetensors"], "--recipe: 'known_names=Bag' is not KEY=VALUE"),
    (["--backbone", "RN50"], "--backbone: the tag 'fashion-mnist' exists for rsnl-tiny"),
])
def test_cli_bad_input_is_one_line_before_any_model(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("RSNL_CACHE", str(tmp_path))  # nothing may be built there
    assert pretrain.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not any(tmp_path.iterdir())
