"""End-to-end experiments of the paper, each runnable as
python -m minidpo.experiments.<name> --scale smoke|laptop|paper."""
