"""Running a model: sampling and generation, and pipeline-parallel inference."""
