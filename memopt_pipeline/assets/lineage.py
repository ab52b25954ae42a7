"""Which files a materialization used, by path and SHA-256, and the checks that they are still those.

A checkpoint is only reusable if what it was built from can be named exactly: the ensemble
records the model files and model cards of its members, the evaluation stages record the
model files they loaded. Models live in per-materialization folders (resources/storage.py), so
a recorded path keeps its bytes; the hash makes that checkable, and a mismatch (a file edited
or restored by hand) stops the stage instead of silently evaluating other bytes.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from memopt_pipeline.core.evaluate.ensemble import EnsembleMember
from memopt_pipeline.core.storage import file_reference, read_json


def _fail(message: str) -> dg.Failure:
    # Not a memory problem: running the same step again at a lower ladder level cannot help.
    return dg.Failure(description=message, allow_retries=False)


def load_instance_card(partition: str, value: dict) -> tuple[dict, dict, dict]:
    """(model card as written beside the model, model file reference, card file reference) of one
    instance_model value. The card is read from its file (the one that is hashed), not taken from
    the value, and its recorded model hash must match the model file."""
    label = f"instance_model [{partition}]"
    model_path = Path(value["model_path"])
    card_path = Path(value.get("model_card_path") or model_path.with_name("model_card.json"))
    for what, path in (("model file", model_path), ("model card", card_path)):
        if not path.is_file():
            raise _fail(f"{label}: {what} {path} is missing; materialize {label} again")
    model_ref, card_ref = file_reference(model_path), file_reference(card_path)
    card = read_json(card_path)
    recorded = card.get("model_sha256")
    if recorded and recorded != model_ref["sha256"]:
        raise _fail(
            f"{label}: {model_path} is not the model its card describes (sha256 {model_ref['sha256'][:12]} != "
            f"{recorded[:12]}); materialize {label} again"
        )
    if not isinstance(card.get("genes"), list):
        raise _fail(f"{label}: model card {card_path} lists no genes; materialize {label} again")
    return card, model_ref, card_ref


def coverage_of(cards: dict[str, dict], assignment: dict, train_genes: list[str]) -> float:
    """Share of the training genes some model was trained on, from the genes the model cards list.

    Fails when it is below 100%, naming how many genes no model has seen and the instances whose
    card lacks genes of their assignment (those are the partitions to materialize again)."""
    train = set(train_genes)
    covered = set().union(*(set(card["genes"]) for card in cards.values()))
    missing = train - covered
    coverage = 1.0 - len(missing) / len(train) if train else 1.0
    if missing:
        short = {
            key: len(set(assignment["instances"][key]["genes"]) - set(card["genes"]))
            for key, card in sorted(cards.items())
            if key in assignment["instances"]
        }
        short = {key: n for key, n in short.items() if n}
        fix = (
            f"materialize instance_model again for {sorted(short)} (their model cards lack "
            + ", ".join(f"{n} assigned gene(s) of {key}" for key, n in short.items())
            + ")"
            if short
            else "materialize instance_assignment, then every instance_model partition"
        )
        raise _fail(
            f"the instance models cover only {coverage:.1%} of the training genes: {len(missing)} training gene(s) "
            f"are in no model's card (e.g. {sorted(missing)[:5]}); {fix}"
        )
    return coverage


def loaded_models(ensemble_model: dict) -> tuple[list[EnsembleMember], list[dict]]:
    """The ensemble's members, and a reference (partition, path, sha256, bytes) to each model file
    they load, checked against the hash the ensemble recorded when it has one."""
    members, references = [], []
    for member in ensemble_model["members"]:
        path = Path(member["model_path"])
        label = f"instance_model [{member['partition']}]"
        if not path.is_file():
            raise _fail(f"{label}: model file {path} is missing; materialize {label} and ensemble_model again")
        reference = {"partition": member["partition"], **file_reference(path)}
        recorded = member.get("model_sha256")
        if recorded and recorded != reference["sha256"]:
            raise _fail(
                f"{label}: {path} changed since ensemble_model recorded it (sha256 {reference['sha256'][:12]} != "
                f"{recorded[:12]}); materialize {label} and ensemble_model again"
            )
        references.append(reference)
        members.append(
            EnsembleMember(
                partition=member["partition"],
                model_path=str(path),
                weight=member["weight"],
                calibration=member.get("calibration"),
            )
        )
    return members, references
