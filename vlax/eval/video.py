"""Episode videos: GIF (pillow) or MP4 (PyAV, H.264)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

VIDEO_FORMATS = ("gif", "mp4")


def write_video(path: str, frames: Sequence[np.ndarray], *, fps: int = 30) -> str:
    """Writes ``frames`` (each ``uint8 [h, w, 3]``) to ``path``; the format follows the extension.

    Returns:
      ``path``.
    """
    fmt = os.path.splitext(path)[1].lstrip(".").lower()
    if fmt not in VIDEO_FORMATS:
        raise ValueError(f"video {path!r} has extension {fmt!r}; use one of {VIDEO_FORMATS}")
    if not frames:
        raise ValueError(f"no frames to write to {path!r}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if fmt == "gif":
        from PIL import Image

        images = [Image.fromarray(np.asarray(f, np.uint8)) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        return path
    import av

    height, width = np.asarray(frames[0]).shape[:2]
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        # yuv420p (what players expect) needs even sides: pad by one pixel where needed.
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            frame = np.asarray(frame, np.uint8)
            frame = np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
