"""Built-in balancing strategies: round_robin, weighted_round_robin,
least_inflight, random, p2c, ring_hash, maglev.

A unit picks one with ``routing: {balancer: NAME, balancer_options: {...}}``,
the options structured into the strategy's attrs class (``*Options`` below). A
balancer only ever sees the routable endpoints (the caller filters them) and
may be given a new list at any time with ``update``; ``pick`` is on every
call's path, so each strategy does its work in ``update`` and keeps ``pick``
cheap: O(1) for round_robin, random and p2c, and for weighted_round_robin
with equal weights or a short cycle (O(log n) for a longer one); O(log n) for
ring_hash; O(1) for maglev once its table is filled (lookups fill it as they
need it); O(n) for least_inflight when no endpoint near the last one picked is
idle. ``update`` runs in the caller's event loop whenever the list changes,
so a small change costs little: ring_hash keeps each endpoint's points and
merges only the changed ones into its ring, and maglev keeps each endpoint's
permutation and leaves filling its table to the lookups.

Load-aware strategies (least_inflight, p2c) compare in-flight calls per unit
of :attr:`~hsu.ports.Endpoint.weight`; with the default weight 1 that is the
number of calls in flight. ``random`` ignores weights.

The hashing strategies (ring_hash, maglev) route a call by its ``key``, hashed
with 64-bit BLAKE2b so that every process, of any Python version or
``PYTHONHASHSEED``, sends a key to the same instance. A call without a key
goes to a random place on the ring (or table), which spreads keyless calls by
weight. Both take ``bounded_load: c`` (``0``, the default, turns it off):
consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam,
2016). An instance that one more call would put over its bound,
``ceil(c * (total + 1) / n)`` calls in flight with ``total`` the calls in flight
to all ``n`` (scaled by its share of the weight when weights differ), is
passed over for the next distinct instance clockwise. Some instance is always
under its bound, so ``c`` must be 1 or more; 1.25 is a common choice.
"""

from __future__ import annotations

import heapq
import math
import operator
import random
import struct
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Generator, Mapping, Sequence
from functools import reduce
from itertools import repeat
from typing import Any

import attrs

import hsu
from hsu.ports import Balancer, Endpoint, Factory, Register

#: virtual nodes per unit of weight on a ring_hash ring: each endpoint's share
#: of the keys is then within about 10% (one standard deviation) of its due
DEFAULT_REPLICAS = 100
#: the most virtual nodes a ring holds (about 0.3s to build); more weight
#: scales every endpoint down, keeping at least one node each
MAX_RING_POINTS = 1 << 18
#: the size of a maglev lookup table (a prime; about 100 times the endpoints
#: it is meant for keeps every endpoint's share within about 1% of its due)
DEFAULT_TABLE_SIZE = 65537
MAX_TABLE_SIZE = 1 << 24
#: weighted_round_robin precomputes nginx's smooth cycle when the cycle's
#: length times the endpoints is at most this (the work, about 1.5 ms at
#: most); beyond, it schedules earliest deadline first (O(log n) a pick)
MAX_SCHEDULE_WORK = 1 << 15
#: least_inflight looks at this many endpoints one by one for an idle one,
#: then at all of them at once
LEAST_INFLIGHT_SCAN = 16

# Costs with 1,000 endpoints, before -> after the fast paths above (best of 5
# on a shared 2-CPU machine, so +-30%), from the repository root with the
# development virtualenv's python:
#   python -m timeit -s "import random; from hsu.ports import Endpoint as E;
#     from hsu_plugins.routing import balancers as m; r = random.Random(7);
#     ones = [E(instance_id=f'e{i}', unit='u', address='a', interfaces=('x',))
#             for i in range(1000)];
#     eps = [E(instance_id=f'e{i}', unit='u', address='a', interfaces=('x',),
#              weight=r.randint(1, 4)) for i in range(1000)];
#     busy = {e.instance_id: 1 + i % 4 for i, e in enumerate(ones)};
#     less, wless = ones[1:], eps[1:]; b = m.CLASS(OPTIONS); b.update(LIST)" "STMT"
# - WeightedRoundRobin(), ones, b.pick({}): 47 us -> 0.12-0.17 us;
#   with eps: 50 us -> 0.5-0.7 us
# - LeastInflight(), ones, b.pick(busy): 62 us -> 34-39 us; with eps: 86 -> 58 us
# - RingHash({}), ones, "b.update(less); b.update(ones)" (two updates):
#   144-168 ms -> 2.6-2.8 ms; with eps and wless: 515-532 ms -> 3.6-3.7 ms.
#   A new balancer's first update (m.RingHash({}).update(ones)) is unchanged,
#   61-85 ms: it hashes and sorts 100,000 points
# - Maglev({}), ones, "b.update(less); b.update(ones)": 128-131 ms -> 1.5-2.4 ms,
#   but the fill moved to the lookups, and a whole fill (stmt "b = m.Maglev({});
#   b.update(ones); t = b._table; [b._claim(p) for p in range(len(t)) if t[p] < 0]")
#   is 30 ms (37 ms with eps), against 47.5 ms (53 ms) for m.Maglev({}).update(ones)
#   before. The first keyed lookup after a change fills until its slot is taken:
#   5-10 ms at the median, up to a whole fill.

