"""The protocol every training-batch loader follows, so the loop can resume any of them.

A loader yields this process's rows of each global batch (a dict of numpy arrays) and can say
where it is (`get_state() -> dict`, JSON-able, saved with every checkpoint) and go back there
(`set_state(state)`), so a resumed run sees exactly the batches an uninterrupted one would
have. `close()` releases workers or files. The loaders of ftjax — `SyntheticLoader`,
the Grain `Loader` of the data pipeline, `ArrayLoader` (classification) and
`PreferenceLoader` — derive from `Resumable`; wrappers derive from `PassthroughIterator`.
"""
from __future__ import annotations

import abc
from typing import Iterator, Mapping


class Resumable(abc.ABC):
    """Base of resumable batch loaders (see the module docstring)."""

    def __iter__(self) -> Iterator[dict]:
        return self

    @abc.abstractmethod
    def __next__(self) -> dict:
        """This process's rows of the next global batch."""

    @abc.abstractmethod
    def get_state(self) -> dict:
        """Where the loader is: a JSON-able dict."""

    @abc.abstractmethod
    def set_state(self, state: Mapping) -> None:
        """Continue from a state `get_state` returned."""

    def close(self) -> None:
        """Releases workers and files (no-op by default)."""


class PassthroughIterator(Resumable):
    """Wraps a resumable loader, passing each batch through `attach`; its state is the inner
    loader's. Subclasses override `attach`."""

    def __init__(self, inner: Iterator[dict]):
        self.inner = inner

    def __next__(self) -> dict:
        return self.attach(next(self.inner))

    def attach(self, batch: dict) -> dict:
        raise NotImplementedError

    def get_state(self) -> dict:
        return self.inner.get_state() if hasattr(self.inner, "get_state") else {}

    def set_state(self, state: Mapping) -> None:
        if hasattr(self.inner, "set_state"):
            self.inner.set_state(state)

    def close(self) -> None:
        if hasattr(self.inner, "close"):
            self.inner.close()
