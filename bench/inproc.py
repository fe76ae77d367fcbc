"""Where a forward-auth check's CPU goes, without sockets: a real `App` in this process, fed raw requests.

``python -m bench.inproc [--policies] [--first-seen [--full-cache] [--record]] [--no-memo] [--profile]
[--callgrind [--cache-sim]]`` starts
the bench's provider, builds the verifier from the same config ``bench run`` uses (audit logging on, as served: the
lines go to /dev/null), and feeds one connection (a fake transport: no syscalls, no event-loop wake-ups) the same
forward-auth request as ``wrk`` sends. It prints the CPU per check (cached: the best of 7 passes of 20,000;
first-seen: 5 rounds of 1,000 fresh ES256 tokens, each ending with the audit lines it logged formatted and written
(timed with it), each followed by the raw parse + verify of the same tokens (``bench/floor.py``), medians and
their ratio, with the page faults and the garbage collector's own CPU per check during the checks: a
``gc.callbacks`` hook times each collection, per generation, and keeps the longest (a pause of the worker); then the
CPU of one full collection with the caches as the rounds left them) and, with ``--profile``, cProfile's top functions.
``--full-cache``: the verified-token cache bounded at one round's tokens (``cache: {token_entries: N}``), so that
the timed rounds after the first store into a full cache and push out an entry for each, as a verifier at its
bound does, instead of growing an empty 100,000-entry cache (whose growth the default measure pays: page faults
and collections walking the new entries). ``--record``: instead of the timed rounds, what one round of first-seen
tokens leaves alive per token, the collector off: the GC-tracked objects by type (``gc.get_objects()`` before and
after) and the bytes by allocation site (``tracemalloc``); what each cached token costs a worker.
``--callgrind`` runs the first-seen measure under valgrind instead and prints instructions per check and per
raw parse + verify (deterministic: immune to the other processes on the machine); with ``--cache-sim`` also the
simulated L1 instruction and data cache misses of each (why the CPU ratio exceeds the instruction ratio). The gap
between this and ``bench run``'s server CPU per check is the I/O (read, write, epoll) that the no-op pays too. The
same raw request again is answered by the door's answer memo; ``--no-memo`` measures the path every other request takes.
``--no-verify`` (with ``--first-seen``): the ES256 signature left unchecked in both loops (the verify replaced by its
length check, in this process only), so the figures are what a check and the raw parse cost besides the signature;
with ``--layer``, per layer. Against the same measure with the verify, it tells the Python's own cost from what it
pays for running after a verify (its caches cold).

``--opaque``: 5,000 first-seen opaque tokens, introspected over real loopback HTTP at the provider (its
process, no delay), through ``OPAQUE_CONNECTIONS`` door connections at a time (``--in-flight N``; 1: the loop sleeps
and wakes for every provider answer, as served): the CPU per first-seen opaque token with the provider calls' real I/O
but none of the door's.

``--pure-vs-compiled N``: the same measure (with the other options given) run N times in each of two child
processes, alternating which goes first: a copy of the ``verifier/`` in use with the first-seen hot path compiled
by mypyc (``bench/native.py``, ~1-3 minutes to build), and a copy as it is (pure Python); prints each run's figures
and their medians.

``--door grpc|ext_authz``: the cached check at a gRPC door instead, its method handler called as grpc.aio calls
it (deserializer, handler, serializer) with the serialized request ``h2load`` sends (``ext_authz``: each with its
own request id, time and source port, as Envoy sends them).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import functools
import gc
import itertools
import math
import os
import pstats
import re
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bench import floor, idp, native, procs, wire

CACHED_PASSES, CACHED_REQUESTS = 7, 20_000
JUNK_CACHE_ENTRIES = 10_000  # --junk: the refused-token cache's bound (filled before the measure)
FIRST_SEEN_ROUNDS, FIRST_SEEN_PER_ROUND = 5, 1_000
OPAQUE_TOKENS = 5_000
OPAQUE_CONNECTIONS = 32  # door connections fed at once (a check waits for its provider call)
CALLGRIND_TOKENS = 300  # per measure under valgrind (~50x slower); counts are exact, few suffice
# The two loops run inside these C functions, so callgrind can tell their instructions apart.
CHECK_LOOP, RAW_LOOP = "consume_iterator", "deque_extendleft"
SIGNATURES_UNCHECKED = False  # --no-verify: the ES256 verify replaced by its length check in this process
OPAQUE_LOOP = "functools_reduce"  # --opaque: the measured groups' event loop runs inside it


class _Transport:
    """What the connection writes to: counts answers, keeps the last."""

    def __init__(self, answered: Any = None) -> None:
        self.answers = 0
        self.last = b""
        self.answered = answered  # called with each answer (the opaque pass counts them)

    def write(self, data: bytes) -> None:
        self.answers += 1
        self.last = data
        if self.answered is not None:
            self.answered(data)

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else None

    def is_closing(self) -> bool:
        return False

    def close(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


def _checks(feed: Callable[[bytes], None], requests: Iterable[bytes]) -> None:
    collections.deque(map(feed, requests), maxlen=0)  # runs in C `consume_iterator`


def _checks_and_lines(feed: Callable[[Any], Any], requests: Iterable[Any]) -> None:
    """A first-seen round: the checks, then the audit lines they left in the log buffer formatted and written
    (`flush_logs`), both inside C `consume_iterator` (timed, and counted by ``--callgrind``): whatever a check
    leaves for later is paid for in its own round, not in the raw loop's nor outside the measure."""
    from verifier.observe.audit import flush_logs

    collections.deque(itertools.chain(map(feed, requests), map(_call, [flush_logs])), maxlen=0)


