"""Capacity: one model on one GPU (`project`), fleets against demand (`fleet`), their configs, calibration from runs."""
