"""open_clip loading and the prompt matrix (the method: docs/method.md; the fast text path: docs/performance.md).

`load_clip` resolves weights before building anything, so that a missing download is one line in
seconds rather than minutes of hub retries. `PromptMatrix` holds the m x context vectors and encodes
all m x C prompts in one call of the frozen text tower.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import open_clip

from rsnl.config import CLASS_TOKEN_POSITIONS
from rsnl.errors import ModelError
from rsnl.files import file_digest, is_weights_path
from rsnl.pretrain import ensure_standin, is_standin, standin_backbones, standin_tags

TINY = "rsnl-tiny"
_CONFIG_DIR = Path(__file__).parent / "model_configs"
INIT_SEED = 0  # random-init backbones are seeded so that every trial of a study sees the same tower


def _register_configs():
    if TINY not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


_register_configs()


def check_backbone(name: str, pretrained: str | None) -> None:
    """Cheap validation of a (backbone, pretrained) pair; raises ModelError with one line."""
    import difflib
    models = open_clip.list_models()
    if name not in models:
        close = difflib.get_close_matches(name, models, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ModelError(f"backbone: {name!r} is not an open_clip model{hint}; "
                         f"see open_clip.list_models(), e.g. RN50, ViT-B-32, {TINY}")
    if pretrained is None or is_standin(name, pretrained):
        return
    if is_weights_path(pretrained):
        if not Path(pretrained).is_file():
            raise ModelError(f"pretrained: checkpoint file {pretrained} does not exist")
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    own = [f"{t} (rsnl's stand-in VLM, built on first use)" for t in standin_tags(name)]
    if pretrained not in tags:
        allowed = ", ".join(tags + own + ["a checkpoint path", "none"])
        published = "" if tags else f" ({name} has no published weights)"
        elsewhere = standin_backbones(pretrained)
        if elsewhere:
            published = f" (rsnl's stand-in {pretrained!r} exists for {', '.join(elsewhere)})"
        raise ModelError(f"pretrained: {pretrained!r} is not a tag of {name}{published}; allowed: {allowed}")


@dataclass
class LoadedClip:
    model: nn.Module
    preprocess: object       # the test-time transform (PIL -> tensor)
    tokenizer: object
    identity: str            # names the exact weights; part of every feature-cache key


def load_clip(name: str, pretrained: str | None = None, device="cpu", cache_dir=None) -> LoadedClip:
    """An open_clip model, frozen and in eval mode, with its preprocess, tokenizer and weights' identity.

    pretrained: an open_clip tag (e.g. 'openai'), rsnl's stand-in tag ('fashion-mnist' for rsnl-tiny,
    built on first use by rsnl.pretrain into `cache_dir`, default $RSNL_CACHE), a local checkpoint file
    (open_clip's formats or OpenAI's TorchScript archive), or None for random init (seeded with
    INIT_SEED, so the same weights in every process).
    """
    check_backbone(name, pretrained)
    path, identity, kwargs = resolve_weights(name, pretrained, cache_dir)
    scripted = path is not None and is_torchscript(path)
    if scripted:  # OpenAI's release format: QuickGELU, as their models were trained with
        kwargs["force_quick_gelu"] = True
    with torch.random.fork_rng(devices=[]), quiet_random_init():
        torch.manual_seed(INIT_SEED)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=None if scripted else path, device=device, **kwargs)
            if scripted:
                load_torchscript_weights(model, path)
        except Exception as e:
            # A bad file surfaces from open_clip as many types (pickle.UnpicklingError for a non-checkpoint,
            # SafetensorError, AssertionError or RuntimeError for another architecture's weights): all mean
            # the file does not fit this backbone. Some carry no message, so the type leads.
            if path is None:
                raise
            detail = (str(e).strip().splitlines() or [""])[0][:200]
            raise ModelError(f"pretrained: {path} could not be loaded into {name}: "
                             f"{type(e).__name__}{': ' + detail if detail else ''}") from None
    model.eval().requires_grad_(False)
    return LoadedClip(model, preprocess, open_clip.get_tokenizer(name), identity)


def resolve_weights(name: str, pretrained: str | None, cache_dir=None) -> tuple[str | None, str, dict]:
    """(weights file or None, identity, open_clip keyword arguments). The identity names the weights by
    their file's content (sha256), never by its path or mtime: a tag's file replaced in the hub cache, or a
    checkpoint rewritten in place, is other weights to the feature cache."""
    kwargs = {}
    if pretrained is None:
        return None, f"{name}|random-init-{INIT_SEED}", kwargs
    if is_standin(name, pretrained):  # built once, then loaded like any checkpoint file
        path = str(ensure_standin(name, pretrained, cache_dir))
        return path, f"{name}|{pretrained}|file-sha256:{_file_digest(path)}", kwargs
    if is_weights_path(pretrained):
        return pretrained, f"{name}|file-sha256:{_file_digest(pretrained)}", kwargs
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    path = _resolve_tag(name, pretrained, cfg)
    kwargs["force_quick_gelu"] = bool(cfg.get("quick_gelu", False))
    kwargs["force_preprocess_cfg"] = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
    return path, f"{name}|{pretrained}|file-sha256:{_file_digest(path)}", kwargs


# Entries of OpenAI's TorchScript archives that are not weights (and masks open_clip builds itself).
_ARCHIVE_EXTRAS = ("input_resolution", "context_length", "vocab_size")


def is_torchscript(path) -> bool:
    """A TorchScript archive (a zip with compiled code), as OpenAI released CLIP (~/.cache/clip/RN50.pt)."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_torchscript_weights(model: nn.Module, path) -> None:
    """The archive's weights into an open_clip model of the same architecture, every weight accounted for:
    a missing or foreign key raises (another architecture's archive must not half-load)."""
    import warnings
    with warnings.catch_warnings():  # torch deprecates TorchScript; these archives exist all the same
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=FutureWarning)
        archive = torch.jit.load(str(path), map_location="cpu")
    state = {k: v for k, v in archive.state_dict().items() if k not in _ARCHIVE_EXTRAS}
    expected = model.state_dict()
    buffers_not_saved = {n for n, _ in model.named_buffers()} - set(expected)  # e.g. attn_mask
    foreign = sorted(k for k in state if k not in expected and k not in buffers_not_saved)
    if foreign:
        raise ValueError(f"the archive has {len(foreign)} weight(s) this architecture lacks, e.g. {foreign[0]!r}")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True)


