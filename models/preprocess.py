"""Frame and text preprocessing, defined once and driven by the bundle's constants.

Training imports these same functions, so the model sees at the edge exactly what it saw
at HQ. numpy + OpenCV + tokenizers only (no torch on the appliance path).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from models.errors import BadFrame, BadExplanation

MAX_EXPLANATION_CHARS = 2000
# Exposure: with a white point set, each frame is scaled so that its 90th-percentile brightness
# (the glowing area of a cell; defects are dark) lands on it, which undoes a camera's gain or
# exposure drift. The scale is held within 1/4..4 so that a covered lens is not blown up to noise.
WHITE_POINT_PERCENTILE = 90
MAX_EXPOSURE_GAIN = 4.0


@dataclass(frozen=True)
class PreprocessSpec:
    image_size: int = 160
    mean: float = 0.5
    std: float = 0.25
    max_tokens: int = 32
    white_point: float | None = None      # None: frames as the camera sends them

    def __post_init__(self):
        if self.white_point is not None and not 1 <= self.white_point <= 255:
            raise ValueError(f"white_point must be a brightness from 1 to 255 or None, not {self.white_point!r}")

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessSpec":
        """A bundle manifest's `preprocessing`; bundles from before 2026-12-07 have no white point."""
        white = data.get("white_point")
        return cls(int(data["image_size"]), float(data["mean"]), float(data["std"]),
                   int(data["max_tokens"]), None if white is None else float(white))

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": self.mean, "std": self.std,
                "max_tokens": self.max_tokens, "white_point": self.white_point}


def to_gray(frame: np.ndarray) -> np.ndarray:
    """Any uint8 frame (H,W), (H,W,1), (H,W,3) BGR or (H,W,4) -> (H,W) uint8."""
    if not isinstance(frame, np.ndarray) or frame.size == 0:
        raise BadFrame("the frame is empty; check the camera or the uploaded file")
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    elif frame.ndim == 3 and frame.shape[2] in (3, 4):
        code = cv2.COLOR_BGR2GRAY if frame.shape[2] == 3 else cv2.COLOR_BGRA2GRAY
        frame = cv2.cvtColor(frame, code)
    elif frame.ndim != 2:
        raise BadFrame(f"a frame must have 1, 3 or 4 channels, this one has shape {frame.shape}")
    if frame.dtype != np.uint8:
        frame = cv2.normalize(frame, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    return frame


def resize_gray(frame: np.ndarray, size: int) -> np.ndarray:
    gray = to_gray(frame)
    if gray.shape != (size, size):
        gray = cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA)
    return gray


def _line_energy(profile: np.ndarray) -> float:
    """How much a frame's mean profile (one value per row, or per column) swings over a few
    pixels: long straight lines across the frame (a solar cell's busbars) make it swing."""
    sigma = max(1.0, len(profile) / 40)
    smooth = cv2.GaussianBlur(profile.reshape(1, -1), (0, 0), sigma).ravel()
    return float(np.abs(profile - smooth).mean())


def upright_quarter_turns(gray: np.ndarray) -> int:
    """1 when the frame's long lines run up and down instead of across, else 0: a solar cell's
    busbars run across in every ELPV cell (2,623 of 2,624; the other is a dark dead cell). A
    quarter turn swaps the two profiles, so a frame and its quarter turns, each turned upright,
    end in the same or the opposite orientation: the frame as trained on or its half turn."""
    pixels = gray.astype(np.float32)
    across, up_down = _line_energy(pixels.mean(axis=1)), _line_energy(pixels.mean(axis=0))
    return int(up_down > across)


def turn_upright(gray: np.ndarray) -> np.ndarray:
    """The frame turned so that its long lines (a solar cell's busbars) run across."""
    return np.ascontiguousarray(np.rot90(gray, upright_quarter_turns(gray)))


# Views of a frame whose rewards are averaged (appliance config `views`; the first view's patches
# feed the checks and the heat map). upright judges the frame once, turned so that a solar cell's
# busbars run across; upright2 averages that and its half turn: the same rewards for every quarter
# turn of the camera, at 2x the image cost; rot4 averages the four quarter turns (4x)
# (reports/experiments/views-upright).
VIEWS = {"one": (lambda g: g,),
         "upright": (turn_upright,),
         "upright2": (turn_upright, lambda g: np.rot90(turn_upright(g), 2)),
         "rot4": (lambda g: g, lambda g: np.rot90(g, 1), lambda g: np.rot90(g, 2), lambda g: np.rot90(g, 3))}

# A frame with no part in it: nearly one grey level (lens cap, dead camera, blown exposure), or
# pixels unrelated to their neighbours (sensor noise). Every real ELPV cell lies far above both
# thresholds, uniform and noise frames far below (reports/measurements.md).
MIN_CONTRAST = 2.0
MIN_NEIGHBOUR_CORRELATION = 0.5


