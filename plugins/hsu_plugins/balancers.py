"""Built-in balancing strategies: round_robin, weighted_round_robin,
least_inflight, random, p2c, ring_hash, maglev.

A unit picks one with ``balancer: {strategy: NAME, options: {...}}``. A
balancer only ever sees the routable endpoints (the caller filters them) and
may be given a new list at any time with ``update``; ``pick`` is on every
call's path, so each strategy does its work in ``update`` and keeps ``pick``
cheap: O(1) for round_robin, weighted_round_robin (up to a schedule size),
random and p2c, O(log n) for ring_hash, O(1) for maglev, O(n) for
least_inflight.

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

import difflib
import hashlib
import math
import random
import struct
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from functools import reduce
from typing import Any

import hsu
from hsu.ports import Balancer, Endpoint, Factory

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
#: weighted_round_robin precomputes its whole cycle when the cycle's length
#: times the endpoints is at most this; beyond, it computes each pick (O(n))
MAX_SCHEDULE_WORK = 1 << 18
QUOTE_CHARS = 200

_U64 = struct.Struct("<Q")
_U64_PAIR = struct.Struct("<QQ")
_U64_X8 = struct.Struct("<8Q")


def hash64(data: bytes) -> int:
    """The stable 64-bit hash ring_hash and maglev use (BLAKE2b, little-endian)."""
    return int(_U64.unpack(hashlib.blake2b(data, digest_size=8).digest())[0])


def ring_points(instance_id: str, count: int) -> list[int]:
    """An endpoint's ``count`` places on a ring_hash ring.

    Point ``j`` is 64-bit word ``j % 8`` (little-endian) of the 64-byte BLAKE2b
    of ``"{instance_id}#{j // 8}"``: one hash gives eight points.
    """
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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_int(value: object) -> bool:
    return _is_int(value) and value >= 1  # type: ignore[operator]


def _is_load_factor(value: object) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    return value == 0 or (math.isfinite(value) and value >= 1)


def _is_table_size(value: object) -> bool:
    return _is_int(value) and 2 <= value <= MAX_TABLE_SIZE  # type: ignore[operator]


#: option type: (test, description for "expected ...")
OptionType = tuple[Callable[[object], bool], str]
SEED: OptionType = (_is_int, "an int")
REPLICAS: OptionType = (_is_positive_int, "an int >= 1")
BOUNDED_LOAD: OptionType = (_is_load_factor, "0 (off) or a number >= 1, such as 1.25")
TABLE_SIZE: OptionType = (_is_table_size, f"a prime int between 2 and {MAX_TABLE_SIZE}")


def _quote(value: object) -> str:
    text = repr(value)
    return text if len(text) <= QUOTE_CHARS else text[: QUOTE_CHARS - 3] + "..."


def check_option_types(
    options: Mapping[str, Any], known: Mapping[str, OptionType], strategy: str
) -> list[str]:
    """The problems common to every strategy: unknown keys and wrong types."""
    if not isinstance(options, Mapping):
        return [f"options: expected a mapping, got {type(options).__name__}"]
    problems: list[str] = []
    for key, value in options.items():
        name = str(key)
        if name not in known:
            if not known:
                problems.append(
                    f"{name}: unknown option (the {strategy} strategy takes no options)"
                )
                continue
            close = difflib.get_close_matches(name, list(known), n=1)
            if close:
                problems.append(f"{name}: unknown option (did you mean {close[0]!r}?)")
            else:
                listing = ", ".join(sorted(known))
                problems.append(f"{name}: unknown option (known: {listing})")
            continue
        test, description = known[name]
        if not test(value):
            problems.append(f"{name}: expected {description}, got {_quote(value)}")
    return problems


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


def _check_table_size(options: Mapping[str, Any]) -> list[str]:
    size = options.get("table_size")
    if isinstance(size, int) and _is_table_size(size) and not is_prime(size):
        return [f"table_size: expected a prime, got {size} (the next prime is {_next_prime(size)})"]
    return []


class Strategy:
    """The :class:`hsu.ports.Factory` of one strategy: its options and its balancer."""

    def __init__(
        self,
        name: str,
        make: Callable[[Mapping[str, Any]], Balancer],
        options: Mapping[str, OptionType] | None = None,
        check: Callable[[Mapping[str, Any]], list[str]] | None = None,
    ) -> None:
        self.name = name
        self.options: Mapping[str, OptionType] = options or {}
        self._make = make
        self._check = check

    def check_options(self, options: Mapping[str, Any]) -> list[str]:
        problems = check_option_types(options, self.options, self.name)
        if not problems and self._check is not None:
            problems = self._check(options)
        return problems

    def create(self, options: Mapping[str, Any]) -> Balancer:
        return self._make(options)

    def __repr__(self) -> str:
        return f"<balancing strategy {self.name!r}>"


def _rng(options: Mapping[str, Any]) -> random.Random:
    seed = options.get("seed")
    return random.Random(seed) if seed is not None else random.Random()


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
    """Smooth weighted round robin (nginx): shares by weight, interleaved.

    Weights 5, 1, 1 give ``a a b a c a a``, never five ``a`` in a row. The
    sequence repeats every (sum of weights / their gcd) picks; when that cycle
    is short enough it is computed once, in :meth:`update`, and each pick is
    a lookup from a random place in it (so callers do not align). A longer
    cycle is computed as it goes, O(n) a pick. A new list starts a new cycle.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._endpoints: tuple[Endpoint, ...] = ()
        self._weights: tuple[int, ...] = ()
        #: the whole cycle, as endpoints, when it is short enough
        self._schedule: tuple[Endpoint, ...] | None = ()
        self._next = 0
        #: the running state when there is no schedule
        self._current: list[int] = []
        self._reduced: list[int] = []
        self._total = 0

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
        if not new:
            self._schedule, self._current, self._total = (), [], 0
            return
        divisor = reduce(math.gcd, weights)
        reduced = [w // divisor for w in weights]
        total = sum(reduced)
        self._current = [0] * len(new)
        self._total = total
        if total * len(new) <= MAX_SCHEDULE_WORK:
            current = [0] * len(new)
            order = [_swrr_step(reduced, current, total) for _ in range(total)]
            self._schedule = tuple(new[i] for i in order)
            self._next = self._rng.randrange(total)
        else:
            self._schedule = None
            self._reduced = reduced

    def pick(self, inflight: Mapping[str, int], key: str | None = None) -> Endpoint | None:
        schedule = self._schedule
        if schedule is None:
            return self._endpoints[_swrr_step(self._reduced, self._current, self._total)]
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
    lowest it finds, so equally loaded endpoints take turns.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__()
        self._rng = rng or random.Random()
        self._start = 0

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
            for j in range(start + 1, start + n):
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

    ``_owners[p]`` is the index (into ``_endpoints``, sorted by instance id)
    of the endpoint that owns position ``p``; a subclass fills it in
    :meth:`_build` and finds a key's position in :meth:`_locate`.
    """

    def __init__(self, options: Mapping[str, Any]) -> None:
        self._rng = _rng(options)
        self._c = float(options.get("bounded_load") or 0)
        self._endpoints: tuple[Endpoint, ...] = ()
        self._ids: tuple[str, ...] = ()
        self._zeros: tuple[int, ...] = ()
        self._shape: tuple[tuple[str, int], ...] = ()
        self._owners: list[int] = []
        #: bounded load: c * weight for each endpoint, and the total weight
        self._capacity: tuple[float, ...] = ()
        self._total_weight = 0

    def update(self, endpoints: Sequence[Endpoint]) -> None:
        ordered = tuple(sorted(endpoints, key=lambda e: e.instance_id))
        shape = tuple((e.instance_id, max(1, e.weight)) for e in ordered)
        self._endpoints = ordered
        if shape == self._shape:
            return  # the same ids and weights: the same table
        self._shape = shape
        self._ids = tuple(i for i, _ in shape)
        self._zeros = (0,) * len(shape)
        self._capacity = tuple(self._c * w for _, w in shape)
        self._total_weight = sum(w for _, w in shape)
        self._owners = self._build(shape) if shape else []

    def _build(self, shape: tuple[tuple[str, int], ...]) -> list[int]:
        raise NotImplementedError

    def _locate(self, key: str) -> int:
        raise NotImplementedError

    def pick(self, inflight: Mapping[str, int], key: str | None = None) -> Endpoint | None:
        owners = self._owners
        if not owners:
            return None
        position = int(self._rng.random() * len(owners)) if key is None else self._locate(key)
        owner = owners[position]
        if not self._c:
            return self._endpoints[owner]
        ids = self._ids
        load = inflight.get(ids[owner], 0)
        if not load:
            return self._endpoints[owner]
        room = sum(map(inflight.get, ids, self._zeros)) + 1
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
            if inflight.get(ids[candidate], 0) * total_weight < capacity[candidate] * room:
                return self._endpoints[candidate]
        # only an endpoint the table does not list (too little weight) is under
        # its bound: the least loaded, per unit of capacity
        best = min(range(len(ids)), key=lambda i: inflight.get(ids[i], 0) / capacity[i])
        return self._endpoints[best]


class RingHash(_Hashed):
    """Consistent hashing on a ring of virtual nodes (``replicas`` per unit
    of weight, default 100), looked up with a binary search.

    Adding an endpoint moves only the keys it takes over; removing one moves
    only its keys. Option ``seed`` is for keyless calls' random positions.
    """

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        self._replicas = int(options.get("replicas", DEFAULT_REPLICAS))
        self._hashes: list[int] = []

    def _build(self, shape: tuple[tuple[str, int], ...]) -> list[int]:
        total = self._replicas * sum(w for _, w in shape)
        scale = min(1.0, MAX_RING_POINTS / total)
        shift = max(1, (len(shape) - 1).bit_length())
        # a point is its hash with its owner's index below, so one sort of
        # plain ints orders them (and breaks a tie between two hashes)
        points: list[int] = []
        for index, (instance_id, weight) in enumerate(shape):
            count = max(1, round(self._replicas * weight * scale))
            points.extend((h << shift) | index for h in ring_points(instance_id, count))
        points.sort()
        mask = (1 << shift) - 1
        self._hashes = [p >> shift for p in points]
        return [p & mask for p in points]

    def _locate(self, key: str) -> int:
        position = bisect_right(self._hashes, hash64(_key_bytes(key)))
        return 0 if position == len(self._hashes) else position


class Maglev(_Hashed):
    """Maglev hashing (Eisenbud et al., NSDI 2016): a lookup table of
    ``table_size`` slots (a prime, default 65537) shared out by weight.

    A lookup is one hash and one index. Adding or removing an endpoint moves
    about the keys it gains or loses, and a small fraction more.
    """

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        self._size = int(options.get("table_size", DEFAULT_TABLE_SIZE))

    def _build(self, shape: tuple[tuple[str, int], ...]) -> list[int]:
        size = self._size
        n = len(shape)
        offsets: list[int] = []
        skips: list[int] = []
        for instance_id, _ in shape:
            digest = hashlib.blake2b(_key_bytes(instance_id), digest_size=16).digest()
            h1, h2 = _U64_PAIR.unpack(digest)
            offsets.append(h1 % size)
            skips.append(h2 % (size - 1) + 1)
        weights = [w for _, w in shape]
        top = max(weights)
        weighted = any(w != top for w in weights)
        targets = [0] * n
        table = [-1] * size
        filled = 0
        iteration = 0
        while filled < size:
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
                table[slot] = i
                offsets[i] = slot + skip - size if slot + skip >= size else slot + skip
                filled += 1
                if filled == size:
                    break
        return table

    def _locate(self, key: str) -> int:
        return hash64(_key_bytes(key)) % self._size


# -- registration --------------------------------------------------------------


def _seeded(cls: Callable[[random.Random], Balancer]) -> Callable[[Mapping[str, Any]], Balancer]:
    return lambda options: cls(_rng(options))


STRATEGIES: tuple[Strategy, ...] = (
    Strategy("round_robin", _seeded(RoundRobin)),
    Strategy("weighted_round_robin", _seeded(WeightedRoundRobin)),
    Strategy("least_inflight", _seeded(LeastInflight)),
    Strategy("random", _seeded(RandomPick), {"seed": SEED}),
    Strategy("p2c", _seeded(PowerOfTwoChoices), {"seed": SEED}),
    Strategy(
        "ring_hash",
        RingHash,
        {"replicas": REPLICAS, "bounded_load": BOUNDED_LOAD, "seed": SEED},
    ),
    Strategy(
        "maglev",
        Maglev,
        {"table_size": TABLE_SIZE, "bounded_load": BOUNDED_LOAD, "seed": SEED},
        check=_check_table_size,
    ),
)


@hsu.hookimpl
def hsu_register_balancers(register: Callable[[str, Factory], None]) -> None:
    for strategy in STRATEGIES:
        register(strategy.name, strategy)
