"""Stage 4, project: rewrite the model by a plan (folded pairs) and measure its fidelity."""
