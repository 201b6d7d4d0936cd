"""The built-in balancing strategies (``hsu_plugins.routing.balancers``), as units."""

from __future__ import annotations

import bisect
import collections
import hashlib
import heapq
import itertools
import math
import random
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import attrs
import pytest

import hsu
from hsu._kernel.config.model import structure_options
from hsu._kernel.plugins import PluginManager
from hsu.errors import ConfigError, ConflictError
from hsu.ports import Balancer, Endpoint, Factory
from hsu_plugins.routing import balancers

ALL = [
    "least_inflight",
    "maglev",
    "p2c",
    "random",
    "ring_hash",
    "round_robin",
    "weighted_round_robin",
]
HASHING = ["ring_hash", "maglev"]
KEYS = [f"user-{i}" for i in range(10_000)]


def ep(i: int | str, weight: int = 1, address: str = "") -> Endpoint:
    name = f"svc-{i}"
    return Endpoint(
        instance_id=name,
        unit="svc",
        address=address or f"unix:/run/{name}.sock",
        interfaces=("hsu.echo.v1.Echo",),
        weight=weight,
    )


def eps(n: int, start: int = 0) -> list[Endpoint]:
    return [ep(i) for i in range(start, start + n)]


def _collect() -> dict[str, Factory]:
    found: dict[str, Factory] = {}

    def register(name: str, factory: Factory, default: bool = False) -> None:
        assert name not in found
        found[name] = factory

    balancers.hsu_register_balancers(register=register)
    return found


FACTORIES = _collect()


def structured(name: str, options: Any) -> Any:
    """``options`` as the kernel structures them for strategy ``name``."""
    return structure_options(FACTORIES[name], options, ("balancer_options",), "d.yaml")


def make(name: str, endpoints: Sequence[Endpoint] = (), **options: Any) -> Balancer:
    balancer = FACTORIES[name].create(structured(name, options))
    balancer.update(endpoints)
    return balancer


def ids(picks: Sequence[Endpoint | None]) -> list[str]:
    return [p.instance_id if p else "-" for p in picks]


def route(balancer: Balancer, keys: Sequence[str] = KEYS) -> dict[str, str]:
    routed = {}
    for key in keys:
        chosen = balancer.pick({}, key)
        assert chosen is not None
        routed[key] = chosen.instance_id
    return routed


# -- registration and the common contract --------------------------------------


def test_the_plugin_registers_every_strategy_through_the_plugin_manager():
    pm = PluginManager.load(env={}, autoload=False)
    if not pm.pm.is_registered(balancers):  # not (yet) a default plugin
        pm.register(balancers, "balancers")
    assert set(ALL) <= set(pm.balancer_names())
    for name in ALL:
        factory = pm.balancer(name)
        assert isinstance(factory, Factory)
        assert attrs.has(factory.options)
        balancer = factory.create(factory.options())
        assert isinstance(balancer, Balancer)
        balancer.update(eps(3))
        assert balancer.pick({}, "k") in eps(3)


def test_another_plugin_adds_a_strategy_but_cannot_take_a_builtin_name():
    pm = PluginManager.load(env={}, autoload=False)
    if not pm.pm.is_registered(balancers):
        pm.register(balancers, "balancers")

    class Mine:
        @hsu.hookimpl
        def hsu_register_balancers(self, register):
            register("first", balancers.Strategy("first", lambda options: FirstOnly()))

    class Clash:
        @hsu.hookimpl
        def hsu_register_balancers(self, register):
            register("round_robin", balancers.Strategy("round_robin", lambda options: FirstOnly()))

    pm.register(Mine(), "mine")
    first = pm.balancer("first").create(balancers.NoOptions())
    first.update(eps(3))
    assert first.pick({}).instance_id == "svc-0"
    with pytest.raises(ConflictError, match="balancer 'round_robin'"):
        pm.register(Clash(), "clash")
    assert isinstance(pm.balancer("round_robin").create(None), balancers.RoundRobin)


class FirstOnly:
    def __init__(self) -> None:
        self.endpoints: Sequence[Endpoint] = ()

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = endpoints

    def pick(self, inflight: Mapping[str, int], key: str | None = None) -> Endpoint | None:
        return self.endpoints[0] if self.endpoints else None


def test_the_module_registers_exactly_the_seven_strategies():
    assert sorted(FACTORIES) == ALL


@pytest.mark.parametrize("name", ALL)
def test_no_endpoints_picks_none_before_and_after_some(name):
    balancer = make(name)
    assert balancer.pick({}) is None
    assert balancer.pick({}, "key") is None
    balancer.update(eps(3))
    assert balancer.pick({}) is not None
    balancer.update([])
    assert balancer.pick({}) is None
    assert balancer.pick({"svc-0": 4}, "key") is None