class _NoRandomInitWarning(logging.Filter):
    def filter(self, record):
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def quiet_random_init():
    """open_clip warns on the root logger for every random-init model; here random init is asked for."""
    quiet = _NoRandomInitWarning()
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)


def _file_digest(path: str) -> str:
    return file_digest(path)[:16]


def check_weights(name: str, pretrained: str | None) -> None:
    """A published tag's weights are in the local cache or can be downloaded: said before any model or Ray
    starts. (Files are checked by check_backbone; the stand-in is built when missing.)"""
    if pretrained is None or is_standin(name, pretrained) or is_weights_path(pretrained):
        return
    _resolve_tag(name, pretrained, open_clip.get_pretrained_cfg(name, pretrained), download=False)


def _resolve_tag(name: str, tag: str, cfg: dict, download: bool = True) -> str | None:
    """The local file of a pretrained tag: from the caches if present, else downloaded if online."""
    from open_clip.pretrained import download_pretrained
    local = _cached_tag_file(cfg)
    if local:
        return local
    if not _online():
        where = cfg.get("hf_hub") or cfg.get("url")
        why = "HF_HUB_OFFLINE is set" if _hub_offline() else "the network is unreachable"
        raise ModelError(
            f"pretrained: weights {name}/{tag} are not in the local cache and {why} "
            f"({where}); download them on a machine with network (python -c \"import open_clip; "
            f"open_clip.create_model('{name}', pretrained='{tag}')\") and copy ~/.cache/huggingface, "
            f"or set pretrained: /path/to/checkpoint.pt")
    return download_pretrained(cfg) if download else None


