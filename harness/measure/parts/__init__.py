"""Parts of a suite. Each module gives a `Spec` (the YAML section, validated) and `plan(spec, ctx) -> list[Job]`.

The runner knows the parts only through `PARTS` (section name -> (Spec class, plan function)); the order they run
in is `tokenfleet.measure.plan`'s: ceilings first, because every later point is reported against them, then by value.
"""

from tokenfleet.measure.parts import ceilings, collective, kernels, model, tp

PARTS = {
    "ceilings": (ceilings.Spec, ceilings.plan),
    "collectives": (collective.Spec, collective.plan),  # runs on N ranks (tokenfleet.measure.distributed)
    "kernels": (kernels.Spec, kernels.plan),
    "prefill": (model.PrefillSpec, model.plan_prefill),
    "decode": (model.DecodeSpec, model.plan_decode),
    "tp": (tp.Spec, tp.plan),  # tensor-parallel prefill/decode at tp = world size
}