@pytest.mark.parametrize("name", ALL)
def test_one_endpoint_takes_every_call_whatever_its_load(name):
    options = {"bounded_load": 1.25} if name in HASHING else {}
    only = ep(7, weight=3)
    balancer = make(name, [only], **options)
    for i in range(50):
        assert balancer.pick({"svc-7": i}, None if i % 2 else f"k{i}") is only


@pytest.mark.parametrize("name", ALL)
def test_a_changed_list_is_used_at_once(name):
    balancer = make(name, eps(4))
    balancer.update(eps(3, start=10))
    picked = {balancer.pick({}, f"k{i}").instance_id for i in range(200)}
    assert picked == {"svc-10", "svc-11", "svc-12"}


@pytest.mark.parametrize("name", ALL)
def test_new_endpoint_objects_with_the_same_ids_replace_the_old(name):
    balancer = make(name, eps(3))
    moved = [ep(i, address=f"127.0.0.1:{6000 + i}") for i in range(3)]
    before = [balancer.pick({}, f"k{i}") for i in range(30)]
    balancer.update(moved)
    for i in range(60):
        chosen = balancer.pick({}, f"k{i}")
        assert chosen is not None and chosen.address.startswith("127.0.0.1:")
    assert {p.instance_id for p in before if p} <= {e.instance_id for e in moved}


# -- round_robin -----------------------------------------------------------------


def test_round_robin_gives_each_endpoint_exactly_k_of_k_times_n():
    for n in (1, 2, 5, 7):
        balancer = make("round_robin", eps(n))
        counts = collections.Counter(ids([balancer.pick({}) for _ in range(11 * n)]))
        assert counts == {f"svc-{i}": 11 for i in range(n)}


def test_round_robin_starts_at_a_random_place():
    firsts = {make("round_robin", eps(5)).pick({}).instance_id for _ in range(60)}
    assert len(firsts) >= 4


def test_round_robin_keeps_its_place_when_the_list_changes():
    a, b, c, d, x = ep("a"), ep("b"), ep("c"), ep("d"), ep("x")
    balancer = make("round_robin", [a, b, c, d])
    while balancer.pick({}) is not b:
        pass
    balancer.update([x, a, b, c, d])
    assert ids([balancer.pick({}) for _ in range(5)]) == ids([c, d, x, a, b])
    # the one picked last goes: the one that was to come next comes next
    balancer.update([x, a, c, d])
    assert ids([balancer.pick({}) for _ in range(4)]) == ids([c, d, x, a])
    balancer.update([c, d, x, a])
    assert ids([balancer.pick({}) for _ in range(2)]) == ids([c, d])
    # and when the next one goes too, the first still listed of those to come
    balancer.update([b, a, c])
    assert ids([balancer.pick({}) for _ in range(3)]) == ids([a, c, b])


def test_round_robin_ignores_load_and_keys():
    balancer = make("round_robin", eps(3))
    picks = [balancer.pick({"svc-0": 100}, "same-key") for _ in range(30)]
    assert collections.Counter(ids(picks)) == {"svc-0": 10, "svc-1": 10, "svc-2": 10}


# -- weighted_round_robin --------------------------------------------------------


def _wrr_eps(*weights: int) -> list[Endpoint]:
    return [ep(name, weight=w) for name, w in zip("abcdefgh", weights, strict=False)]


def _max_run(sequence: Sequence[str]) -> int:
    return max(len(list(run)) for _, run in itertools.groupby(sequence))


def test_weighted_round_robin_gives_exact_shares_smoothly():
    balancer = make("weighted_round_robin", _wrr_eps(5, 1, 1))
    picks = [p[-1] for p in ids([balancer.pick({}) for _ in range(700)])]
    assert collections.Counter(picks) == {"a": 500, "b": 100, "c": 100}
    # nginx's sequence, from wherever this caller starts in it
    cycle = "aabacaa"
    start = "".join(picks[:7])
    assert start in {cycle[i:] + cycle[:i] for i in range(7)}
    assert "".join(picks) == (start * 100)
    assert _max_run(picks) < 5


def test_weighted_round_robin_reduces_weights_by_their_gcd():
    balancer = make("weighted_round_robin", _wrr_eps(50, 10, 10))
    picks = [p[-1] for p in ids([balancer.pick({}) for _ in range(7)])]
    assert collections.Counter(picks) == {"a": 5, "b": 1, "c": 1}


def test_weighted_round_robin_with_equal_weights_is_round_robin():
    balancer = make("weighted_round_robin", eps(4))
    picks = ids([balancer.pick({}) for _ in range(8)])
    assert picks[:4] == picks[4:] and sorted(picks[:4]) == [f"svc-{i}" for i in range(4)]


