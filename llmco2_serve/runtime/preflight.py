"""Start-up checks of every setting that can fail at run time, without vLLM.

:func:`preflight` runs where the plugin registers (``hooks/__init__.py``, in every vLLM process,
during argument parsing: before any model is loaded). It returns the problems it finds, each with
the setting it concerns, why, and what fail-open turns off because of it:

* invalid settings (``settings.load_settings``: bad values, unknown GPU, unreadable
  ``LLMCO2_GPU_SPEC_FILE``, an unparseable ``LLMCO2_OTLP_METRICS_ENDPOINT``, a bad config file):
  the whole plugin is off;
* ``LLMCO2_ENERGY_READER=nvml`` without a working NVML energy counter, or ``cpu-estimate``
  without codecarbon: measured energy is off (``auto`` falls back on its own and is no problem);
* ``LLMCO2_PAIRS_PATH`` that cannot be written: pairs are not kept.

With ``LLMCO2_FAIL_OPEN=0`` the caller refuses to start on any problem (:class:`PreflightError`
names them all); otherwise it logs each once and runs with :func:`effective_settings`, the
settings with exactly the failed features switched off. The served model's architecture is only
known later, when vLLM hands its config to the stat logger; that check stays there
(``hooks/stat_logger.py``), still before the first request.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmco2_serve.runtime.settings import PREFIX, Settings, SettingsError, fail_open_from_env, load_settings

__all__ = ["Problem", "PreflightError", "preflight", "check_settings", "effective_settings"]

PLUGIN_OFF = "the llmco2 plugin is OFF (vLLM serves without predictions or measurements)"
MEASUREMENT_OFF = ("measured energy is OFF (spans say llmco2.measured.source=unavailable); "
                   "predictions continue")
PAIRS_OFF = "pairs for retraining are NOT kept; predictions and measurements continue"


@dataclass(frozen=True)
class Problem:
    """One setting that cannot work here. ``disabled`` says what fail-open turns off."""

    setting: str  # the variable (or config-file key) at fault
    reason: str
    disabled: str

    def __str__(self) -> str:
        return f"{self.setting}: {self.reason}"


class PreflightError(RuntimeError):
    """Raised by the caller with ``LLMCO2_FAIL_OPEN=0``: the server must not start."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(str(p) for p in self.problems))


def preflight(environ: Mapping[str, str] | None = None, *, nvml: Any = None) -> tuple[Settings | None, list[Problem]]:
    """Load the settings and check them. Returns ``(settings, problems)``; ``settings`` is
    ``None`` when they are invalid (then the one problem says which variable). ``nvml`` injects a
    pynvml-like module (tests); the default imports ``pynvml``."""
    try:
        settings = load_settings(environ)
    except SettingsError as e:
        return None, [Problem(e.variable, str(e).split(": ", 1)[-1], PLUGIN_OFF)]
    return settings, check_settings(settings, nvml=nvml)


def check_settings(settings: Settings, *, nvml: Any = None) -> list[Problem]:
    """The run-time checks of valid settings (module docstring). Never raises."""
    if not settings.enabled:
        return []
    problems = []
    reader = _check_energy_reader(settings.energy_reader, nvml)
    if reader:
        problems.append(Problem(PREFIX + "ENERGY_READER", reader, MEASUREMENT_OFF))
    if settings.pairs_path:
        why = pairs_path_problem(settings.pairs_path)
        if why:
            problems.append(Problem(PREFIX + "PAIRS_PATH", why, PAIRS_OFF))
    return problems


def effective_settings(settings: Settings, problems: list[Problem]) -> Settings:
    """What fail-open runs with: each failed feature off, everything else as configured."""
    changes: dict[str, Any] = {}
    for p in problems:
        if p.setting == PREFIX + "ENERGY_READER":
            changes["energy_reader"] = "off"
        elif p.setting == PREFIX + "PAIRS_PATH":
            changes["pairs_path"] = None
    return dataclasses.replace(settings, **changes) if changes else settings


def fail_open(settings: Settings | None, environ: Mapping[str, str] | None = None) -> bool:
    """The fail-open decision, also when the settings themselves are invalid."""
    return settings.fail_open if settings is not None else fail_open_from_env(environ)


# ---------------------------------------------------------------------------------- checks
def _check_energy_reader(mode: str, nvml: Any) -> str | None:
    if mode == "nvml":
        from llmco2_serve.hardware.gpu_energy import EnergyReaderError, NvmlEnergyReader

        try:
            # The first visible GPU: proves NVML and the total-energy counter work on this host
            # (the engine core opens the full tensor-parallel set itself).
            reader = NvmlEnergyReader([0], nvml=nvml)
        except EnergyReaderError as e:
            return f"'nvml' was asked for but NVML energy counters are unavailable here ({e})"
        except Exception as e:  # noqa: BLE001 - any NVML failure means the same: no counter
            return f"'nvml' was asked for but opening NVML failed ({type(e).__name__}: {e})"
        reader.close()
    elif mode == "cpu-estimate":
        try:
            # The modules CodecarbonCpuEstimateReader imports (not constructed here: ~1 s).
            import codecarbon.core.cpu  # noqa: F401
            import codecarbon.core.util  # noqa: F401
            import codecarbon.external.hardware  # noqa: F401
        except ImportError as e:
            return ("'cpu-estimate' was asked for but codecarbon is not importable "
                    f"({e}; pip install 'llmco2-serve[cpu-estimate]')")
    return None


def pairs_path_problem(path: str) -> str | None:
    """Why ``path`` cannot take appended pairs, or ``None``. Creates nothing: an existing file is
    opened for append (which changes nothing); otherwise the nearest existing folder must be a
    writable folder (``os.access`` also sees read-only file systems)."""
    path = os.path.abspath(os.path.expanduser(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:  # e.g. a parent that is a file (ENOTDIR), a loop, no permission
        return f"cannot use {path}: {e.strerror or e}"
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            return f"{path} is a directory, not a file"
        try:
            with open(path, "ab"):
                pass
        except OSError as e:
            return f"cannot append to {path}: {e.strerror or e}"
        return None
    parent = os.path.dirname(path)
    while True:
        try:
            pst = os.stat(parent)
        except FileNotFoundError:
            up = os.path.dirname(parent)
            if up == parent:
                return f"no existing folder above {path}"
            parent = up
            continue
        except OSError as e:
            return f"cannot use {path}: {e.strerror or e}"
        if not stat.S_ISDIR(pst.st_mode):
            return f"cannot create {path}: {parent} is not a folder"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"cannot create {path}: {parent} is not writable"
        return None
