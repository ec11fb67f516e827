"""`python -m fastnorm.train [--key value ...]`, also under `torchrun -m fastnorm.train`."""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .config import ConfigError, help_text, parse_args

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    try:
        cfg = parse_args(argv)
        from .loop import train
        train(cfg)
    except (ConfigError, FileNotFoundError, FileExistsError) as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"fastnorm.train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
