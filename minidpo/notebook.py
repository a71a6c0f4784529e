"""What the notebooks share beyond the library: stored outputs without progress bars or loading chatter."""

from __future__ import annotations

import functools
import os


def quiet():
    """No progress bars and no transformers/datasets chatter in a notebook's stored outputs (they would be stored as
    widget state or carriage-return gibberish). Works after tqdm is imported: tqdm reads TQDM_DISABLE only at import,
    and its notebook flavour ignores it, so every tqdm is made disabled by default and tqdm.auto made the plain one."""
    os.environ["TQDM_DISABLE"] = "1"  # for what imports tqdm afresh (subprocesses)
    import tqdm.auto
    import tqdm.std
    tqdm.std.tqdm.__init__ = functools.partialmethod(tqdm.std.tqdm.__init__, disable=True)
    tqdm.auto.tqdm = tqdm.std.tqdm
    import datasets
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
