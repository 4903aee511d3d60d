"""Many checks run in one spawn of CPU ranks and reported as one pytest test each (not a test file).

A spawn costs every rank an import of torch and fast_attn, which dwarfs the checks themselves; so a
test module spawns its ranks once (run_on_local_ranks in a module-scoped fixture), each rank runs every
check with `run_checks`, and one parametrized test per check reads its outcome with `assert_passed`.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable


def run_checks(checks: dict[str, Callable[[], None]]) -> dict[str, str | None]:
    """Every check on this rank: name -> None (passed) or the traceback of its failure."""
    outcomes = {}
    for name, check in checks.items():
        try:
            check()
            outcomes[name] = None
        except Exception:
            outcomes[name] = traceback.format_exc()
    return outcomes


def assert_passed(outcomes_by_rank: list[dict[str, str | None]], name: str) -> None:
    failures = [f"rank {rank}:\n{o[name]}" for rank, o in enumerate(outcomes_by_rank) if o[name] is not None]
    assert not failures, "\n".join(failures)
