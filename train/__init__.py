"""Stage training scripts: one per stage, each runnable as `python train/<stage>.py`."""
