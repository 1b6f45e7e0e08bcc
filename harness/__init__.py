"""tokenfleet's harness: device, timing, ceilings, runs, the model, capacity and reports."""
