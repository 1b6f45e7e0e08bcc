"""Parts of a suite. Each module gives a `Spec` (the YAML section, validated) and `plan(spec, ctx) -> list[Job]`.

The runner knows the parts only through `PARTS` (section name -> (module, spec attr, plan attr)), in run order:
ceilings first, because every later point is reported against them.
"""

PARTS: dict[str, tuple[str, str, str]] = {
    "ceilings": ("harness.parts.ceilings", "Spec", "plan"),
    "kernels": ("harness.parts.kernels", "Spec", "plan"),
    "prefill": ("harness.parts.model", "PrefillSpec", "plan_prefill"),
    "decode": ("harness.parts.model", "DecodeSpec", "plan_decode"),
}

# Why Triton points are `skipped` on a CPU, in every part that has them.
CPU_TRITON_NOTE = "Triton's interpreter is a correctness tool, not a timing tool: CPU timings use the torch backend"
