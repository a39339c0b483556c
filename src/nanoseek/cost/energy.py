"""Energy, money and CO2 per log interval, with a label saying whether the energy was measured or estimated.

Energy comes from codecarbon's offline tracker (nothing is sent anywhere, no file is written), which reads
  NVIDIA / AMD GPUs   the driver's energy counter or power readings (NVML / AMD SMI)          measured
  CPUs                RAPL counters where /sys/class/powercap is readable (Linux; Windows EMI) measured
                      otherwise a model of power from the CPU load and the CPU's TDP          estimated
  RAM                 always a model from the installed memory                                 estimated
An interval is labelled "measured" when the device that trains is read from the hardware (GPU runs: NVML; CPU
runs: RAPL), "estimated" otherwise; `energy_method` says how each part was obtained. When codecarbon cannot run,
a constant power (the accelerator's board power from nanoseek.cost.hardware, or codecarbon's generic 85 W for a
CPU) times the wall time stands in, labelled "estimated" and saying so; a CUDA GPU that codecarbon cannot read (no
NVML) is added the same way, at its board power.

Money: kWh × price_per_kwh, or machine-hours × price_per_hour for a rented machine, whose price includes its power.
CO2: kWh × the grid's carbon intensity: the country's figure from codecarbon's own table (global_energy_mix.json,
Ember / Our World in Data, gCO2e per kWh), its world average (475 g, IEA), or a figure given in the config.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.resources
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from nanoseek.config import ConfigError
from nanoseek.cost.hardware import match_device_name

if TYPE_CHECKING:
    from nanoseek.train.config import CostConfig

GENERIC_CPU_WATTS = 85.0  # codecarbon's POWER_CONSTANT: the TDP it assumes when it can tell nothing of the CPU
_COUNTER_CPU_MODES = {"intel_rapl": "RAPL counters", "windows_emi": "the Windows Energy Meter Interface (RAPL)",
                      "intel_power_gadget": "Intel Power Gadget"}


# ---- grid intensity and prices --------------------------------------------------------------------------------
@dataclass(frozen=True)
class GridIntensity:
    g_per_kwh: float  # gCO2e per kWh
    source: str


def _codecarbon_data(name: str) -> dict[str, Any]:
    """A JSON table shipped inside the codecarbon package (read directly: no pandas, no tracker)."""
    return json.loads((importlib.resources.files("codecarbon") / "data" / "private_infra" / name).read_text())


@functools.cache
def _country_table() -> dict[str, dict[str, Any]]:
    return _codecarbon_data("global_energy_mix.json")


def grid_intensity(country: str, override_g_per_kwh: float = 0.0) -> GridIntensity:
    """The carbon intensity of a country's grid (ISO 3166-1 alpha-3, or "world"), or the given override."""
    if override_g_per_kwh > 0:
        return GridIntensity(override_g_per_kwh, "given (cost.carbon_intensity)")
    code = str(country).strip().upper()
    if code == "WORLD":
        data = _codecarbon_data("carbon_intensity_per_source.json")
        return GridIntensity(float(data["world_average"]),
                             f"world average, codecarbon's table ({data['world_average_source']})")
    row = _country_table().get(code)
    if row is None:
        examples = ", ".join(c for c in ("FRA", "DEU", "USA", "IND", "CHN", "BRA", "KEN") if c in _country_table())
        raise ConfigError(f"cost.country={country!r} (nanoseek plan: --country) is not in codecarbon's grid table "
                          f"({len(_country_table())} ISO 3166-1 alpha-3 codes, e.g. {examples}): set it to one of them "
                          "or to 'world', or give cost.carbon_intensity=GRAMS_PER_KWH")
    return GridIntensity(float(row["carbon_intensity"]),
                         f"{row['country_name']} ({code}) {row['year']} grid mix, codecarbon's table (Ember / OWID)")


