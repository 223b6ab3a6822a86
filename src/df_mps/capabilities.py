"""What this machine and this torch can do, as one frozen snapshot.

Detection (``detect``) touches the OS and torch; everything else works on the snapshot alone,
so the logic can be tested with faked facts (``PlatformFacts``) on any machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import plistlib
import threading
from typing import Iterator, Optional, Tuple

from .util import sysctl

MacVersion = Tuple[int, int]

# MPS holds complex dtypes only from macOS 14 on; below that torch raises
# "MPS complex types are only supported on MacOS 14.0 or newer".
MPS_COMPLEX_MIN_MACOS: MacVersion = (14, 0)


@dataclasses.dataclass(frozen=True)
class PlatformFacts:
    """Raw facts read from the OS and torch; the only input of ``build``."""

    system: str  # platform.system(): "Darwin", "Linux", "Windows"
    machine: str  # platform.machine(): "arm64", "x86_64", ...
    mac_ver: str = ""  # platform.mac_ver()[0]; "10.16" for binaries built against old SDKs
    sysctl_product_version: Optional[str] = None  # sysctl kern.osproductversion
    plist_product_version: Optional[str] = None  # SystemVersion.plist ProductVersion
    proc_translated: bool = False  # sysctl.proc_translated == 1: x86_64 under Rosetta 2
    torch_version: str = ""
    cuda_available: bool = False
    mps_built: bool = False
    mps_available: bool = False
    mps_complex_probe: Optional[bool] = None  # result of the opt-in runtime probe, if run


@dataclasses.dataclass(frozen=True)
class Capabilities:
    system: str
    machine: str
    macos_version: Optional[MacVersion]
    rosetta: bool
    torch_version: str
    cuda_available: bool
    mps_built: bool
    mps_available: bool
    # None where there is no usable MPS device to ask about.
    mps_complex: Optional[bool]
    mps_complex_source: str  # "macOS rule", "runtime probe", "no MPS"
    # Device types (torch.device.type) on which complex tensors must not be created.
    devices_without_complex: frozenset = frozenset()
    emulated: bool = False

    def supports_complex(self, device_type: str) -> bool:
        return device_type not in self.devices_without_complex

    def summary(self) -> str:
        mac = ".".join(map(str, self.macos_version)) if self.macos_version else "n/a"
        if self.mps_complex is None:
            cplx = "n/a (no MPS device)"
        else:
            cplx = f"{'yes' if self.mps_complex else 'no'} ({self.mps_complex_source})"
        lines = [
            f"platform:            {self.system} {self.machine}"
            + (" (Rosetta 2 translation)" if self.rosetta else ""),
            f"macOS version:       {mac}",
            f"torch:               {self.torch_version or 'not installed'}",
            f"CUDA available:      {'yes' if self.cuda_available else 'no'}",
            f"MPS built:           {'yes' if self.mps_built else 'no'}",
            f"MPS available:       {'yes' if self.mps_available else 'no'}",
            f"MPS complex support: {cplx}",
            "no-complex devices:  "
            + (", ".join(sorted(self.devices_without_complex)) or "none")
            + (" (emulated)" if self.emulated else ""),
        ]
        return "\n".join(lines)


def parse_version(text: Optional[str]) -> Optional[MacVersion]:
    """'14.2.1' -> (14, 2); None or garbage -> None."""
    if not text:
        return None
    parts = text.strip().split(".")
    try:
        major = int(parts[0])
        minor = int(parts[1]) if len(parts) > 1 and parts[1] else 0
    except ValueError:
        return None
    return (major, minor)


def macos_version(facts: PlatformFacts) -> Optional[MacVersion]:
    """The real macOS version, or None off macOS.

    Python built against an old SDK reports the compatibility value 10.16 for any macOS >= 11
    (SYSTEM_VERSION_COMPAT), so 10.16 is never trusted: the kernel's product version is.
    """
    if facts.system != "Darwin":
        return None
    for candidate in (facts.sysctl_product_version, facts.plist_product_version, facts.mac_ver):
        version = parse_version(candidate)
        if version is not None and version != (10, 16):
            return version
    return parse_version(facts.mac_ver)


def build(facts: PlatformFacts) -> Capabilities:
    """Pure: turn raw facts into the capability snapshot."""
    mac = macos_version(facts)
    # Under Rosetta the process is x86_64 but the hardware is Apple Silicon; an x86_64 torch has no
    # usable MPS there, whatever it reports.
    mps_available = facts.mps_available and not facts.proc_translated
    if not mps_available:
        mps_complex, source = None, "no MPS"
    elif facts.mps_complex_probe is not None:
        mps_complex, source = facts.mps_complex_probe, "runtime probe"
    else:
        mps_complex = mac is not None and mac >= MPS_COMPLEX_MIN_MACOS
        source = "macOS rule"
    return Capabilities(
        system=facts.system,
        machine=facts.machine,
        macos_version=mac,
        rosetta=facts.proc_translated,
        torch_version=facts.torch_version,
        cuda_available=facts.cuda_available,
        mps_built=facts.mps_built,
        mps_available=mps_available,
        mps_complex=mps_complex,
        mps_complex_source=source,
        devices_without_complex=frozenset({"mps"}) if mps_complex is False else frozenset(),
    )


def _read_plist_version() -> Optional[str]:
    try:
        with open("/System/Library/CoreServices/SystemVersion.plist", "rb") as f:
            return plistlib.load(f).get("ProductVersion")
    except (OSError, plistlib.InvalidFileException, ValueError):
        return None


def probe_mps_complex() -> bool:
    """Try a tiny complex op on MPS. Only call where MPS is available."""
    import torch

    try:
        x = torch.ones(2, dtype=torch.complex64, device="mps")
        return bool(torch.isfinite(torch.view_as_real(x * x).cpu()).all())
    except (RuntimeError, TypeError):
        return False


_probe_cache: Optional[bool] = None


def read_facts(probe: bool = False) -> PlatformFacts:
    """Read the raw facts from the OS and torch (this is the only impure part)."""
    global _probe_cache
    system = platform.system()
    facts = dict(system=system, machine=platform.machine())
    if system == "Darwin":
        facts["mac_ver"] = platform.mac_ver()[0]
        facts["sysctl_product_version"] = sysctl("kern.osproductversion")
        facts["plist_product_version"] = _read_plist_version()
        facts["proc_translated"] = sysctl("sysctl.proc_translated") == "1"
    try:
        import torch
    except ImportError:
        return PlatformFacts(**facts)
    mps = getattr(torch.backends, "mps", None)
    facts.update(
        torch_version=torch.__version__.split("+")[0],
        cuda_available=torch.cuda.is_available(),
        mps_built=bool(mps and mps.is_built()),
        mps_available=bool(mps and mps.is_available()),
    )
    if probe and facts["mps_available"]:
        if _probe_cache is None:
            _probe_cache = probe_mps_complex()
        facts["mps_complex_probe"] = _probe_cache
    return PlatformFacts(**facts)


def detect(probe: bool = False) -> Capabilities:
    return build(read_facts(probe=probe))


# The process-wide snapshot, built lazily on the first question.
_current: Optional[Capabilities] = None
_lock = threading.Lock()


def get() -> Capabilities:
    global _current
    snapshot = _current
    if snapshot is None:
        with _lock:
            if _current is None:
                from . import settings

                _current = detect(probe=settings.get().probe_mps_complex)
            snapshot = _current
    return snapshot


def refresh() -> Capabilities:
    """Forget the snapshot and detect again."""
    global _current
    with _lock:
        _current = None
    return get()


@contextlib.contextmanager
def override(snapshot: Capabilities) -> Iterator[Capabilities]:
    """Use ``snapshot`` as this process's capabilities inside the block (tests, emulation)."""
    global _current
    with _lock:
        previous = _current
        _current = snapshot
    try:
        yield snapshot
    finally:
        with _lock:
            _current = previous
