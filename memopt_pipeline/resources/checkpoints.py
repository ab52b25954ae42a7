"""Checkpoints in Dagster's event log: the latest materialization of an asset (partition), and
pruning of the versions nothing current refers to.

Layout (resources/storage.py, resources/io_manager.py): each materialization writes its files
under ``<output>/artifacts/<asset>/[<partition>/]<run_id>/`` and its value to
``<output>/assets/<asset>/[<partition>/]<run_id>.json``; nothing is overwritten, so old versions
pile up until :func:`prune_checkpoints` removes the ones no current materialization needs.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import dagster as dg

from memopt_pipeline.core.storage import read_json
from memopt_pipeline.resources.storage import RUN_ID_PATTERN, materialization_parts

FINISHED_STATUSES = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]

# A string longer than this in a value or metadata is text (markdown, base64 images), not a path.
MAX_PATH_CHARS = 4096


def latest_materialization(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, partition: str | None
) -> dg.EventLogRecord | None:
    """The latest materialization record of ``asset_key`` (its ``partition``, when given)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[partition] if partition else None), limit=1
    ).records
    return records[0] if records else None


def recorded_value_path(record: dg.EventLogRecord) -> Path | None:
    """The value file a materialization recorded (``path`` metadata of JsonIOManager), if any."""
    entry = record.asset_materialization.metadata.get("path") if record.asset_materialization else None
    return Path(str(entry.value)) if entry is not None else None


def latest_materializations(instance: dg.DagsterInstance) -> list[dg.EventLogRecord]:
    """The latest materialization of every asset in the instance, and of each of its partitions."""
    latest: dict[int, dg.EventLogRecord] = {}
    for asset_key in instance.get_asset_keys():
        candidates = [latest_materialization(instance, asset_key, None)]
        partitions = instance.get_materialized_partitions(asset_key)
        candidates += [latest_materialization(instance, asset_key, p) for p in partitions]
        latest.update({r.storage_id: r for r in candidates if r is not None})
    return list(latest.values())


def strings_in(value: Any) -> Iterator[str]:
    """Every string inside a JSON-like value (dicts, lists, tuples), depth first."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from strings_in(item)


def _absolute_paths(values: Iterable[Any]) -> set[Path]:
    """Every absolute path named by a string in ``values`` (values and metadata store resolved paths)."""
    paths = set()
    for value in values:
        for text in strings_in(value):
            if len(text) < MAX_PATH_CHARS and "\n" not in text and os.path.isabs(text):
                paths.add(Path(os.path.normpath(text)))
    return paths


@dataclass
class PruneResult:
    removed: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    bytes_freed: int = 0


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _candidates(output_dir: Path) -> Iterator[Path]:
    """Run folders under ``artifacts/`` and value files under ``assets/``: whatever is named by a
    run id. Anything else (the CSV ingest, files of the layout before run folders) is left alone."""
    for dirpath, dirnames, _ in os.walk(output_dir / "artifacts"):
        for name in sorted(dirnames):
            if RUN_ID_PATTERN.match(name):
                dirnames.remove(name)  # a run folder is removed or kept whole
                if not Path(dirpath, name).is_symlink():
                    yield Path(dirpath, name)
    for dirpath, _, filenames in os.walk(output_dir / "assets"):
        for name in sorted(filenames):
            if name.endswith(".json") and RUN_ID_PATTERN.match(name.removesuffix(".json")):
                yield Path(dirpath, name)


def _run_id_of(candidate: Path) -> str:
    return candidate.name.removesuffix(".json")


def prune_checkpoints(
    instance: dg.DagsterInstance,
    output_dir: str | Path,
    log: Callable[[str], None] = print,
    *,
    dry_run: bool = False,
) -> PruneResult:
    """Delete the run folders under ``<output_dir>/artifacts`` and the value files under
    ``<output_dir>/assets`` that no current materialization needs.

    Kept, always:
    - the folder and the value file of the latest materialization of every asset and of every
      partition (as recorded in ``instance``'s event log);
    - anything named by path, in the value or the metadata of any of those latest
      materializations (e.g. the instance models an ensemble was built from, even after
      instance_model was materialized again), and anything inside a folder so named;
    - the files of runs that had not finished when pruning began (they may not have recorded their
      materialization yet).
    Removed: every other run folder and value file, e.g. superseded versions and what failed or
    killed runs left behind. Only names shaped like run ids are considered, so nothing the
    pipeline did not write per run is touched. ``dry_run``: report, delete nothing.
    """
    output_dir = Path(output_dir).resolve()
    # Runs finished before the latest materializations are read: everything they recorded is in
    # what is read next. A run that finishes while this runs may have just recorded a new latest
    # materialization, so only the folders of runs finished by now (or unknown to the instance:
    # orphans) may go.
    finished = set(instance.get_run_ids(dg.RunsFilter(statuses=FINISHED_STATUSES)))
    latest = latest_materializations(instance)
    keep: set[Path] = set()
    referenced_values: list[Any] = []
    for record in latest:
        parts = materialization_parts(record.asset_key, record.partition_key, record.run_id)
        keep.add(output_dir.joinpath("artifacts", *parts))
        metadata = record.asset_materialization.metadata
        referenced_values.append([entry.value for entry in metadata.values()])
        value_path = recorded_value_path(record)
        if value_path is not None and value_path.is_file():
            keep.add(Path(os.path.normpath(value_path)))
            referenced_values.append(read_json(value_path))
    referenced = _absolute_paths(referenced_values)
    # A candidate is referenced when a reference is inside it (a file in a run folder: the
    # candidate is one of its ancestors), is it, or is around it (a folder holding it).
    referenced_or_inside = referenced | {parent for path in referenced for parent in path.parents}

    def needed(candidate: Path) -> bool:
        if candidate in keep or candidate in referenced_or_inside:
            return True
        if any(parent in referenced for parent in candidate.parents):
            return True
        run_id = _run_id_of(candidate)
        return run_id not in finished and instance.get_run_by_id(run_id) is not None

    result = PruneResult()
    for candidate in _candidates(output_dir):
        if needed(candidate):
            result.kept.append(candidate)
            continue
        size = _size(candidate)
        result.removed.append(candidate)
        result.bytes_freed += size
        log(f"prune: {'would remove' if dry_run else 'removing'} {candidate} ({size / 2**20:.1f} MiB)")
        if not dry_run:
            shutil.rmtree(candidate) if candidate.is_dir() else candidate.unlink()
            _remove_empty_parents(candidate, output_dir)
    log(
        f"prune: {'would remove' if dry_run else 'removed'} {len(result.removed)} checkpoint(s), "
        f"{result.bytes_freed / 2**30:.2f} GiB; kept {len(result.kept)} that current materializations use"
    )
    return result


def _remove_empty_parents(path: Path, output_dir: Path) -> None:
    # Emptied asset/partition folders go too, up to (not including) artifacts/ and assets/.
    roots = {output_dir / "artifacts", output_dir / "assets"}
    parent = path.parent
    while parent not in roots and output_dir in parent.parents:
        try:
            parent.rmdir()
        except OSError:  # not empty
            return
        parent = parent.parent