def _junk_requests(count: int) -> list[bytes]:
    """Distinct malformed tokens (refused and remembered as refused), as forward-auth requests."""
    return [wire.http_request(wire.http_headers(f"junk{i}.junk.junk"), "127.0.0.1") for i in range(count)]


def _call(function: Callable[[], None]) -> None:
    function()


def _raw(check: Callable[[str], None], tokens: Iterable[str]) -> None:
    collections.deque(maxlen=1).extendleft(map(check, tokens))  # runs in C `deque_extendleft`


def _timed(loop: Callable[[Any, Any], None], *args: Any, profiler: cProfile.Profile | None = None) -> float:
    started = time.process_time()
    if profiler:
        profiler.enable()
    loop(*args)
    if profiler:
        profiler.disable()
    return time.process_time() - started


class _GcClock:
    """The collector's own CPU (``time.process_time``) while `on`, per generation, from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.on = False
        self.spent = [0.0, 0.0, 0.0]
        self.count = [0, 0, 0]
        self.longest = [0.0, 0.0, 0.0]  # the longest single collection (a pause of the worker), per generation
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if not self.on:
            return
        if phase == "start":
            self._started = time.process_time()
        else:
            generation, took = info["generation"], time.process_time() - self._started
            self.spent[generation] += took
            self.count[generation] += 1
            self.longest[generation] = max(self.longest[generation], took)

    def report(self, checks: int) -> str:
        per_check = [s / checks * 1e6 for s in self.spent]
        counted = enumerate(zip(self.count, per_check, self.longest, strict=True))
        by_generation = ", ".join(
            f"gen{g}: {n} collections, {p:.2f} us, longest {most * 1e3:.1f} ms" for g, (n, p, most) in counted if n
        )
        return f"GC {sum(per_check):.2f} us CPU per check ({by_generation or 'none'})"


def _record(feed: Callable[[Any], Any], items: list[Any]) -> None:
    """``--record``: the GC-tracked objects and the bytes one round of first-seen checks leaves alive, per token."""
    import tracemalloc

    from verifier.observe.audit import flush_logs

    gc.collect()
    gc.disable()
    try:
        tracemalloc.start(1)
        first = tracemalloc.take_snapshot()
        before = {id(o) for o in gc.get_objects()}
        collections.deque(map(feed, items), maxlen=0)
        flush_logs()
        gc.collect()  # frees nothing cyclic of theirs; untracks the tuples of atoms, as any collection does
        born = collections.Counter(type(o).__qualname__ for o in gc.get_objects() if id(o) not in before)
        second = tracemalloc.take_snapshot()
        tracemalloc.stop()
    finally:
        gc.enable()
    n = len(items)
    born["set"] -= 1  # `before`
    tracked = sum(born.values()) / n
    kinds = ", ".join(f"{name} {count / n:.2f}" for name, count in born.most_common() if count >= n / 10)
    print(f"GC-tracked objects left per token: {tracked:.2f} ({kinds})")
    stats = second.compare_to(first, "lineno")
    total = sum(s.size_diff for s in stats) / n
    print(f"bytes left per token (tracemalloc): {total:,.0f}, by allocation site:")
    for stat in stats[:14]:
        if stat.size_diff >= n * 8:
            frame = stat.traceback[0]
            where = f"{'/'.join(Path(frame.filename).parts[-2:])}:{frame.lineno}"
            print(f"  {stat.size_diff / n:7,.0f} B {stat.count_diff / n:5.2f} blocks  {where}")


def _faults_and_collections() -> tuple[int, int]:
    """This process's minor page faults and garbage collections (all generations) so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt, sum(s["collections"] for s in gc.get_stats())


