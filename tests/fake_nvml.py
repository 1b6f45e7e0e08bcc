"""A fake `pynvml` for tests: GPUs numbered NVML's way, each with a UUID, a PCI bus id, readings and an energy counter
that a test advances; installed with `install(monkeypatch, ...)` in place of the real module."""

from __future__ import annotations

import sys
import types


def install(monkeypatch, gpus: int = 4, energy_mj: list[float] | None = None) -> types.SimpleNamespace:
    """A fake pynvml module with `gpus` devices (NVML index i: UUID GPU-0000000i-…, bus 0000000i:00.0... as
    `uuid(i)`, `bus(i)` give them); `state.energy_mj[i]` is device i's counter (millijoules), `state.calls` the
    handles asked for."""
    state = types.SimpleNamespace(energy_mj=list(energy_mj or [0.0] * gpus), calls=[], inits=0)
    m = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def handle(i):
        if not 0 <= i < gpus:
            raise NVMLError("Not Found")
        return ("handle", i)

    def by_uuid(u):
        state.calls.append(("uuid", u))
        return handle(next((i for i in range(gpus) if uuid(i) == u), -1))

    def by_bus(b):
        state.calls.append(("pci", b))
        return handle(next((i for i in range(gpus) if bus(i) == b), -1))

    def by_index(i):
        state.calls.append(("index", i))
        return handle(i)

    m.NVMLError = NVMLError
    m.NVML_TEMPERATURE_GPU, m.NVML_CLOCK_SM, m.NVML_CLOCK_MEM = 0, 1, 2
    m.nvmlInit = lambda: setattr(state, "inits", state.inits + 1)
    m.nvmlShutdown = lambda: None
    m.nvmlDeviceGetHandleByUUID = by_uuid
    m.nvmlDeviceGetHandleByPciBusId = by_bus
    m.nvmlDeviceGetHandleByIndex = by_index
    m.nvmlDeviceGetUUID = lambda h: uuid(h[1])
    m.nvmlDeviceGetName = lambda h: f"Fake GPU {h[1]}"
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=80 << 30)
    m.nvmlDeviceGetEnforcedPowerLimit = lambda h: 700_000
    m.nvmlDeviceGetPowerUsage = lambda h: 500_000 + 1000 * h[1]
    m.nvmlDeviceGetTemperature = lambda h, sensor: 50
    m.nvmlDeviceGetClockInfo = lambda h, clock: 1980
    m.nvmlDeviceGetMaxClockInfo = lambda h, clock: 1980
    m.nvmlSystemGetDriverVersion = lambda: "580.0"
    m.nvmlDeviceGetTotalEnergyConsumption = lambda h: int(state.energy_mj[h[1]])
    monkeypatch.setitem(sys.modules, "pynvml", m)
    return state


def uuid(i: int) -> str:
    return f"GPU-{i:08x}-1111-2222-3333-444444444444"


def bus(i: int) -> str:
    return f"{i:08X}:00:00.0"
