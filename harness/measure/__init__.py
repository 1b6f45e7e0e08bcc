"""Measuring this device: the device decision, the one timing function, suites, the runner and its parts."""