LOOP_OBJECTS = ("create_task", "call_soon", "create_future", "call_at")  # --loop-objects: BaseEventLoop methods


def _count_loop_objects() -> collections.Counter[str]:
    """``--loop-objects``: wraps the plain asyncio loop's methods that make tasks, handles, futures and timers
    (uvloop's are C: not countable) and returns the counter they add to."""
    counts: collections.Counter[str] = collections.Counter()
    base = asyncio.base_events.BaseEventLoop

    def counting(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def counted(self: Any, *args: Any, **kw: Any) -> Any:
            counts[name] += 1
            return method(self, *args, **kw)

        return counted

    for name in LOOP_OBJECTS:
        setattr(base, name, counting(name, getattr(base, name)))
    return counts


def _measure_opaque(
    loop: asyncio.AbstractEventLoop,
    app: Any,
    tokens: list[str],
    profiler: Any,
    objects: collections.Counter[str] | None = None,
) -> None:
    """First-seen opaque tokens, ``OPAQUE_CONNECTIONS`` checks in flight; prints the CPU per token.

    The measured groups run in one ``loop.run_until_complete`` called from C ``functools_reduce``, so that
    callgrind (``--callgrind``) counts exactly them (the warm-up group before it is not counted)."""
    from verifier.doors import forward_auth

    state: dict[str, Any] = {"left": 0, "done": None, "allowed": 0}

    def answered(data: bytes) -> None:
        state["allowed"] += data.startswith(b"HTTP/1.1 200")
        if not data.startswith(b"HTTP/1.1 200"):
            state["refused"] = data[:300]
        state["left"] -= 1
        if state["left"] == 0:
            state["done"].set_result(None)

    async def connect() -> Any:  # a connection reads the running loop
        conn = forward_auth._Connection(app.forward_auth)
        conn.connection_made(_Transport(answered))  # type: ignore[arg-type]
        return conn

    conns = [loop.run_until_complete(connect()) for _ in range(OPAQUE_CONNECTIONS)]
    requests = [wire.http_request(wire.http_headers(t), "127.0.0.1") for t in tokens]
    warm, measured = requests[:OPAQUE_CONNECTIONS], requests[OPAQUE_CONNECTIONS:]

    async def feed(groups: list[list[bytes]]) -> None:
        for group in groups:
            state["left"], state["done"] = len(group), loop.create_future()
            for conn, raw in zip(conns, group, strict=False):
                conn.data_received(raw)
            await state["done"]

    loop.run_until_complete(feed([warm]))
    state["allowed"] = 0
    groups = [measured[i : i + OPAQUE_CONNECTIONS] for i in range(0, len(measured), OPAQUE_CONNECTIONS)]
    started = time.process_time()
    if profiler:
        profiler.enable()
    if objects is not None:
        objects.clear()
    functools.reduce(lambda _, __: loop.run_until_complete(feed(groups)), [0], None)
    spent = time.process_time() - started
    if objects is not None:
        print("asyncio objects per token: " + ", ".join(f"{n} {objects[n] / len(measured):.2f}" for n in LOOP_OBJECTS))
    if profiler:
        profiler.disable()
    refused = len(measured) - state["allowed"]
    print(f"first-seen opaque: {spent / len(measured) * 1e6:.2f} us CPU per token ({len(measured)} tokens)")
    if refused:  # a loaded machine: the provider or the decision deadline was late for some
        print(f"  {refused} not allowed, e.g. {state['refused'][:60]!r}")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


def _grpc_handler(doors: Any, door: wire.Door) -> Any:
    """The gRPC door's method handler as the server registers it."""
    if hasattr(doors, "own_handler"):
        return doors.own_handler() if door is wire.Door.GRPC else doors.envoy_handler()
    # An older tree (before/after comparisons): both doors parsed by grpc.
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2

    from verifier.v1 import verifier_pb2

    own = door is wire.Door.GRPC
    parse = (verifier_pb2 if own else external_auth_pb2).CheckRequest.FromString
    method = doors.check_own if own else doors.check_envoy
    return grpc.unary_unary_rpc_method_handler(method, request_deserializer=parse, response_serializer=bytes)


async def _measure_grpc(app: Any, door: wire.Door, tokens: list[str], profiler: cProfile.Profile | None) -> None:
    """A cached check at a gRPC door: its handler as grpc.aio calls it (deserializer, handler, serializer;
    no servicer context: a cached check never reads it), fed the request h2load sends."""
    handler = _grpc_handler(app.grpc, door)
    deserialize = handler.request_deserializer or (lambda data: data)
    serialize = handler.response_serializer or (lambda data: data)
    check = handler.unary_unary
    answers: list[bytes] = [serialize(await check(deserialize(wire.grpc_payload(door, tokens[0])), None))]  # warm

    def one(raw: bytes) -> None:
        call = check(deserialize(raw), None)
        try:
            call.send(None)  # a cached check never suspends
        except StopIteration as done:
            answers[0] = serialize(done.value)
        else:
            raise SystemExit("the handler suspended: not a cached check")

    # Fresh bytes objects, as grpc hands over; Envoy's differ in their per-request fields (`wire.grpc_payload`).
    requests = [wire.grpc_payload(door, t, serial) for serial, t in enumerate(tokens[1:], 1)]
    best = min(_timed(_checks, one, requests, profiler=profiler) for _ in range(CACHED_PASSES))
    if not wire.allowed(door, answers[0]):
        raise SystemExit(f"not an allow: {answers[0][:80]!r}")
    print(f"{door.value} cached: {best / len(requests) * 1e6:.2f} us CPU per check")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


def _settle_gc() -> None:
    """The collector as a serving worker's once it serves (an older tree without `gc_policy`: as it was)."""
    try:
        from verifier import gc_policy
    except ImportError:
        return
    gc_policy.settle()


def _layer(
    door: Any, layer: str, data_received: Any, requests: list[bytes], tokens: list[str]
) -> tuple[Callable[[Any], Any], list[Any]]:
    """``--layer``: what a first-seen check is fed below the door (built before the timed loop): ``pipeline``, the
    request's attributes to `Pipeline.decide_cached` (no HTTP parse, answer bytes, answer memo, metrics); ``jwt``,
    the token to the JWT authenticator's `verify_now` (parse, key, signature, claims, principal: no cache, no audit)."""
    if layer == "door":
        return data_received, requests
    if layer == "pipeline":
        decide = door.pipeline.decide_cached
        attributes = [door.attributes("GET", wire.FORWARD_AUTH_PATH.encode(), _lower(wire.http_headers(t)), "127.0.0.1")
                      for t in tokens]  # fmt: skip
        return functools.partial(_decided, decide), attributes
    from verifier.authenticators import JwtAuthenticator, Seen

    jwt = next(a for a in door.pipeline._authenticators if isinstance(a, JwtAuthenticator))
    return lambda token: jwt.verify_now(token, Seen()), tokens


def _without_signature_verify() -> None:
    """``--no-verify``: this process's ES256 verify replaced by its length check (a measure of everything a
    first-seen check does besides the signature; every minted token is valid, so the answers are the same)."""
    from verifier.tokens import keys

    def length_only(self: Any, msg: bytes, key: Any, sig: bytes) -> bool:
        return len(sig) == 2 * self._size

    global SIGNATURES_UNCHECKED
    keys._Ecdsa.verify = length_only  # type: ignore[method-assign]
    SIGNATURES_UNCHECKED = True


def _lower(headers: dict[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def _decided(decide: Callable[[Any, str], Any], attrs: Any) -> None:
    decision = decide(attrs, "forward_auth")
    if decision is None or not decision.allowed:
        raise SystemExit(f"not an allow from memory: {decision}")


async def _measure(
    config: Path,
    tokens: list[str],
    raw: Callable[[str], None] | None,
    profile: bool,
    memo: bool,
    door: str = "http",
    layer: str = "door",
    record: bool = False,
    junk: int = 0,
) -> None:
    from verifier.app import App
    from verifier.doors import forward_auth
    from verifier.settings import load_settings

    app = App(load_settings(str(config)))
    await app.start()
    try:
        await asyncio.wait_for(app.keys.wait_ready(), 10)
        _settle_gc()
        if not memo:
            app.forward_auth.memo = None
        # The loop does not come round during a measured pass: its overload clock would shed the pass.
        app.forward_auth.shed_after = math.inf
        if door != "http":
            await _measure_grpc(app, wire.Door(door), tokens, cProfile.Profile() if profile else None)
            return
        conn = forward_auth._Connection(app.forward_auth)
        transport = _Transport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        requests = [wire.http_request(wire.http_headers(t), "127.0.0.1") for t in tokens]
        conn.data_received(requests[0])  # warm: the cached token is admitted here
        await asyncio.sleep(0.01)
        profiler = cProfile.Profile() if profile else None
        if raw is None and junk:  # cached, each answer after `junk` distinct junk tokens: the refused-token cache full
            feed = conn.data_received
            rejects = iter(_junk_requests(JUNK_CACHE_ENTRIES * 2 + (len(requests) - 1) * junk * CACHED_PASSES))
            _checks(feed, itertools.islice(rejects, JUNK_CACHE_ENTRIES * 2))  # filled: each store now pushes one out
            mixes = [
                [r for valid in requests[1:] for r in (*itertools.islice(rejects, junk), valid)]
                for _ in range(CACHED_PASSES)
            ]
            answers = transport.answers
            best = min(_timed(_checks, feed, mix, profiler=profiler) for mix in mixes)
            per_check = [best / len(mixes[0])]
            lost = transport.answers - answers != len(mixes[0]) * CACHED_PASSES
            if lost or not transport.last.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"answers lost, or not an allow last: {transport.last[:80]!r}")
            print(
                f"cached, each check after {junk} distinct junk token(s): {per_check[0] * 1e6:.2f} us CPU per request "
                f"(valid or junk); answer memo {len(app.forward_auth.memo or ())} entries, generation bumped "
                f"{app.generation.value:,} times; refused-token cache {len(app.negative):,} entries "
                f"(bound {JUNK_CACHE_ENTRIES:,})"
            )
            if profiler:
                pstats.Stats(profiler).sort_stats("tottime").print_stats(int(os.environ.get("BENCH_TOP", "30")))
            return
        if raw is None:  # cached: one token, many passes
            feed = conn.data_received
            best = min(_timed(_checks, feed, requests[1:], profiler=profiler) for _ in range(CACHED_PASSES))
            per_check = [best / (len(requests) - 1)]
        elif record:
            per_check = []
            feed, items = _layer(app.forward_auth, layer, conn.data_received, requests[1:], tokens[1:])
            _record(feed, items)
        else:  # first-seen: rounds of fresh tokens, each followed by the raw parse + verify of the same ones
            per_check, per_raw = [], []
            rounds = (len(requests) - 1) // FIRST_SEEN_ROUNDS
            gc_clock = _GcClock()
            faults = collections = 0  # during the checks: the first touch of the pages the caches grow into, GC
            for r in range(FIRST_SEEN_ROUNDS):
                lo, hi = 1 + r * rounds, 1 + (r + 1) * rounds
                before = _faults_and_collections()
                feed, items = _layer(app.forward_auth, layer, conn.data_received, requests[lo:hi], tokens[lo:hi])
                gc_clock.on = True
                per_check.append(_timed(_checks_and_lines, feed, items, profiler=profiler) / rounds)
                gc_clock.on = False
                after = _faults_and_collections()
                faults, collections = faults + after[0] - before[0], collections + after[1] - before[1]
                per_raw.append(_timed(_raw, raw, tokens[lo:hi]) / rounds)
            full_gc = _timed(lambda: gc.collect())  # what a full collection walks: the caches as the rounds left them
        if not transport.last.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"not an allow: {transport.last[:80]!r}")
        check_us = statistics.median(per_check) * 1e6 if not record else 0.0
        if record:
            pass
        elif raw is None:
            print(f"cached: {check_us:.2f} us CPU per check ({transport.answers} answers)")
        else:
            raw_us = statistics.median(per_raw) * 1e6
            rounds_text = " ".join(f"{c * 1e6:.0f}/{w * 1e6:.0f}" for c, w in zip(per_check, per_raw, strict=True))
            unchecked = " (signatures NOT verified: --no-verify)" if SIGNATURES_UNCHECKED else ""
            print(
                f"first-seen ES256{unchecked}: {check_us:.2f} us CPU per check, raw parse + verify {raw_us:.2f} us, "
                f"ratio {check_us / raw_us:.2f}x (medians of {FIRST_SEEN_ROUNDS}; per round check/raw: {rounds_text}; "
                f"{transport.answers} answers; during the checks {faults / (rounds * FIRST_SEEN_ROUNDS):.2f} page "
                f"faults per check, {collections} GC collections)"
            )
            print(f"  during the checks: {gc_clock.report(rounds * FIRST_SEEN_ROUNDS)}")
            tracked = len(gc.get_objects())
            print(f"  a full collection after the rounds: {full_gc * 1e3:.1f} ms CPU ({tracked:,} objects tracked)")
        if profiler:
            order = os.environ.get("BENCH_SORT", "tottime")
            pstats.Stats(profiler).sort_stats(order).print_stats(int(os.environ.get("BENCH_TOP", "30")))
    finally:
        await app.stop(grace=0.1)


def _measure_opaque_outside(
    config: Path, tokens: list[str], profile: bool, objects: collections.Counter[str] | None = None
) -> None:
    """``--opaque``: the app started and stopped in a loop of its own, the measure run outside it."""
    from verifier.app import App
    from verifier.settings import load_settings

    loop = asyncio.new_event_loop()
    app = App(load_settings(str(config)))
    try:
        loop.run_until_complete(app.start())
        loop.run_until_complete(asyncio.wait_for(app.keys.wait_ready(), 10))
        _settle_gc()
        _measure_opaque(loop, app, tokens, cProfile.Profile(time.process_time) if profile else None, objects)
    finally:
        loop.run_until_complete(app.stop(grace=0.1))
        loop.close()


def _inclusive(annotated: str, function: str) -> int:
    """A function's inclusive instruction count from ``callgrind_annotate --inclusive=yes``."""
    return _inclusive_events(annotated, function)[0]


def _inclusive_events(annotated: str, function: str) -> list[int]:
    """A function's inclusive counts, one per event shown (``Ir`` first; with ``--cache-sim`` the L1 misses)."""
    for line in annotated.splitlines():
        if re.search(rf"[:\s]{function}\b", line):
            return [int(field.replace(",", "")) for field in line.split() if re.fullmatch(r"[\d,]+", field)]
    raise SystemExit(f"{function} not in the callgrind output")


def _callgrind(argv: list[str]) -> None:
    """Re-runs the first-seen measure under callgrind; prints instructions per check and per raw parse + verify
    (``--opaque``: per first-seen opaque token, its provider call's loopback I/O included, the provider not)."""
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed")
    opaque = "--opaque" in argv
    cache_sim = "--cache-sim" in argv
    loops = [f"--toggle-collect={f}" for f in ((OPAQUE_LOOP,) if opaque else (CHECK_LOOP, RAW_LOOP))]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        subprocess.run(
            [
                "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", f"--log-file={tmp}/valgrind.log", *loops,
                *(["--cache-sim=yes"] if cache_sim else []),
                sys.executable, "-m", "bench.inproc", *[a for a in argv if a not in ("--callgrind", "--cache-sim")],
                *([] if opaque else ["--first-seen"]), "--tokens", str(CALLGRIND_TOKENS + OPAQUE_CONNECTIONS * opaque),
            ],
            check=True,
        )  # fmt: skip
        shown = ["--show=Ir,I1mr,D1mr,D1mw"] if cache_sim else []
        command = ["callgrind_annotate", "--inclusive=yes", *shown, str(out)]
        annotated = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    if opaque:
        per_token = _inclusive(annotated, OPAQUE_LOOP) / CALLGRIND_TOKENS
        print(f"callgrind, first-seen opaque: {per_token:,.0f} instructions per token ({CALLGRIND_TOKENS} tokens)")
        return
    check, raw = _inclusive(annotated, CHECK_LOOP), _inclusive(annotated, RAW_LOOP)
    print(
        f"callgrind, first-seen ES256: {check / CALLGRIND_TOKENS:,.0f} instructions per check, "
        f"{raw / CALLGRIND_TOKENS:,.0f} per raw parse + verify, ratio {check / raw:.2f}x ({CALLGRIND_TOKENS} tokens)"
    )
    if cache_sim:  # simulated L1 misses (32 KiB instruction and data caches): what instructions alone do not show
        checks, raws = _inclusive_events(annotated, CHECK_LOOP), _inclusive_events(annotated, RAW_LOOP)
        print(
            "  L1 misses per check / per raw parse + verify: "
            + ", ".join(
                f"{name} {c / CALLGRIND_TOKENS:,.0f} / {r / CALLGRIND_TOKENS:,.0f}"
                for name, c, r in zip(("instruction", "data read", "data write"), checks[1:], raws[1:], strict=True)
            )
        )


# The figures a run prints: us, instructions, a ratio; with --cache-sim the L1 misses (per check / per raw).
FIGURES = re.compile(r"(\d[\d,]*\.?\d*)(?= us\b| instructions per check| per raw|x \(| /)|(?<=/ )(\d[\d,]*)")


def _pure_vs_compiled(argv: list[str], pairs: int) -> None:
    """``--pure-vs-compiled``: ``pairs`` alternating runs of this measure in two copies of the ``verifier/`` in use,
    one compiled with mypyc (`bench.native`), one as it is (pure Python)."""
    import importlib.util

    spec = importlib.util.find_spec("verifier")
    assert spec is not None and spec.origin is not None
    package = Path(spec.origin).resolve().parent
    bench_dir = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"compiled": Path(tmp, "compiled"), "pure": Path(tmp, "pure")}
        for tree in trees.values():
            shutil.copytree(package, tree / "verifier", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
            shutil.copy(package.parent / "pyproject.toml", tree)  # mypy's settings, for mypyc
        seconds = native.build(trees["compiled"])
        print(f"compiled {len(native.MODULES)} modules with mypyc in {seconds:.0f} s", flush=True)
        runs: dict[str, list[list[float]]] = {"compiled": [], "pure": []}
        for pair in range(pairs):
            for name in ("compiled", "pure") if pair % 2 == 0 else ("pure", "compiled"):
                cwd = Path(tmp, "run-" + name)  # `-m` puts the working directory first on sys.path: only `bench`
                cwd.mkdir(exist_ok=True)
                if not (cwd / "bench").exists():
                    (cwd / "bench").symlink_to(bench_dir)
                env = {**os.environ, "PYTHONPATH": str(trees[name])}
                done = subprocess.run(
                    [sys.executable, "-m", "bench.inproc", *argv], cwd=cwd, env=env, capture_output=True, text=True
                )
                if done.returncode != 0:
                    raise SystemExit(f"{name} run failed:\n{done.stdout}{done.stderr}")
                lines = [line.strip() for line in done.stdout.splitlines() if FIGURES.search(line)]
                if name == "compiled" and "compiled: True" not in done.stdout:
                    raise SystemExit("the compiled run did not run compiled")
                print(f"pair {pair + 1} {name:>8}: " + " | ".join(lines), flush=True)
                found = [a or b for line in lines for a, b in FIGURES.findall(line)]
                runs[name].append([float(f.replace(",", "")) for f in found])
    for name, figures in runs.items():
        columns = [statistics.median(column) for column in zip(*figures, strict=True)] if all(figures) else []
        print(f"median {name:>8}: " + ", ".join(f"{c:,.2f}" for c in columns))


def main() -> None:
    global OPAQUE_CONNECTIONS
    parser = argparse.ArgumentParser(prog="python -m bench.inproc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", action="store_true", help="two route policies (bench run --policies)")
    parser.add_argument("--first-seen", action="store_true", help="each ES256 token once, instead of one token")
    parser.add_argument("--opaque", action="store_true", help="each opaque token once (introspected at the provider)")
    parser.add_argument(
        "--full-cache", action="store_true", help="--first-seen: the token cache bounded at one round's tokens"
    )
    parser.add_argument(
        "--record", action="store_true", help="--first-seen: GC-tracked objects and bytes each cached token leaves"
    )
    parser.add_argument("--no-memo", action="store_true", help="without the door's answer memo")
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="--first-seen: the ES256 signature left unchecked in the checks and the raw loop (what the rest costs)",
    )
    parser.add_argument(
        "--junk", type=int, default=0, metavar="N", help="cached: each check after N distinct junk tokens (a flood)"
    )
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions")
    parser.add_argument("--door", choices=["http", "grpc", "ext_authz"], default="http", help="cached: which door")
    parser.add_argument(
        "--layer", choices=["door", "pipeline", "jwt"], default="door", help="first-seen: fed at which layer"
    )
    parser.add_argument("--callgrind", action="store_true", help="first-seen instruction counts under valgrind")
    parser.add_argument("--cache-sim", action="store_true", help="with --callgrind: simulated L1 cache misses too")
    parser.add_argument(
        "--loop-objects",
        action="store_true",
        help="--opaque: asyncio objects per token (plain asyncio loop, not uvloop)",
    )
    parser.add_argument(
        "--pure-vs-compiled", type=int, default=0, metavar="N", help="N alternating runs: compiled tree vs pure copy"
    )
    parser.add_argument(
        "--in-flight",
        type=int,
        default=OPAQUE_CONNECTIONS,
        metavar="N",
        help="--opaque: checks fed at once (1: the loop sleeps and wakes for every provider answer, as served)",
    )
    parser.add_argument(
        "--tokens", type=int, default=0, help="how many tokens (default: 5 rounds of 1,000; --opaque 5,032)"
    )
    args = parser.parse_args()
    OPAQUE_CONNECTIONS = max(1, args.in_flight)  # read by `_measure_opaque`
    if args.pure_vs_compiled:
        argv = sys.argv[1:]
        at = argv.index("--pure-vs-compiled")
        _pure_vs_compiled(argv[:at] + argv[at + 2 :], args.pure_vs_compiled)
        return
    if args.door != "http" and (args.first_seen or args.opaque):
        parser.error("--door grpc|ext_authz measures the cached check only")
    if args.junk and (args.first_seen or args.opaque or args.door != "http"):
        parser.error("--junk measures the cached check at forward-auth only")
    if args.no_verify and not args.first_seen:
        parser.error("--no-verify measures the first-seen check only")
    if args.callgrind:
        _callgrind(sys.argv[1:])
        return
    print(f"compiled: {native.running_compiled()}", flush=True)  # which build this run measures
    import uvloop

    from verifier import cli
    from verifier.observe import audit

    try:  # as `verifier serve`'s workers run (older trees: their threshold, or the default)
        from verifier import gc_policy

        gc_policy.tune()
    except ImportError:
        young = getattr(cli, "GC_YOUNG_THRESHOLD", None)
        if young is not None:
            gc.set_threshold(young, *gc.get_threshold()[1:])

    os.environ.setdefault(idp.SECRET_ENV, secrets.token_urlsafe(24))  # the provider and the verifier share it
    with tempfile.TemporaryDirectory() as tmp:
        servers = procs.Servers(Path(tmp))
        stderr = os.dup(2)
        try:
            count = args.tokens or (
                OPAQUE_TOKENS + OPAQUE_CONNECTIONS if args.opaque else FIRST_SEEN_ROUNDS * FIRST_SEEN_PER_ROUND
            )
            issuer = idp.Issuer(servers, opaque=count if args.opaque else 0)
            tokens = issuer.mint("ES256", count + 1) if args.first_seen else [issuer.cached_token]
            tokens = tokens if args.first_seen else tokens * (CACHED_REQUESTS + 1)
            tokens = issuer.opaque if args.opaque else tokens
            raw = None
            if args.first_seen:
                public = idp.read_keys(issuer.keys_file)["ES256"][1].public_key()
                raw = floor.parse_and_verify("ES256", public, verify_signature=not args.no_verify)
                if args.no_verify:
                    _without_signature_verify()
            config = Path(tmp) / "inproc.yaml"
            config.write_text(
                'grpc: {listen: "127.0.0.1:0"}\n'
                + ("" if args.opaque else 'http: {listen: "127.0.0.1:0"}\n')
                + f'issuers:\n  - issuer: "{issuer.url}"\n    audiences: ["{wire.AUDIENCE}"]\n'
                "    algorithms: [ES256, RS256, EdDSA]\n    leeway_seconds: 30\n    allow_insecure_http: true\n"
                + (
                    f"    introspection: {{client_id: {idp.CLIENT_ID}, client_secret_env: {idp.SECRET_ENV}, "
                    f'endpoint: "{issuer.url}/introspect", timeout_seconds: 30}}\n'
                    # A loaded machine (or valgrind) must not turn checks into 503s: the deadline, nor shedding
                    # (32 requests fed in one go look like a queue to the door's loop clock).
                    'deadline_seconds: 30\nhttp: {listen: "127.0.0.1:0", shed_after_seconds: 30}\n'
                    if args.opaque
                    else ""
                )
                + (wire.TWO_POLICIES if args.policies else "")
                + (f"cache: {{token_entries: {(count // FIRST_SEEN_ROUNDS)}}}\n" if args.full_cache else "")
                + (f"cache: {{negative_entries: {JUNK_CACHE_ENTRIES}}}\n" if args.junk else "")
            )
            audit.configure_logging("INFO")  # as served: one audit line per signature check ...
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 2)  # ... written to /dev/null instead of the terminal
            objects = _count_loop_objects() if args.opaque and args.loop_objects else None
            if objects is None:
                uvloop.install()
            if args.opaque:
                _measure_opaque_outside(config, tokens, args.profile, objects)
            else:
                asyncio.run(
                    _measure(
                        config, tokens, raw, args.profile, not args.no_memo, args.door, args.layer, args.record,
                        args.junk,
                    )
                )
        finally:
            audit.flush_logs()
            os.dup2(stderr, 2)
            servers.stop()


if __name__ == "__main__":
    main()
