"""pytest plugin for tools/mutation.py: run a mutant's tests fastest first.

mutmut hands pytest a mutant's tests in no particular order and stops at the first failure
(-x); with test_train.py's minute-long end-to-end tests in the selection, running the quick
unit tests first kills most mutants in seconds. Durations come from mutmut's own traced run
(mutants/mutmut-stats.json, in the directory pytest runs in); without it, order is unchanged.
"""

import json
from pathlib import Path


def pytest_collection_modifyitems(session, config, items):
    stats = Path("mutmut-stats.json")
    if not stats.is_file():
        return
    try:
        durations = json.loads(stats.read_text()).get("duration_by_test", {})
    except (OSError, ValueError):
        return
    items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))
