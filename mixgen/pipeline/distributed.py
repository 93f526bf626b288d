"""How the workers of one job coordinate: the ``Coordinator`` interface the run calls, with two
implementations.

- ``FileLocks`` (today's, and the only one without torchrun): workers share OUT and its caches and
  divide the source stage through flock'd slices under the cache folder (``mixgen.pipeline.prepare``).
  A single process is this with one worker.
- ``ProcessGroup``: under torchrun (its rendezvous in the environment: MASTER_ADDR, MASTER_PORT,
  RANK, WORLD_SIZE > 1), the workers join torch.distributed's process group (gloo: the source
  stage's exchanges are small CPU arrays and Python objects) and coordinate there. Every rank
  refuses the job in one line when any rank was started with other settings; slice k of the
  source stage (``slice_spans``) is rank k % WORLD_SIZE's; the pooled probe features (or the maps
  of a fixed head) are gathered in memory; rank 0 fits the probe and broadcasts the head; each
  rank makes the maps of its slices and the maps are gathered. Each cache folder (``--cache-dir``,
  a local disk per machine) receives every view: the ranks that share it decode the views their
  slices did not cover from SRC, and its first rank seals it. Nothing but SRC (read) and OUT
  (written) is shared; no lock file, slice board or feature file crosses machines.

A restarted job (torchrun ``--max-restarts``) resumes: kept shards stay, and a cache folder that
holds the views and maps whole is reused; when any folder holds the maps, its first rank sends them
to the folders that lack them (only views are then decoded), so the backbone never runs twice
over a source that is already mapped.

Every rank waits for the last before leaving (``ProcessGroup.finish``): torchrun restarts a job
only with all its agents. While waiting it watches the others' progress counters in the group's
store, so a rank that hangs while mixing ends the job (and torchrun restarts it) after
``MIXGEN_DIST_TIMEOUT_S``, as the collectives' own timeout does for a hang in the source stage.
Where a cache folder has no room for the views, they are decoded from SRC whenever read
(``sources.views.DecodedViews``), and the run says so.

``torch.distributed`` is imported only when a process group is joined. Why it is near 700 lines:
the process group's exchanges and the source stage they carry (``GroupPreparation``) are one
protocol, whose order of collectives every rank must follow alike; kept in one module so that
order can be read in one place."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mixgen import layout
from mixgen.errors import MixgenError, UsageError, one_line
from mixgen.files import allocate, temp_path, write_json
from mixgen.layout import maps_meta, slice_file, slices_dir
from mixgen.output.cache import RecordFile, save_checked_array
from mixgen.pipeline.prepare import (
    Prepared,
    ViewCache,
    decode_positions,
    maps_cache_key,
    prepare_sources,
    reused_caches,
    save_head,
    seal_views,
    slice_spans,
    views_cache_key,
)
from mixgen.progress import Reporter

if TYPE_CHECKING:
    from mixgen.config import RunConfig
    from mixgen.pipeline.campass import CamPass
    from mixgen.sources.index import SourceIndex

COORDINATION_ENV = "MIXGEN_COORDINATION"  # files: the flock path even under torchrun
TIMEOUT_ENV = "MIXGEN_DIST_TIMEOUT_S"  # a collective waiting longer than this fails the rank
DEFAULT_TIMEOUT_S = 1800.0
RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")


class Coordinator:
    """What the run asks of the job's coordination. This base is one process alone, or workers
    that coordinate through files (``FileLocks``): every exchange is local."""

    rank, world = 0, 1
    coordination: str | None = None  # what the run record says coordinated the job (None: files or nothing)

    def check_settings(self, cfg: RunConfig) -> None:
        """Refuse the job (every rank) when a rank was started with other settings."""

    def check_sources(self, cfg: RunConfig, index: SourceIndex) -> None:
        """Refuse the job when the ranks read different sources."""

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """A step every rank takes: a refusal (MixgenError) on one rank stops all of them with it."""
        yield

    def all_true(self, value: bool) -> bool:
        return value

    def prepare(self, cfg, index, device, pool, reporter, campass) -> Prepared:
        return prepare_sources(cfg, index, device, pool, reporter, campass)

    def progress(self, advance: Callable[[int], None]) -> Callable[[int], None]:
        """The mixing stage's progress callback, as the other workers see it too."""
        return advance

    def finish(self) -> None:
        """This worker has written its shards."""

    def close(self) -> None:
        """Leave the job."""