_U64 = struct.Struct("<Q")
_U64_PAIR = struct.Struct("<QQ")
_U64_X8 = struct.Struct("<8Q")


def hash64(data: bytes) -> int:
    """The stable 64-bit hash ring_hash and maglev use (BLAKE2b, little-endian)."""
    import hashlib  # not at start (docs/benchmarks.md, Footprint)

    return int(_U64.unpack(hashlib.blake2b(data, digest_size=8).digest())[0])


def ring_points(instance_id: str, count: int) -> list[int]:
    """An endpoint's ``count`` places on a ring_hash ring.

    Point ``j`` is 64-bit word ``j % 8`` (little-endian) of the 64-byte BLAKE2b
    of ``"{instance_id}#{j // 8}"``: one hash gives eight points.
    """
    import hashlib  # not at start (docs/benchmarks.md, Footprint)

    prefix = _key_bytes(instance_id) + b"#"
    points: list[int] = []
    for block in range((count + 7) // 8):
        digest = hashlib.blake2b(prefix + str(block).encode(), digest_size=64).digest()
        points.extend(_U64_X8.unpack(digest))
    del points[count:]
    return points


def _key_bytes(key: str) -> bytes:
    return key.encode("utf-8", "surrogatepass")


# -- options -------------------------------------------------------------------


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


def _next_prime(n: int) -> int:
    while not is_prime(n):
        n += 1
    return n


def _load_factor(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (value == 0 or (math.isfinite(value) and value >= 1)):
        raise ValueError(
            f"'{attribute.name}' must be 0 (off) or a number >= 1, such as 1.25, got {value!r}"
        )


def _prime(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not is_prime(value):
        raise ValueError(
            f"'{attribute.name}' must be a prime, got {value} (the next prime is"
            f" {_next_prime(value)})"
        )


def _bounded_load() -> Any:
    """``bounded_load``: 0 turns it off, else c >= 1 (ring_hash, maglev)."""
    return attrs.field(
        default=0.0,
        validator=_load_factor,
        metadata={"json_schema": {"type": "number", "anyOf": [{"const": 0}, {"minimum": 1}]}},
    )


@attrs.frozen
class NoOptions:
    """round_robin, weighted_round_robin and least_inflight take no options."""


@attrs.frozen
class SeedOptions:
    """random and p2c."""

    #: seeds the strategy's random numbers, for repeatable picks
    seed: int | None = None


@attrs.frozen
class RingHashOptions:
    #: points on the ring per unit of weight
    replicas: int = attrs.field(default=DEFAULT_REPLICAS, validator=attrs.validators.ge(1))
    bounded_load: float = _bounded_load()
    seed: int | None = None


@attrs.frozen
class MaglevOptions:
    #: the lookup table's size: a prime
    table_size: int = attrs.field(
        default=DEFAULT_TABLE_SIZE,
        validator=[attrs.validators.ge(2), attrs.validators.le(MAX_TABLE_SIZE), _prime],
    )
    bounded_load: float = _bounded_load()
    seed: int | None = None


class Strategy:
    """The :class:`hsu.ports.Factory` of one strategy: its options class and its balancer."""

    def __init__(
        self, name: str, make: Callable[[Any], Balancer], options: type[Any] = NoOptions
    ) -> None:
        self.name = name
        self.options = options
        self._make = make

    def create(self, options: Any) -> Balancer:
        return self._make(options)

    def __repr__(self) -> str:
        return f"<balancing strategy {self.name!r}>"


# -- rotation ------------------------------------------------------------------


class RoundRobin:
    """Each endpoint in turn, from a random first one (so callers do not align).

    A new list keeps the rotation going: the next pick is the endpoint after
    the last one picked or, when that one is gone, the one that was to come
    next (the first still listed).
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._endpoints: tuple[Endpoint, ...] = ()
        self._next = 0

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        new = tuple(endpoints)
        old = self._endpoints
        if not new:
            self._endpoints, self._next = (), 0
            return
        if not old:
            self._next = self._rng.randrange(len(new))
        else:
            # after the one picked last, or else the first still listed of
            # those that were to come next
            where = {e.instance_id: i for i, e in enumerate(new)}
            at = where.get(old[self._next - 1].instance_id)
            if at is not None:
                self._next = (at + 1) % len(new)
            else:
                upcoming = (old[(self._next + i) % len(old)].instance_id for i in range(len(old)))
                self._next = next((where[u] for u in upcoming if u in where), 0)
        self._endpoints = new

    def pick(self, inflight: Mapping[str, int], key: str | None = None) -> Endpoint | None:
        endpoints = self._endpoints
        if not endpoints:
            return None
        i = self._next
        chosen = endpoints[i]
        i += 1
        self._next = 0 if i == len(endpoints) else i
        return chosen


def _swrr_step(weights: Sequence[int], current: list[int], total: int) -> int:
    """One step of smooth weighted round robin (nginx): the index picked."""
    best = 0
    best_value = current[0] + weights[0]
    current[0] = best_value
    for i in range(1, len(weights)):
        value = current[i] + weights[i]
        current[i] = value
        if value > best_value:
            best, best_value = i, value
    current[best] -= total
    return best


class WeightedRoundRobin:
    """Weighted round robin: each endpoint's share by weight, interleaved.

    The sequence repeats every (sum of weights / their gcd) picks, and each
    endpoint is picked exactly (weight / gcd) times in any run of that many.
    How the picks are interleaved depends on the size of the cycle:

    - equal weights: plain rotation, from a random place;
    - a short cycle (its length times the endpoints at most
      ``MAX_SCHEDULE_WORK``): smooth weighted round robin (nginx), computed
      once in :meth:`update` and looked up from a random place in it, so
      weights 5, 1, 1 give ``a a b a c a a``, never five ``a`` in a row;
    - a longer cycle: earliest deadline first, as Envoy does. An endpoint of
      weight w is due w times a cycle, at ``(k + phase) / w`` for
      ``k = 0 .. w-1`` with its own random phase in (0, 1], and each pick takes
      the endpoint due first from a heap: O(log n) a pick. Each endpoint's
      picks are spread evenly over the cycle, and between two picks of
      endpoint i, endpoint j is picked ``floor(wj / wi)`` or ``ceil(wj / wi)``
      times; the random phases also keep callers from aligning.

    A new list starts a new cycle; the same ids and weights keep its place.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._endpoints: tuple[Endpoint, ...] = ()
        self._weights: tuple[int, ...] = ()
        #: the whole cycle, as endpoints, for rotation and short nginx cycles
        self._schedule: tuple[Endpoint, ...] | None = ()
        self._next = 0
        #: earliest deadline first: (deadline, index, k) of each endpoint not yet
        #: picked its w times this cycle, and the heap a cycle starts from
        self._heap: list[tuple[float, int, int]] = []
        self._first: list[tuple[float, int, int]] = []
        self._reduced: list[int] = []
        self._phase: list[float] = []

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        new = tuple(endpoints)
        weights = tuple(max(1, e.weight) for e in new)
        if (
            new
            and weights == self._weights
            and [e.instance_id for e in new] == [e.instance_id for e in self._endpoints]
        ):
            # the same cycle: keep its place, swap in the new endpoint objects
            if self._schedule is not None:
                index = {e.instance_id: e for e in new}
                self._schedule = tuple(index[e.instance_id] for e in self._schedule)
            self._endpoints = new
            return
        self._endpoints = new
        self._weights = weights
        self._next = 0
        self._heap, self._first = [], []
        if not new:
            self._schedule = ()
            return
        divisor = reduce(math.gcd, weights)
        reduced = [w // divisor for w in weights]
        total = sum(reduced)
        if total == len(new):  # all equal: a rotation
            self._schedule = new
            self._next = self._rng.randrange(total)
        elif total * len(new) <= MAX_SCHEDULE_WORK:
            current = [0] * len(new)
            order = [_swrr_step(reduced, current, total) for _ in range(total)]
            self._schedule = tuple(new[i] for i in order)
            self._next = self._rng.randrange(total)
        else:
            self._schedule = None
            self._reduced = reduced
            random_ = self._rng.random
            self._phase = [1.0 - random_() for _ in new]
            first = [
                (phase / w, i, 1)
                for i, (phase, w) in enumerate(zip(self._phase, reduced, strict=True))
            ]
            heapq.heapify(first)
            self._first = first

    def pick(self, inflight: Mapping[str, int], key: str | None = None) -> Endpoint | None:
        schedule = self._schedule
        if schedule is None:
            heap = self._heap
            if not heap:  # a new cycle
                heap = self._heap = self._first.copy()
            _, i, k = heap[0]
            weight = self._reduced[i]
            if k == weight:
                heapq.heappop(heap)
            else:
                heapq.heapreplace(heap, ((k + self._phase[i]) / weight, i, k + 1))
            return self._endpoints[i]
        if not schedule:
            return None
        i = self._next
        chosen = schedule[i]
        i += 1
        self._next = 0 if i == len(schedule) else i
        return chosen


# -- load ----------------------------------------------------------------------


class _Indexed:
    """Endpoints with their ids and weights in parallel tuples, for quick picks."""

    def __init__(self) -> None:
        self._endpoints: tuple[Endpoint, ...] = ()
        self._ids: tuple[str, ...] = ()
        self._weights: tuple[int, ...] = ()
        self._weighted = False

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        self._endpoints = tuple(endpoints)
        self._ids = tuple(e.instance_id for e in self._endpoints)
        self._weights = tuple(max(1, e.weight) for e in self._endpoints)
        self._weighted = any(w != 1 for w in self._weights)


class LeastInflight(_Indexed):
    """The endpoint with the fewest calls in flight (per unit of weight).

    The search starts after the endpoint picked last and takes the first
    lowest it finds, so equally loaded endpoints take turns. It looks at the
    endpoints one by one until an idle one; past ``LEAST_INFLIGHT_SCAN`` of
    them it gathers every load at once instead (the same pick, about twice as
    fast when all are busy), comparing ``load * (lcm of weights / weight)``
    when weights differ (one by one still when that lcm is huge).
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__()
        self._rng = rng or random.Random()
        self._start = 0
        self._zeros: tuple[int, ...] = ()
        #: lcm / weight of each endpoint, when weights differ
        self._multipliers: tuple[int, ...] = ()
        #: how far to look one by one
        self._scan = 0

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        old = self._ids
        super().update(endpoints)
        n = len(self._ids)
        if not n:
            self._start = 0
        elif not old:
            self._start = self._rng.randrange(n)
        else:
            self._start %= n
        self._zeros = (0,) * n
        self._multipliers = ()
        self._scan = min(n, LEAST_INFLIGHT_SCAN)
        if self._weighted:
            lcm = math.lcm(*self._weights)
            if lcm < 1 << 32:
                self._multipliers = tuple(lcm // w for w in self._weights)
            else:
                self._scan = n

    def _least(self, inflight: Mapping[str, int], start: int) -> int:
        """The first endpoint from ``start`` on (round) of the least load."""
        loads = list(map(inflight.get, self._ids, self._zeros))
        if self._weighted:
            loads = list(map(operator.mul, loads, self._multipliers))
        low = min(loads)
        try:
            return loads.index(low, start)
        except ValueError:
            return loads.index(low, 0, start)

    def pick(self, inflight: Mapping[str, int], key: str | None = None) -> Endpoint | None:
        ids = self._ids
        n = len(ids)
        if not n:
            return None
        start = self._start
        best = start
        best_load = inflight.get(ids[start], 0)
        if best_load:
            weights = self._weights
            weighted = self._weighted
            best_weight = weights[start]
            for j in range(start + 1, start + self._scan):
                i = j - n if j >= n else j
                load = inflight.get(ids[i], 0)
                if weighted:
                    if load * best_weight >= best_load * weights[i]:
                        continue
                    best_weight = weights[i]
                elif load >= best_load:
                    continue
                best, best_load = i, load
                if not load:
                    break
            else:
                if self._scan < n:  # none idle near: look at all at once
                    best = self._least(inflight, start)
        self._start = 0 if best + 1 == n else best + 1
        return self._endpoints[best]


class RandomPick(_Indexed):
    """A uniformly random endpoint (weights are ignored). Option ``seed``."""

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__()
        self._random = (rng or random.Random()).random

    def pick(self, inflight: Mapping[str, int], key: str | None = None) -> Endpoint | None:
        endpoints = self._endpoints
        if not endpoints:
            return None
        return endpoints[int(self._random() * len(endpoints))]


class PowerOfTwoChoices(_Indexed):
    """Power of two choices: of two distinct random endpoints, the less loaded.

    Load is calls in flight per unit of weight; a tie goes to either at
    random. Option ``seed``.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__()
        self._random = (rng or random.Random()).random

    def pick(self, inflight: Mapping[str, int], key: str | None = None) -> Endpoint | None:
        endpoints = self._endpoints
        n = len(endpoints)
        if n < 2:
            return endpoints[0] if n else None
        a = int(self._random() * n)
        b = int(self._random() * (n - 1))
        if b >= a:
            b += 1
        ids = self._ids
        load_a = inflight.get(ids[a], 0)
        load_b = inflight.get(ids[b], 0)
        if self._weighted:
            load_a *= self._weights[b]
            load_b *= self._weights[a]
        return endpoints[b] if load_b < load_a else endpoints[a]


# -- hashing -------------------------------------------------------------------


class _Hashed:
    """What ring_hash and maglev share: keyed lookup over a table of owners,
    and bounded loads.

    ``_owners[p]`` is the slot of the endpoint that owns position ``p`` (or
    -1 while it is not known yet: :meth:`_claim` finds it); a subclass fills
    it in :meth:`_build` and finds a key's position in :meth:`_locate`. An
    endpoint keeps its slot while it stays listed, so a ring of slots only
    changes where endpoints come, go or change weight; the arrays by slot
    (``_endpoints``, ``_ids``, ``_capacity``) have ``None``, "" and 0 in the
    slots of no endpoint.
    """

    def __init__(self, options: RingHashOptions | MaglevOptions) -> None:
        self._rng = random.Random(options.seed)
        self._c = float(options.bounded_load)
        #: (instance id, weight) of each endpoint, by instance id
        self._shape: tuple[tuple[str, int], ...] = ()
        self._slots: dict[str, int] = {}
        self._endpoints: list[Endpoint | None] = []
        self._ids: list[str] = []
        self._free: list[int] = []
        #: the listed endpoints' slots and ids, by instance id
        self._order: tuple[int, ...] = ()
        self._listed_ids: tuple[str, ...] = ()
        self._zeros: tuple[int, ...] = ()
        self._owners: Sequence[int] = ()
        #: bounded load: c * weight for each slot, and the total weight
        self._capacity: list[float] = []
        self._total_weight = 0

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        listed: dict[str, Endpoint] = {}
        for e in sorted(endpoints, key=_instance_id):
            listed.setdefault(e.instance_id, e)  # one endpoint an id: the first
        shape = tuple((i, max(1, e.weight)) for i, e in listed.items())
        slots = self._slots
        if shape == self._shape:  # the same ids and weights: the same table
            for i, e in listed.items():
                self._endpoints[slots[i]] = e
            return
        old_shape, old_slots, old_ids = self._shape, dict(slots), list(self._ids)
        self._shape = shape
        # free the slots of the endpoints that left, then give the newcomers one
        for instance_id in old_slots.keys() - listed.keys():
            slot = slots.pop(instance_id)
            self._endpoints[slot], self._ids[slot], self._capacity[slot] = None, "", 0.0
            self._free.append(slot)
        self._free.sort(reverse=True)  # reuse the lowest first
        for instance_id, weight in shape:
            slot = slots.get(instance_id, -1)
            if slot < 0:
                if self._free:
                    slot = self._free.pop()
                else:
                    slot = len(self._ids)
                    self._endpoints.append(None)
                    self._ids.append("")
                    self._capacity.append(0.0)
                slots[instance_id] = slot
                self._ids[slot] = instance_id
            self._endpoints[slot] = listed[instance_id]
            self._capacity[slot] = self._c * weight
        self._order = tuple(slots[i] for i, _ in shape)
        self._listed_ids = tuple(i for i, _ in shape)
        self._zeros = (0,) * len(shape)
        self._total_weight = sum(w for _, w in shape)
        self._owners = self._build(old_shape, old_slots, old_ids)

    def _renumber(self) -> None:
        """Give the listed endpoints slots 0, 1, ... in instance id order."""
        slots = [self._slots[i] for i, _ in self._shape]
        self._endpoints = [self._endpoints[slot] for slot in slots]
        self._capacity = [self._capacity[slot] for slot in slots]
        self._ids = [i for i, _ in self._shape]
        self._slots = {i: slot for slot, i in enumerate(self._ids)}
        self._free = []
        self._order = tuple(range(len(slots)))

    def _build(
        self,
        old_shape: tuple[tuple[str, int], ...],
        old_slots: Mapping[str, int],
        old_ids: Sequence[str],
    ) -> Sequence[int]:
        """The new owners, given what the endpoints were (``_shape`` and
        ``_slots`` are already the new ones)."""
        raise NotImplementedError

    def _locate(self, key: str) -> int:
        raise NotImplementedError

    def _claim(self, position: int) -> int:
        """The owner of a position that ``_owners`` does not know yet."""
        raise NotImplementedError

    def pick(self, inflight: Mapping[str, int], key: str | None = None) -> Endpoint | None:
        owners = self._owners
        if not owners:
            return None
        position = int(self._rng.random() * len(owners)) if key is None else self._locate(key)
        owner = owners[position]
        if owner < 0:
            owner = self._claim(position)
        if not self._c:
            return self._endpoints[owner]
        ids = self._ids
        load = inflight.get(ids[owner], 0)
        if not load:
            return self._endpoints[owner]
        room = sum(map(inflight.get, self._listed_ids, self._zeros)) + 1
        total_weight = self._total_weight
        capacity = self._capacity
        if load * total_weight < capacity[owner] * room:
            return self._endpoints[owner]
        # over its bound: the next endpoint clockwise that is not
        size = len(owners)
        for _ in range(size - 1):
            position += 1
            if position == size:
                position = 0
            candidate = owners[position]
            if candidate < 0:
                candidate = self._claim(position)
            if inflight.get(ids[candidate], 0) * total_weight < capacity[candidate] * room:
                return self._endpoints[candidate]
        # only an endpoint the table does not list (too little weight) is under
        # its bound: the least loaded, per unit of capacity
        best = min(self._order, key=lambda s: inflight.get(ids[s], 0) / capacity[s])
        return self._endpoints[best]


def _instance_id(endpoint: Endpoint) -> str:
    return endpoint.instance_id


def _cut(items: array[int], cuts: Sequence[int]) -> None:
    """Take out of ``items`` the items at ``cuts`` (ascending), in one pass."""
    end = len(items)
    write = cuts[0]
    with memoryview(items) as view:
        for i, at in enumerate(cuts):
            stop = cuts[i + 1] if i + 1 < len(cuts) else end
            view[write : write + stop - at - 1] = view[at + 1 : stop]
            write += stop - at - 1
    del items[write:]


def _insert(items: array[int], places: Sequence[int], values: Sequence[int]) -> None:
    """Put ``values[j]`` into ``items`` before the item at ``places[j]``
    (ascending), in one pass from the end."""
    end = len(items)
    items.extend(values)
    with memoryview(items) as view:
        for j in range(len(values) - 1, -1, -1):
            at = places[j]
            view[at + j + 1 : end + j + 1] = view[at:end]
            view[at + j] = values[j]
            end = at


class RingHash(_Hashed):
    """Consistent hashing on a ring of virtual nodes (``replicas`` per unit
    of weight, default 100), looked up with a binary search.

    Adding an endpoint moves only the keys it takes over; removing one moves
    only its keys. Option ``seed`` is for keyless calls' random positions.

    Each endpoint's points are kept, so a new list only hashes the points of
    the endpoints that came or grew, and merges them into the ring and the
    points of those that went or shrank out of it (an endpoint's first
    ``count`` points are the same whatever ``count``): one pass over the ring,
    O(ring + changes log ring). A change of more than a quarter of the points
    sorts the ring anew.
    """

    def __init__(self, options: RingHashOptions | None = None) -> None:
        options = options or RingHashOptions()
        super().__init__(options)
        self._replicas = options.replicas
        #: the ring: its points' hashes, ascending, and their owners' slots
        self._hashes: array[int] = array("Q")
        self._ring: array[int] = array("I")
        #: each listed endpoint's points, by instance id
        self._points: dict[str, list[int]] = {}

    def _counts(self, shape: tuple[tuple[str, int], ...]) -> dict[str, int]:
        total = self._replicas * sum(w for _, w in shape)
        scale = min(1.0, MAX_RING_POINTS / total)
        return {i: max(1, round(self._replicas * w * scale)) for i, w in shape}

    def _build(
        self,
        old_shape: tuple[tuple[str, int], ...],
        old_slots: Mapping[str, int],
        old_ids: Sequence[str],
    ) -> Sequence[int]:
        if not self._shape:
            self._points, self._hashes, self._ring = {}, array("Q"), array("I")
            return self._ring
        old = self._points
        counts = self._counts(self._shape)
        changes = sum(abs(len(have) - counts.get(i, 0)) for i, have in old.items())
        changes += sum(count for i, count in counts.items() if i not in old)
        points: dict[str, list[int]] = {}
        for instance_id, count in counts.items():
            have = old.get(instance_id)
            if have is None or len(have) < count:
                points[instance_id] = ring_points(instance_id, count)
            else:
                points[instance_id] = have if len(have) == count else have[:count]
        self._points = points
        if 4 * changes > len(self._hashes):
            self._renumber()
            self._sort(points)
        elif changes:
            # (hash, old slot) of the points to take out, (hash, id, slot) to add
            out: list[tuple[int, int]] = []
            add: list[tuple[int, str, int]] = []
            for instance_id, have in old.items():
                count = counts.get(instance_id, 0)
                if count < len(have):
                    slot = old_slots[instance_id]
                    out.extend((h, slot) for h in have[count:])
            for instance_id, count in counts.items():
                had = len(old.get(instance_id, ()))
                if count > had:
                    slot = self._slots[instance_id]
                    add.extend((h, instance_id, slot) for h in points[instance_id][had:])
            self._merge(out, add, old_ids)
        return self._ring

    def _sort(self, points: Mapping[str, list[int]]) -> None:
        """The ring from scratch (slots in instance id order): a point is its
        hash with its owner's slot below, so one sort of plain ints orders them
        (and breaks a tie between two hashes by instance id)."""
        shift = max(1, (len(self._shape) - 1).bit_length())
        packed: list[int] = []
        for slot, (instance_id, _) in enumerate(self._shape):
            packed.extend([(h << shift) | slot for h in points[instance_id]])
        packed.sort()
        mask = (1 << shift) - 1
        self._hashes = array("Q", map(operator.rshift, packed, repeat(shift)))
        self._ring = array("I", map(operator.and_, packed, repeat(mask)))

    def _merge(
        self, out: list[tuple[int, int]], add: list[tuple[int, str, int]], old_ids: Sequence[str]
    ) -> None:
        """The ring less the points ``out`` plus the points ``add``, in place."""
        hashes, owners = self._hashes, self._ring
        size = len(hashes)
        # where each point to take out is: its hash, and its slot among equals
        gone: set[int] = set()
        for h, slot in out:
            at = bisect_left(hashes, h)
            while owners[at] != slot or at in gone:
                at += 1
            gone.add(at)
        # where each point to add goes: before the first greater hash, or
        # equal hash of a greater instance id
        add.sort()
        places: list[int] = []
        for h, instance_id, _ in add:
            at = bisect_left(hashes, h)
            while at < size and hashes[at] == h and old_ids[owners[at]] <= instance_id:
                at += 1
            places.append(at)
        if gone:
            cuts = sorted(gone)
            _cut(hashes, cuts)
            _cut(owners, cuts)
            # where the points go once those are out
            places = [at - bisect_left(cuts, at) for at in places]
        if add:
            _insert(hashes, places, [h for h, _, _ in add])
            _insert(owners, places, [slot for _, _, slot in add])

    def _locate(self, key: str) -> int:
        position = bisect_right(self._hashes, hash64(_key_bytes(key)))
        return 0 if position == len(self._hashes) else position


class Maglev(_Hashed):
    """Maglev hashing (Eisenbud et al., NSDI 2016): a lookup table of
    ``table_size`` slots (a prime, default 65537) shared out by weight.

    A lookup is one hash and one index. Adding or removing an endpoint moves
    about the keys it gains or loses, and a small fraction more.

    The table is filled as lookups need it: :meth:`update` only starts the
    fill (each endpoint's permutation is kept by instance id), and a lookup of
    a position not yet filled runs the fill on until that position is taken.
    Filling is the same whenever it happens, so a key maps to the same
    endpoint as with a table filled at once; a list that changes several
    times between lookups is filled once. The last ``isqrt(table_size)`` free
    positions are found from the free positions rather than by probing along
    the permutation, which is where the probes pile up.
    """

    def __init__(self, options: MaglevOptions | None = None) -> None:
        options = options or MaglevOptions()
        super().__init__(options)
        self._size = options.table_size
        self._prime = is_prime(self._size)
        #: the permutation (offset, skip, 1/skip mod size) of each endpoint, by id
        self._permutations: dict[str, tuple[int, int, int]] = {}
        #: the table being filled, and its fill
        self._table: list[int] = []
        self._filling: Generator[None, int, None] | None = None

    def _permutation(self, instance_id: str) -> tuple[int, int, int]:
        import hashlib  # not at start (docs/benchmarks.md, Footprint)

        size = self._size
        digest = hashlib.blake2b(_key_bytes(instance_id), digest_size=16).digest()
        h1, h2 = _U64_PAIR.unpack(digest)
        skip = h2 % (size - 1) + 1
        inverse = pow(skip, -1, size) if self._prime else 0
        return h1 % size, skip, inverse

    def _build(
        self,
        old_shape: tuple[tuple[str, int], ...],
        old_slots: Mapping[str, int],
        old_ids: Sequence[str],
    ) -> list[int]:
        shape = self._shape
        if not shape:
            self._permutations, self._table, self._filling = {}, [], None
            return self._table
        cached = self._permutations
        self._permutations = {i: cached.get(i) or self._permutation(i) for i, _ in shape}
        self._table = table = [-1] * self._size
        self._filling = self._fill(table)
        next(self._filling)
        return table

    def _claim(self, position: int) -> int:
        table = self._table
        filling = self._filling
        if filling is not None:
            try:
                filling.send(position)
            except StopIteration:
                self._filling = None
        if table[position] < 0:
            # the fill stopped short (it raised): start it again
            table[:] = [-1] * len(table)
            self._filling = filling = self._fill(table)
            next(filling)
            filling.send(position)
        return table[position]

    def _fill(self, table: list[int]) -> Generator[None, int, None]:
        """Fill ``table`` as Maglev does, pausing each time the position it
        was sent is taken (it must be one not taken yet)."""
        size = len(table)
        shape = self._shape
        slots = self._order
        n = len(shape)
        permutations = [self._permutations[i] for i, _ in shape]
        offsets = [p[0] for p in permutations]
        skips = [p[1] for p in permutations]
        weights = [w for _, w in shape]
        top = max(weights)
        weighted = any(w != top for w in weights)
        targets = [0] * n
        left = size
        # the last few free positions are found from the free positions
        # (when the size is prime, so that a skip has an inverse)
        few = math.isqrt(size) if self._prime else 0
        target = yield
        iteration = 0
        i = n - 1
        while left > few:
            iteration += 1
            for i in range(n):
                if weighted:
                    # an endpoint of weight top/k claims a slot every k-th round
                    if iteration * weights[i] < targets[i]:
                        continue
                    targets[i] += top
                slot = offsets[i]
                skip = skips[i]
                while table[slot] >= 0:
                    slot += skip
                    if slot >= size:
                        slot -= size
                offsets[i] = slot + skip - size if slot + skip >= size else slot + skip
                table[slot] = slots[i]
                left -= 1
                if slot == target:
                    target = yield
                if left == few:
                    break
            else:
                continue
            break
        if not left:
            return
        free: list[int] = []
        at = -1
        for _ in range(left):
            at = table.index(-1, at + 1)
            free.append(at)
        first = i + 1  # the rest of this round, then more
        while True:
            for i in range(first, n):
                if weighted:
                    if iteration * weights[i] < targets[i]:
                        continue
                    targets[i] += top
                # the first free position along its permutation: every
                # position before it there is taken, and stays taken
                start, _, inverse = permutations[i]
                places = [(s - start) * inverse % size for s in free]
                slot = free.pop(places.index(min(places)))
                table[slot] = slots[i]
                if slot == target:
                    if not free:
                        return
                    target = yield
                elif not free:
                    return
            first = 0
            iteration += 1

    def _locate(self, key: str) -> int:
        return hash64(_key_bytes(key)) % self._size


# -- registration --------------------------------------------------------------


def _seeded(cls: Callable[[random.Random], Balancer]) -> Callable[[Any], Balancer]:
    return lambda options: cls(random.Random(getattr(options, "seed", None)))


STRATEGIES: tuple[Strategy, ...] = (
    Strategy("round_robin", _seeded(RoundRobin)),
    Strategy("weighted_round_robin", _seeded(WeightedRoundRobin)),
    Strategy("least_inflight", _seeded(LeastInflight)),
    Strategy("random", _seeded(RandomPick), SeedOptions),
    Strategy("p2c", _seeded(PowerOfTwoChoices), SeedOptions),
    Strategy("ring_hash", RingHash, RingHashOptions),
    Strategy("maglev", Maglev, MaglevOptions),
)


@hsu.hookimpl
def hsu_register_balancers(register: Register[Factory]) -> None:
    for strategy in STRATEGIES:
        register(strategy.name, strategy, default=strategy.name == "round_robin")