@dataclass(frozen=True)
class Tariff:
    """What a kWh and a machine-hour cost (USD) and what a kWh emits: the arithmetic of the cost columns."""

    price_per_kwh: float
    price_per_hour: float
    grid: GridIntensity
    machines: int = 1  # the hourly price is paid for each machine of the job

    @classmethod
    def of(cls, cost: CostConfig, machines: int = 1) -> Tariff:
        """The tariff a run's (or server's) `[cost]` settings describe, for a job on `machines` machines."""
        return cls(cost.price_per_kwh, cost.price_per_hour, grid_intensity(cost.country, cost.carbon_intensity),
                   machines)

    def cost_usd(self, kwh: float | None, seconds: float) -> float | None:
        """A rented machine's hourly price includes its power, so it replaces the per-kWh price when set."""
        if self.price_per_hour > 0:
            return seconds / 3600 * self.price_per_hour * self.machines
        return None if kwh is None else kwh * self.price_per_kwh

    def co2_kg(self, kwh: float | None) -> float | None:
        return None if kwh is None else kwh * self.grid.g_per_kwh / 1000

    @property
    def basis(self) -> str:
        if self.price_per_hour > 0:
            return f"{self.price_per_hour:g} USD per machine-hour" + (
                f" x {self.machines} machines" if self.machines > 1 else "")
        return f"{self.price_per_kwh:g} USD per kWh"


def energy_scope(machines: int) -> str:
    """What a run's energy figures cover: the meter runs on rank 0's machine only."""
    return "this machine" if machines == 1 else f"rank 0's machine only, 1 of {machines}: the others are not metered"


# ---- the meter ---------------------------------------------------------------------------------------------
@functools.cache
def machine_power() -> tuple[float, str]:
    """Watts of this machine's CPU and RAM at full load, as codecarbon estimates them when it reads no counters:
    its TDP table (4 W per thread for a CPU it does not know) plus RAM by size. `nanoseek plan --cpu` plans with
    this, so a plan and a metered run on the same machine use one power model."""
    try:
        from codecarbon.core.cpu import TDP
        from codecarbon.external.ram import RAM

        logging.getLogger("codecarbon").setLevel(logging.ERROR)  # "we don't know this CPU" is said in the source
        tdp = TDP()
        cpu = float(tdp.tdp or GENERIC_CPU_WATTS)
        ram = float(RAM(tracking_mode="machine").total_power().W)
    except Exception as e:  # codecarbon cannot tell anything about this machine
        return GENERIC_CPU_WATTS, f"codecarbon's generic CPU power ({type(e).__name__}: {e})"
    version = importlib.metadata.version("codecarbon")
    return cpu + ram, f"codecarbon {version}'s estimate for {tdp.model}: CPU TDP {cpu:g} W + RAM {ram:g} W"


def _physical_gpu(device: torch.device) -> str:
    """The NVML index (or UUID) of a torch CUDA device: torch numbers only the CUDA_VISIBLE_DEVICES."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[index].strip() if visible else str(index)


def board_power(device: torch.device, gpus: int = 1) -> tuple[float, str] | None:
    """Datasheet board power (W) of the CUDA GPUs in use, when nanoseek.cost.hardware's table knows them."""
    if device.type != "cuda":
        return None
    acc = match_device_name(torch.cuda.get_device_name(device))
    return None if acc is None else (acc.tdp_w * gpus, f"{gpus} x {acc.name} board power {acc.tdp_w:g} W (datasheet)")


def _describe(tracker: Any, device: torch.device) -> tuple[str, str, bool]:
    """(source, method, whether a GPU is read) from the parts codecarbon found: "measured" when the training
    device is read."""
    from codecarbon.external.hardware import CPU, GPU, AppleSiliconChip, Raspberry

    parts, cpu_read, gpu_read = [], False, False
    for hw in tracker._hardware:  # codecarbon has no public accessor for how each part is read
        if isinstance(hw, GPU):
            gpu_read = True
            parts.append(f"{tracker._conf.get('gpu_model') or 'GPUs'} read from the driver (NVML / AMD SMI)")
        elif isinstance(hw, CPU) and hw._mode in _COUNTER_CPU_MODES:
            cpu_read = True
            parts.append(f"CPU read from {_COUNTER_CPU_MODES[hw._mode]}")
        elif isinstance(hw, CPU) and hw._mode == "cpu_load":
            parts.append(f"CPU estimated from its load and a {hw._tdp:g} W TDP (no readable RAPL counters)")
        elif isinstance(hw, CPU):
            parts.append(f"CPU estimated as a constant share of a {hw._tdp:g} W TDP")
        elif isinstance(hw, AppleSiliconChip | Raspberry):
            cpu_read = gpu_read = True
            parts.append(f"{hw.chip_part} read by {'powermetrics' if isinstance(hw, AppleSiliconChip) else 'its PMIC'}")
        else:
            parts.append("RAM estimated from its size")
    parts.sort(key=lambda p: p.startswith("RAM"))  # the part that does the work first
    measured = gpu_read if device.type in ("cuda", "mps") else cpu_read
    version = importlib.metadata.version("codecarbon")
    return ("measured" if measured else "estimated"), f"codecarbon {version} offline: " + "; ".join(parts), gpu_read


