"""Run the benchmark (the same as `addnorm bench`): python benchmarks/run.py [--quick] ..."""

import sys

from addnorm.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
