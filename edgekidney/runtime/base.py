"""The backend protocol every runtime implements (no torch).

A backend takes a preprocessed float32 batch ``(N, 3, S, S)`` and returns its named outputs
(``{name: array}``, Polygraphy's convention): ``logits`` ``(N, classes)`` and, for models exported with
heads, ``scope_distance`` ``(N,)`` and ``cam`` ``(N, S, S)`` (see :mod:`edgekidney.model.heads`).
Public methods check state and shapes and call small ``_*_impl`` methods, as Polygraphy's runners do;
batches larger than the backend's maximum are split here, once, for every backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from edgekidney.errors import InputError, ModelError


class Backend(ABC):
    name: str = "base"

    def __init__(self, image_size: int, max_batch: int | None = None) -> None:
        self.image_size = image_size
        self.max_batch = max_batch
        self._closed = False

    # -- public API ------------------------------------------------------------------------
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """The logits alone."""
        outputs = self.infer_outputs(batch)
        return outputs["logits"] if "logits" in outputs else next(iter(outputs.values()))

    def infer_outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the model, by name."""
        if self._closed:
            raise ModelError(f"{self.name} backend is closed")
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        s = self.image_size
        if batch.ndim != 4 or batch.shape[1:] != (3, s, s):
            raise InputError(f"input batch has shape {tuple(batch.shape)}; this model takes (N, 3, {s}, {s})")
        if batch.shape[0] == 0:
            raise InputError("input batch is empty")
        step = self.max_batch or batch.shape[0]
        outs = [self._infer_impl(batch[i : i + step]) for i in range(0, batch.shape[0], step)]
        return outs[0] if len(outs) == 1 else {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

    def close(self) -> None:
        if not self._closed:
            self._close_impl()
            self._closed = True

    def describe(self) -> dict:
        """What a report should say about this backend (name, device, threads...)."""
        return {"backend": self.name}

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- for subclasses --------------------------------------------------------------------
    @abstractmethod
    def _infer_impl(self, batch: np.ndarray) -> dict[str, np.ndarray]: ...

    def _close_impl(self) -> None:
        pass
