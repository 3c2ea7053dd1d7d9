"""`torch.load(..., weights_only=True)` whose failures read as one line, without torch's advice to load unsafely."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

WEIGHTS_ONLY_MARK = "WeightsUnpickler error: "


class TensorFileError(ValueError):
    """The file exists but holds no tensors that can be loaded safely; the message says why, in one line."""


def load_tensor_file(path: str | Path) -> Any:
    """The file's tensors on the CPU. FileNotFoundError passes through; every other failure is a TensorFileError."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise TensorFileError("a directory, not a weights file") from None
    except pickle.UnpicklingError as exc:
        raise TensorFileError(_unpickling_reason(str(exc))) from None
    except Exception as exc:  # zip/pickle/format errors: torch names no cause a user can act on
        raise TensorFileError(f"not a torch weights file ({_first_line(exc)})") from None


def read_tensor_file(path: str | Path, error: type[Exception], what: str, unreadable: str = "") -> Any:
    """`load_tensor_file` with both failures raised as `error` from None, in one line naming the file:
    `PATH: WHAT not found`, or `PATH: UNREADABLE<why>` for a file that holds no loadable tensors."""
    try:
        return load_tensor_file(path)
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except TensorFileError as exc:
        raise error(f"{path}: {unreadable}{exc}") from None


def _unpickling_reason(message: str) -> str:
    detail = _first_sentence(message.split(WEIGHTS_ONLY_MARK, 1)[-1])
    if detail.startswith("Unsupported global"):  # a real pickle of Python objects, refused by safe loading
        return f"holds Python objects, not only tensors, and is not loaded ({detail})"
    return f"not a torch weights file ({detail})"


def _first_line(exc: Exception) -> str:
    detail = _first_sentence(str(exc)) if isinstance(exc, RuntimeError) else "unrecognised format"
    return f"{type(exc).__name__}: {detail}"


def _first_sentence(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0].split(". ", 1)[0].rstrip(".")[:120] if lines else "no detail"
