"""The search: the study loop, its storage and typed records, the space, the Pareto front, the MLflow mirror."""
