"""The one place that picks the device: a CUDA GPU when torch sees one, else the CPU.

`TOKENFLEET_DEVICE=cpu|cuda` (or the CLI's `--device`) overrides. `DeviceInfo` records what the device is,
read through NVML on NVIDIA; when NVML is missing or fails, the reason is recorded and the run goes on.
`TOKENFLEET_CACHE_BYTES` replaces the cache size the device reports (`l2_bytes`: the L2, a CPU's last-level cache),
which sizes the bandwidth probes and the kernels' flush: for a machine that misreports it, and for the tests, which
keep the probes small with it.
"""

from __future__ import annotations

import glob
import os
import platform
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata

import torch
from tokenfleet.config import ConfigError

KINDS = ("cpu", "cuda")


def pick(override: str | None = None) -> str:
    """'cuda' or 'cpu'. An override that asks for CUDA where none is present is a user error."""
    want = (override or os.environ.get("TOKENFLEET_DEVICE") or "").strip().lower() or None
    if want is not None and want not in KINDS:
        raise ConfigError("--device" if override else "TOKENFLEET_DEVICE", None,
                          f"unknown device {want!r}; known: {', '.join(KINDS)}")
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device" if override else "TOKENFLEET_DEVICE", None,
                          "cuda asked for, but torch sees no CUDA device")
    return want or ("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class DeviceInfo:
    kind: str
    name: str
    memory_bytes: int | None
    compute_units: int | None  # multiprocessors on a GPU, logical cores on a CPU
    threads: int | None  # torch intra-op threads (CPU timing depends on it)
    torch_version: str
    triton_version: str | None
    cuda_version: str | None
    driver_version: str | None = None
    l2_bytes: int | None = None  # on a CPU: the last-level cache
    capability: str | None = None
    datasheet: str | None = None  # configs/hardware id this device maps to
    nvml: dict = field(default_factory=dict)
    nvml_error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.kind)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def meminfo(field: str) -> int | None:
    """A /proc/meminfo field in bytes (MemTotal, MemAvailable, ...), or None where unreadable."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _decode_reasons(pynvml, mask: int) -> list[str]:
    names = []
    for attr in dir(pynvml):
        for prefix in ("nvmlClocksEventReason", "nvmlClocksThrottleReason"):
            if attr.startswith(prefix) and attr not in (prefix + "All", prefix + "None"):
                bit = getattr(pynvml, attr)
                reason = attr[len(prefix):]
                if isinstance(bit, int) and bit and mask & bit and reason not in names:
                    names.append(reason)
    return sorted(names)


def cuda_identity(index: int) -> dict:
    """What NVML can find CUDA device `index` by: its UUID and PCI bus id as torch reports them (either may be
    missing on an old torch). NVML numbers GPUs its own way: under CUDA_VISIBLE_DEVICES (or CUDA's default
    fastest-first order) CUDA's index is not NVML's."""
    try:
        props = torch.cuda.get_device_properties(index)
    except Exception:  # noqa: BLE001 - no CUDA here: nothing to match by
        return {}
    out = {}
    uuid = getattr(props, "uuid", None)
    if uuid:
        out["uuid"] = str(uuid)
    if all(isinstance(getattr(props, a, None), int) for a in ("pci_domain_id", "pci_bus_id", "pci_device_id")):
        out["pci_bus_id"] = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
    return out


def nvml_handle(pynvml, index: int) -> tuple[object, str]:
    """NVML's handle of CUDA device `index` and how it was found: by UUID (`GPU-…`, or `MIG-…`), else by PCI bus
    id, else by NVML's index (`index (unverified)`: wrong under a remapped CUDA_VISIBLE_DEVICES, so there a device
    torch names and NVML does not have raises instead)."""
    ident = cuda_identity(index)
    tried = []
    if ident.get("uuid"):
        uuid = ident["uuid"]
        for name in ([uuid] if uuid.startswith(("GPU-", "MIG-")) else [f"GPU-{uuid}", f"MIG-{uuid}"]):
            try:
                return pynvml.nvmlDeviceGetHandleByUUID(name), "uuid"
            except Exception as e:  # noqa: BLE001 - try the next name, then the bus id
                tried.append(f"{name}: {e}")
    if ident.get("pci_bus_id"):
        try:
            return pynvml.nvmlDeviceGetHandleByPciBusId(ident["pci_bus_id"]), "pci_bus_id"
        except Exception as e:  # noqa: BLE001
            tried.append(f"{ident['pci_bus_id']}: {e}")
    if tried and os.environ.get("CUDA_VISIBLE_DEVICES"):  # remapped: NVML's device `index` is another GPU
        raise RuntimeError(f"NVML has no device matching CUDA device {index} ({'; '.join(tried)})"[:400])
    return pynvml.nvmlDeviceGetHandleByIndex(index), "index (unverified)" + (": no UUID or bus id matched" if tried
                                                                            else "")


def read_nvml(index: int = 0) -> tuple[dict, str | None]:
    """NVML fields for CUDA device `index` (found by UUID or PCI bus id: `nvml_handle`), or ({}, why not). Never
    raises."""
    try:
        import pynvml  # from the nvidia-ml-py package
    except Exception as e:  # noqa: BLE001 - absent or broken: record why and go on
        return {}, f"pynvml not importable: {e}"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001
        return {}, f"nvmlInit failed: {e}"
    out: dict = {}
    errors: list[str] = []
    try:
        h, out["nvml_lookup"] = nvml_handle(pynvml, index)

        def get(key, fn, *args, scale=1.0):
            try:
                v = fn(h, *args)
                out[key] = v.decode() if isinstance(v, bytes) else (v * scale if scale != 1.0 else v)
            except Exception as e:  # noqa: BLE001 - one unreadable field does not lose the others
                errors.append(f"{key}: {e}")

        get("uuid", pynvml.nvmlDeviceGetUUID)
        get("name", pynvml.nvmlDeviceGetName)
        try:
            out["memory_total_bytes"] = pynvml.nvmlDeviceGetMemoryInfo(h).total
        except Exception as e:  # noqa: BLE001
            errors.append(f"memory: {e}")
        get("power_limit_w", pynvml.nvmlDeviceGetEnforcedPowerLimit, scale=1e-3)
        get("power_w", pynvml.nvmlDeviceGetPowerUsage, scale=1e-3)
        get("temperature_c", pynvml.nvmlDeviceGetTemperature, pynvml.NVML_TEMPERATURE_GPU)
        get("sm_clock_mhz", pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_SM)
        get("mem_clock_mhz", pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_MEM)
        get("sm_clock_max_mhz", pynvml.nvmlDeviceGetMaxClockInfo, pynvml.NVML_CLOCK_SM)
        get("mem_clock_max_mhz", pynvml.nvmlDeviceGetMaxClockInfo, pynvml.NVML_CLOCK_MEM)
        reasons_fn = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
            pynvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
        if reasons_fn is not None:
            try:
                out["clock_event_reasons"] = _decode_reasons(pynvml, reasons_fn(h))
            except Exception as e:  # noqa: BLE001
                errors.append(f"clock_event_reasons: {e}")
        try:
            out["driver_version"] = pynvml.nvmlSystemGetDriverVersion()
            if isinstance(out["driver_version"], bytes):
                out["driver_version"] = out["driver_version"].decode()
        except Exception as e:  # noqa: BLE001
            errors.append(f"driver: {e}")
    except Exception as e:  # noqa: BLE001
        errors.append(f"handle: {e}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001, S110
            pass
    return out, ("; ".join(errors) or None)


def energy_counter(index: int = 0) -> tuple[Callable[[], float] | None, str | None]:
    """A reader of NVML's total-energy counter of CUDA device `index`, in joules (nvmlDeviceGetTotalEnergyConsumption:
    millijoules since the driver loaded; Volta and newer), or (None, why not). One nvmlInit for the process: the
    reader is called twice around every timed point."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h, _ = nvml_handle(pynvml, index)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(h)  # not supported (pre-Volta, some vGPUs): raises here
    except Exception as e:  # noqa: BLE001 - no counter: points go without measured energy, and say why
        return None, f"NVML energy counter: {type(e).__name__}: {e}"[:300]
    return (lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(h) * 1e-3), None


