"""Reading and writing: models (atomic, external data), calibration data, artifacts (statistics, plans), reports."""
