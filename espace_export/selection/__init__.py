"""Stage 3, select: the candidate projections and baselines, ranks per layer, validation, the planner."""