def assert_weighted_cycle(picks: Sequence[str], weights: Mapping[str, int]) -> None:
    """Exact shares in every run of one cycle's length, and smooth: between
    two picks of a, b is picked floor(wb / wa) or ceil(wb / wa) times."""
    cycle = sum(weights.values())
    assert len(picks) >= 2 * cycle
    assert collections.Counter(picks[:cycle]) == weights
    # it repeats every cycle, so every run of a cycle's length has exact shares
    assert picks[cycle:] == picks[: len(picks) - cycle]
    at: dict[str, list[int]] = collections.defaultdict(list)
    for i, name in enumerate(picks):
        at[name].append(i)
    for a, where in at.items():
        between = [picks[i + 1 : j] for i, j in itertools.pairwise(where)]
        for b, wb in weights.items():
            if b == a:
                continue
            low, high = wb // weights[a], -(-wb // weights[a])
            assert {run.count(b) for run in between} <= {low, high}, (a, b)


def test_weighted_round_robin_too_long_to_precompute_is_scheduled_earliest_deadline_first(
    monkeypatch,
):
    monkeypatch.setattr(balancers, "MAX_SCHEDULE_WORK", 0)
    for weights in [(5, 1, 1), (1, 2), (7, 3, 2, 1, 1), (9, 6, 4, 4, 2, 1, 1, 1)]:
        endpoints = _wrr_eps(*weights)
        due = {e.instance_id: e.weight // math.gcd(*weights) for e in endpoints}
        for _ in range(10):  # each balancer has its own random phases
            balancer = make("weighted_round_robin", endpoints)
            picks = ids([balancer.pick({}) for _ in range(3 * sum(due.values()))])
            assert_weighted_cycle(picks, due)
    balancer.update(_wrr_eps(1, 2))
    picks = [p[-1] for p in ids([balancer.pick({}) for _ in range(300)])]
    assert collections.Counter(picks) == {"a": 100, "b": 200}
    balancer.update([])
    assert balancer.pick({}) is None


def test_weighted_round_robin_callers_do_not_align(monkeypatch):
    monkeypatch.setattr(balancers, "MAX_SCHEDULE_WORK", 0)
    endpoints = _wrr_eps(3, 3, 3, 2, 1)
    firsts = {make("weighted_round_robin", endpoints).pick({}).instance_id for _ in range(60)}
    assert len(firsts) >= 4


def _no_swrr_step(*args: object) -> int:
    raise AssertionError("an O(n) step per pick")


def test_weighted_round_robin_with_equal_weights_rotates_however_many(monkeypatch):
    monkeypatch.setattr(balancers, "_swrr_step", _no_swrr_step)
    endpoints = [ep(i, weight=3) for i in range(1000)]
    balancer = make("weighted_round_robin", endpoints)
    picks = [balancer.pick({}) for _ in range(2500)]
    start = endpoints.index(picks[0])
    assert picks == [endpoints[(start + k) % 1000] for k in range(2500)]


def test_weighted_round_robin_large_cycle_has_exact_shares(monkeypatch):
    monkeypatch.setattr(balancers, "_swrr_step", _no_swrr_step)
    rng = random.Random(4)
    endpoints = [ep(i, weight=rng.randint(1, 4)) for i in range(1000)]
    due = {e.instance_id: e.weight for e in endpoints}
    cycle = sum(due.values())
    assert cycle * len(endpoints) > balancers.MAX_SCHEDULE_WORK
    balancer = make("weighted_round_robin", endpoints)
    picks = ids([balancer.pick({}) for _ in range(2 * cycle + 100)])
    assert collections.Counter(picks[:cycle]) == due
    assert picks[cycle:] == picks[: len(picks) - cycle]
    # the same list keeps its place; each endpoint's picks are spread over the cycle
    balancer.update(list(endpoints))
    more = ids([balancer.pick({}) for _ in range(cycle)])
    assert more == picks[100 : 100 + cycle]
    for name, weight in due.items():
        where = [i for i, p in enumerate(picks[:cycle]) if p == name]
        gaps = [j - i for i, j in itertools.pairwise(where)]
        assert all(g <= 2.5 * cycle / weight for g in gaps), (name, weight, gaps)


def test_weighted_round_robin_unchanged_list_keeps_its_place():
    endpoints = _wrr_eps(5, 1, 1)
    balancer = make("weighted_round_robin", endpoints)
    picks = [balancer.pick({}) for _ in range(3)]
    balancer.update(list(endpoints))
    picks += [balancer.pick({}) for _ in range(697)]
    assert collections.Counter(p.weight for p in picks if p) == {5: 500, 1: 200}


# -- least_inflight --------------------------------------------------------------


def test_least_inflight_picks_the_least_loaded():
    balancer = make("least_inflight", eps(5))
    inflight = {"svc-0": 4, "svc-1": 2, "svc-2": 7, "svc-3": 1, "svc-4": 3}
    assert {balancer.pick(inflight).instance_id for _ in range(20)} == {"svc-3"}
    # absent means 0
    del inflight["svc-2"]
    assert balancer.pick(inflight).instance_id == "svc-2"


def test_least_inflight_spreads_ties():
    balancer = make("least_inflight", eps(4))
    inflight = {"svc-0": 3, "svc-1": 1, "svc-2": 5, "svc-3": 1}
    counts = collections.Counter(ids([balancer.pick(inflight) for _ in range(100)]))
    assert counts == {"svc-1": 50, "svc-3": 50}
    idle = collections.Counter(ids([balancer.pick({}) for _ in range(100)]))
    assert idle == {f"svc-{i}": 25 for i in range(4)}


def test_least_inflight_weighs_load_by_weight():
    heavy, light = ep("heavy", weight=4), ep("light", weight=1)
    balancer = make("least_inflight", [heavy, light])
    assert balancer.pick({"svc-heavy": 7, "svc-light": 2}) is heavy  # 7/4 < 2/1
    assert balancer.pick({"svc-heavy": 9, "svc-light": 2}) is light  # 9/4 > 2/1


def test_least_inflight_keeps_calls_even_as_they_arrive():
    balancer = make("least_inflight", eps(6))
    inflight: dict[str, int] = {}
    for _ in range(60):
        chosen = balancer.pick(inflight)
        assert chosen is not None
        inflight[chosen.instance_id] = inflight.get(chosen.instance_id, 0) + 1
    assert set(inflight.values()) == {10}


@pytest.mark.parametrize(
    "weights",
    [[1] * 100, [1 + i % 4 for i in range(100)], [65_521, 65_519, 65_497, 1, 2] * 10],
    ids=["equal", "1-4", "huge lcm"],
)
def test_least_inflight_picks_as_a_plain_scan_does_when_all_are_busy(weights):
    endpoints = [ep(i, weight=w) for i, w in enumerate(weights)]
    n = len(endpoints)
    balancer = make("least_inflight", endpoints)
    first = balancer.pick({})
    assert first is not None
    start = (endpoints.index(first) + 1) % n
    rng = random.Random(8)
    for round_ in range(300):
        inflight = {e.instance_id: rng.randint(1, 40) for e in endpoints}
        if round_ % 3 == 0:  # an idle one, near the start or far from it
            inflight[endpoints[(start + rng.choice([3, 40, 90])) % n].instance_id] = 0
        load = [Fraction(inflight[e.instance_id], e.weight) for e in endpoints]
        rotation = [(start + k) % n for k in range(n)]
        expected = min(rotation, key=load.__getitem__)  # the first of the least
        assert balancer.pick(inflight) is endpoints[expected], round_
        start = (expected + 1) % n


# -- random ----------------------------------------------------------------------


def test_random_is_roughly_uniform():
    n, calls = 10, 20_000
    balancer = make("random", eps(n), seed=1)
    counts = collections.Counter(ids([balancer.pick({}) for _ in range(calls)]))
    assert len(counts) == n
    expected = calls / n
    chi_square = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi_square < 27.9  # 9 degrees of freedom, p = 0.001


def test_random_with_a_seed_repeats_itself_and_without_does_not():
    first = make("random", eps(10), seed=42)
    second = make("random", eps(10), seed=42)
    assert ids([first.pick({}) for _ in range(50)]) == ids([second.pick({}) for _ in range(50)])
    unseeded = [ids([make("random", eps(10)).pick({}) for _ in range(20)]) for _ in range(2)]
    assert unseeded[0] != unseeded[1]


# -- p2c -------------------------------------------------------------------------


def test_p2c_compares_two_distinct_endpoints():
    lighter = ep("b")
    balancer = make("p2c", [ep("a"), lighter], seed=3)
    # with two endpoints both are always the candidates: the lighter always wins
    assert all(balancer.pick({"svc-a": 1}) is lighter for _ in range(200))


def test_p2c_weighs_load_by_weight():
    heavy, light = ep("heavy", weight=4), ep("light", weight=1)
    balancer = make("p2c", [heavy, light])
    assert all(balancer.pick({"svc-heavy": 7, "svc-light": 2}) is heavy for _ in range(50))
    assert all(balancer.pick({"svc-heavy": 9, "svc-light": 2}) is light for _ in range(50))


def test_p2c_never_picks_the_most_loaded_of_many():
    balancer = make("p2c", eps(8), seed=5)
    inflight = {f"svc-{i}": i for i in range(8)}
    picks = collections.Counter(ids([balancer.pick(inflight) for _ in range(2000)]))
    assert "svc-7" not in picks
    # svc-i wins when it and one of the 7 - i heavier ones are drawn
    assert picks["svc-0"] > picks["svc-3"] > picks["svc-6"] > 0


def simulate(balancer: Balancer, *, seed: int, n: int = 20, calls: int = 2000) -> tuple[int, float]:
    """Calls arrive at random (one per time unit on average) and last a random
    time (100 on average), so about 5 per endpoint are in flight; returns the
    highest in-flight seen on one endpoint, and the most it was above the
    average at the same time."""
    balancer.update(eps(n))
    rng = random.Random(seed)
    inflight: dict[str, int] = {}
    ends: list[tuple[float, str]] = []
    now, total, peak, excess = 0.0, 0, 0, 0.0
    for _ in range(calls):
        now += rng.expovariate(1.0)
        while ends and ends[0][0] <= now:
            _, done = heapq.heappop(ends)
            inflight[done] -= 1
            total -= 1
        chosen = balancer.pick(inflight)
        assert chosen is not None
        inflight[chosen.instance_id] = inflight.get(chosen.instance_id, 0) + 1
        total += 1
        heapq.heappush(ends, (now + rng.expovariate(1 / 100), chosen.instance_id))
        most = max(inflight.values())
        peak, excess = max(peak, most), max(excess, most - total / n)
    return peak, excess


@pytest.mark.parametrize("seed", [1, 2])
def test_p2c_keeps_the_busiest_endpoint_near_the_average_unlike_random(seed):
    p2c_peak, p2c_excess = simulate(make("p2c", seed=seed), seed=seed)
    random_peak, random_excess = simulate(make("random", seed=seed), seed=seed)
    assert p2c_excess <= 4.5
    assert random_excess >= p2c_excess + 3
    assert p2c_peak < random_peak


# -- ring_hash and maglev --------------------------------------------------------


@pytest.mark.parametrize("name", HASHING)
def test_adding_an_endpoint_moves_about_its_share_of_keys_and_only_to_it(name):
    balancer = make(name, eps(10))
    before = route(balancer)
    balancer.update(eps(11))
    after = route(balancer)
    moved = [k for k in KEYS if before[k] != after[k]]
    to_new = [k for k in moved if after[k] == "svc-10"]
    assert 0.5 / 11 <= len(to_new) / len(KEYS) <= 1.6 / 11
    if name == "ring_hash":
        assert moved == to_new
    else:
        # maglev's disruption is near minimal, not minimal: a few keys shift
        # between the other endpoints as the table is refilled
        assert len(moved) - len(to_new) <= 0.01 * len(KEYS)


@pytest.mark.parametrize("name", HASHING)
def test_removing_an_endpoint_moves_only_its_keys(name):
    balancer = make(name, eps(10))
    before = route(balancer)
    balancer.update([e for e in eps(10) if e.instance_id != "svc-4"])
    after = route(balancer)
    assert "svc-4" not in after.values()
    strays = [k for k in KEYS if before[k] != "svc-4" and after[k] != before[k]]
    if name == "ring_hash":
        assert strays == []
    else:
        assert len(strays) <= 0.01 * len(KEYS)
    # and putting it back restores every key
    balancer.update(eps(10))
    assert route(balancer) == before


@pytest.mark.parametrize(("name", "bound"), [("ring_hash", 1.4), ("maglev", 1.1)])
def test_keys_spread_evenly(name, bound):
    counts = collections.Counter(route(make(name, eps(10))).values())
    assert len(counts) == 10
    assert max(counts.values()) / (len(KEYS) / 10) <= bound
    assert min(counts.values()) / (len(KEYS) / 10) >= 2 - bound


@pytest.mark.parametrize("name", HASHING)
def test_keys_spread_by_weight(name):
    endpoints = [ep("heavy", weight=3), *eps(3)]
    counts = collections.Counter(route(make(name, endpoints)).values())
    share = counts["svc-heavy"] / len(KEYS)
    assert 0.4 <= share <= 0.6  # 3 / 6


@pytest.mark.parametrize("name", HASHING)
def test_a_key_goes_to_the_same_endpoint_in_every_balancer(name):
    endpoints = eps(12)
    first = make(name, endpoints, seed=1)
    shuffled = list(endpoints)
    random.Random(9).shuffle(shuffled)
    second = make(name, shuffled, seed=2)
    keys = KEYS[:3000]
    assert route(first, keys) == route(second, keys)


def test_the_hash_is_stable_across_processes_and_versions():
    # BLAKE2b, not Python's hash(): these values must never change, or two
    # processes (or two versions) would route the same key differently
    expected = int.from_bytes(hashlib.blake2b(b"user-1", digest_size=8).digest(), "little")
    assert balancers.hash64(b"user-1") == expected == 0x88E1EA21865AAC9A
    keys = [f"golden-{i}" for i in range(12)]
    ring = route(make("ring_hash", eps(5)), keys)
    assert "".join(ring[k][-1] for k in keys) == "232214220342"
    table = route(make("maglev", eps(5)), keys)
    assert "".join(table[k][-1] for k in keys) == "402300103331"


def ring_order(endpoints: Sequence[Endpoint], replicas: int = 100) -> tuple[list[int], list[str]]:
    """The ring, built independently of the balancer from its documented points."""
    points = sorted(
        (h, e.instance_id)
        for e in endpoints
        for h in balancers.ring_points(e.instance_id, replicas * e.weight)
    )
    return [h for h, _ in points], [i for _, i in points]


def test_ring_hash_routes_a_key_to_the_first_point_clockwise():
    endpoints = eps(6)
    hashes, owners = ring_order(endpoints, replicas=7)
    balancer = make("ring_hash", endpoints, replicas=7)
    for key in KEYS[:500]:
        at = bisect.bisect_right(hashes, balancers.hash64(key.encode())) % len(hashes)
        assert balancer.pick({}, key).instance_id == owners[at]


@pytest.mark.parametrize("name", HASHING)
def test_a_call_without_a_key_goes_anywhere(name):
    balancer = make(name, eps(5), seed=4)
    counts = collections.Counter(ids([balancer.pick({}) for _ in range(1000)]))
    assert len(counts) == 5 and min(counts.values()) >= 120


def _weighted_eps(n: int, seed: int, start: int = 0) -> list[Endpoint]:
    rng = random.Random(seed)
    return [ep(i, weight=rng.randint(1, 3)) for i in range(start, start + n)]


def _changes(endpoints: list[Endpoint]) -> list[list[Endpoint]]:
    """A rolling restart's worth of endpoint lists, small changes and large."""
    drained = endpoints[1:]
    steps = [drained, endpoints]  # one goes and comes back
    steps.append([*endpoints, *_weighted_eps(2, seed=1, start=10_000)])  # two new
    mixed = [e for i, e in enumerate(steps[-1]) if i % 97 != 5]
    steps.append([*mixed, *_weighted_eps(3, seed=2, start=20_000)])  # 5 out, 3 in
    reweighted = list(steps[-1])
    reweighted[7] = ep(reweighted[7].instance_id[4:], weight=reweighted[7].weight + 4)
    reweighted[8] = ep(reweighted[8].instance_id[4:], weight=1)
    steps.append(reweighted)  # two change weight
    steps.append(reweighted[len(reweighted) * 3 // 8 :])  # many at once
    steps.append(list(reversed(reweighted)))  # and back, in another order
    return steps


@pytest.mark.parametrize(
    ("name", "max_ring_points"),
    [("ring_hash", balancers.MAX_RING_POINTS), ("ring_hash", 20_000), ("maglev", None)],
)
def test_an_updated_balancer_routes_every_key_as_a_fresh_one(monkeypatch, name, max_ring_points):
    rescaled = max_ring_points is not None and max_ring_points < balancers.MAX_RING_POINTS
    if rescaled:  # 20,000 points: every change rescales every endpoint's points
        monkeypatch.setattr(balancers, "MAX_RING_POINTS", max_ring_points)
    endpoints = _weighted_eps(400, seed=3)
    balancer = make(name, endpoints, bounded_load=1.25)
    # the fast paths: the ring is sorted anew only for the large changes, and
    # maglev computes only the newly listed endpoints' permutations
    sorted_at: list[int] = []
    hashed: list[str] = []
    if name == "ring_hash":
        sort = balancers.RingHash._sort

        def counted_sort(self: balancers.RingHash, points: Any) -> None:
            if self is balancer:
                sorted_at.append(step)
            sort(self, points)

        monkeypatch.setattr(balancers.RingHash, "_sort", counted_sort)
    else:
        permutation = balancers.Maglev._permutation

        def counted_permutation(self: balancers.Maglev, instance_id: str) -> Any:
            if self is balancer:
                hashed.append(instance_id)
            return permutation(self, instance_id)

        monkeypatch.setattr(balancers.Maglev, "_permutation", counted_permutation)
    rng = random.Random(5)
    before = {e.instance_id for e in endpoints}
    for step, listed in enumerate(_changes(endpoints)):
        balancer.update(listed)
        now = {e.instance_id for e in listed}
        if name == "maglev":
            assert sorted(hashed) == sorted(now - before), step
        hashed.clear()
        before = now
        fresh = make(name, listed, bounded_load=1.25)
        # every key, or a few only (a maglev table left part filled)
        keys = KEYS[step::2000] if step % 2 else KEYS
        assert route(balancer, keys) == route(fresh, keys), step
        inflight = {e.instance_id: rng.choice([0, 1, 2, 9]) for e in listed}
        for key in KEYS[:300]:
            assert balancer.pick(inflight, key) == fresh.pick(inflight, key), (step, key)
    if name == "ring_hash" and not rescaled:
        assert sorted_at == [5, 6]  # 151 of 405 endpoints out, then back


def test_an_updated_ring_breaks_ties_between_equal_hashes_as_a_fresh_one(monkeypatch):
    # 6-bit hashes: most points share their hash with others
    ring_points, hash64 = balancers.ring_points, balancers.hash64
    monkeypatch.setattr(balancers, "hash64", lambda data: hash64(data) % 64)
    monkeypatch.setattr(
        balancers, "ring_points", lambda i, count: [h % 64 for h in ring_points(i, count)]
    )
    endpoints = _weighted_eps(40, seed=9)
    balancer = make("ring_hash", endpoints, replicas=2)
    for step, listed in enumerate(_changes(endpoints)):
        balancer.update(listed)
        fresh = make("ring_hash", listed, replicas=2)
        assert route(balancer, KEYS[:500]) == route(fresh, KEYS[:500]), step


def maglev_table(endpoints: Sequence[Endpoint], size: int) -> list[str]:
    """The Maglev table, filled as the paper does it (weights as rounds to skip),
    independently of the balancer."""
    shape = sorted((e.instance_id, e.weight) for e in endpoints)
    where, skips = [], []
    for instance_id, _ in shape:
        digest = hashlib.blake2b(instance_id.encode(), digest_size=16).digest()
        where.append(int.from_bytes(digest[:8], "little") % size)
        skips.append(int.from_bytes(digest[8:], "little") % (size - 1) + 1)
    top = max(w for _, w in shape)
    claims = [0] * len(shape)
    table: list[str] = [""] * size
    filled, round_ = 0, 0
    while filled < size:
        round_ += 1
        for i, (instance_id, weight) in enumerate(shape):
            if filled == size or round_ * weight < claims[i] * top:
                continue
            while table[where[i]]:
                where[i] = (where[i] + skips[i]) % size
            table[where[i]] = instance_id
            claims[i] += 1
            filled += 1
    return table


@pytest.mark.parametrize(
    ("endpoints", "size"),
    [(_weighted_eps(60, seed=6), 5003), (eps(1000), balancers.DEFAULT_TABLE_SIZE), (eps(3), 7)],
)
def test_maglev_fills_its_table_as_the_paper_does(endpoints, size):
    table = maglev_table(endpoints, size)
    balancer = make("maglev", endpoints, table_size=size)
    assert len(set(table)) == len(endpoints)
    for key in KEYS:
        chosen = balancer.pick({}, key)
        assert chosen is not None
        assert chosen.instance_id == table[balancers.hash64(key.encode()) % size]


# -- bounded loads -----------------------------------------------------------------


def under_bound(inflight: Mapping[str, int], instance_id: str, c: float, n: int) -> bool:
    """One more call keeps it within ceil(c * (total + 1) / n)."""
    total = sum(inflight.values())
    return inflight.get(instance_id, 0) + 1 <= math.ceil(c * (total + 1) / n)


@pytest.mark.parametrize("name", HASHING)
def test_bounded_load_moves_a_hot_key_off_its_overloaded_home(name):
    endpoints = eps(5)
    balancer = make(name, endpoints, bounded_load=1.25)
    home = balancer.pick({}, "hot")
    assert home is not None
    other = next(e.instance_id for e in endpoints if e is not home)
    # under its bound it stays home: 1 + 1 <= ceil(1.25 * (4 + 1) / 5) = 2...
    assert balancer.pick({home.instance_id: 1, other: 3}, "hot") is home
    # ...over it, it does not: 2 + 1 > 2
    assert balancer.pick({home.instance_id: 2, other: 2}, "hot") is not home
    inflight = {home.instance_id: 10}
    elsewhere = balancer.pick(inflight, "hot")
    assert elsewhere is not None and elsewhere is not home
    # piled up, always to the same next one, so the key's calls stay together
    assert all(balancer.pick(inflight, "hot") is elsewhere for _ in range(20))
    # and without the bound it stays home however loaded
    assert make(name, endpoints).pick(inflight, "hot") is home


def test_bounded_load_walks_clockwise_to_the_next_endpoint_under_its_bound():
    endpoints = eps(6)
    hashes, owners = ring_order(endpoints, replicas=5)
    balancer = make("ring_hash", endpoints, replicas=5, bounded_load=1.0)
    rng = random.Random(11)
    for key in KEYS[:300]:
        inflight = {e.instance_id: rng.choice([0, 0, 1, 2, 6]) for e in endpoints}
        at = bisect.bisect_right(hashes, balancers.hash64(key.encode()))
        walk = owners[at:] + owners[:at]
        expected = next(i for i in walk if under_bound(inflight, i, 1.0, 6))
        assert balancer.pick(inflight, key).instance_id == expected


@pytest.mark.parametrize("name", HASHING)
@pytest.mark.parametrize("c", [1.0, 1.25, 2])
def test_bounded_load_never_picks_an_endpoint_over_its_bound(name, c):
    n = 7
    balancer = make(name, eps(n), bounded_load=c, seed=2)
    rng = random.Random(5)
    for round_ in range(400):
        inflight = {
            f"svc-{i}": rng.choice([0, 1, 3, 8, 20]) for i in range(n) if rng.random() < 0.8
        }
        key = None if round_ % 5 == 0 else rng.choice(KEYS)
        chosen = balancer.pick(inflight, key)
        assert chosen is not None
        assert under_bound(inflight, chosen.instance_id, c, n), (inflight, key, chosen)


@pytest.mark.parametrize("name", HASHING)
def test_bounded_load_caps_one_hot_key_as_its_calls_pile_up(name):
    n, c = 5, 1.25
    balancer = make(name, eps(n), bounded_load=c)
    inflight: dict[str, int] = {}
    for _ in range(200):  # calls to one key that do not finish
        chosen = balancer.pick(inflight, "hot")
        assert chosen is not None
        assert under_bound(inflight, chosen.instance_id, c, n)
        inflight[chosen.instance_id] = inflight.get(chosen.instance_id, 0) + 1
    # 1.25 times the average each, so four of the five take them all
    assert sorted(inflight.values()) == [50, 50, 50, 50]


# -- options -----------------------------------------------------------------------


def problems(name: str, options: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        structured(name, options)
    return info.value.problems


@pytest.mark.parametrize(
    ("name", "options", "found"),
    [
        ("ring_hash", {"replcas": 10}, ["replcas: unknown key; did you mean 'replicas'?"]),
        ("ring_hash", {"replicas": "x"}, ["replicas: expected int, got 'x'"]),
        ("ring_hash", {"replicas": "2"}, ["replicas: expected int, got '2'"]),
        ("ring_hash", {"replicas": 0}, ["replicas: must be >= 1, got 0"]),
        ("ring_hash", {"replicas": True}, ["replicas: expected int, got True"]),
        (
            "ring_hash",
            {"bounded_load": 0.5},
            ["bounded_load: must be 0 (off) or a number >= 1, such as 1.25, got 0.5"],
        ),
        (
            "ring_hash",
            {"bounded_load": float("inf")},
            ["bounded_load: must be 0 (off) or a number >= 1, such as 1.25, got inf"],
        ),
        ("maglev", {"bounded_load": "1.25"}, ["bounded_load: expected float, got '1.25'"]),
        (
            "maglev",
            {"table_size": 65536},
            ["table_size: must be a prime, got 65536 (the next prime is 65537)"],
        ),
        ("maglev", {"table_size": 1}, ["table_size: must be >= 2, got 1"]),
        ("maglev", {"table_size": 2**24 + 1}, ["table_size: must be <= 16777216, got 16777217"]),
        ("maglev", {"tablesize": 7}, ["tablesize: unknown key; did you mean 'table_size'?"]),
        ("p2c", {"seed": 1.5}, ["seed: expected int, got 1.5"]),
        ("random", {"sed": 1}, ["sed: unknown key; did you mean 'seed'?"]),
        ("random", {"zzz": 1}, ["zzz: unknown key"]),
        ("round_robin", {"seed": 1}, ["seed: unknown key (takes no options)"]),
        (
            "ring_hash",
            {"replicas": -1, "bounded": 2},
            [
                "bounded: unknown key; did you mean 'bounded_load'?",
                "replicas: must be >= 1, got -1",
            ],
        ),
    ],
)
def test_bad_options_name_the_path_and_each_problem(name, options, found):
    assert problems(name, options) == [f"d.yaml: balancer_options.{p}" for p in found]


def test_options_that_are_not_a_mapping_are_refused():
    assert problems("least_inflight", [1]) == [
        "d.yaml: balancer_options: expected a mapping, got [1]"
    ]


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("ring_hash", {"replicas": 1, "bounded_load": 0, "seed": 3}),
        ("ring_hash", {"bounded_load": 1}),
        ("maglev", {"table_size": 5003, "bounded_load": 1.25}),
        ("maglev", {"table_size": 2}),
        ("p2c", {"seed": -4}),
        ("random", {}),
    ],
)
def test_good_options_are_structured_and_build_a_balancer(name, options):
    opts = structured(name, options)
    assert isinstance(opts, FACTORIES[name].options)
    for key, value in options.items():
        assert getattr(opts, key) == value
    balancer = FACTORIES[name].create(opts)
    balancer.update(eps(3))
    assert balancer.pick({}, "k") is not None


def test_options_reach_the_balancer():
    ring = make("ring_hash", eps(4), replicas=3)
    assert len(ring._hashes) == 12  # 3 points for each of 4 endpoints
    table = make("maglev", eps(4), table_size=5003)
    assert table._size == 5003
    a, b = make("random", eps(50), seed=7), make("random", eps(50), seed=7)
    assert ids([a.pick({}) for _ in range(20)]) == ids([b.pick({}) for _ in range(20)])


def test_a_small_maglev_table_still_fills_and_routes():
    balancer = make("maglev", eps(5), table_size=2)
    assert len(set(route(balancer, KEYS[:100]).values())) <= 2
    balancer = make("maglev", eps(4), table_size=5003)
    assert len(set(route(balancer, KEYS[:1000]).values())) == 4