def frame_problem(gray: np.ndarray) -> str | None:
    """Why a (H,W) uint8 frame cannot show a part, in plain words, or None when it can."""
    pixels = gray.astype(np.float32)
    mean, contrast = float(pixels.mean()), float(pixels.std())
    if contrast < MIN_CONTRAST:
        what = ("all dark: is the lens covered or the camera off?" if mean < 40 else
                "all white: is the light too bright or the exposure too long?" if mean > 215 else
                "one flat grey: is the camera pointed at the part?")
        return f"no part in view: the picture is {what}"
    centred = pixels - mean
    neighbours = max((centred[:, :-1] * centred[:, 1:]).mean(), (centred[:-1] * centred[1:]).mean())
    if neighbours / contrast ** 2 < MIN_NEIGHBOUR_CORRELATION:     # correlation with the next pixel
        return "no part in view: the picture is only noise; check the camera and its cable"
    return None


def exposure_gain(gray: np.ndarray, white_point: float) -> np.ndarray:
    """(B,H,W) uint8 -> (B,) the scale that puts each frame's WHITE_POINT_PERCENTILE on white_point
    (read on every second pixel of every second row: a quarter of the work, nearly the same level;
    a turned view reads other pixels, so its gain may differ a little: every view is normalised
    after it is made, in training and on the appliance alike)."""
    flat = gray[:, ::2, ::2].reshape(len(gray), -1)
    k = int(round(WHITE_POINT_PERCENTILE / 100 * (flat.shape[1] - 1)))
    level = np.partition(flat, k, axis=1)[:, k].astype(np.float32)
    return np.clip(white_point / np.maximum(level, 1.0), 1 / MAX_EXPOSURE_GAIN, MAX_EXPOSURE_GAIN)


def normalize(gray: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """(H,W) uint8 or (B,H,W) uint8 -> float32 (B,1,H,W) normalised (exposure first, with a white point)."""
    gray = gray.reshape(-1, spec.image_size, spec.image_size)
    x = gray.astype(np.float32) / 255.0
    if spec.white_point is not None:
        x = np.minimum(x * exposure_gain(gray, spec.white_point)[:, None, None], 1.0)
    x = (x - spec.mean) / spec.std
    return x.reshape(-1, 1, spec.image_size, spec.image_size)


def frame_to_input(frame: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    return normalize(resize_gray(frame, spec.image_size), spec)


def views_input(gray: np.ndarray, spec: PreprocessSpec, views: str = "one") -> np.ndarray:
    """A (S,S) uint8 frame at the model's size -> the image encoder's batch of its views (a VIEWS
    name, as the appliance config's `views`), normalised: every view in one call, as the appliance
    judges a frame."""
    return np.concatenate([normalize(np.ascontiguousarray(view(gray)), spec) for view in VIEWS[views]])


def blank_input(spec: PreprocessSpec) -> np.ndarray:
    """A featureless mid-gray frame: what the text-only proxy sees (with a white point every flat
    frame brighter than white_point / MAX_EXPOSURE_GAIN becomes that white point)."""
    return normalize(np.full((spec.image_size, spec.image_size), 128, np.uint8), spec)


def decode_image_bytes(data: bytes) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ...) -> uint8 frame, or BadFrame."""
    if not data:
        raise BadFrame("the image is empty (0 bytes)")
    frame = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if frame is None:
        raise BadFrame("the image could not be decoded; send a PNG or JPEG file")
    return frame


def read_image(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise BadFrame(f"image {path} does not exist")
    try:
        return decode_image_bytes(path.read_bytes())
    except BadFrame as exc:
        raise BadFrame(f"image {path}: {exc}") from None


def check_explanation(text: object) -> str:
    if not isinstance(text, str):
        raise BadExplanation("an explanation must be text")
    cleaned = " ".join(text.split())
    if not cleaned:
        raise BadExplanation("an explanation is empty; write what the defect is and where")
    if len(cleaned) > MAX_EXPLANATION_CHARS:
        raise BadExplanation(f"an explanation is {len(cleaned)} characters long; "
                             f"keep it under {MAX_EXPLANATION_CHARS}")
    return cleaned


class TextTokenizer:
    """WordPiece tokenizer from a tokenizer.json (the MiniLM one), padded to max_tokens."""

    def __init__(self, tokenizer_json: str | Path, max_tokens: int):
        from tokenizers import Tokenizer
        self.max_tokens = max_tokens
        self._tok = Tokenizer.from_file(str(tokenizer_json))
        self._tok.enable_truncation(max_tokens)
        self._tok.enable_padding(length=max_tokens, pad_id=0)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        texts = [check_explanation(t) for t in texts]
        encodings = self._tok.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return ids, mask
