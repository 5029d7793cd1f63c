"""The zero-shot baseline: the frozen model with the plain prompt "a photo of a {class}." and no
training. Every trial reports its test accuracy beside the learned prompts', so a table shows at once
whether prompt learning under noise still beats not learning at all.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

TEMPLATE = "a photo of a {}."


@torch.no_grad()
def zeroshot_text(model, tokenizer, classnames, device="cpu") -> torch.Tensor:
    """[C, D] L2-normalised text features of the plain prompt, one per class (class names as the
    prompt matrix writes them: underscores become spaces)."""
    tokens = tokenizer([TEMPLATE.format(c.replace("_", " ")) for c in classnames]).to(device)
    return F.normalize(model.encode_text(tokens).float(), dim=-1).cpu()


def zeroshot_accuracy(image_features: torch.Tensor, text: torch.Tensor, labels) -> float:
    """Accuracy (%) of nearest-prompt prediction for L2-normalised image features."""
    pred = (image_features.float() @ text.float().T).argmax(-1).cpu().numpy()
    return 100.0 * float((pred == np.asarray(labels)).mean())
