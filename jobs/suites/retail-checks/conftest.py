"""Records each check's category and markers as JUnit properties, so that ephemera can
group the results (`results.group_by: property:category`, or `marker`)."""

import pytest


@pytest.fixture(autouse=True)
def _record_category(request, record_property):
    marker = request.node.get_closest_marker("category")
    if marker is not None:
        record_property("category", marker.args[0])
    names = sorted({m.name for m in request.node.iter_markers()} - {"category", "parametrize"})
    if names:
        record_property("markers", ",".join(names))
