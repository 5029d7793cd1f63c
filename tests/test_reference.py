"""benchmarks/reference_loop.py (the original per-batch pattern) computes the same function as the fast
paths of rsnl.models.PromptMatrix on the same weights: text features, logits and the context gradient
(the speed-up is measured at the same math)."""


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rsnl.models import PromptMatrix, load_clip

from benchmarks.reference_loop import ReferenceCLIP, ReferenceTrainer

CLASSNAMES = ["banded", "polka-dotted", "honey_combed", "zigzagged", "crosshatched"]
TOL = 1e-5  # on L2-normalised features


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: faster than two on a loaded 2-core machine, and the same numbers."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=["RN50", "ViT-B-32"])
def clip(request):
    """(model, tokenizer) of each text tower, random init (seeded), built once per module."""
    clip = load_clip(request.param, None)
    model, tok = clip.model, clip.tokenizer
    return model, tok


def pair(model, tok, csc: bool, blocks: int = 2, n_ctx: int = 4):
    pm = PromptMatrix(model, tok, CLASSNAMES, blocks=blocks, n_ctx=n_ctx, csc=csc,
                      generator=torch.Generator().manual_seed(7))
    return pm, ReferenceCLIP(model, pm, tok, CLASSNAMES)


def image_features(n, dim, seed=0):
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def max_diff(a, b) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("csc", [False, True], ids=["shared", "csc"])
def test_text_features_and_logits_equal(clip, csc):
    model, tok = clip
    pm, ref = pair(model, tok, csc)
    assert pm.fast is (not csc)  # shared context takes the prefix-shared path, csc the plain batched one
    with torch.no_grad():
        expect = ref.text_features()                        # per block, 77 tokens
        assert expect.shape[:2] == (2, len(CLASSNAMES))
        assert torch.cdist(expect[0], expect[0]).add(torch.eye(len(CLASSNAMES))).min() > 1e-3  # not vacuous
        assert max_diff(pm.text_features(), expect) <= TOL
        pm.fast = False
        assert max_diff(pm.text_features(), expect) <= TOL  # the plain batched (cut) path as well
        pm.fast = not csc
        f = image_features(9, expect.shape[-1])
        s = model.logit_scale.exp()
        assert max_diff(pm(f, s) / s, ref.logits(f, expect) / s) <= TOL


def test_context_gradients_equal(clip):
    """The training step's gradient: prefix-shared fast path vs the per-block 77-token loop."""
    model, tok = clip
    pm, ref = pair(model, tok, csc=False)
    with torch.no_grad():
        D = pm.text_features().shape[-1]
    f, y = image_features(6, D, seed=1), torch.tensor([0, 1, 2, 3, 4, 0])
    s = model.logit_scale.exp()
    grads = []
    for logits in (lambda: pm(f, s), lambda: ref.logits(f)):
        pm.ctx.grad = None
        F.cross_entropy(logits(), y).backward()
        grads.append(pm.ctx.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_trainer_reads_cached_features_only(digits_inputs):
    """The fast trainer's epoch never runs the image tower, and runs the text tower once per step for all
    blocks, plus once for the selection and once for val and test accuracy together."""
    import math

    from rsnl.trainer import build_trainer

    cfg, clip, bank = digits_inputs
    tr = build_trainer(cfg.replace(epochs=1), clip, bank)
    assert tr.prompts.blocks == 2 and tr.views is not None  # 2 blocks, precomputed augmented views
    calls = {"image": 0, "text": 0}
    hooks = [clip.model.visual.register_forward_pre_hook(lambda *a: calls.__setitem__("image", calls["image"] + 1)),
             tr.prompts.tower.ln_final.register_forward_pre_hook(
                 lambda *a: calls.__setitem__("text", calls["text"] + 1))]
    try:
        m = tr.train_epoch()
    finally:
        for h in hooks:
            h.remove()
    steps = math.ceil(round(m["kept_frac"] * len(tr.data.sample)) / cfg.batch_size)
    assert calls == {"image": 0, "text": steps + 2}


def test_reference_epoch_runs_end_to_end(tmp_path, tiny_clip):
    """One epoch of the original loop (selection pass + training pass) and the end-of-training test
    on a small generated DTD with rsnl-tiny."""
    from rsnl.testing import make_coop_tree

    from rsnl.config import TrialConfig
    from rsnl.data import load_dataset

    classes = ["banded", "blotchy", "braided", "bubbly"]
    make_coop_tree(tmp_path, classes, {"train": 12, "val": 4, "test": 4})
    ds = load_dataset("dtd", str(tmp_path))
    cfg = TrialConfig(dataset="dtd", data_root=str(tmp_path), backbone="rsnl-tiny", pretrained=None, shots=8,
                      noise_rate=0.25, blocks=2, n_ctx=4, batch_size=8, epochs=2, device="cpu")
    ref = ReferenceTrainer(cfg, ds, tiny_clip)
    before = ref.prompts.ctx.detach().clone()
    m = ref.train_epoch()
    assert m["epoch"] == 0 and 0 < m["kept_frac"] <= 1 and np.isfinite(m["train_loss"]) and m["steps"] >= 1
    assert not torch.equal(ref.prompts.ctx.detach(), before)  # the context was trained
    assert all(p.grad is None for p in tiny_clip.model.parameters())  # the tower stays frozen
    assert 0 <= ref.test_accuracy() <= 100
    # samples that the drop_last selection pass did not see (here positions 30, 31) are kept
    keep = ref.selection_from(np.arange(30), torch.randn(30, 64), np.random.default_rng(0).normal(size=30), 0)
    assert keep[30:].all() and keep.shape == (32,)


# ---- CUDA (run by benchmarks/gpu_check.sh on a GPU machine; skipped elsewhere) -------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")


@cuda
@pytest.mark.parametrize("backbone", ["RN50", "ViT-B-32"])
def test_cuda_fast_path_matches_reference(backbone):
    """On the GPU: fp32 equals the 77-token loop; bf16 and fp16 autocast stay close to it."""
    clip = load_clip(backbone, None, device="cuda")
    model, tok = clip.model, clip.tokenizer
    for csc in (False, True):
        pm, ref = pair(model, tok, csc)
        assert pm.ctx.is_cuda and pm.fast is (not csc)
        with torch.no_grad():
            expect = ref.text_features()
            assert max_diff(pm.text_features(), expect) <= 1e-4
            for dtype in (torch.bfloat16, torch.float16):
                with torch.autocast("cuda", dtype=dtype):
                    got = pm.text_features().float()
                assert (got * expect).sum(-1).min() > 0.99, dtype  # cosine to the fp32 reference


@cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_trainer_mixed_precision(digits_inputs, precision):
    """The trainer on the GPU under autocast (GradScaler with fp16): finite, learning, same metrics keys."""
    from rsnl.models import load_clip
    from rsnl.trainer import build_trainer

    cfg, _, bank = digits_inputs
    clip = load_clip("rsnl-tiny", None, "cuda")
    tr = build_trainer(cfg.replace(device="cuda", precision=precision, epochs=3), clip, bank)
    assert tr.amp == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    before = tr.prompts.ctx.detach().clone()
    history = tr.run()
    assert len(history) == 3 and all(np.isfinite(m["train_loss"]) for m in history)
    assert not torch.equal(tr.prompts.ctx.detach(), before) and tr.prompts.ctx.dtype == torch.float32
    assert all(0 <= m["test_acc"] <= 100 for m in history)
