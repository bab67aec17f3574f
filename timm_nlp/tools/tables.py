"""Markdown tables, the one format of every table timm-nlp prints or writes, and the statistics of seeded runs."""
import statistics
from typing import Dict, List, Sequence, Tuple

__all__ = ['markdown_table', 'mean_std', 'within_spread']


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table of ``rows`` under ``header``."""
    lines = ['| ' + ' | '.join(map(str, header)) + ' |', '|' + '---|' * len(header)]
    return '\n'.join(lines + ['| ' + ' | '.join(map(str, r)) + ' |' for r in rows])


def mean_std(values: Sequence[float]) -> str:
    """``mean ± std`` (the sample standard deviation) of several seeds' values, the value itself for one seed."""
    if len(values) == 1:
        return f'{values[0]:.2f}'
    return f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}'


def within_spread(runs: Dict[str, List[float]]) -> List[Tuple[str, str]]:
    """The pairs of models whose mean values differ by no more than the sum of their seeds' standard deviations
    (models with a single seed have no spread and are left out)."""
    stats = {m: (statistics.mean(v), statistics.stdev(v)) for m, v in runs.items() if len(v) > 1}
    names = list(stats)
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
            if abs(stats[a][0] - stats[b][0]) <= stats[a][1] + stats[b][1]]
