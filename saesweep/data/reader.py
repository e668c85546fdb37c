"""The Reader: batches of stored activations, read once, shuffled, resumable.

Shards are fetched ahead and verified against their checksums (local files: mapped from the
page cache by threads; S3: concurrent signed range GETs, received by event-loop threads
straight into one arena). The reader shuffles shard order per epoch and tokens across windows of
several shards; a background thread, helped by `gather_threads - 1` more, gathers each batch
straight from the fetched shards in one copy into a reused (for a GPU: pinned) buffer and hands
it on (copied to the device without blocking) before it is asked for.

Scaled 8-bit activations (float8_e4m3fn with a float32 scale per token) travel as stored, with
their scales, as far as the consumer's device and are decoded there: on a GPU after the copy
(half the host-to-device bytes of bfloat16), on the CPU into reused batch buffers.

Several hooks of one collection (a transcoder's input and target) are served in lockstep: the
same shard schedule and token permutation for each, so row i of every hook's batch is the same
token (checked against the stored token ids), and each hook's bytes are fetched once.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import torch

from saesweep.data.order import shard_order, token_permutation, windows
from saesweep.data.pipeline import Fetched, Pipeline, S3Pipeline, local_pipeline
from saesweep.data.window import BatchBuffers, Window
from saesweep.errors import UserError
from saesweep.format.manifest import find_hook, read_statistics
from saesweep.format.quant import dequantize, dequantize_on_cpu, is_scaled
from saesweep.format.shards import ACT_DTYPES, decode_shard
from saesweep.memory import available_bytes, require_visible_device
from saesweep.store import FileStore, open_store

Acts = torch.Tensor | dict[str, torch.Tensor]
Batch = Acts | tuple[Acts, torch.Tensor]
Stored = tuple[torch.Tensor, torch.Tensor | None]
"""One hook's rows of a batch as stored: acts, and their scales (scaled 8-bit acts) or None."""
Taken = tuple[tuple[Stored, ...], torch.Tensor]
"""A batch before it leaves the reader: each hook's stored rows, and the token ids."""


@dataclass(frozen=True)
class HookData:
    """One hook the reader serves: its manifest records (the chosen shards) and shapes."""

    hook: str
    shards: list[dict]
    d_model: int
    stored_dtype: torch.dtype

    @property
    def scaled(self) -> bool:
        """Whether the acts are 8-bit with a scale per token (a `scales` tensor per shard)."""
        return is_scaled(self.stored_dtype)