TELEMETRY_FIELDS = ("power_w", "temperature_c", "sm_clock_mhz", "mem_clock_mhz", "clock_event_reasons")


def telemetry(index: int = 0) -> dict | None:
    """Power, temperature, clocks and clock-event reasons right now (read after a point), or None off NVIDIA."""
    fields, _ = read_nvml(index)
    return {k: fields[k] for k in TELEMETRY_FIELDS if k in fields} or None


POLLED_NUMBERS = ("sm_clock_mhz", "mem_clock_mhz", "power_w", "temperature_c")


class Poller:
    """Telemetry polled on a background thread while a probe runs: `read()` (a dict of POLLED_NUMBERS and
    `clock_event_reasons`) every `interval_s` from enter to exit. `summary()`: min/median/max of each number over
    the polls and every clock-event reason seen. A probe that ran at a capped clock says so in its own point.
    With `read=None` (a CPU, NVML missing) it polls nothing and summary() is None."""

    def __init__(self, read: Callable[[], dict] | None, interval_s: float = 0.05,
                 close: Callable[[], None] | None = None):
        self.read, self.interval_s, self._close = read, interval_s, close
        self.polls: list[dict] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while True:
            try:
                self.polls.append(self.read())
            except Exception as e:  # noqa: BLE001 - a failed poll is counted, the probe goes on
                self.error = self.error or f"{type(e).__name__}: {e}"[:200]
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> Poller:
        if self.read is not None:
            self._thread = threading.Thread(target=self._loop, name="nvml-poll", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._close is not None:
            self._close()

    def summary(self) -> dict | None:
        if self.read is None:
            return None
        import numpy as np

        out: dict = {"polls": len(self.polls), "interval_s": self.interval_s}
        for key in POLLED_NUMBERS:
            vals = [p[key] for p in self.polls if isinstance(p.get(key), (int, float))]
            if vals:
                out[key] = {"min": min(vals), "median": float(np.median(vals)), "max": max(vals)}
        reasons = sorted({r for p in self.polls for r in p.get("clock_event_reasons", ())})
        out["clock_event_reasons"] = reasons
        if self.error:
            out["error"] = self.error
        return out


def nvml_poller(index: int = 0, interval_s: float = 0.05) -> Poller:
    """A Poller of GPU `index` through NVML (one init for the whole probe), or an empty one where NVML is missing."""
    try:
        import pynvml

        pynvml.nvmlInit()
        h, _ = nvml_handle(pynvml, index)
    except Exception:  # noqa: BLE001 - no NVML: the probe runs without telemetry (DeviceInfo says why)
        return Poller(None)
    reasons_fn = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
        pynvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None)

    def read() -> dict:
        out = {"sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
               "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
               "power_w": pynvml.nvmlDeviceGetPowerUsage(h) * 1e-3,
               "temperature_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)}
        if reasons_fn is not None:
            out["clock_event_reasons"] = _decode_reasons(pynvml, reasons_fn(h))
        return out

    def close() -> None:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001, S110
            pass

    return Poller(read, interval_s, close)


def _cpu_llc_bytes() -> int | None:
    """The largest cache of CPU 0 (sysfs), which the timing flush must exceed."""
    sizes = []
    for idx in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(idx).read().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
            sizes.append(int(text.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return max(sizes) if sizes else None


def _cache_override() -> int | None:
    """TOKENFLEET_CACHE_BYTES as a positive integer, None when unset; anything else is a user error."""
    text = os.environ.get("TOKENFLEET_CACHE_BYTES", "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) <= 0:
        raise ConfigError("TOKENFLEET_CACHE_BYTES", None, f"{text!r} is not a size in bytes (a positive integer)")
    return int(text)


def detect(override: str | None = None) -> DeviceInfo:
    """Describe the device this run uses (see `pick`)."""
    from tokenfleet.hardware import match_device

    kind = pick(override)
    common = dict(torch_version=torch.__version__, triton_version=_version("triton"), cuda_version=torch.version.cuda)
    if kind == "cuda":
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        nvml, nvml_error = read_nvml(idx)
        info = DeviceInfo(
            kind="cuda", name=props.name, memory_bytes=props.total_memory, compute_units=props.multi_processor_count,
            threads=None, driver_version=nvml.get("driver_version"), l2_bytes=getattr(props, "L2_cache_size", None),
            capability=f"{props.major}.{props.minor}", nvml=nvml, nvml_error=nvml_error, **common)
    else:
        info = DeviceInfo(kind="cpu", name=_cpu_name(), memory_bytes=meminfo("MemTotal"), compute_units=os.cpu_count(),
                          threads=torch.get_num_threads(), l2_bytes=_cpu_llc_bytes(),
                          nvml_error="cpu run: NVML not read", **common)
    info.l2_bytes = _cache_override() or info.l2_bytes
    hw = match_device(info.name)
    info.datasheet = hw.id if hw else None
    return info