class EnergyMeter:
    """This machine's energy (and its money and CO2) since the previous `interval()`.

    Measure once per log interval, never per step: each interval costs well under a millisecond. In a distributed
    run only rank 0 meters, and `whole_machine` makes it read every GPU of its machine, not only its own.
    """

    def __init__(self, tariff: Tariff, device: torch.device | str = "cpu", measure: bool = True,
                 whole_machine: bool = False):
        self.tariff = tariff
        self.device = torch.device(device)
        self._gpus = torch.cuda.device_count() if self.device.type == "cuda" and whole_machine else 1
        self._tracker: Any = None
        self._task = 0
        self._watts = 0.0  # constant power standing in for what nothing reads
        self._last = time.perf_counter()
        if not measure:
            self.source, self.method = "off", "not measured (cost.energy = false)"
            return
        try:
            self._tracker = self._start_tracker(whole_machine)
            self.source, self.method, gpu_read = _describe(self._tracker, self.device)
            if self.device.type == "cuda" and not gpu_read:  # no NVML: the GPU would be missing from the total
                board = board_power(self.device, self._gpus)
                self._watts = board[0] if board else 0.0
                self.method += f"; GPU not readable (no NVML): {board[1] + ' x wall time' if board else 'not counted'}"
        except Exception as e:  # codecarbon could not read this machine at all
            self._fall_back(f"codecarbon could not start: {type(e).__name__}: {e}")
        self._last = time.perf_counter()

    def _start_tracker(self, whole_machine: bool) -> Any:
        from codecarbon import OfflineEmissionsTracker

        logging.getLogger("codecarbon").setLevel(logging.ERROR)  # its start-up messages come before log_level
        gpu_ids = [_physical_gpu(self.device)] if self.device.type == "cuda" and not whole_machine else None
        tracker = OfflineEmissionsTracker(
            country_iso_code=None, cloud_provider=None, cloud_region=None, gpu_ids=gpu_ids,
            output_methods=[], emissions_endpoint="", electricitymaps_api_token="",  # no file, no API, no network
            force_carbon_intensity_g_co2e_kwh=self.tariff.grid.g_per_kwh, tracking_mode="machine",
            allow_multiple_runs=True, log_level="error", project_name="nanoseek")
        tracker.start_task(self._task_name)  # task mode: each interval is one task, measured when it stops
        return tracker

    @property
    def _task_name(self) -> str:
        return f"interval-{self._task}"

    def _fall_back(self, why: str) -> None:
        self._tracker = None
        board = board_power(self.device, self._gpus)
        if board is None:
            watts, source = machine_power()
            board = watts, f"{source}, {watts:g} W" + (
                "; the GPU, of unknown power, not counted" if self.device.type == "cuda" else "")
        self._watts, what = board
        self.source, self.method = "estimated", f"constant {what} x wall time ({why})"

    def _read_kwh(self, seconds: float) -> float | None:
        if self.source == "off":
            return None
        if self._tracker is not None:
            try:
                data = self._tracker.stop_task(self._task_name)
                self._tracker._tasks.pop(self._task_name, None)  # one record per interval would grow without end
                self._task += 1
                self._tracker.start_task(self._task_name)
                if data is not None:
                    return float(data.energy_consumed) + self._watts * seconds / 3.6e6
                self._fall_back("codecarbon returned no measurement")
            except Exception as e:
                self._fall_back(f"codecarbon failed: {type(e).__name__}: {e}")
        return self._watts * seconds / 3.6e6

    def interval(self) -> dict[str, Any]:
        """energy_kwh, energy_source, energy_method, cost_usd, co2_kg since the previous call (or the start)."""
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        kwh = self._read_kwh(seconds)
        return {"energy_kwh": kwh, "energy_source": self.source, "energy_method": self.method,
                "cost_usd": self.tariff.cost_usd(kwh, seconds), "co2_kg": self.tariff.co2_kg(kwh)}

    def close(self) -> None:
        """Stop codecarbon's 1-second sampling thread."""
        if self._tracker is not None:
            self._tracker.stop_task(self._task_name)
            self._tracker = None
