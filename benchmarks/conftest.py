"""What the benchmark modules share: the table of time ratios each prints after its runs."""

from __future__ import annotations

import pytest

from fast_attn.bench_report import write_ratio_table


@pytest.fixture(scope="module", autouse=True)
def _print_ratio_table(request):
    """After a module's benchmarks, its ratio table (fast_attn.bench_report.write_ratio_table), for a
    module that defines MEDIANS (median seconds by group, then by implementation), ratio_title() and
    ratio_row(group, medians)."""
    yield
    module = request.module
    if hasattr(module, "ratio_row"):
        write_ratio_table(request.config, module.ratio_title(), module.MEDIANS, module.ratio_row)
