import dagster as dg

# One partition per instance (a subset of training genes that fits the memory plan);
# instance_assignment adds and removes the keys.
INSTANCE_PARTITIONS_NAME = "instances"
instance_partitions = dg.DynamicPartitionsDefinition(name=INSTANCE_PARTITIONS_NAME)


def instance_key(index: int) -> str:
    return f"instance_{index}"
