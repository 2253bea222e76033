"""``adala bench``: measured speed and memory of a teacher vs its linear-attention students, next to
the analytical FLOP bound. ``bench(...) -> dict`` is the API; the CLI and ``benchmarks/`` wrap it."""

from ..plotting import crossover, plot_bench
from .flops import model_flops
from .run import bench, write_json

__all__ = ["bench", "crossover", "model_flops", "plot_bench", "write_json"]
