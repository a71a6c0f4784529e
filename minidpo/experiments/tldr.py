"""python -m minidpo.experiments.tldr --scale smoke|laptop|paper: TL;DR summarization win rates (paper Fig. 2 right)."""

from .tldr_hh import main

if __name__ == "__main__":
    main("tldr")
