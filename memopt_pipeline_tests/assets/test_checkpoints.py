"""Immutable checkpoints: one folder and one value file per materialization, values read from
the event log's latest materialization, and pruning that never touches what is current."""

import hashlib
import shutil
import uuid
from pathlib import Path

import dagster as dg
import pytest

from memopt_pipeline.assets.dataset import dataset_metadata, source_dataset
from memopt_pipeline.core.data.dataset import list_shards
from memopt_pipeline.core.storage import read_json, write_json
from memopt_pipeline.definitions import build_resources
from memopt_pipeline.resources import ArtifactStore, JsonIOManager
from memopt_pipeline.resources.checkpoints import latest_materializations, prune_checkpoints, recorded_value_path

PARTS = dg.StaticPartitionsDefinition(["a", "b"])


class Settings(dg.Config):
    text: str = "v1"
    fail: bool = False


@dg.asset(partitions_def=PARTS)
def upstream(context: dg.AssetExecutionContext, config: Settings, artifacts: ArtifactStore) -> dict:
    if config.fail:
        raise RuntimeError("this materialization fails before it writes its value")
    path = artifacts.materialization_path(context, "table.txt")
    write_json(path, {"text": config.text, "partition": context.partition_key})
    return {"text": config.text, "file": str(path)}


@dg.asset
def downstream(upstream: dict) -> dict:
    # Reads every partition of upstream; records the files it used by path.
    return {"used": {k: v["file"] for k, v in sorted(upstream.items())}, "texts": {k: v["text"] for k, v in upstream.items()}}


class CrashAfterWriteIOManager(JsonIOManager):
    """Writes the value file, then dies before Dagster records the materialization (a kill at
    the worst moment)."""

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        super().handle_output(context, obj)
        raise RuntimeError("killed after the value file was written")


def _resources(output: Path, io_manager: JsonIOManager | None = None) -> dict:
    io_manager = io_manager or JsonIOManager(base_dir=str(output))
    return {"artifacts": ArtifactStore(base_dir=str(output)), "io_manager": io_manager}


def _upstream(instance, output, partition, text="v1", **kwargs) -> dg.ExecuteInProcessResult:
    config = {"ops": {"upstream": {"config": {"text": text, "fail": kwargs.pop("fail", False)}}}}
    return dg.materialize(
        [upstream, downstream], selection=["upstream"], partition_key=partition, instance=instance,
        resources=kwargs.pop("resources", _resources(output)), run_config=config, **kwargs,
    )  # fmt: skip


def _downstream(instance, output) -> dict:
    resources = _resources(output)
    result = dg.materialize([upstream, downstream], selection=["downstream"], instance=instance, resources=resources)
    return result.output_for_node("downstream")


