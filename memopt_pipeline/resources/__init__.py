from memopt_pipeline.resources.io_manager import JsonIOManager
from memopt_pipeline.resources.memory_guard import MemoryGuard
from memopt_pipeline.resources.storage import ArtifactStore, default_output_dir

__all__ = ["ArtifactStore", "JsonIOManager", "MemoryGuard", "default_output_dir"]
