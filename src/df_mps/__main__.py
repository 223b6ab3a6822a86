"""``python -m df_mps``: the capability summary; ``python -m df_mps doctor``: the full report."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m df_mps",
        description="Without a command: what this machine and torch can do (capabilities). "
        "doctor: versions, device, the route of each patch, settings and environment.",
    )
    parser.add_argument("command", nargs="?", choices=("doctor",), help="doctor: full report")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if args.command == "doctor":
        from . import doctor

        return doctor.main()
    from . import capabilities

    print(capabilities.get().summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
