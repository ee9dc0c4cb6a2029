"""Which request keys feed which policy input: the observation key table, and the checks on every value.

An openpi client sends a flat map whose keys its robot's transforms chose; the server maps them onto the
policy's raw observation (``{"images": {camera: uint8 [h, w, 3]}, "state": [S], "prompt": str}``) with this table,
first match wins:

==========================================  ===============================================================
request key                                 policy input
==========================================  ===============================================================
``observation/<camera>``,                   the checkpoint's camera ``<camera>`` (its own names)
``observation/image_<camera>``,
``image_<camera>``, ``images: {<camera>}``
``observation/image``                       the policy's first camera (openpi LIBERO layout)
``observation/wrist_image``                 the policy's second camera
``observation/state``, ``state``            the state, raw (the server normalizes it)
``observation/joint_position`` +            the state, concatenated in this order (openpi DROID layout)
``observation/gripper_position``
``prompt``                                  the instruction (``--default_prompt`` when absent)
``vlax/prev_actions``                       real-time chunking: the previous chunk's actions not yet executed
                                            when this observation was taken, ``[n, A]`` in the dataset's units
``vlax/delay_steps``                        real-time chunking: the inference delay in control steps
==========================================  ===============================================================

Other keys are ignored. Images may be ``uint8`` or float in [0, 1], ``HWC`` or ``CHW``; they are resized to the
policy's size by the observation pipeline.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

MAX_IMAGE_SIDE = 4096
MAX_PROMPT_CHARS = 2000
PREV_ACTIONS, DELAY_STEPS = "vlax/prev_actions", "vlax/delay_steps"
POSITIONAL_CAMERAS = ("observation/image", "observation/wrist_image")


class RequestError(ValueError):
    """A request this policy cannot serve; the message names the key and the fix."""


def camera_keys(camera: str) -> tuple[str, ...]:
    return (f"observation/{camera}", f"observation/image_{camera}", f"image_{camera}")


def key_table(cameras: Sequence[str]) -> dict[str, list[str]]:
    """For the metadata: which request keys are read for each policy input."""
    table = {f"camera:{c}": [*camera_keys(c), f"images/{c}"] for c in cameras}
    for key, camera in zip(POSITIONAL_CAMERAS, cameras):
        table[f"camera:{camera}"].append(key)
    table["state"] = ["observation/state", "state", "observation/joint_position+observation/gripper_position"]
    table["prompt"] = ["prompt"]
    table["rtc"] = [PREV_ACTIONS, DELAY_STEPS]
    return table


def to_image(value: Any, where: str) -> np.ndarray:
    """``uint8 [h, w, 3]`` from a uint8 or [0, 1] float image, HWC or CHW."""
    if not isinstance(value, np.ndarray):
        raise RequestError(f"{where} must be an image array [h, w, 3], got {type(value).__name__}")
    x = value
    if x.ndim == 3 and x.shape[0] == 3 and x.shape[-1] != 3:
        x = np.transpose(x, (1, 2, 0))
    if x.ndim != 3 or x.shape[-1] != 3 or not (1 <= x.shape[0] <= MAX_IMAGE_SIDE and 1 <= x.shape[1] <= MAX_IMAGE_SIDE):
        raise RequestError(f"{where} has shape {list(value.shape)}; send an RGB image [h, w, 3] (or [3, h, w]) with "
                           f"sides up to {MAX_IMAGE_SIDE}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if x.dtype.kind == "f":
        if not np.all(np.isfinite(x)) or x.min() < 0.0 or x.max() > 1.0:
            raise RequestError(f"{where} is a float image outside [0, 1] (or not finite); send uint8 or floats in "
                               "[0, 1]")
        return np.round(x.astype(np.float32) * 255.0).astype(np.uint8)
    raise RequestError(f"{where} has dtype {x.dtype}; send uint8 (or float in [0, 1])")


def to_vector(value: Any, where: str, dim: int | None = None) -> np.ndarray:
    """Finite float32 ``[dim]`` from a numeric array or list."""
    try:
        x = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise RequestError(f"{where} must be a numeric vector") from e
    if x.dtype.kind not in "biuf":
        raise RequestError(f"{where} has dtype {x.dtype}; send numbers")
    x = x.astype(np.float32).reshape(-1) if x.ndim <= 1 else x
    if x.ndim != 1 or (dim is not None and x.shape[0] != dim):
        raise RequestError(f"{where} has shape {list(np.shape(value))}; the policy expects [{dim}]")
    if not np.all(np.isfinite(x)):
        raise RequestError(f"{where} has non-finite values (NaN or inf)")
    return x


def _camera_value(request: Mapping[str, Any], camera: str, index: int) -> tuple[str, Any] | None:
    for key in camera_keys(camera):
        if key in request:
            return key, request[key]
    images = request.get("images")
    if isinstance(images, Mapping) and camera in images:
        return f"images/{camera}", images[camera]
    if index < len(POSITIONAL_CAMERAS) and POSITIONAL_CAMERAS[index] in request:
        return POSITIONAL_CAMERAS[index], request[POSITIONAL_CAMERAS[index]]
    return None


def parse_observation(request: Any, *, cameras: Sequence[str], state_dim: int,
                      default_prompt: str | None = None) -> dict:
    """A request map -> the policy's unbatched raw observation ``{"images", "state", "prompt"}``."""
    if not isinstance(request, Mapping):
        raise RequestError(f"a request must be a map of observation keys, got {type(request).__name__}")
    images = {}
    for i, camera in enumerate(cameras):
        found = _camera_value(request, camera, i)
        if found is None:
            accepted = [*camera_keys(camera), f"images/{camera}"] + \
                ([POSITIONAL_CAMERAS[i]] if i < len(POSITIONAL_CAMERAS) else [])
            raise RequestError(f"missing camera {camera!r}: send one of {accepted}")
        images[camera] = to_image(found[1], found[0])
    if "observation/state" in request or "state" in request:
        key = "observation/state" if "observation/state" in request else "state"
        state = to_vector(request[key], key, state_dim)
    elif "observation/joint_position" in request and "observation/gripper_position" in request:
        parts = [to_vector(request[k], k) for k in ("observation/joint_position", "observation/gripper_position")]
        state = to_vector(np.concatenate(parts), "observation/joint_position+gripper_position", state_dim)
    elif state_dim == 0:
        state = np.zeros(0, np.float32)
    else:
        raise RequestError(f"missing state: send 'observation/state' (or 'state') with {state_dim} values")
    prompt = request.get("prompt", default_prompt)
    if isinstance(prompt, bytes):
        prompt = prompt.decode("utf-8", errors="replace")
    if not isinstance(prompt, str):
        raise RequestError("missing 'prompt': send the instruction as a string (or start the server with "
                           "--default_prompt)")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(f"prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
    return {"images": images, "state": state, "prompt": prompt}


def parse_rtc(request: Mapping[str, Any], *, horizon: int, action_dim: int,
              default_delay: int) -> tuple[np.ndarray, int] | None:
    """``(remaining actions [n, A], delay)`` when the request carries real-time chunking inputs, else ``None``."""
    if PREV_ACTIONS not in request:
        return None
    remaining = request[PREV_ACTIONS]
    if not isinstance(remaining, np.ndarray) or remaining.ndim != 2 or remaining.shape[1] != action_dim \
            or not 1 <= remaining.shape[0] < horizon or remaining.dtype.kind not in "iuf":
        got = list(remaining.shape) if isinstance(remaining, np.ndarray) else type(remaining).__name__
        raise RequestError(f"{PREV_ACTIONS} is {got}; send the actions not yet executed as a float array [n, "
                           f"{action_dim}] with 1 <= n < {horizon}")
    remaining = remaining.astype(np.float32)
    if not np.all(np.isfinite(remaining)):
        raise RequestError(f"{PREV_ACTIONS} has non-finite values (NaN or inf)")
    delay = request.get(DELAY_STEPS, default_delay)
    if isinstance(delay, np.ndarray) and delay.ndim == 0:
        delay = delay.item()
    if isinstance(delay, bool) or not isinstance(delay, (int, np.integer)):
        raise RequestError(f"{DELAY_STEPS} must be an int, got {type(delay).__name__}")
    return remaining, int(delay)
