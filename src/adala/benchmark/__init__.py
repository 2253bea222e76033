"""``adala bench``: measured speed and memory of a teacher vs its linear-attention students, next to
the analytical FLOP bound. ``bench(...) -> dict`` is the API; the CLI and ``benchmarks/`` wrap it."""

from .flops import model_flops
from .plot import plot_bench
from .run import bench, crossover

__all__ = ["bench", "crossover", "model_flops", "plot_bench", "write_json"]


def write_json(record: dict, path) -> None:
    """The bench record as indented JSON, written atomically."""
    import json

    from ..models.weights import atomic_write_text

    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
