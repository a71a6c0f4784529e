"""python -m minidpo.experiments.hh --scale smoke|laptop|paper: Anthropic HH dialogue win rates (paper Fig. 3)."""

from .tldr_hh import main

if __name__ == "__main__":
    main("hh")
