"""A cheap fingerprint of a dataset's files, to notice new or changed shards without reading them.

The fingerprint covers each input file's relative name, size and modification time: adding,
removing, replacing or rewriting a shard changes it; reading the data does not. It never opens
a file, so a sensor can compute it every minute on a dataset of any size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from memopt_pipeline.core.data.dataset import list_shards
from memopt_pipeline.core.data.ingest import find_csv_inputs, is_csv_input


@dataclass(frozen=True)
class DatasetFingerprint:
    digest: str  # sha256 over (name, size, mtime_ns) of every input file, in name order
    files: int
    total_bytes: int

    def describe(self) -> str:
        return f"{self.files} files, {self.total_bytes / 1024**2:.1f} MiB, fingerprint {self.digest[:12]}"


def input_files(path: str | Path) -> list[Path]:
    """The files a training run would read: Parquet shards, or the CSV inputs that get ingested.

    Raises ``DatasetError`` (naming the path and the fix) when the path is missing or holds no input.
    """
    return find_csv_inputs(path) if is_csv_input(path) else list_shards(path)


def dataset_fingerprint(path: str | Path) -> DatasetFingerprint:
    root = Path(path)
    files = input_files(root)
    digest = hashlib.sha256()
    total = 0
    for file in files:
        stat = file.stat()
        # Names relative to the root: moving the whole dataset folder is not a change of data.
        name = file.name if root.is_file() else str(file.relative_to(root))
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        total += stat.st_size
    return DatasetFingerprint(digest=digest.hexdigest(), files=len(files), total_bytes=total)
