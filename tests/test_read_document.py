"""hsu.config.read_document: a document from a store (not a file) as a layer,
with the same errors and origins as a file."""

import pytest

from hsu.config import read_document
from hsu.errors import ConfigError


def test_a_document_becomes_a_layer_whose_origins_name_the_source_and_line():
    layer = read_document("units:\n  echo:\n    command: [x]\n", "etcd /cfg/a@7")
    assert layer.data == {"units": {"echo": {"command": ["x"]}}}
    assert str(layer.origins[("units", "echo", "command")]) == "etcd /cfg/a@7:3"


@pytest.mark.parametrize(
    ("text", "why"),
    [("units: [x", "not valid YAML"), ("- a\n- b\n", "expected a mapping at the top, got list")],
)
def test_a_bad_document_is_an_error_naming_the_source(text, why):
    with pytest.raises(ConfigError, match=f"etcd /cfg/b@9.*{why}"):
        read_document(text, "etcd /cfg/b@9")


def test_an_empty_document_is_an_empty_layer():
    assert read_document("", "etcd /cfg/c@1").data == {}