def _cached_tag_file(cfg: dict) -> str | None:
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache
        repo, filename = os.path.split(hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for fn in names:
            hit = try_to_load_from_cache(repo, fn)
            if isinstance(hit, str):
                return hit
    url = cfg.get("url", "")
    if url:
        path = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if path.is_file():
            return str(path)
    return None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")


def _online(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if _hub_offline():
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# --- the prompt matrix -------------------------------------------------------------------------

def _text_tower(clip_model: nn.Module) -> nn.Module:
    """The module that owns token_embedding / transformer / ln_final (CLIP or a TextTransformer)."""
    tower = clip_model if hasattr(clip_model, "token_embedding") else getattr(clip_model, "text", None)
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    if tower is None or not all(hasattr(tower, a) for a in needed) or getattr(tower, "cls_emb", None) is not None:
        raise ModelError(f"{type(clip_model).__name__}: prompt learning needs a CLIP-style causal text "
                         f"transformer (token embedding + EOS pooling); Hugging Face text towers are not supported")
    return tower


class PromptMatrix(nn.Module):
    """m prompt blocks x C classes of learnable context, encoded by the frozen CLIP text tower.

    Block b, class c: [SOS] ctx_b [name of c] . [EOS] (class token at the end; 'front' and 'middle'
    as in CoOp). `text_features()` -> [blocks, C, D], L2-normalised, from one text-tower call.
    """

    def __init__(self, clip_model, tokenizer, classnames, blocks: int = 1, n_ctx: int = 16,
                 ctx_init: str | None = None, csc: bool = False, class_token_position: str = "end",
                 fast: bool = True, generator: torch.Generator | None = None):
        super().__init__()
        if class_token_position not in CLASS_TOKEN_POSITIONS:
            raise ValueError(f"class_token_position {class_token_position!r}: allowed "
                             f"{', '.join(CLASS_TOKEN_POSITIONS)}")
        tower = _text_tower(clip_model)
        # Frozen parts are held outside the module's parameters: only ctx is trained or checkpointed.
        object.__setattr__(self, "tower", tower)
        self.blocks, self.num_classes, self.csc = blocks, len(classnames), csc
        self.position = class_token_position
        names = [c.replace("_", " ") for c in classnames]
        emb = tower.token_embedding
        width = emb.weight.shape[1]

        if ctx_init:
            init_ids = tokenizer([ctx_init])[0]
            n_ctx = int(init_ids.argmax()) - 1  # tokens between SOS and EOS
            with torch.no_grad():
                init = emb(init_ids[1:1 + n_ctx].to(emb.weight.device)).float()
            template = ctx_init.strip()
        else:
            init = None
            template = " ".join(["X"] * n_ctx)
        self.n_ctx = n_ctx
        shape = (blocks, self.num_classes, n_ctx, width) if csc else (blocks, n_ctx, width)
        if init is None:
            ctx = torch.randn(shape, generator=generator) * 0.02
        else:
            ctx = init.expand(shape).clone()
        self.ctx = nn.Parameter(ctx.to(emb.weight.device))

        tokens = tokenizer([f"{template} {name}." for name in names])
        self.register_buffer("tokens", tokens, persistent=False)
        eos = tokens.argmax(dim=-1)  # EOS has the highest id in CLIP's vocabulary
        length = int(eos.max()) + 1  # causal attention: nothing after EOS reaches it
        with torch.no_grad():
            embedded = emb(tokens[:, :length].to(emb.weight.device))
        self.register_buffer("sos", embedded[:, :1], persistent=False)               # [C, 1, d]
        self.register_buffer("suffix", embedded[:, 1 + n_ctx:], persistent=False)    # [C, S, d]
        self.register_buffer("eos", eos, persistent=False)
        if class_token_position != "end":
            if not hasattr(tokenizer, "encode"):
                raise ValueError("class_token_position front/middle needs a tokenizer with encode()")
            self.name_lens = [len(tokenizer.encode(n)) for n in names]
        self.length = length
        self.fast = fast and self.prefix_shareable()

    # -- which path ---------------------------------------------------------------------------
    def prefix_shareable(self) -> bool:
        """The SOS + context prefix is the same for all classes of a block, and blocks are plain."""
        from open_clip.transformer import ResidualAttentionBlock
        blocks_ok = all(type(b) is ResidualAttentionBlock and not hasattr(b, "ln_1_kv")
                        and b.attn._qkv_same_embed_dim for b in self.tower.transformer.resblocks)
        return not self.csc and self.position == "end" and blocks_ok

    def extra_repr(self) -> str:
        return (f"blocks={self.blocks}, classes={self.num_classes}, n_ctx={self.n_ctx}, csc={self.csc}, "
                f"position={self.position}, tokens={self.length}, fast={self.fast}")

    # -- text features ------------------------------------------------------------------------
    def text_features(self) -> torch.Tensor:
        """[blocks, C, D], L2-normalised."""
        return F.normalize(self.encode(self.ctx), dim=-1)

    def encode(self, ctx: torch.Tensor) -> torch.Tensor:
        """The text tower's features [blocks, C, D] (not normalised) of the prompts with context `ctx`:
        this matrix's, or several of this shape stacked along the first dimension (members trained side
        by side, rsnl/members.py)."""
        return self._prefix_shared(ctx) if self.fast else self._batched(ctx)

    def prompt_embeddings(self, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """[blocks * C, length, d] token embeddings of every prompt (the plain path's input)."""
        ctx = self.ctx if ctx is None else ctx
        m, C, n = ctx.shape[0], self.num_classes, self.n_ctx
        ctx = ctx if self.csc else ctx.unsqueeze(1).expand(m, C, n, -1)
        ctx = ctx.to(self.sos.dtype)
        sos = self.sos.expand(m, C, 1, -1)
        suffix = self.suffix.expand(m, C, -1, -1)
        if self.position == "end":
            x = torch.cat([sos, ctx, suffix], dim=2)
        else:
            rows = []
            for c, k in enumerate(self.name_lens):
                name, rest = suffix[:, c, :k], suffix[:, c, k:]
                if self.position == "front":
                    parts = [sos[:, c], name, ctx[:, c], rest]
                else:
                    half = n // 2
                    parts = [sos[:, c], ctx[:, c, :half], name, ctx[:, c, half:], rest]
                rows.append(torch.cat(parts, dim=1))
            x = torch.stack(rows, dim=1)
        return x.reshape(m * C, self.length, -1)

    def _batched(self, ctx: torch.Tensor) -> torch.Tensor:
        m = ctx.shape[0]
        x = encode_cut(self.tower, self.prompt_embeddings(ctx), self.eos.repeat(m))
        return x.reshape(m, self.num_classes, -1)

    def _prefix_shared(self, ctx: torch.Tensor) -> torch.Tensor:
        """Exact: causal attention lets the per-block prefix be computed once and attended to by all
        class suffixes (docs/performance.md)."""
        t = self.tower
        m, C, P = ctx.shape[0], self.num_classes, 1 + self.n_ctx
        S = self.length - P
        pos = t.positional_embedding.to(self.sos.dtype)
        hp = torch.cat([self.sos[:1].expand(m, 1, -1), ctx.to(self.sos.dtype)], dim=1) + pos[:P]  # [m, P, d]
        hs = (self.suffix + pos[P: P + S]).unsqueeze(0).expand(m, C, S, -1)                          # [m, C, S, d]
        causal = torch.full((S, S), float("-inf"), device=hs.device).triu_(1).to(hs.dtype)
        for blk in t.transformer.resblocks:
            hp, hs = _shared_prefix_block(blk, hp, hs, causal)
        x = t.ln_final(hs)
        x = x[:, torch.arange(C, device=x.device), self.eos - P]  # [m, C, d]
        return _project(t, x)

    def forward(self, image_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        return ensemble_logits(image_features, self.text_features(), logit_scale)


def ensemble_logits(image_features: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Logits [N, C] = mean over blocks of s * f . t_b, for text features [blocks, C, D] (image features
    L2-normalised)."""
    return logit_scale * torch.einsum("nd,bcd->ncb", image_features.to(text.dtype), text).mean(-1)


def encode_cut(tower, embeddings: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """The text tower on token embeddings [N, L, d] cut after their longest EOS, pooled at `eos` [N] and
    projected (not normalised). Exact: with causal attention nothing after an EOS changes its output."""
    L = embeddings.shape[1]
    x = embeddings + tower.positional_embedding[:L].to(embeddings.dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:L, :L])
    x = tower.ln_final(x)
    return _project(tower, x[torch.arange(x.shape[0], device=x.device), eos])


def _project(tower, x):
    proj = tower.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def _heads(x, h):
    return x.unflatten(-1, (h, x.shape[-1] // h)).transpose(-2, -3)  # [..., L, d] -> [..., h, L, dh]


def _merge(x):
    return x.transpose(-2, -3).flatten(-2)


def _shared_prefix_block(blk, hp, hs, causal):
    """One residual attention block for prefix states hp [m, P, d] and suffix states hs [m, C, S, d]."""
    attn = blk.attn
    h = attn.num_heads
    qp, kp, vp = (_heads(z, h) for z in F.linear(blk.ln_1(hp), attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1))
    qs, ks, vs = (_heads(z, h) for z in F.linear(blk.ln_1(hs), attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1))
    # prefix tokens see only the prefix (causal)
    op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)                  # [m, h, P, dh]
    # suffix tokens see the whole prefix and the suffix causally; one softmax over both key sets
    scale = 1.0 / math.sqrt(qs.shape[-1])
    kp_, vp_ = kp.unsqueeze(1), vp.unsqueeze(1)                                       # [m, 1, h, P, dh]
    scores = torch.cat([qs @ kp_.transpose(-1, -2), qs @ ks.transpose(-1, -2) + causal], dim=-1) * scale
    w = scores.softmax(dim=-1)
    P = kp.shape[-2]
    os_ = w[..., :P] @ vp_ + w[..., P:] @ vs                                          # [m, C, h, S, dh]
    out_p = F.linear(_merge(op), attn.out_proj.weight, attn.out_proj.bias)
    out_s = F.linear(_merge(os_), attn.out_proj.weight, attn.out_proj.bias)
    hp = hp + blk.ls_1(out_p)
    hs = hs + blk.ls_1(out_s)
    hp = hp + blk.ls_2(blk.mlp(blk.ln_2(hp)))
    hs = hs + blk.ls_2(blk.mlp(blk.ln_2(hs)))
    return hp, hs
