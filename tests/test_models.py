"""rsnl.models: open_clip loading (random init, local checkpoints, tags offline) and the prompt matrix,
whose fast and plain paths must equal the text tower on the same prompt text."""

import os
import time

import pytest
import torch
import torch.nn.functional as F

import rsnl.models as models
from rsnl.models import ModelError, PromptMatrix, check_backbone, load_clip

pytestmark = pytest.mark.usefixtures("torch_one_thread")

CLASSNAMES = ["banded", "bubbly", "honey_combed", "zig_zagged_stripes", "dog"]
TOL = 1e-5


@pytest.fixture(scope="module", params=["rsnl-tiny", "RN50", "ViT-B-32"])
def clip(request, tiny_clip):
    """(model, tokenizer) of each backbone, random init, built once per module."""
    if request.param == "rsnl-tiny":
        return tiny_clip.model, tiny_clip.tokenizer
    clip = load_clip(request.param, None)
    model, tok = clip.model, clip.tokenizer
    return model, tok


def reference(model, tok, texts):
    with torch.no_grad():
        return F.normalize(model.encode_text(tok(texts)).float(), dim=-1)


def both_paths(pm: PromptMatrix):
    """text_features() of the prefix-shared path (where it applies) and of the plain batched path."""
    with torch.no_grad():
        fast = pm.text_features()
        pm.fast = False
        plain = pm.text_features()
    return fast, plain


def assert_close(a, b, tol=TOL):
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= tol, f"max abs difference {err:.3g} > {tol}"


def assert_classes_distinct(t):
    """Guard against a vacuous equality: a random-init tower must still tell the classes apart."""
    d = torch.cdist(t, t) + torch.eye(len(t)) * 10
    assert d.min().item() > 1e-3


# ---- the prompt matrix equals the text tower ----------------------------------------------------


def test_end_position_equals_encode_text(clip):
    model, tok = clip
    ref = reference(model, tok, [f"a photo of a {c.replace('_', ' ')}." for c in CLASSNAMES])
    assert_classes_distinct(ref)
    pm = PromptMatrix(model, tok, CLASSNAMES, blocks=1, ctx_init="a photo of a")
    assert pm.fast, "the shared-prefix path applies to CLIP towers with shared context at the end"
    assert pm.n_ctx == 4 and pm.ctx.shape == (1, 4, model.token_embedding.weight.shape[1])
    assert pm.length == int(pm.eos.max()) + 1 < 77  # cut after the longest EOS
    fast, plain = both_paths(pm)
    assert fast.shape == (1, len(CLASSNAMES), ref.shape[1])
    assert_close(fast[0], ref)
    assert_close(plain[0], ref)


@pytest.mark.parametrize("position,template", [("front", "{} a photo of a."), ("middle", "a photo {} of a.")])
def test_front_and_middle_positions_equal_encode_text(clip, position, template):
    model, tok = clip
    ref = reference(model, tok, [template.format(c.replace("_", " ")) for c in CLASSNAMES])
    pm = PromptMatrix(model, tok, CLASSNAMES, blocks=1, ctx_init="a photo of a", class_token_position=position)
    assert not pm.fast  # the prefix differs per class
    with torch.no_grad():
        assert_close(pm.text_features()[0], ref)


def test_class_specific_context_with_init_equals_encode_text(clip):
    model, tok = clip
    ref = reference(model, tok, [f"a photo of a {c.replace('_', ' ')}." for c in CLASSNAMES])
    pm = PromptMatrix(model, tok, CLASSNAMES, blocks=2, ctx_init="a photo of a", csc=True)
    assert not pm.fast and pm.ctx.shape[:3] == (2, len(CLASSNAMES), 4)
    with torch.no_grad():
        t = pm.text_features()
    assert_close(t[0], ref)
    assert_close(t[1], ref)


