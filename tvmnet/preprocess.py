"""Image → input tensor, the way ImageNet classifiers expect it (runtime side: Pillow + numpy only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError
from .manifest import Preprocessing


def load_image(path: str | Path, pre: Preprocessing, dtype: str = "float32") -> np.ndarray:
    """Resize the shorter side, centre-crop to ``resolution``, normalise, and lay out as a batch of one."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except FileNotFoundError:
        raise InputError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from None
    short = round(pre.resolution / pre.crop_fraction)
    width, height = img.size
    scale = short / min(width, height)
    img = img.resize((max(short, round(width * scale)), max(short, round(height * scale))), Image.BILINEAR)
    width, height = img.size
    left, top = (width - pre.resolution) // 2, (height - pre.resolution) // 2
    img = img.crop((left, top, left + pre.resolution, top + pre.resolution))
    pixels = np.asarray(img, dtype=np.float32) / 255.0
    pixels = (pixels - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    if pre.layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels[None].astype(dtype))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def top_k(scores: np.ndarray, k: int) -> list[tuple[int, float]]:
    """(class id, probability) of the ``k`` best classes of the first batch item; logits get a softmax."""
    row = np.asarray(scores, dtype=np.float64).reshape(scores.shape[0], -1)[0]
    is_probability = row.min() >= 0 and abs(row.sum() - 1.0) < 1e-3
    probs = row if is_probability else softmax(row)
    best = np.argsort(-probs)[:k]
    return [(int(i), float(probs[i])) for i in best]