class Reader:
    """Iterate over a collection's activations: `for acts in Reader(uri, batch_size=4096)`.

    Every stored token comes out exactly once per epoch (the final partial batch included
    unless drop_last); the same seed gives the same order. `state_dict()` records how far the
    consumer got; `load_state_dict()` continues from there. Batches come in `dtype` (default:
    the stored dtype; scaled 8-bit acts are decoded to float32).

    Memory: the shuffle window being served plus `prefetch_shards` shards read ahead
    (default: one more window, so reading overlaps serving). `n_threads`: threads mapping local
    shards, or event-loop threads receiving S3 range GETs (`s3_connections` each). An S3
    store that fails transiently (down, restarting, failing over) is retried with backoff for
    up to `retry_s` seconds, and reading continues exactly where it was; past that, one
    sentence names the store as unreachable. S3 reads are unsigned (a public bucket) without
    AWS credentials or with `anonymous`.

    `extra_hooks` (module paths or short forms) are served with `hook` in lockstep: each
    batch is then {hook: acts} for every hook (with_token_ids: ({hook: acts}, token ids)).
    They must store the same tokens in the same shards as `hook` (one collection run).
    """

    def __init__(
        self,
        uri: str,
        hook: str | None = None,
        layer: int | None = None,
        batch_size: int = 4096,
        shuffle: bool = True,
        seed: int = 0,
        epochs: int = 1,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        with_token_ids: bool = False,
        drop_last: bool = False,
        shuffle_tokens: int = 1 << 20,
        n_threads: int = 2,
        gather_threads: int = 2,
        prefetch_shards: int | None = None,
        prefetch_batches: int = 4,
        normalize: Literal["norm"] | None = None,
        on_corrupt: Literal["raise", "skip"] = "raise",
        s3_connections: int = 16,
        retry_s: float = 300.0,
        shards: slice = slice(None),
        extra_hooks: Sequence[str] = (),
        anonymous: bool = False,
    ):
        self.store = open_store(uri, anonymous)
        self.meta = find_hook(self.store, hook, layer)
        self.hook = self.meta["hook"]
        self.shards = self.meta["shards"][shards]
        if not self.shards:
            raise UserError(
                f"the shard slice [{_text(shards.start)}:{_text(shards.stop)}] of {uri} selects "
                f"none of its {len(self.meta['shards'])} shards; collect more or change the "
                "train/val shard slices"
            )
        self.d_model = self.meta["d_model"]
        metas = [self.meta, *(find_hook(self.store, h) for h in extra_hooks)]
        metas = list({m["hook"]: m for m in metas}.values())
        self.hooks = [self._hook_data(m, shards, uri) for m in metas]
        """Every hook served, `hook` first."""
        self.serves_dicts = bool(extra_hooks)
        """Batches are {hook: acts} (extra_hooks given), else acts."""
        self.n_tokens = sum(s["n_tokens"] for s in self.shards)
        self.batch_size, self.shuffle, self.seed, self.epochs = batch_size, shuffle, seed, epochs
        self.device = torch.device(device)
        require_visible_device(
            self.device,
            f"device={str(device)!r}",
            "use device='cpu', or run where a GPU and a CUDA build of torch are",
        )
        stored = self.hooks[0].stored_dtype
        if dtype is not None and is_scaled(dtype):
            raise UserError(
                f"Reader(dtype={dtype}) asks for 8-bit values without their scales; ask for a "
                "float dtype (by default scaled acts are decoded to float32)"
            )
        self.dtype = dtype or (torch.float32 if is_scaled(stored) else stored)
        self.with_token_ids, self.drop_last, self.on_corrupt = with_token_ids, drop_last, on_corrupt
        avg = self.n_tokens / max(len(self.shards), 1)
        self.shards_per_window = max(1, round(shuffle_tokens / max(avg, 1)))
        self.n_threads, self.prefetch_batches = n_threads, prefetch_batches
        self.gather_threads = max(1, gather_threads)
        ahead = self.shards_per_window if prefetch_shards is None else max(1, prefetch_shards)
        self.n_slots = min(self.shards_per_window + ahead, len(self.shards) * epochs)
        self.s3_connections, self.retry_s = s3_connections, retry_s
        if not isinstance(self.store, FileStore):
            self._check_arena_fits(uri)
        self.normalization = self._normalization(normalize)
        self.epoch, self.tokens_in_epoch = 0, 0
        self.corrupt_skipped: list[str] = []
        self.wait_s = 0.0
        self.bytes_read = 0
        """Bytes fetched from storage by finished iterations (see figures() for the total)."""
        self._pipelines: list[Pipeline] = []
        self._started = time.perf_counter()

    def _hook_data(self, meta: dict, shards: slice, uri: str) -> HookData:
        """A served hook's chosen records, refused unless it stores `hook`'s tokens."""
        check_same_tokens(uri, self.meta, meta)
        records = meta["shards"][shards]
        return HookData(meta["hook"], records, meta["d_model"], ACT_DTYPES[meta["dtype"]])

    def _check_arena_fits(self, uri: str) -> None:
        """S3 shards are held in memory (file mappings are page cache, which the kernel can
        evict): refuse now rather than be killed when the arena fills."""
        need = self.n_slots * sum(max(s["n_bytes"] for s in h.shards) for h in self.hooks)
        free = available_bytes("cpu")
        if need > free:
            raise UserError(
                f"reading {uri} holds {self.n_slots} shards in memory (a shuffle window of "
                f"{self.shards_per_window} plus those read ahead), {need / 1e9:.1f} GB, but "
                f"{free / 1e9:.1f} GB are available; lower shuffle_tokens or prefetch_shards"
            )

    def _normalization(self, normalize: str | None) -> dict | None:
        if normalize is None:
            return None
        if normalize != "norm":
            raise UserError(f"normalize={normalize!r} is not known; use 'norm' or None")
        return {"kind": "norm", "scales": {h.hook: self.norm_scale(h.hook) for h in self.hooks}}

    def norm_scale(self, hook: str | None = None) -> float:
        """The factor that brings a served hook's mean L2 norm per token (default `hook`'s) to
        sqrt(its d_model), from statistics.json (normalize='norm')."""
        data = next(h for h in self.hooks if h.hook == (hook or self.hook))
        return math.sqrt(data.d_model) / read_statistics(self.store, data.hook)["mean_norm"]

    def __len__(self) -> int:
        per_epoch = self.n_tokens / self.batch_size
        return (math.floor(per_epoch) if self.drop_last else math.ceil(per_epoch)) * self.epochs

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "tokens_in_epoch": self.tokens_in_epoch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"state was saved with seed {state['seed']}, reader has {self.seed}")
        self.epoch, self.tokens_in_epoch = state["epoch"], state["tokens_in_epoch"]

    def figures(self) -> dict[str, float]:
        """Live figures for logging: MB/s read, consumer wait time, shards in flight."""
        pipes = self._pipelines
        elapsed = time.perf_counter() - self._started
        current = sum(p.bytes_read for p in pipes)
        in_flight = sum(p.in_flight_count() for p in pipes)
        return {
            "reader/bytes_read": self.bytes_read + current,
            "reader/mb_per_s": current / 1e6 / max(elapsed, 1e-9),
            "reader/wait_s": self.wait_s,
            "reader/buffer_fill": in_flight / (self.n_slots * len(self.hooks)) if pipes else 0.0,
            "reader/corrupt_skipped": len(self.corrupt_skipped),
        }

    def __iter__(self) -> Iterator[Batch]:
        batches: queue.Queue = queue.Queue(maxsize=self.prefetch_batches)
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(batches, stop), daemon=True)
        self._started = time.perf_counter()
        producer.start()
        try:
            while True:
                start = time.perf_counter()
                item = batches.get()
                self.wait_s += time.perf_counter() - start
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                batch, (self.epoch, self.tokens_in_epoch) = item
                yield batch
        finally:
            stop.set()
            producer.join()

    def _produce(self, batches: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    batches.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        helpers = (
            ThreadPoolExecutor(self.gather_threads - 1, "saesweep-gather")
            if self.gather_threads > 1
            else None
        )
        decoded = [
            BatchBuffers(self.batch_size, h.d_model, self.dtype, self.prefetch_batches + 4, False)
            for h in self.hooks
        ]
        try:
            for batch, position in self._batches(helpers):
                if not put((self._to_device(batch, decoded), position)):
                    return
            put(None)
        except BaseException as err:  # handed to the consumer, which raises it
            put(err)
        finally:
            if helpers is not None:
                helpers.shutdown()
            for pipe in self._pipelines:
                pipe.close()
                self.bytes_read += pipe.bytes_read
            self._pipelines = []

    def _to_device(self, batch: Taken, decoded: list[BatchBuffers]) -> Batch:
        hook_acts, ids = batch
        out = []
        for h, stored in enumerate(hook_acts):
            acts = self._decode(stored, decoded[h])
            if self.normalization:
                acts = acts.mul_(self.normalization["scales"][self.hooks[h].hook])
            out.append(acts)
        acts = {h.hook: a for h, a in zip(self.hooks, out, strict=True)}
        acts = acts if self.serves_dicts else out[0]
        return (acts, ids.to(self.device)) if self.with_token_ids else acts

    def _decode(self, stored: Stored, decoded: BatchBuffers) -> torch.Tensor:
        """A hook's stored rows on the device in self.dtype: copied there as stored, then
        decoded (a GPU), or decoded into a reused buffer (the CPU)."""
        acts, scales = stored
        if self.device.type == "cuda":
            acts = acts.to(self.device, non_blocking=True)
            if scales is None:
                return acts.to(self.dtype)
            return dequantize(acts, scales.to(self.device, non_blocking=True), self.dtype)
        if acts.dtype == self.dtype:
            return acts
        if scales is None:
            return decoded.get(len(acts)).copy_(acts)
        if self.dtype == torch.float32:
            return dequantize_on_cpu(acts, scales, decoded.get(len(acts)))
        return dequantize(acts, scales, self.dtype)

    def _plan(self) -> list[tuple[int, int, list[int]]]:
        """(epoch, window index, shards) from the current position to the end."""
        plan = []
        for epoch in range(self.epoch, self.epochs):
            order = shard_order(len(self.shards), self.seed, epoch, self.shuffle)
            plan += [
                (epoch, w, group) for w, group in enumerate(windows(order, self.shards_per_window))
            ]
        return plan

    def _batches(
        self, helpers: ThreadPoolExecutor | None
    ) -> Iterator[tuple[Taken, tuple[int, int]]]:
        """Consecutive slices of each epoch's token stream (its windows' shuffled tokens, one
        after another), each with the (epoch, tokens_in_epoch) position after it."""
        buffers = [
            BatchBuffers(
                self.batch_size,
                h.d_model,
                h.stored_dtype,
                keep=self.prefetch_batches + 4,
                pinned=self.device.type == "cuda",
            )
            for h in self.hooks
        ]
        gather = (helpers, self.gather_threads - 1) if helpers else None
        plan, skip = self._plan(), self.tokens_in_epoch
        while plan and plan[0][0] == self.epoch and skip >= self._window_tokens(plan[0][2]):
            skip -= self._window_tokens(plan.pop(0)[2])
        self._pipelines = [self._start_pipeline(h) for h in self.hooks]
        for pipe in self._pipelines:
            pipe.start(s for _, _, group in plan for s in group)
        position, size = self.tokens_in_epoch, self.batch_size
        pending = self._empty()
        for i, (epoch, window, group) in enumerate(plan):
            tokens, fetched = self._load_window(epoch, window, group)
            start, skip = skip, 0
            if len(pending[1]):
                need = min(size - len(pending[1]), tokens[0].n_tokens - start)
                head = _take(tokens, start, start + need)
                pending = _concat(pending, head)
                start += need
                if len(pending[1]) == size:
                    position += size
                    yield pending, (epoch, position)
                    pending = self._empty()
            full = start + (tokens[0].n_tokens - start) // size * size
            for first in range(start, full, size):
                position += size
                yield _take(tokens, first, first + size, buffers, gather), (epoch, position)
            if full < tokens[0].n_tokens:
                pending = _take(tokens, full, tokens[0].n_tokens)
            del tokens
            for pipe, shards in zip(self._pipelines, fetched, strict=True):
                pipe.release(shards)
            if i + 1 == len(plan) or plan[i + 1][0] != epoch:
                if len(pending[1]) and not self.drop_last:
                    yield pending, (epoch + 1, 0)
                pending, position = self._empty(), 0

    def _empty(self) -> Taken:
        stored = tuple(
            (
                torch.empty(0, h.d_model, dtype=h.stored_dtype),
                torch.empty(0, dtype=torch.float32) if h.scaled else None,
            )
            for h in self.hooks
        )
        return stored, torch.empty(0, dtype=torch.int32)

    def _window_tokens(self, group: list[int]) -> int:
        return sum(self.shards[s]["n_tokens"] for s in group)

    def _load_window(
        self, epoch: int, window: int, group: list[int]
    ) -> tuple[list[Window], list[list[Fetched]]]:
        """The window's tokens in serving order, one Window per hook, all in the same order,
        and each hook's fetched shards (to release). A shard bad in any hook leaves the
        window in every hook."""
        acts: list[list[torch.Tensor]] = [[] for _ in self.hooks]
        scales: list[list[torch.Tensor]] = [[] for _ in self.hooks]
        ids, fetched = [], [[] for _ in self.hooks]
        for _ in group:
            shards = [pipe.next_shard() for pipe in self._pipelines]
            for h, shard in enumerate(shards):
                fetched[h].append(shard)
            bad = next(((h, s) for h, s in enumerate(shards) if s.status != "ok"), None)
            if bad is not None:
                self._bad_shard(bad[0], bad[1].shard, bad[1].status)
                continue
            tensors = [self._shard_tensors(h, shard) for h, shard in enumerate(shards)]
            for h, (shard_acts, shard_ids, shard_scales) in enumerate(tensors):
                if h and not torch.equal(shard_ids, tensors[0][1]):
                    raise UserError(
                        f"shard {self._shard_uri(h, shards[h].shard)} holds other tokens than "
                        f"{self._shard_uri(0, shards[0].shard)}; read hooks collected together"
                    )
                acts[h].append(shard_acts)
                scales[h].append(shard_scales)
            ids.append(tensors[0][1])
        if not ids:
            empty, empty_ids = self._empty()
            return [
                Window([a], [empty_ids], None, None if s is None else [s]) for a, s in empty
            ], fetched
        n_tokens = sum(len(i) for i in ids)
        order = token_permutation(n_tokens, self.seed, epoch, window, self.shuffle)
        return [
            Window(a, ids, order, s if h.scaled else None)
            for a, s, h in zip(acts, scales, self.hooks, strict=True)
        ], fetched

    def _shard_tensors(
        self, h: int, fetched: Fetched
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Views of a fetched shard's acts [n_tokens, d_model] as stored, token ids and (scaled
        acts) scales (hook h), checked against the manifest."""
        data = self.hooks[h]
        record = data.shards[fetched.shard]
        where = f"shard {self._shard_uri(h, fetched.shard)}"
        try:
            tensors = decode_shard(fetched.data, ("acts", "token_ids"), where, raw=True)
        except ValueError as err:
            raise UserError(f"{err}; recollect it") from None
        acts, ids, scales = tensors["acts"], tensors["token_ids"], tensors.get("scales")
        expected = [record["n_tokens"], data.d_model]
        if list(acts.shape) != expected or acts.dtype != data.stored_dtype:
            raise UserError(
                f"{where} holds acts "
                f"{list(acts.shape)} {acts.dtype}, but metadata.json says {expected} "
                f"{data.stored_dtype}; recollect it"
            )
        if list(ids.shape) != expected[:1] or ids.dtype != torch.int32:
            raise UserError(
                f"{where} holds token_ids {list(ids.shape)} {ids.dtype}, but metadata.json says "
                f"[{record['n_tokens']}] int32; recollect it"
            )
        return acts, ids, scales

    def _shard_uri(self, h: int, shard: int) -> str:
        data = self.hooks[h]
        return f"{self.store.child(data.hook)}/{data.shards[shard]['name']}"

    def _bad_shard(self, h: int, shard: int, status: str) -> None:
        name = self._shard_uri(h, shard)
        if status == "corrupt":
            message = f"shard {name} does not match its checksum after a refetch"
        else:
            message = f"shard {name} could not be read ({status})"
        if self.on_corrupt == "raise":
            raise UserError(
                f"{message}; recollect it, or leave such shards out with train.py "
                "--train-data.on-corrupt skip (Reader(on_corrupt='skip'))"
            )
        self.corrupt_skipped.append(name)
        print(f"warning: skipping {message} ({len(self.corrupt_skipped)} skipped so far)")

    def _start_pipeline(self, data: HookData) -> Pipeline:
        keys = [f"{data.hook}/{s['name']}" for s in data.shards]
        common = (data.shards, self.n_threads, self.n_slots)
        if isinstance(self.store, FileStore):
            return local_pipeline([self.store.local_path(k) for k in keys], *common)
        make_reader = lambda: self.store.range_reader(self.s3_connections, retry_s=self.retry_s)  # noqa: E731
        return S3Pipeline(make_reader, keys, *common)


def check_same_tokens(uri: str, first: dict, other: dict) -> None:
    """Refuse a hook (metadata `other`) whose shards hold other numbers of tokens than those
    of `first`: they were not collected together, so row i would not be the same token."""
    a, b = ([s["n_tokens"] for s in m["shards"]] for m in (first, other))
    if a != b:
        raise UserError(
            f"hooks {first['hook']} and {other['hook']} of {uri} store different tokens "
            f"({sum(a):,} in {len(a)} shards against {sum(b):,} in {len(b)}); read hooks "
            "collected together, in one collection run"
        )


def _take(windows: list[Window], start: int, stop: int, buffers=None, gather=None) -> Taken:
    """Tokens order[start:stop] of every hook's window (the same tokens in each)."""
    taken = [
        w.take(start, stop, buffers[h] if buffers else None, gather) for h, w in enumerate(windows)
    ]
    return tuple((acts, scales) for acts, _, scales in taken), taken[0][1]


def _concat(a: Taken, b: Taken) -> Taken:
    stored = tuple(
        (torch.cat([x, y]), None if sx is None else torch.cat([sx, sy]))
        for (x, sx), (y, sy) in zip(a[0], b[0], strict=True)
    )
    return stored, torch.cat([a[1], b[1]])


def _text(bound: int | None) -> str:
    return "" if bound is None else str(bound)