def test_random_context_fast_equals_batched(clip):
    model, tok = clip
    pm = PromptMatrix(model, tok, CLASSNAMES, blocks=3, n_ctx=5, generator=torch.Generator().manual_seed(0))
    assert pm.fast
    fast, plain = both_paths(pm)
    D = model.text_projection.shape[1] if isinstance(model.text_projection, torch.Tensor) else model.embed_dim
    assert fast.shape == plain.shape == (3, len(CLASSNAMES), D)
    assert_close(fast, plain)
    torch.testing.assert_close(fast.norm(dim=-1), torch.ones(3, len(CLASSNAMES)), atol=1e-5, rtol=0)
    assert not torch.allclose(fast[0], fast[1], atol=1e-3)  # blocks start from different context


def test_gradients_reach_only_the_context(tiny_clip):
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    grads = {}
    for fast in (True, False):
        pm = PromptMatrix(model, tok, CLASSNAMES, blocks=2, n_ctx=4, generator=torch.Generator().manual_seed(1))
        pm.fast = fast
        assert [n for n, _ in pm.named_parameters()] == ["ctx"]
        assert list(pm.state_dict()) == ["ctx"]  # the frozen tower is not checkpointed
        img = F.normalize(torch.randn(6, 64, generator=torch.Generator().manual_seed(2)), dim=-1)
        loss = F.cross_entropy(pm(img, model.logit_scale.exp()), torch.tensor([0, 1, 2, 3, 4, 0]))
        loss.backward()
        assert pm.ctx.grad is not None and torch.isfinite(pm.ctx.grad).all() and pm.ctx.grad.abs().sum() > 0
        grads[fast] = pm.ctx.grad.clone()
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    # the two paths compute the same function, so the same gradient
    torch.testing.assert_close(grads[True], grads[False], atol=1e-6, rtol=1e-4)


def test_forward_is_mean_of_block_logits(tiny_clip):
    model, tok = tiny_clip.model, tiny_clip.tokenizer
    pm = PromptMatrix(model, tok, CLASSNAMES, blocks=3, n_ctx=4, generator=torch.Generator().manual_seed(3))
    img = F.normalize(torch.randn(7, 64), dim=-1)
    s = model.logit_scale.exp()
    with torch.no_grad():
        t = pm.text_features()
        expect = torch.stack([s * img @ t[b].T for b in range(3)]).mean(0)
        assert_close(pm(img, s), expect, tol=1e-4)


def test_bad_class_token_position(tiny_clip):
    with pytest.raises(ValueError, match="class_token_position 'start'"):
        PromptMatrix(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, class_token_position="start")


# ---- loading ------------------------------------------------------------------------------------


def test_random_init_is_seeded_frozen_and_eval(tiny_clip):
    again = load_clip("rsnl-tiny", None)
    assert again.identity == tiny_clip.identity == "rsnl-tiny|random-init-0"
    a, b = tiny_clip.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not again.model.training and not any(p.requires_grad for p in again.model.parameters())


