"""``python -m df_mps``: the capability summary; ``python -m df_mps doctor``: the full report;
``python -m df_mps doctor --audit``: DeepFilterNet3's ops checked for a target device."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["doctor"]:
        from . import doctor

        return doctor.main(argv[1:])  # doctor parses its own options (--audit, ...)
    parser = argparse.ArgumentParser(
        prog="python -m df_mps",
        description="Without a command: what this machine and torch can do (capabilities). "
        "doctor: versions, device, the route of each patch, settings and environment "
        "(python -m df_mps doctor --help for --audit).",
    )
    parser.add_argument("command", nargs="?", choices=("doctor",), help="doctor: full report")
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    from . import capabilities

    print(capabilities.get().summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
