"""Roofline report on random weights: python scripts/bench_roofline.py --preset smollm2-135m --png roofline.png

Thin wrapper around inference.roofline.main (see --help)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from inference.roofline import main  # noqa: E402

if __name__ == "__main__":
    main()
