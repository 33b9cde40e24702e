"""Pixel-level rules shared by every X-ray format: the read error, colour images that hold a grey radiograph, and
EXIF orientation. One place decides each rule; ``docs/READER.md`` tabulates them per format.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["COLOUR_TOLERANCE", "XRayReadError", "apply_exif_orientation", "grey_from_colour"]

# A grey image stored as colour differs between channels only by rounding and lossy-codec noise (YCbCr chroma of a
# grey JPEG is constant): at most a few levels. Annotations or a photo differ by far more.
COLOUR_TOLERANCE = 0.06  # of the full sample range


class XRayReadError(ValueError):
    """A file could not be read as an X-ray; the message names the file and the cause."""

    def __init__(self, path: str | os.PathLike, cause: str) -> None:
        self.path = str(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")


def grey_from_colour(channels: np.ndarray, max_value: float, path: str | os.PathLike,
                     has_alpha: bool = False) -> np.ndarray:
    """The grey radiograph held in a colour image, or a refusal.

    Args:
        channels: ``(H, W, C)`` samples, C = 2 (grey + alpha), 3 (RGB) or 4 (RGB + alpha), at full precision.
        max_value: the largest value a sample can take (255 for 8 bits, 65535 for 16 bits): sets the tolerance.
        path: the file, for the error message.
        has_alpha: the last channel is alpha; it is dropped (a radiograph has no transparency).

    Returns:
        ``(H, W)`` float32: the mean of the colour channels, equal to each of them for a grey image.

    Raises:
        XRayReadError: the colour channels differ by more than ``COLOUR_TOLERANCE`` of the range somewhere (a photo,
            an annotated screenshot, a heat map): no grey conversion is the right one, so none is guessed.
    """
    colour = channels[..., :-1] if has_alpha else channels
    colour = colour.astype(np.float32)
    if colour.shape[-1] == 1:
        return colour[..., 0]
    spread = colour.max(axis=-1) - colour.min(axis=-1)
    worst = float(spread.max())
    if worst > COLOUR_TOLERANCE * max_value:
        share = float(np.mean(spread > COLOUR_TOLERANCE * max_value))
        raise XRayReadError(
            path,
            f"colour image: its channels differ by up to {worst:.0f} of {max_value:.0f} levels on {share:.1%} of the "
            "pixels (a photo, an annotated screenshot or a heat map, not a grey radiograph). Export the radiograph "
            "without colour annotations, or convert it to greyscale yourself if that is what you want to train on",
        )
    return colour.mean(axis=-1)


def apply_exif_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Turn a stored ``(H, W[, C])`` array the way the EXIF/TIFF Orientation tag (0x0112) says a viewer shows it.

    Orientation values (EXIF 2.32, TIFF 6.0): 1 as stored, 2 mirrored left-right, 3 rotated 180 degrees, 4 mirrored
    top-bottom, 5 transposed, 6 rotated 90 degrees clockwise, 7 transversed, 8 rotated 90 degrees anticlockwise.
    Same result as Pillow's ``ImageOps.exif_transpose`` (tested against it).
    """
    ops = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: np.swapaxes(a, 0, 1),
        6: lambda a: np.rot90(a, k=-1),
        7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1],
        8: lambda a: np.rot90(a, k=1),
    }
    return np.ascontiguousarray(ops.get(int(orientation), ops[1])(image))