def _tree(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_two_materializations_have_their_own_folders_and_the_first_is_unchanged(tiny_dataset, tmp_path):
    """The real dataset stages, twice, on different data: two folders and two value files, and
    every byte the first materialization wrote is still there."""
    output = tmp_path / "out"
    smaller = tmp_path / "smaller"
    smaller.mkdir()
    for shard in list_shards(tiny_dataset)[:2]:
        shutil.copy(shard, smaller / Path(shard).name)
    with dg.instance_for_test() as instance:
        runs = []
        for data in (tiny_dataset, smaller):
            config = {"ops": {"source_dataset": {"config": {"path": str(data)}}}}
            result = dg.materialize(
                [source_dataset, dataset_metadata], instance=instance,
                resources=build_resources(output_dir=str(output)), run_config=config,
            )  # fmt: skip
            runs.append(result.run_id)
            if len(runs) == 1:
                first = _tree(output)
        folders = sorted(p.name for p in (output / "artifacts" / "dataset_metadata").iterdir())
        assert folders == sorted(runs)
        values = sorted(p.stem for p in (output / "assets" / "dataset_metadata").glob("*.json"))
        assert values == sorted(runs)
        after = _tree(output)
        assert {name: after.get(name) for name in first} == first  # nothing the first run wrote changed
        old, new = (read_json(output / "assets" / "dataset_metadata" / f"{run}.json") for run in runs)
        first_folder = output.resolve() / "artifacts" / "dataset_metadata" / runs[0]
        assert old["gene_stats_path"] == str(first_folder / "gene_stats.parquet")
        assert new["n_rows"] < old["n_rows"] and new["gene_stats_path"] != old["gene_stats_path"]


def test_load_input_reads_the_latest_successful_materialization(tmp_path):
    output = tmp_path / "out"
    with dg.instance_for_test() as instance:
        for partition in ("a", "b"):
            _upstream(instance, output, partition, text="good")
        # A later run that fails in the asset, and one killed after its value file was written.
        assert not _upstream(instance, output, "a", text="bad", fail=True, raise_on_error=False).success
        crashed = _upstream(
            instance, output, "a", text="half-written",
            resources=_resources(output, CrashAfterWriteIOManager(base_dir=str(output))), raise_on_error=False,
        )  # fmt: skip
        assert not crashed.success
        assert (output / "assets" / "upstream" / "a" / f"{crashed.run_id}.json").exists()  # there, but not recorded
        assert _downstream(instance, output)["texts"] == {"a": "good", "b": "good"}
        _upstream(instance, output, "a", text="newer")
        assert _downstream(instance, output)["texts"] == {"a": "newer", "b": "good"}


def test_load_input_without_a_materialization_or_its_file_names_the_fix(tmp_path):
    output = tmp_path / "out"
    with dg.instance_for_test() as instance:
        _upstream(instance, output, "a")
        never = r"upstream \[b\] has no materialization .*; materialize upstream \[b\] first"
        with pytest.raises(dg.Failure, match=never):
            _downstream(instance, output)
        result = _upstream(instance, output, "b")
        (output / "assets" / "upstream" / "b" / f"{result.run_id}.json").unlink()
        gone = r"value file of the latest materialization of upstream \[b\] .* is missing"
        with pytest.raises(dg.Failure, match=gone):
            _downstream(instance, output)


def test_prune_keeps_everything_referenced_and_removes_unreferenced_runs(tmp_path):
    output = tmp_path / "out"
    artifacts = output / "artifacts" / "upstream"
    with dg.instance_for_test() as instance:
        first = {p: _upstream(instance, output, p, text="first").run_id for p in ("a", "b")}
        used = _downstream(instance, output)["used"]  # downstream's latest value names the first run's files
        second = _upstream(instance, output, "a", text="second").run_id  # neither latest nor referenced
        third = _upstream(instance, output, "a", text="third").run_id  # latest of partition a
        orphan = artifacts / "a" / str(uuid.uuid4())  # what a run killed half-way leaves
        write_json(orphan / "table.txt", {"partial": True})
        unfinished = str(uuid.uuid4())  # a run still going: it has not recorded anything yet
        instance.add_run(dg.DagsterRun(job_name="x", run_id=unfinished, status=dg.DagsterRunStatus.STARTED))
        write_json(artifacts / "b" / unfinished / "table.txt", {"in progress": True})
        legacy = artifacts / "a" / "table.txt"  # not a run folder: never touched
        write_json(legacy, {"legacy": True})

        result = prune_checkpoints(instance, output, log=lambda m: None)

        removed = {p.relative_to(output.resolve()).as_posix() for p in result.removed}
        assert removed == {
            f"artifacts/upstream/a/{second}", f"artifacts/upstream/a/{orphan.name}", f"assets/upstream/a/{second}.json",
            # Value files of superseded materializations; their files stay, downstream refers to them.
            f"assets/upstream/a/{first['a']}.json",
        }  # fmt: skip
        assert (artifacts / "a" / first["a"]).is_dir() and (artifacts / "a" / third).is_dir()
        assert (artifacts / "b" / first["b"]).is_dir() and (artifacts / "b" / unfinished).is_dir() and legacy.is_file()
        for record in latest_materializations(instance):  # every latest value, and every file it names
            value = read_json(recorded_value_path(record))
            assert all(Path(p).exists() for p in value.get("used", {}).values())
            assert "file" not in value or Path(value["file"]).exists()
        assert all(Path(p).exists() for p in used.values())
        # Still loadable after pruning, from the latest materializations.
        assert _downstream(instance, output)["texts"] == {"a": "third", "b": "first"}
