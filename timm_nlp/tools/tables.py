"""Markdown tables, the one format of every table timm-nlp prints or writes."""
from typing import Sequence

__all__ = ['markdown_table']


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table of ``rows`` under ``header``."""
    lines = ['| ' + ' | '.join(map(str, header)) + ' |', '|' + '---|' * len(header)]
    return '\n'.join(lines + ['| ' + ' | '.join(map(str, r)) + ' |' for r in rows])