class FileLocks(Coordinator):
    """Workers of one job on one shared OUT (``--num-shards``/``--shard-index``, or the
    torchrun/SLURM variables without a rendezvous): flocks under the cache folder."""


def torchrun_rendezvous(cfg: RunConfig, env: dict[str, str] | None = None) -> bool:
    """Whether this process was started by torchrun (or a launcher that sets its rendezvous) as
    one of several ranks, with the shards torchrun's variables give (not overridden by hand)."""
    env = os.environ if env is None else env
    if env.get(COORDINATION_ENV, "").strip().lower() == "files" or not all(env.get(k) for k in RENDEZVOUS):
        return False
    try:
        world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
    except ValueError:
        return False
    shards = world if cfg.num_shards is None else cfg.num_shards
    index = rank if cfg.shard_index is None else cfg.shard_index
    return world > 1 and shards == world and index == rank


def coordinator_for(cfg: RunConfig) -> Coordinator:
    """The process group under torchrun, else the file locks (a single process included). Called
    before ``cfg.resolve()``: an unset --num-shards is $WORLD_SIZE's."""
    if torchrun_rendezvous(cfg):
        return ProcessGroup()
    shards = cfg.num_shards if cfg.num_shards is not None else _world_size()
    return FileLocks() if shards > 1 else Coordinator()


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "").strip() or 1)
    except ValueError:
        return 1  # cfg.resolve() refuses it in one line


def _timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UsageError(f"environment variable {TIMEOUT_ENV}={value!r} is not a number of seconds") from None


def _setting_name(key: str) -> str:
    return "method" if key == "method" else f"--{key.replace('_', '-')}"


def settings_of(cfg: RunConfig) -> dict[str, Any]:
    """What every rank of a job must share: the settings that make the bytes, and those that fix how
    the source stage is cut (--batch-size) or where it runs (the device type asked for)."""
    settings = {**cfg.output_settings(), "batch_size": cfg.batch_size, "runtime": cfg.runtime}
    settings["device"] = str(cfg.device).partition(":")[0]
    return settings


def settings_difference(mine: dict[str, Any], first: dict[str, Any]) -> str | None:
    """``--pairs 1600 → 800`` for the first setting where ``mine`` differs from rank 0's (the method
    first: another method's options differ too)."""
    for key in sorted(set(mine) | set(first), key=lambda k: (k != "method", k)):
        if mine.get(key) != first.get(key):
            return f"{_setting_name(key)} {first.get(key)} → {mine.get(key)}"
    return None


