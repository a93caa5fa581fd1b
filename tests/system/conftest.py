import pytest

from tests.system.netns import available


def pytest_collection_modifyitems(config, items):
    reason = available()
    for item in items:
        if "tests/system/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.system)
            item.add_marker(pytest.mark.one_loop)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
