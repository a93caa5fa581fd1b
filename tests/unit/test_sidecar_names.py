"""Names the sidecar derives by itself: the default instance name."""

import pytest

from mesh.cmd_sidecar import hostname_label
from registry.model import check_label


@pytest.mark.parametrize(
    ("hostname", "label"),
    [
        ("web-1", "web-1"),
        ("Web_01.example.com", "web-01"),
        ("3f2a9c1d7e4b", "3f2a9c1d7e4b"),
        ("--x--", "x"),
        ("...", "instance"),
        ("a" * 80, "a" * 63),
        ("ab" + "-" * 70, "ab"),
    ],
)
def test_hostname_label(hostname, label):
    assert hostname_label(hostname) == label
    assert check_label(label, "instance") == label
