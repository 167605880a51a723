"""`python -m lossgraph ...` and the `lossgraph` console script (see lossgraph/cli.py)."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
