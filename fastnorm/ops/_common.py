"""Helpers shared by the custom-op files."""
from __future__ import annotations

from typing import Optional

from torch import Tensor


def empty_if_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    """A custom op cannot return None: an absent gradient comes back as an empty tensor."""
    return like.new_empty(0) if t is None else t