@pytest.fixture(scope="module")
def perturbed_tiny(tiny_clip):
    """A state dict that differs from the random init in every float tensor."""
    g = torch.Generator().manual_seed(5)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in tiny_clip.model.state_dict().items()}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_load_local_checkpoint(tmp_path, tiny_clip, perturbed_tiny, suffix):
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".pt":
        torch.save(perturbed_tiny, path)
    else:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in perturbed_tiny.items()}, str(path))
    loaded = load_clip("rsnl-tiny", str(path))
    sd = loaded.model.state_dict()
    assert sd.keys() == perturbed_tiny.keys()
    assert all(torch.equal(sd[k], perturbed_tiny[k]) for k in sd)
    assert loaded.identity.startswith("rsnl-tiny|file-sha256:") and loaded.identity != tiny_clip.identity
    assert not any(p.requires_grad for p in loaded.model.parameters())

    # outputs: the loaded model is the perturbed one, not the random init
    ref = load_clip("rsnl-tiny", None).model
    ref.load_state_dict(perturbed_tiny)
    img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = tiny_clip.tokenizer(["a photo of a dog.", "banded"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.encode_image(img), ref.encode_image(img), atol=0, rtol=0)
        torch.testing.assert_close(loaded.model.encode_text(tokens), ref.encode_text(tokens), atol=0, rtol=0)
        assert not torch.allclose(loaded.model.encode_text(tokens), tiny_clip.model.encode_text(tokens), atol=1e-3)

    # the identity follows the content, not the name
    assert all(torch.equal(loaded.model.state_dict()[k], perturbed_tiny[k]) for k in perturbed_tiny)
    copy = tmp_path / f"copy{suffix}"
    copy.write_bytes(path.read_bytes())
    assert load_clip("rsnl-tiny", str(copy)).identity == loaded.identity


def one_line(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg == msg.strip()
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def test_missing_checkpoint_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ModelError) as e:
        load_clip("rsnl-tiny", str(missing))
    one_line(e, "pretrained:", str(missing), "does not exist")


@pytest.mark.parametrize("content", ["garbage", "truncated", "other_arch", "missing_key", "empty"])
def test_bad_checkpoint_file_is_one_line(tmp_path, tiny_clip, perturbed_tiny, content):
    path = tmp_path / "bad.pt"
    if content == "garbage":
        path.write_bytes(b"not a checkpoint" * 64)
    elif content == "truncated":
        torch.save(perturbed_tiny, path)
        path.write_bytes(path.read_bytes()[:4000])
    elif content == "other_arch":
        sd = dict(perturbed_tiny)
        sd["positional_embedding"] = torch.zeros(77, 32)
        torch.save(sd, path)
    elif content == "missing_key":
        torch.save({k: v for k, v in perturbed_tiny.items() if k != "text_projection"}, path)
    else:
        path.write_bytes(b"")
    with pytest.raises(ModelError) as e:
        load_clip("rsnl-tiny", str(path))
    one_line(e, "pretrained:", str(path), "could not be loaded into rsnl-tiny")


def test_unknown_tag():
    with pytest.raises(ModelError) as e:
        load_clip("RN50", "opneai")
    one_line(e, "'opneai' is not a tag of RN50", "openai", "checkpoint path")
    with pytest.raises(ModelError) as e:
        load_clip("rsnl-tiny", "openai")
    one_line(e, "is not a tag of rsnl-tiny", "no published weights")


@pytest.mark.parametrize("typo,suggestion", [("RN5O", "RN50"), ("ViT-B-3", "ViT-B-32"), ("rsnl_tiny", "rsnl-tiny")])
def test_unknown_backbone_suggests(typo, suggestion):
    with pytest.raises(ModelError) as e:
        load_clip(typo, None)
    one_line(e, f"backbone: {typo!r} is not an open_clip model", f"did you mean {suggestion!r}")


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No pretrained weights anywhere: HF cache and ~/.cache/clip point into an empty tmp dir."""
    import huggingface_hub.constants as hf
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(home / "hf" / "hub"))  # read at import time by huggingface_hub
    return home


@pytest.mark.parametrize("name,tag", [("RN50", "openai"), ("ViT-B-32", "laion2b_s34b_b79k")])
def test_pretrained_tag_offline_fails_fast(empty_caches, name, tag):
    start = time.perf_counter()
    with pytest.raises(ModelError) as e:
        load_clip(name, tag)
    assert time.perf_counter() - start < 5
    one_line(e, f"weights {name}/{tag}", "not in the local cache", "pretrained: /path/to/checkpoint.pt")


def test_cached_tag_is_found_in_hf_cache(empty_caches):
    """A tag whose file is in the Hugging Face cache resolves to that file without any network."""
    import open_clip
    cfg = open_clip.get_pretrained_cfg("RN50", "openai")
    repo = cfg["hf_hub"].rstrip("/")
    base = empty_caches / "hf" / "hub" / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text("abc123")
    assert models._cached_tag_file(cfg) is None
    (snap / "open_clip_pytorch_model.bin").write_bytes(b"x")
    assert models._cached_tag_file(cfg) == str(snap / "open_clip_pytorch_model.bin")
    (snap / "open_clip_model.safetensors").write_bytes(b"x")  # preferred when both exist
    assert models._cached_tag_file(cfg) == str(snap / "open_clip_model.safetensors")
    assert models._resolve_tag("RN50", "openai", cfg) == str(snap / "open_clip_model.safetensors")


def test_tagged_weights_are_identified_by_their_file_content(empty_caches):
    """A tag's identity (the feature cache's key for its weights) follows the bytes of the file the tag
    resolves to: a replaced file with the same mtime is other weights."""
    import open_clip
    cfg = open_clip.get_pretrained_cfg("RN50", "openai")
    repo = cfg["hf_hub"].rstrip("/")
    snap = empty_caches / "hf" / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    weights = snap / "open_clip_model.safetensors"
    weights.write_bytes(b"weights one")
    path, first, _ = models.resolve_weights("RN50", "openai")
    assert path == str(weights) and first.startswith("RN50|openai|file-sha256:")
    before = os.stat(weights)
    weights.write_bytes(b"weights two")
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert models.resolve_weights("RN50", "openai")[1] != first
    weights.write_bytes(b"weights one")
    assert models.resolve_weights("RN50", "openai")[1] == first


def test_openai_url_cache_is_found(empty_caches):
    import open_clip
    cfg = {"url": open_clip.get_pretrained_cfg("RN50", "openai")["url"]}
    clip_dir = empty_caches / ".cache" / "clip"
    clip_dir.mkdir(parents=True)
    target = clip_dir / os.path.basename(cfg["url"])
    target.write_bytes(b"x")
    assert models._cached_tag_file(cfg) == str(target)


def test_check_backbone_is_cheap_and_accepts_valid_pairs(tmp_path):
    start = time.perf_counter()
    check_backbone("RN50", "openai")
    check_backbone("ViT-B-32", None)
    f = tmp_path / "w.pt"
    f.write_bytes(b"x")
    check_backbone("rsnl-tiny", str(f))
    assert time.perf_counter() - start < 2


def test_openai_torchscript_archive_loads_and_computes_what_it_computes(tmp_path):
    """OpenAI's release format (~/.cache/clip/RN50.pt): a TorchScript archive with RN50's key layout, its
    size fields, and QuickGELU. The test builds one from a random RN50 and traces its encoders into it, so
    the archive computes its own outputs; the loaded open_clip model must give the same."""
    import warnings

    import open_clip

    from rsnl.models import is_torchscript, quiet_random_init

    with quiet_random_init():
        torch.manual_seed(3)
        source = open_clip.create_model("RN50", force_quick_gelu=True).eval()
    del source.context_length, source.vocab_size  # OpenAI's archives hold these as tensors
    for key, value in (("input_resolution", 224), ("context_length", 77), ("vocab_size", 49408)):
        source.register_buffer(key, torch.tensor(value))
    image = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    text = open_clip.get_tokenizer("RN50")(["a photo of a banded.", "a photo of a dotted."])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        archive = torch.jit.trace_module(source, {"encode_image": image, "encode_text": text})
    path = tmp_path / "RN50.pt"
    archive.save(str(path))
    assert is_torchscript(path) and not is_torchscript(tmp_path / "missing.pt")

    loaded = load_clip("RN50", str(path))
    with torch.no_grad():
        assert torch.allclose(loaded.model.encode_image(image), archive.encode_image(image), atol=1e-5)
        assert torch.allclose(loaded.model.encode_text(text), archive.encode_text(text), atol=1e-5)
    assert loaded.identity.startswith("RN50|file-sha256:")
    # the same weights with GELU in the text tower compute something else: QuickGELU is part of loading these
    with quiet_random_init():
        gelu = open_clip.create_model("RN50").eval()
    gelu.load_state_dict(loaded.model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(gelu.encode_text(text), archive.encode_text(text), atol=1e-4)


def test_torchscript_archive_of_another_architecture_is_one_line(tmp_path, tiny_clip):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        archive = torch.jit.trace_module(tiny_clip.model, {"encode_image": torch.randn(1, 3, 32, 32)})
    path = tmp_path / "tiny.pt"
    archive.save(str(path))
    with pytest.raises(ModelError) as e:
        load_clip("RN50", str(path))
    one_line(e, "pretrained:", str(path), "could not be loaded into RN50")