class ProcessGroup(Coordinator):
    """The ranks of a torchrun job, joined in a gloo process group (see the module's docstring)."""

    coordination = "torch.distributed (gloo)"

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self._server = None
        if not dist.is_initialized():
            timeout = datetime.timedelta(seconds=_timeout_s())
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                self.store = self._fresh_store(rank, world, timeout)
            else:  # what env:// makes: rank 0 serves a store at MASTER_ADDR:MASTER_PORT
                from torch.distributed import PrefixStore, TCPStore

                addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
                self._server = TCPStore(addr, port, world, is_master=rank == 0, timeout=timeout)
                self.store = PrefixStore("mixgen", self._server)
            dist.init_process_group("gloo", store=self.store, rank=rank, world_size=world, timeout=timeout)
            self._own = True
        else:
            self._own = False
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def _fresh_store(self, rank: int, world: int, timeout: datetime.timedelta):
        """A store of this try of the job alone. torchrun hands its workers the rendezvous's own
        store, which outlives an elastic restart with the keys of the try before it: a process group
        made there after a restart reads the dead ranks' addresses. So rank 0 serves a new store and
        posts its address there; the others take the posted address that answers (an earlier try's
        is closed: its rank 0 is gone before a new try starts)."""
        from torch.distributed import PrefixStore, TCPStore

        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        shared = TCPStore(addr, port, world, is_master=False, timeout=timeout)
        key = f"mixgen/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/process-group-store"
        if rank == 0:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((addr, port))  # the address the other machines reach this one at
                here = probe.getsockname()[0]
            self._server = TCPStore(here, 0, world, is_master=True, timeout=timeout, wait_for_workers=False)
            shared.set(key, f"{here}:{self._server.port}")
            return PrefixStore("mixgen", self._server)
        deadline = time.monotonic() + timeout.total_seconds()
        while True:
            host, _, served = shared.get(key).decode().rpartition(":")
            try:
                store = TCPStore(host, int(served), world, is_master=False, timeout=datetime.timedelta(seconds=5))
                return PrefixStore("mixgen", store)
            except (RuntimeError, ValueError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def gather(self, value: Any) -> list[Any]:
        found: list[Any] = [None] * self.world
        with self._lost_rank():
            self.dist.all_gather_object(found, value)
        return found

    def gather_to(self, value: Any, destination: int) -> list[Any] | None:
        """Every rank's ``value`` at rank ``destination`` (None on the others)."""
        found: list[Any] | None = [None] * self.world if self.rank == destination else None
        with self._lost_rank():
            self.dist.gather_object(value, found, dst=destination)
        return found

    def broadcast(self, value: Any, source: int) -> Any:
        box = [value if self.rank == source else None]
        with self._lost_rank():
            self.dist.broadcast_object_list(box, src=source)
        return box[0]

    @contextlib.contextmanager
    def _lost_rank(self) -> Iterator[None]:
        """A collective that fails (a rank died, or waited past the timeout) ends this rank in one line;
        torchrun then restarts the job (--max-restarts), which resumes."""
        try:
            yield
        except (RuntimeError, ValueError) as exc:
            raise MixgenError(
                f"rank {self.rank} of this torchrun job lost the other ranks ({one_line(exc, 100)}); torchrun restarts "
                "the job with --max-restarts N, or re-run the same command to resume"
            ) from None

    def barrier(self) -> None:
        self.gather(None)  # an object exchange: gloo's barrier has no timeout of its own on every build

    def check_settings(self, cfg: RunConfig) -> None:
        settings = self.gather(settings_of(cfg))
        for rank, theirs in enumerate(settings):
            if (what := settings_difference(theirs, settings[0])) is not None:
                raise UsageError(
                    f"rank {rank} of this torchrun job was started with other settings than rank 0 ({what}); "
                    "start every rank with the same command"
                )

    def check_sources(self, cfg: RunConfig, index: SourceIndex) -> None:
        digests = self.gather((index.digest, len(index)))
        for rank, (digest, count) in enumerate(digests):
            if digest != digests[0][0]:
                raise MixgenError(
                    f"rank {rank} of this torchrun job reads other sources than rank 0 ({count} sources against "
                    f"{digests[0][1]} in SRC {cfg.src}); every rank must read the same SRC"
                )

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        try:
            yield
        except MixgenError as exc:
            self.gather((type(exc) is UsageError, str(exc)))
            raise
        for rank, failure in enumerate(self.gather(None)):
            if failure is not None:
                usage, message = failure
                raise (UsageError if usage else MixgenError)(f"rank {rank}: {message}")

    def all_true(self, value: bool) -> bool:
        return all(self.gather(bool(value)))

    def prepare(self, cfg, index, device, pool, reporter, campass) -> Prepared:
        return GroupPreparation(self, cfg, index, device, pool, reporter, campass).run()

    def finish(self) -> None:
        """Wait, without a time limit, until every rank has written its shards. A rank killed
        meanwhile is restarted by torchrun only together with all the others (a restart is a new
        rendezvous of every agent), so no rank may leave before the last is done: one that waits here
        is restarted with the killed one, and the restarted job resumes. Waiting polls the store, so
        torchrun's SIGTERM ends it at once."""
        with self._lost_rank():
            self.store.set(f"done/{self.rank}", b"1")
            watch = _Stalls(self.store, self.world, _timeout_s())
            keys = [f"done/{r}" for r in range(self.world)]
            while not self.store.check(keys):
                watch.check()  # a rank that made no progress for the timeout: end this one, torchrun restarts all
                time.sleep(0.2)
            if self.rank != 0:
                self.store.set(f"left/{self.rank}", b"1")
                return
            keys = [f"left/{r}" for r in range(1, self.world)]  # rank 0 serves the store: it leaves last
            while not self.store.check(keys):
                time.sleep(0.2)

    def progress(self, advance: Callable[[int], None]) -> Callable[[int], None]:
        """The progress callback of the mixing stage, also counted in the group's store (at most every
        few seconds), where the ranks that are done watch for a rank that hangs."""
        key, last = f"progress/{self.rank}", [0.0]
        self.store.add(key, 1)
        _debug_pause("mixing")

        def step(count: int) -> None:
            advance(count)
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S:
                last[0] = now
                with contextlib.suppress(Exception):  # a lost store is found by finish(), in one line
                    self.store.add(key, 1)

        return step

    def close(self) -> None:
        if self._own and self.dist.is_initialized():
            with contextlib.suppress(Exception):
                self.dist.destroy_process_group()


PROGRESS_EVERY_S = 5.0


class _Stalls:
    """Watches the other ranks' progress counters while this one waits at the end: one that has not
    moved for ``timeout`` seconds (and is not done) hangs, and this rank ends in one line, so that
    torchrun stops the hung rank and restarts the job, which resumes."""

    def __init__(self, store, world: int, timeout: float) -> None:
        self.store, self.world, self.timeout = store, world, timeout
        self.seen: dict[int, tuple[int, float]] = {}

    def check(self) -> None:
        now = time.monotonic()
        for rank in range(self.world):
            if self.store.check([f"done/{rank}"]):
                continue
            count = self.store.add(f"progress/{rank}", 0)
            before = self.seen.get(rank)
            if before is None or before[0] != count:
                self.seen[rank] = (count, now)
            elif now - before[1] > self.timeout:
                raise MixgenError(
                    f"rank {rank} of this torchrun job made no progress for {self.timeout:.0f} s "
                    f"({TIMEOUT_ENV}); torchrun restarts the job (--max-restarts N), which resumes"
                )


VIEW_CACHE_ENV = "MIXGEN_VIEW_CACHE"  # off: no view cache, views decoded from SRC when needed
PAUSE_ENV = "MIXGEN_DEBUG_PAUSE"  # "STAGE:SECONDS": hold still there (benchmarks kill a rank at that moment)


def _debug_pause(stage: str) -> None:
    """Hold still at ``stage`` for the seconds ``MIXGEN_DEBUG_PAUSE`` says, once per job and rank
    (and only on the ranks whose environment has it): the benchmarks' kills and hangs."""
    where, _, seconds = os.environ.get(PAUSE_ENV, "").partition(":")
    if where != stage:
        return
    job = os.environ.get("TORCHELASTIC_RUN_ID", "") + os.environ.get("MASTER_PORT", "")
    marker = Path(tempfile.gettempdir()) / f"mixgen-paused-{os.getuid()}-{job}-{stage}-{os.environ.get('RANK')}"
    if marker.exists():
        return  # once per job and rank: the restarted try goes on
    marker.touch()
    with contextlib.suppress(ValueError):
        time.sleep(float(seconds))


def machine_turn_lock(cfg: RunConfig) -> Path:
    """The lock the ranks of one machine take turns at the CPU backbone with: in the machine's temp
    folder (never on a shared disk), one per OUT."""
    key = hashlib.sha256(str(Path(cfg.out).resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"mixgen-backbone-{os.getuid()}-{key}.lock"


class GroupPreparation:
    """The source stage of one rank of a process group (``ProcessGroup.prepare``)."""

    def __init__(self, group: ProcessGroup, cfg, index, device, pool: ThreadPoolExecutor, reporter, campass) -> None:
        from mixgen.pipeline.campass import MapExtractor

        self.group, self.cfg, self.index, self.device, self.pool = group, cfg, index, device, pool
        self.reporter: Reporter = reporter
        self.campass: CamPass | None = campass
        self.n = len(index)
        self.cache = cfg.cache
        self.cache.mkdir(parents=True, exist_ok=True)
        self.views_key = views_cache_key(index.digest, cfg.size, cfg.resize)
        self.maps_key, self.extractor = None, None
        if cfg.needs_maps:
            self.maps_key = maps_cache_key(self.views_key, campass.identity, cfg.cam, cfg.cam_size, device.type)
            self.extractor = MapExtractor(cfg, index, campass)
            self.extractor.turn_lock = machine_turn_lock(cfg)
        self.spans = slice_spans(self.n, self.extractor.call if self.extractor else cfg.batch_size)
        self.notes: list[str] = []
        self.streaming = False
        self.timings = {"decode_s": 0.0, "backbone_s": 0.0, "exchange_wait_s": 0.0, "probe_s": 0.0}
        self.work = {"slices": len(self.spans), "slices_prepared": 0, "backbone_sources": 0}

    # -- who shares which cache folder ------------------------------------------------------------

    def _sharers(self) -> list[int]:
        """The ranks whose cache folder is this rank's (the same folder, seen from any machine): each
        rank leaves a token file in its folder and looks for the others' tokens in its own."""
        path = temp_path(self.cache / f"rank-{self.group.rank}")  # a temp name: a dead rank's is cleaned up
        path.touch()
        try:
            tokens = self.group.gather(path.name)
            sharers = [rank for rank, theirs in enumerate(tokens) if (self.cache / theirs).exists()]
            self.group.barrier()
        finally:
            path.unlink(missing_ok=True)
        return sharers

    # -- the stage --------------------------------------------------------------------------------

    def _timed_gather(self, value: Any) -> list[Any]:
        began = time.perf_counter()
        found = self.group.gather(value)
        self.timings["exchange_wait_s"] += time.perf_counter() - began
        return found

    def _timed_gather_to(self, value: Any, destination: int) -> list[Any] | None:
        began = time.perf_counter()
        found = self.group.gather_to(value, destination)
        self.timings["exchange_wait_s"] += time.perf_counter() - began
        return found

    def run(self) -> Prepared:
        group, cfg = self.group, self.cfg
        sharers = self._sharers()
        self.first = sharers[0] == group.rank  # this rank looks after its cache folder
        state, found = None, None
        with group.together():
            if self.first:
                found = reused_caches(cfg, self.index, self.pool, self.reporter, self.maps_key, self.notes)
                state = "all" if isinstance(found, Prepared) else ("views" if not found.decode_needed else "none")
                if state == "none" and not self._views_fit():
                    state = "stream"
                if state == "none":
                    self._new_view_file(found)
                if isinstance(found, ViewCache) and found.views is not None:
                    found.views.close()
        states = group.gather(state)  # None for the ranks that are not their folder's first
        mine = states[sharers[0]]
        self.streaming = mine == "stream"
        if all(s in (None, "all") for s in states):
            return self._load(reused=True)
        holder = next((rank for rank, s in enumerate(states) if s == "all"), None)
        views = self._open_views(mine)
        started = time.perf_counter()
        with self.reporter.stage("decode + backbone" if self.extractor else "decode", self.n) as advance:
            if self.extractor is None or holder is not None:
                maps = self._without_backbone(views, mine, sharers, states, holder, advance)
            else:
                maps = self._with_backbone(views, mine, sharers, states, advance)
        with group.together():
            if self.first:
                self._seal(views, mine, maps)
            elif views.views is not None:
                views.views.close()
        prepared = self._streamed(views, maps) if self.streaming else self._load(reused=False)
        prepared.timings["decode_s"] = (
            time.perf_counter() - started - self.timings["backbone_s"] - self.timings["exchange_wait_s"]
        )
        if self.extractor is not None:
            prepared.timings["decode_s"] -= self.extractor.turn_wait
            prepared.timings["backbone_turn_wait_s"] = self.extractor.turn_wait
        return prepared

    def _views_fit(self) -> bool:
        """Whether the cache folder has room for every view (``MIXGEN_VIEW_CACHE=off``: never); when
        it has not, the views are decoded from SRC whenever they are needed, and the run says so."""
        need = self.n * self.cfg.size * self.cfg.size * 3
        free = shutil.disk_usage(self.cache).free
        if os.environ.get(VIEW_CACHE_ENV, "").strip().lower() != "off" and free >= need * 1.05:
            return True
        why = f"{VIEW_CACHE_ENV}=off"
        if free < need * 1.05:
            why = f"they do not fit in {self.cache}: {free / 1e9:.1f} GB free"
        self.reporter.info(
            f"no view cache for {self.n:,} sources ({need / 1e9:.1f} GB; {why}): each view is decoded from SRC "
            "whenever it is needed, which is slower; to cache them, give --cache-dir a disk with room for them"
        )
        return False

    def _streamed(self, views: ViewCache, maps: tuple | None) -> Prepared:
        """The prepared sources of a folder that holds no views: views decoded when read."""
        self.group.barrier()
        array, probe, head = maps if maps is not None else (None, {}, None)
        self.work["views_decoded_on_demand"] = 1
        timings = dict(self.timings)
        return Prepared(views.views, views.readable, views.skipped, array, probe, timings, self.notes, self.work, head)

    def _new_view_file(self, cache: ViewCache) -> None:
        """The first rank of a folder reserves the view file its ranks write (before any of them
        opens it), and clears what an earlier try left of this job's slices there."""
        part = cache.path.with_name(cache.path.name + ".part")
        size = self.cfg.size
        allocate(part, self.n * size * size * 3)
        shutil.rmtree(slices_dir(self.cache, self.maps_key or self.views_key), ignore_errors=True)

    def _open_views(self, state: str) -> ViewCache:
        """This rank's handle on its folder's view cache: the file being written, or the whole one."""
        size = self.cfg.size
        path = layout.views_path(self.cache, self.views_key)
        status_path = layout.views_status(self.cache, self.views_key)
        if state == "stream":
            from mixgen.sources.views import DecodedViews

            decoded = DecodedViews(self.index, size, self.cfg.resize)
            return ViewCache(self.views_key, path, status_path, decoded, np.zeros(self.n, bool), [], True)
        if state == "none":
            part = path.with_name(path.name + ".part")
            records = RecordFile(part, self.n, (size, size, 3), np.uint8)
            return ViewCache(self.views_key, path, status_path, records, np.zeros(self.n, bool), [], True, part)
        from mixgen.files import read_json

        status = read_json(status_path) or {"skipped": []}
        readable = np.ones(self.n, dtype=bool)
        readable[[s["position"] for s in status["skipped"]]] = False
        records = RecordFile(path, self.n, (size, size, 3), np.uint8)
        return ViewCache(self.views_key, path, status_path, records, readable, status["skipped"], False)

    def _decode_share(self, views: ViewCache, slices: list[int], sharers: list[int], advance) -> dict[int, Any]:
        """Decode (no backbone) this rank's share of ``slices`` into its folder's view file; returns
        per slice the skipped sources and the views' CRC-32s."""
        done = {}
        mine = slices[sharers.index(self.group.rank) :: len(sharers)]
        for k in mine:
            span = self.spans[k]
            before = len(views.skipped)
            if views.decode_needed:
                decode_positions(self.cfg, self.index, span, views, None, self.pool)
                digests = [int(d) for d in views.views.digests[span.start : span.stop]]
                done[k] = (views.skipped[before:], digests)
                if self.streaming:
                    views.views.forget()
            advance(len(span))
        if views.decode_needed:
            views.views.sync()  # on disk before the folder's first rank seals it (a shared folder too)
        return done

    def _take_views(self, views: ViewCache, gathered: list[dict[int, Any]]) -> None:
        """Every rank's decoded slices into this folder's view state (readable, skipped, CRC-32s)."""
        if not views.decode_needed:
            return
        skipped = {s["position"]: s for s in views.skipped}
        for done in gathered:
            for k, (unreadable, digests) in done.items():
                if unreadable is None:  # a rank whose folder already held the views decoded none
                    continue
                span = self.spans[k]
                positions = {s["position"] for s in unreadable}
                views.readable[span.start : span.stop] = [p not in positions for p in span]
                views.views.digests[span.start : span.stop] = digests
                skipped.update((s["position"], s) for s in unreadable)
        views.skipped = [skipped[p] for p in sorted(skipped)]

    def _without_backbone(self, views, state, sharers, states, holder, advance) -> tuple | None:
        """Views only: no maps are needed, or rank ``holder`` has them all and sends them."""
        group = self.group
        with group.together():
            decoded = self._decode_share(views, list(range(len(self.spans))), sharers, advance)
        self._take_views(views, self._timed_gather(decoded))
        if holder is None:
            return None
        sent = None
        if group.rank == holder:
            found = reused_caches(self.cfg, self.index, self.pool, self.reporter, self.maps_key, [])
            sent = (found.maps, found.probe, found.head)  # the probe's head too: the teacher's
        return group.broadcast(sent, holder)

    def _with_backbone(self, views, state, sharers, states, advance) -> tuple:
        """The whole source stage: this rank's slices through the backbone, the rest of its folder's
        views decoded, the pooled features (or maps) gathered, one probe fit, the maps gathered."""
        group, cfg, extractor = self.group, self.cfg, self.extractor
        board = slices_dir(self.cache, self.maps_key)
        board.mkdir(parents=True, exist_ok=True)
        owner = {k: k % group.world for k in range(len(self.spans))}
        mine = [k for k in owner if owner[k] == group.rank]
        kept: dict[int, Any] = {}
        features = []
        with group.together():
            for k in mine:
                span = self.spans[k]
                before = len(views.skipped)
                extractor.start_slice(span, slice_file(board, k, "f16"))
                decode_positions(cfg, self.index, span, views, extractor, self.pool)
                rows, shape = extractor.end_slice()
                digests = [int(d) for d in views.views.digests[span.start : span.stop]] if views.decode_needed else None
                kept[k] = (rows, views.skipped[before:] if views.decode_needed else None, digests)
                if shape is not None:
                    features.append((span, slice_file(board, k, "f16"), shape))
                if self.streaming:
                    views.views.forget()  # the backbone has read them; mixing decodes them again
                advance(len(span))
            if views.decode_needed:
                views.views.sync()
            # The views of the slices no rank of this folder runs the backbone over.
            others = [k for k in owner if owner[k] not in sharers]
            caching = views.decode_needed and not self.streaming
            decoded = self._decode_share(views, others, sharers, advance) if caching else {}
        self.work["slices_prepared"] = len(mine)
        self.work["backbone_sources"] = extractor.sources
        self.timings["backbone_s"] = extractor.seconds
        # What each folder needs of every slice (skipped sources, CRC-32s: a few bytes a source) goes
        # to every rank; the pooled probe features (4·C bytes a source) only to rank 0, which fits.
        slices_done = {k: (skipped, digests) for k, (_, skipped, digests) in kept.items()}
        self._take_views(views, [*self._timed_gather(slices_done), *self._timed_gather(decoded)])
        if not views.readable.any():
            raise MixgenError("no source image could be read; nothing to mix")
        rows_of = {k: rows for k, (rows, _, _) in kept.items()}
        gathered = self._timed_gather_to(rows_of, 0) if cfg.cam == "probe" else self._timed_gather(rows_of)
        for done in gathered or []:
            for k, rows in done.items():
                if rows is not None:
                    extractor.load_slice(self.spans[k], rows)
        if cfg.cam != "probe":
            return extractor.maps, {}, None
        began = time.perf_counter()
        with group.together():
            result = None
            if group.rank == 0:
                readable = int(views.readable.sum())
                self.reporter.info(f"fitting the probe on the pooled features of {readable} sources (rank 0)")
                _debug_pause("probe")
                probe = extractor.fit(views.readable)
                result = (campass_head_to_cpu(self.campass), probe)
        head, probe = group.broadcast(result, 0)
        self.campass.head = head_to(head, self.device)
        with group.together():
            extractor.maps_from_features(views.readable, views.views, features)
        ours = extractor.maps
        rows = {k: None if ours is None else ours[self.spans[k].start : self.spans[k].stop] for k in mine}
        for done in self._timed_gather(rows):
            for k, maps in done.items():
                if maps is not None:
                    extractor.load_maps(self.spans[k], maps)
        probe.pop("seconds", None)
        self.timings["probe_s"] = round(time.perf_counter() - began, 3)
        return extractor.maps, {"cam": "probe", **probe, "seconds": self.timings["probe_s"]}, head

    def _seal(self, views: ViewCache, state: str, maps: tuple | None) -> None:
        """The first rank of a folder: the view cache and the maps cache into place (neither where the
        views are decoded on demand: the maps are then in every rank's memory, and a restart redoes them)."""
        if self.streaming:
            if self.maps_key is not None:
                shutil.rmtree(slices_dir(self.cache, self.maps_key), ignore_errors=True)
            return
        if views.decode_needed:
            seal_views(views, self.n)
        views.views.close()
        if maps is not None and state != "all":
            array, probe, head = maps
            meta = maps_meta(self.cache, self.maps_key)
            write_json(meta, probe)
            save_checked_array(layout.maps_path(self.cache, self.maps_key), array, meta)
            if head is not None:  # the probe's, broadcast by rank 0 (or sent with the maps)
                save_head(self.cache, self.maps_key, head)
        if self.maps_key is not None:
            shutil.rmtree(slices_dir(self.cache, self.maps_key), ignore_errors=True)

    def _load(self, reused: bool) -> Prepared:
        """Every rank loads its folder's caches, once their first rank has sealed them."""
        self.group.barrier()
        found = reused_caches(self.cfg, self.index, self.pool, self.reporter, self.maps_key, [])
        if not isinstance(found, Prepared):
            raise MixgenError(
                f"the caches in {self.cache} were damaged while they were written; re-run the same command"
            )
        if reused and found.maps is not None:
            self.reporter.info("views and CAMs reused from the cache")
        timings = dict(self.timings)
        found.timings, found.notes, found.work = timings, self.notes, self.work
        return found


def campass_head_to_cpu(campass: CamPass):
    head = campass.head
    return type(head)(head.weight.detach().cpu(), head.bias.detach().cpu())


def head_to(head, device):
    return type(head)(head.weight.to(device), head.bias.to(device))
