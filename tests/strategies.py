"""Hypothesis strategies the numerics and QAT property tests share (``pythonpath = tests`` in pyproject)."""

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp


def matrices(cols: int = 64, max_rows: int = 4) -> st.SearchStrategy[torch.Tensor]:
    """float32 (rows, cols) tensors, zeros included, each row scaled by its own 2^e, e in [-40, 40]: a wide
    dynamic range with every row at its own magnitude."""
    values = hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, max_rows), st.just(cols)),
        elements=st.floats(-4.0, 4.0, width=32, allow_nan=False, allow_infinity=False),
    )
    exponents = st.lists(st.integers(-40, 40), min_size=max_rows, max_size=max_rows)
    return st.builds(
        lambda a, e: torch.from_numpy(a) * torch.exp2(torch.tensor(e[: a.shape[0]]).float())[:, None], values, exponents
    )
