"""One path from a stored row to what the models take, for both runners and `ssod label`:
decode -> weak view (a random horizontal flip; boxes and masks move with the image) -> the strong view on
top of the weak one.

An image that does not decode is refused where the split must be whole (the labeled split: run `ssod
prepare` again), and skipped and counted anywhere else (the unlabeled pool, an image folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import Tensor

from pipeline.data.augment import strong_view, weak_transform
from pipeline.data.rows import DECODE_FAILURES, decode_row
from pipeline.errors import InputError

# Counts a skipped part as (part, rows, reason): `Skipped.add`, or the weight store's `skip` on Ray.
SkipCounter = Callable[[str, int, str], Any]


class Views:
    """Weak views of stored rows with their targets (tv_tensors, in the view's geometry), and strong views.

    Args:
        flip_prob: the weak view's horizontal-flip probability (`data.flip_prob`).
        with_masks: decode the rows' segmentations into the targets' masks.
        undecodable: the one policy for an image that does not decode: a split's path (the split must be
            whole: an InputError naming the split and the image), or a `SkipCounter` (skipped and counted).
    """

    def __init__(self, flip_prob: float, with_masks: bool, undecodable: str | Path | SkipCounter):
        self.weak = weak_transform(flip_prob)
        self.with_masks, self.undecodable = with_masks, undecodable

    def decode(self, row: dict[str, Any]) -> tuple[Tensor, dict] | None:
        """The weak view of one row (uint8 CHW) and its target; None when the image does not decode."""
        try:
            return self.weak(*decode_row(row, self.with_masks))
        except DECODE_FAILURES as exc:
            self._undecodable(row, exc)
            return None

    def _undecodable(self, row: dict[str, Any], exc: Exception) -> None:
        image = f"image {row['image_id']}"
        if not callable(self.undecodable):
            raise InputError(f"{self.undecodable}: {image} does not decode; run `ssod prepare` again") from None
        self.undecodable(image, 1, f"undecodable image ({type(exc).__name__})")

    @staticmethod
    def strong(weak_image: Tensor) -> Tensor:
        """Photometric noise and erasing on the weak view: its boxes stay valid."""
        return strong_view(weak_image)
