"""Reading a deployment cheaply: a document without anchors is built from
the parser's events, and origins are worked out from the text read when
first asked for; the data and every origin are what the node builder makes."""

from __future__ import annotations

import datetime
import math
import re

import hypothesis.strategies as st
import pytest
import yaml
from hypothesis import HealthCheck, given, settings

from conftest import write_deployment
from hsu._kernel.config import loader as config_loader
from hsu._kernel.plugins import PluginManager
from hsu.config import DeferredOrigins, _load_yaml, read_document, read_file
from hsu.errors import ConfigError


def typed(value):
    """``value`` with each scalar's type beside it (``1``, ``1.0`` and
    ``True`` are equal in Python), NaN made comparable."""
    if isinstance(value, dict):
        return ("dict", [(typed(k), typed(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [typed(v) for v in value])
    if isinstance(value, float) and math.isnan(value):
        return ("float", "nan")
    return (type(value).__name__, value)


def node_built(text: str):
    """The data as the node builder makes it (with origins, as on demand)."""
    return _load_yaml(text, "d.yaml", origins=True)[0]


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.sampled_from(["1", "1.0", "true", "no", "~", "null", "0x1f", "1e3", ".nan", "2001-12-14"]),
    st.dates(min_value=datetime.date(1970, 1, 1)),
)
documents = st.dictionaries(
    st.one_of(st.text(max_size=6), st.integers(), st.booleans()),
    st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
        ),
        max_leaves=12,
    ),
    max_size=5,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=documents, flow=st.booleans())
def test_a_document_reads_to_the_same_data_as_the_node_builder_makes(data, flow):
    text = yaml.safe_dump(data, default_flow_style=flow, allow_unicode=True)
    assert typed(read_document(text, "d.yaml").data) == typed(node_built(text))


def test_what_the_events_leave_to_the_node_builder_reads_as_before():
    """Merge keys, anchors, tags, a key that is a list, duplicates, bounds:
    the same data or the same error as the node builder."""
    docs = [
        "base: &b {x: 1}\nu: {<<: *b, y: 2}\n",
        "u: {<<: {x: 1}, x: 2}\n",
        "a: !!str 1\nb: !!binary aGVsbG8=\n",
        "x: " + "[" * 100 + "]" * 100 + "\n",
    ]
    for text in docs:
        assert typed(read_document(text, "d.yaml").data) == typed(node_built(text))
    for text, message in [
        ("a: 1\nb: 2\na: 3\n", "d.yaml:3: duplicate key 'a' (first at line 1)"),
        ("a: 1\n? [x]\n: 2\n", "d.yaml:2: a key must be a plain value"),
        ("a: !!set {x}\n", "d.yaml:1: YAML tag 'tag:yaml.org,2002:set' is not supported"),
        ("x: " + "[" * 101 + "]" * 101 + "\n", "d.yaml:1: nested more than 100 levels deep"),
        ("a: 1\n---\nb: 2\n", "d.yaml:2: not valid YAML: but found another document"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            read_document(text, "d.yaml")


def test_origins_come_from_the_text_read_when_first_asked_for(tmp_path):
    path = write_deployment(
        tmp_path / "d.yaml",
        "name: d\nunits:\n  echo:\n    kind: managed\n    command: [sleep, '1']\n"
        "    stop_grace: 2\n",
    )
    pm = PluginManager.load([], env={}, autoload=False)
    d = config_loader.read_config(pm, config_loader.context([path], env={}))
    assert isinstance(d.origins, DeferredOrigins)
    assert "not made yet" in repr(d.origins)  # a read that finds no problem makes none
    # the file changes after the read: the origins are still those of the text read
    path.write_text("name: d\n\n\n\nunits: {}\n")
    assert str(d.origins[("units", "echo", "stop_grace")]) == f"{path}:6"
    assert str(d.origins[("units", "echo", "command", 1)]) == f"{path}:5"
    assert d.origins.get(("units", "nope")) is None


def test_a_file_and_the_environment_merge_their_origins_on_demand(tmp_path):
    path = write_deployment(
        tmp_path / "d.yaml",
        "name: d\nunits:\n  echo:\n    kind: managed\n    command: [sleep, '1']\n"
        "    stop_grace: 2\n",
    )
    env = {"HSU_UNITS__ECHO__STOP_GRACE": "7"}
    pm = PluginManager.load([], env=env, autoload=False)
    d = config_loader.read_config(pm, config_loader.context([path], env=env))
    assert d.units["echo"].stop_grace == 7
    assert str(d.origins[("units", "echo", "stop_grace")]) == "env HSU_UNITS__ECHO__STOP_GRACE"
    assert str(d.origins[("units", "echo", "kind")]) == f"{path}:4"
    assert str(read_file(path).origins[("units", "echo", "stop_grace")]) == f"{path}:6"
