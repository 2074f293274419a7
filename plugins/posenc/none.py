"""NoPE: no positional information at all (causal attention alone orders tokens)."""

from lowbit.nn.posenc import PositionalEncoding

__all__ = ["NoPE"]


class NoPE(PositionalEncoding):
    """Adds nothing: the protocol's defaults. Kuzmin-style NoPE baseline for extrapolation."""

    lowbit_plugin_api = 1
    pos_dims = (1, 2)

    def __init__(self) -> None:
        super().__init__()
