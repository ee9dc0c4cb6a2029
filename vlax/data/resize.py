"""How a frame of another shape reaches a policy's image size; shared by the tf.data pipeline and inference.

``"stretch"`` resizes both axes (antialiased bilinear). ``"pad"`` keeps the aspect ratio and zero-pads on the left
and top, resizing with plain bilinear as LeRobot's SmolVLA does (``F.interpolate``, no antialiasing), so that a
pretrained checkpoint sees its training-time geometry.
"""

from __future__ import annotations

RESIZE_MODES = ("stretch", "pad")


def check_resize_mode(mode: str) -> str:
    if mode not in RESIZE_MODES:
        raise ValueError(f"image resize mode {mode!r} (data.image_resize); known: {list(RESIZE_MODES)}")
    return mode


def padded_extent(h: int, w: int, size: tuple[int, int]) -> tuple[int, int]:
    """The ``(height, width)`` an ``h x w`` frame is resized to before ``"pad"`` pads it to ``size = (H, W)``."""
    ratio = max(w / size[1], h / size[0])
    return int(h / ratio), int(w / ratio)
