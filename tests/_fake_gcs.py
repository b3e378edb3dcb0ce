"""An emulated `gs://` bucket for tests: the real code paths for URLs, backed by a local dir.

- `etils.epath` serves `gs://` through its fsspec backend; fsspec's `gs`/`gcs` protocol is
  registered here as a filesystem over `root` that, like GCS, refuses append mode.
- orbax sees `gs://` URLs and takes its GCS code paths (no atomic rename, commit_success.txt);
  only two leaves are replaced: the tensorstore kvstore spec (the `gcs` driver would call the
  network, here it becomes the `file` driver at the same place under `root`) and the
  hierarchical-namespace probe (which needs google-cloud-storage).
Every URL that reaches fsspec or tensorstore is recorded in `opened` / `kvstores`.
"""
from __future__ import annotations

import os

from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem


class FakeGCS(DirFileSystem):
    protocol = ("gs", "gcs")
    cachable = False  # fsspec would otherwise reuse an instance bound to an earlier root
    root: str = ""
    opened: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(path=FakeGCS.root, fs=LocalFileSystem())

    def _join(self, path):
        if isinstance(path, (list, tuple)):
            return type(path)(self._join(p) for p in path)
        if isinstance(path, str):
            assert path.startswith("gs://") or "://" not in path, path
            path = path.removeprefix("gs://")
        return super()._join(path)

    def open(self, path, mode="rb", *args, **kwargs):  # noqa: A003 - fsspec's API
        FakeGCS.opened.append((str(path), mode))
        if "a" in mode:
            raise NotImplementedError(f"GCS objects cannot be appended to ({path})")
        return super().open(path, mode, *args, **kwargs)


def install(monkeypatch, root: str) -> dict:
    """Routes `gs://` to `root` until `monkeypatch` undoes it (call `uninstall` after).

    Returns {"opened": [(url, mode), ...], "kvstores": [url, ...]}.
    """
    from fsspec.registry import _registry
    from orbax.checkpoint._src.path import gcs_utils

    FakeGCS.root, FakeGCS.opened = root, []
    kvstores: list[str] = []
    for proto in ("gs", "gcs"):
        monkeypatch.setitem(_registry, proto, FakeGCS)
    _clear_epath_cache()

    def kvstore(ckpt_path: str) -> dict:
        assert ckpt_path.startswith("gs://"), ckpt_path
        kvstores.append(ckpt_path)
        return {"driver": "file", "path": os.path.join(root, ckpt_path.removeprefix("gs://"))}

    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    return {"opened": FakeGCS.opened, "kvstores": kvstores}


def _clear_epath_cache() -> None:
    from etils.epath import backend

    backend.fsspec_backend._get_filesystem.cache_clear()


uninstall = _clear_epath_cache  # after monkeypatch restored the registry
