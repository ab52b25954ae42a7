"""ensemble_model checks coverage from the model cards it loads and records them by hash.

The upstream stages are stand-ins with the real asset keys (no training): each instance model
is a small file with a model card beside it, as instance_model writes them.
"""

import hashlib
import json
from pathlib import Path

import dagster as dg
import pytest

from memopt_pipeline.assets.partitions import INSTANCE_PARTITIONS_NAME, instance_partitions
from memopt_pipeline.assets.training import ensemble_model
from memopt_pipeline.resources import ArtifactStore, JsonIOManager

GENES = {"instance_0": ["g1", "g2", "g3"], "instance_1": ["g4", "g5", "g6"]}


def _stand_ins(model_dir: Path, card_genes: dict[str, list[str]]) -> list:
    @dg.asset(name="gene_split")
    def gene_split() -> dict:
        return {"train_genes": sorted(g for genes in GENES.values() for g in genes), "holdout_genes": ["h1"]}

    @dg.asset(name="instance_assignment")
    def instance_assignment() -> dict:
        return {"instances": {key: {"genes": genes, "rows": 10} for key, genes in GENES.items()}}

    @dg.asset(name="instance_model", partitions_def=instance_partitions)
    def instance_model(context: dg.AssetExecutionContext) -> dict:
        key = context.partition_key
        folder = model_dir / key
        folder.mkdir(parents=True, exist_ok=True)
        model_path = folder / "model.txt"
        model_path.write_text(f"tree\nstand-in model of {key}\n")
        card = {
            "partition": key,
            "model_path": str(model_path),
            "genes": card_genes[key],
            "cv_logloss_mean": 0.5,
            "calibration": None,
        }
        (folder / "model_card.json").write_text(json.dumps(card))
        return card

    return [gene_split, instance_assignment, instance_model]


def _materialize_ensemble(tmp_path: Path, card_genes: dict[str, list[str]], **kwargs) -> dg.ExecuteInProcessResult:
    assets = [*_stand_ins(tmp_path / "models", card_genes), ensemble_model]
    resources = {
        "io_manager": JsonIOManager(base_dir=str(tmp_path / "out")),
        "artifacts": ArtifactStore(base_dir=str(tmp_path / "out")),
    }
    instance = kwargs["instance"]
    instance.add_dynamic_partitions(INSTANCE_PARTITIONS_NAME, sorted(GENES))
    dg.materialize(assets, selection=["gene_split", "instance_assignment"], instance=instance, resources=resources)
    for key in sorted(GENES):
        dg.materialize(assets, selection=["instance_model"], partition_key=key, instance=instance, resources=resources)
    return dg.materialize(assets, selection=["ensemble_model"], instance=instance, resources=resources)


def test_ensemble_fails_when_a_model_card_lacks_assigned_genes(tmp_path):
    # instance_1's model was trained on one of its three assigned genes: the assignment alone
    # says 100% coverage; the cards say two training genes are in no model.
    short = {"instance_0": GENES["instance_0"], "instance_1": ["g4"]}
    with dg.instance_for_test() as instance:
        with pytest.raises(dg.Failure) as failure:
            _materialize_ensemble(tmp_path, short, instance=instance)
    message = str(failure.value.description)
    assert "2 training gene(s) are in no model's card" in message
    assert "materialize instance_model again for ['instance_1']" in message


def test_ensemble_records_each_member_model_and_card_by_hash(tmp_path):
    with dg.instance_for_test() as instance:
        result = _materialize_ensemble(tmp_path, GENES, instance=instance)
    value = result.output_for_node("ensemble_model")
    assert value["coverage"] == 1.0
    for member in value["members"]:
        for kind in ("model", "model_card"):
            path = Path(member[f"{kind}_path"])
            assert path.is_file() and member[f"{kind}_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert Path(member["model_card_path"]).parent == Path(member["model_path"]).parent
    [materialization] = result.asset_materializations_for_node("ensemble_model")
    recorded = materialization.metadata["models"].value
    members = {m["partition"]: m["model_sha256"] for m in value["members"]}
    assert {k: v["model_sha256"] for k, v in recorded.items()} == members
