"""Image bytes -> RGB uint8 array at the training resolution (ADM centre crop), or a reason to reject it."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFile

# Truncated files must fail to load (and be rejected), never be silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class RejectedImage(ValueError):
    """An input that cannot become a training sample; the message is the reason written to rejects.jsonl."""


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: 16/32-bit greyscale is rescaled (PIL's own convert would clip it to white),
    transparency is composited on white, palette/CMYK/greyscale go through PIL's conversions."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit greyscale (PNG/TIFF; PIL opens some as 32-bit "I"): keep the top 8 of 16 bits.
        arr = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        image = Image.fromarray(arr.astype(np.uint8), mode="L")
    elif image.mode == "F":
        arr = np.nan_to_num(np.asarray(image, dtype=np.float64))
        lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
        image = Image.fromarray(np.round((arr - lo) / max(hi - lo, 1e-12) * 255.0).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop (as used by DiT): halve with a BOX filter while the short side is at least twice the
    target, resize the short side to the target with BICUBIC, then crop the centre square. Returns HWC uint8."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return np.ascontiguousarray(arr[top:top + image_size, left:left + image_size])


def load_image(data: bytes, resolution: int, min_side: int) -> np.ndarray:
    """Decode and crop one image -> [resolution, resolution, 3] uint8; raises RejectedImage with the reason."""
    if not data:
        raise RejectedImage("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if min(image.size) < min_side:
                raise RejectedImage(f"too small: {image.size[0]}x{image.size[1]} (shorter side < {min_side})")
            rgb = to_rgb(image)
    except RejectedImage:
        raise
    except Exception as exc:  # noqa: BLE001 - every decoder failure is a counted reject, not a crash
        raise RejectedImage(f"cannot decode: {type(exc).__name__}: {exc}") from exc
    return center_crop_arr(rgb, resolution)
