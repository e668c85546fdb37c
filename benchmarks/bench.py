"""Benchmarks: is storage or compute the bottleneck?

  uv run benchmarks/bench.py synth URI [--gb 1 --d-model 768 --act-dtype bfloat16]
                                                                write a synthetic collection
  uv run benchmarks/bench.py transcode SRC DST [--act-dtype float8_e4m3fn]
                                                                a collection in another dtype
  uv run benchmarks/bench.py dtypes [--gb 1 --d-model 768]      bf16 against fp8: bytes, reads
  uv run benchmarks/bench.py decode [--device cuda]             fp8 decode against bf16 widening
  uv run benchmarks/bench.py reader URI [--batch-size 4096 ...] Reader vs raw vs naive reads
  uv run benchmarks/bench.py sae [--arch switch --device cuda --bf16]  SAE training tokens/s
                                                                against the encoder GEMM alone
  uv run benchmarks/bench.py matmul [--n-saes 3 --device cuda]  member_bmm against torch.bmm
  uv run benchmarks/bench.py collect [--out DIR --s3-out URI]   collection vs forward pass

S3 URIs use the endpoint in S3_ENDPOINT_URL and the usual AWS credentials. CPU seconds are this
process and any joined child processes; the object store's own CPU is not counted.
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from saesweep.errors import exit_on_user_error
from saesweep.format.collection import Collection
from saesweep.format.shards import ACT_DTYPES as ACT_DTYPE_NAMES
from saesweep.store import open_store


@dataclass
class Measured:
    """One timed run: wall and CPU seconds for n_bytes / n_tokens delivered."""

    name: str
    seconds: float
    cpu_s: float
    n_bytes: int
    n_tokens: int

    @property
    def mb_per_s(self) -> float:
        return self.n_bytes / 1e6 / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.seconds

    @property
    def cpu_s_per_gb(self) -> float:
        return self.cpu_s / (self.n_bytes / 1e9)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children."""
    usages = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return sum(u.ru_utime + u.ru_stime for u in usages)


def measure(
    name: str, run: Callable[[], int], n_bytes: int, repeat: int, before=lambda: None
) -> Measured:
    """The fastest of `repeat` runs of `run` (which returns the tokens it delivered), each
    after an untimed `before()`."""
    best = None
    for _ in range(repeat):
        before()
        wall, cpu = time.perf_counter(), cpu_seconds()
        n_tokens = run()
        result = Measured(name, time.perf_counter() - wall, cpu_seconds() - cpu, n_bytes, n_tokens)
        best = result if best is None or result.seconds < best.seconds else best
    return best


# ---------------------------------------------------------------- synthetic collections


def synth(uri: str, gb: float, d_model: int, shard_tokens: int, act_dtype: str) -> None:
    """Write a collection of random activations (the real format) to `uri`: about `gb` GB of
    bfloat16 values, stored as `act_dtype` (the same values for every dtype)."""
    store = open_store(uri)
    _ensure_bucket(store)
    hook = "synthetic.0"
    n_shards = max(1, round(gb * 1e9 / (shard_tokens * d_model * 2)))
    gen = torch.Generator().manual_seed(0)
    shards = (torch.randn(shard_tokens, d_model, generator=gen) for _ in range(n_shards))
    info = {"hook": hook, "layer": 0, "d_model": d_model, "dtype": act_dtype, "model": "synthetic"}
    write_collection(store, {hook: info}, {hook: shards}, act_dtype)
    print(f"wrote {n_shards} shards of {shard_tokens} tokens x {d_model} ({act_dtype}) to {uri}")


def write_collection(store, infos: dict[str, dict], shards: dict, act_dtype: str) -> None:
    """A complete one-machine collection of the hooks `infos` (hook -> metadata fields), each
    hook's shards (an iterable of acts, or of tensor dicts with acts and the three id tensors)
    stored as `act_dtype` as collect.py's writer stores them (format.quant for 8-bit)."""
    from saesweep.collect.run import _commit
    from saesweep.collect.writer import PendingShard, ShardWriter
    from saesweep.format.manifest import Part
    from saesweep.format.shards import ACT_DTYPES, held_dtype

    part = Part(0, 1, complete=True)

    def commit(written) -> None:
        _commit(store, part, written, infos)

    writer = ShardWriter(store, {h: h for h in infos}, 0, 2, 2, commit, ACT_DTYPES[act_dtype])
    for index, tensors in enumerate(zip(*shards.values(), strict=True)):
        pending = PendingShard(index, 0)
        for hook, t in zip(shards, tensors, strict=True):
            t = t if isinstance(t, dict) else {"acts": t, "token_ids": torch.arange(len(t))}
            ids = t["token_ids"]
            pending.acts[hook] = [t["acts"].to(held_dtype(act_dtype))]
        pending.token_ids = [ids]
        pending.seq_ids = [t.get("seq_ids", ids.long())]
        pending.positions = [t.get("positions", torch.zeros_like(ids))]
        writer.submit(pending)
    writer.close()


def transcode(src: str, dst: str, act_dtype: str) -> None:
    """Write the collection at `src` again at `dst` with acts stored as `act_dtype`: the same
    shards and tokens; a bfloat16 source gives float8_e4m3fn shards bit for bit as collect.py
    would have written them (it quantizes the same bfloat16 values)."""
    from saesweep.format.shards import schema_version

    collection, target = Collection.open(src), open_store(dst)
    source = collection.store
    _ensure_bucket(target)
    metas = {m["hook"]: m for m in collection.hooks}
    names = ("acts", "token_ids", "seq_ids", "positions")
    chosen = {hook: collection.choose(meta) for hook, meta in metas.items()}
    shards = {
        hook: (collection.read_shard(h, s, names) for s in range(len(h.shards)))
        for hook, h in chosen.items()
    }
    dropped = ("shards", "n_tokens", "complete", "schema_version", "quantization")
    infos = {
        h: {k: v for k, v in m.items() if k not in dropped} | {"dtype": act_dtype}
        for h, m in metas.items()
    }
    write_collection(target, infos, shards, act_dtype)
    cfg = source.get_json("cfg.json")
    cfg["config"]["act_dtype"], cfg["schema_version"] = act_dtype, schema_version(act_dtype)
    target.put_json("cfg.json", cfg)
    print(f"wrote {src} as {act_dtype} to {dst}")


def _ensure_bucket(store) -> None:
    if store.maps_objects:
        return
    client = s3_client(1)
    try:
        client.head_bucket(Bucket=store.bucket)
    except client.exceptions.ClientError:
        client.create_bucket(Bucket=store.bucket)


# ---------------------------------------------------------------- reading


def read_reader(uri: str, batch_size: int, **kwargs) -> int:
    from saesweep.data.reader import Reader

    n_tokens = sum(len(batch) for batch in Reader(uri, batch_size=batch_size, **kwargs))
    if str(kwargs.get("device", "cpu")).startswith("cuda"):
        torch.cuda.synchronize()
    return n_tokens


def read_raw_local(paths: list[Path], sizes: list[int]) -> None:
    """Plain sequential reads of every file into one reused buffer."""
    buf = memoryview(bytearray(max(sizes)))
    for path, size in zip(paths, sizes, strict=True):
        with open(path, "rb", buffering=0) as f:
            f.readinto(buf[:size])


def read_raw_s3(client, bucket: str, keys: list[str], threads: int) -> None:
    """Concurrent whole-object GETs from a thread pool."""

    def get(key: str) -> int:
        return len(client.get_object(Bucket=bucket, Key=key)["Body"].read())

    with ThreadPoolExecutor(threads) as pool:
        sum(pool.map(get, keys))


def evict(paths: list[Path]) -> None:
    """Drop files from the page cache, so that the next read comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_naive(get: Callable[[str], bytes], keys: list[str], batch_size: int) -> int:
    """The activault/sache pattern: fetch a shard, deserialize it, slice batches, repeat."""
    from safetensors.torch import load

    n_tokens = 0
    for key in keys:
        acts = load(get(key))["acts"]
        n_tokens += sum(len(batch) for batch in acts.split(batch_size))
    return n_tokens


def s3_client(threads: int):
    import boto3
    from botocore.config import Config

    from saesweep.store.s3 import endpoint_from_env

    config = Config(max_pool_connections=threads, s3={"addressing_style": "path"})
    return boto3.client("s3", endpoint_url=endpoint_from_env(), config=config)


def bench_reader(args: argparse.Namespace) -> None:
    collection = Collection.open(args.uri)
    store, meta = collection.store, collection.hook(args.hook)
    names = [s["name"] for s in meta["shards"]]
    sizes = [s["n_bytes"] for s in meta["shards"]]
    total, n_tokens = sum(sizes), meta["n_tokens"]
    print(
        f"{store.uri} hook {meta['hook']}: {len(names)} shards, {total / 1e9:.2f} GB, "
        f"{n_tokens:,} tokens x {meta['d_model']} ({meta['dtype']})"
    )
    raw, naive, before = _baselines(store, meta["hook"], names, sizes, args)

    def reader() -> int:
        kwargs = dict(
            n_threads=args.n_threads, s3_connections=args.s3_connections, device=args.device
        )
        if args.shuffle_tokens:
            kwargs["shuffle_tokens"] = args.shuffle_tokens
        return read_reader(args.uri, args.batch_size, hook=meta["hook"], **kwargs)

    raw()  # warm-up: page cache for files, connections and server caches for S3
    results = [
        measure("reader", reader, total, args.repeat, before),
        measure("raw", lambda: raw() or n_tokens, total, args.repeat, before),
        measure("naive", naive, total, args.repeat, before),
    ]
    _print_table(results)
    from saesweep.sae import SAEConfig

    sae_cfg = SAEConfig(exp_factor=args.exp_factor, k=args.k)
    sae = sae_tokens_per_s(sae_cfg, meta["d_model"], args.n_saes, args.batch_size)
    _print_verdict(results[0], sae, args)


def bench_dtypes(args: argparse.Namespace) -> None:
    """The same random activations stored as bfloat16 and as float8_e4m3fn: bytes per token,
    and the Reader's tokens/s and CPU seconds per token decoding to float32 from local files
    (cold: evicted from the page cache before each run) and from S3 (S3_ENDPOINT_URL set)."""
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        places = {"disk (cold)": tmp}
        if os.environ.get("S3_ENDPOINT_URL"):
            places["s3"] = f"{args.s3_out.rstrip('/')}/run-{time.time_ns()}"
        else:
            print("s3: skipped (S3_ENDPOINT_URL is not set)")
        rows = []
        for (place, root), dtype in itertools.product(places.items(), DTYPE_PAIR):
            uri = f"{root}/{dtype}"
            synth(uri, args.gb, args.d_model, args.shard_tokens, dtype)
            rows.append((place, dtype, _read_dtype(uri, args)))
    print(
        f"{'read from':<12} {'dtype':<14} {'bytes/token':>11} {'tokens/s':>10} {'CPU us/token':>12}"
    )
    for place, dtype, (per_token, run) in rows:
        cpu = run.cpu_s / run.n_tokens * 1e6
        print(f"{place:<12} {dtype:<14} {per_token:>11.1f} {run.tokens_per_s:>10,.0f} {cpu:>12.2f}")
    for place in places:
        (b16, r16), (b8, r8) = (r for p, _, r in rows if p == place)
        speed = r8.tokens_per_s / r16.tokens_per_s
        cpu = (r8.cpu_s / r8.n_tokens) / (r16.cpu_s / r16.n_tokens)
        print(
            f"{place}: fp8/bf16 bytes {b8 / b16:.3f}, tokens/s {speed:.2f}x, CPU s/token {cpu:.2f}x"
        )


DTYPE_PAIR = ("bfloat16", "float8_e4m3fn")
"""The baseline and the dtype bench_dtypes compares with it."""


def bench_decode(args: argparse.Namespace) -> None:
    """Tokens/s of decoding a batch of float8_e4m3fn with scales to float32 on the device
    (the CPU: numpy's bit path into a reused buffer, and torch's conversion), against widening
    the same batch from bfloat16 (torch), in the same run."""
    from saesweep.format.quant import dequantize, dequantize_on_cpu, quantize

    device = torch.device(args.device)
    x = torch.randn(args.batch_size, args.d_model)
    values, scales = (t.to(device) for t in quantize(x, torch.float8_e4m3fn))
    wide = x.to(torch.bfloat16).to(device)
    out = torch.empty(x.shape, device=device)
    runs = {
        "bf16 -> fp32 (torch)": lambda: out.copy_(wide),
        "fp8 x scale -> fp32 (torch)": lambda: dequantize(values, scales),
    }
    if device.type == "cpu":
        runs["fp8 x scale -> fp32 (numpy bits)"] = lambda: dequantize_on_cpu(values, scales, out)
    seconds = {
        name: min(_timed(lambda a, b, f=f: f(), None, None, args.device) for _ in range(20))
        for name, f in runs.items()
    }
    base = seconds["bf16 -> fp32 (torch)"]
    print(f"{args.batch_size} x {args.d_model} on {device} ({torch.get_num_threads()} threads):")
    for name, sec in seconds.items():
        print(f"  {name:<34} {args.batch_size / sec:>14,.0f} tokens/s  {base / sec:.2f}x bf16")


def _read_dtype(uri: str, args: argparse.Namespace) -> tuple[float, Measured]:
    """(bytes per token of the collection's files, the fastest Reader run over it)."""
    collection = Collection.open(uri)
    store, meta = collection.store, collection.hook()
    total = sum(s["n_bytes"] for s in meta["shards"])
    paths = (
        [store.local_path(f"{meta['hook']}/{s['name']}") for s in meta["shards"]]
        if store.maps_objects
        else []
    )

    def reader() -> int:
        return read_reader(uri, args.batch_size, dtype=torch.float32)

    run = measure(meta["dtype"], reader, total, args.repeat, lambda: evict(paths))
    return total / meta["n_tokens"], run


def _baselines(store, hook: str, names: list[str], sizes: list[int], args):
    """(raw, naive, before) for the store: the two baselines and what precedes each run."""
    if store.maps_objects:
        paths = [store.local_path(f"{hook}/{n}") for n in names]
        raw = lambda: read_raw_local(paths, sizes)  # noqa: E731
        naive = lambda: read_naive(lambda p: Path(p).read_bytes(), paths, args.batch_size)  # noqa: E731
        return raw, naive, (lambda: evict(paths)) if args.cold else (lambda: None)
    client = s3_client(args.raw_threads)
    keys = [store.key_of(f"{hook}/{n}") for n in names]
    raw = lambda: read_raw_s3(client, store.bucket, keys, args.raw_threads)  # noqa: E731
    get = lambda k: client.get_object(Bucket=store.bucket, Key=k)["Body"].read()  # noqa: E731
    return raw, lambda: read_naive(get, keys, args.batch_size), lambda: None


def _print_table(results: list[Measured]) -> None:
    print(f"{'method':<8} {'MB/s':>9} {'tokens/s':>12} {'CPU s/GB':>9} {'wall s':>7}")
    for r in results:
        print(
            f"{r.name:<8} {r.mb_per_s:>9.0f} {r.tokens_per_s:>12,.0f} "
            f"{r.cpu_s_per_gb:>9.2f} {r.seconds:>7.2f}"
        )
    reader, raw, naive = results
    print(
        f"reader/raw {reader.mb_per_s / raw.mb_per_s:.2f}   "
        f"reader/naive {reader.mb_per_s / naive.mb_per_s:.2f}"
    )


class StackTimer:
    """A stack of n_saes SAEs with its optimizer and one random batch, and the stack's
    encoder GEMM alone (member_bmm of the same shapes), each timed on demand; `dead` latents
    of every member (the first ones) held dead before every step, so that AuxK acts."""

    def __init__(
        self, sae_cfg, d_model: int, n_saes: int, batch_size: int, device, autocast, dead=0
    ):
        from saesweep.sae import make_sae
        from saesweep.sae.optim import StackedAdam

        self.sae = make_sae(sae_cfg, d_model, list(range(n_saes))).to(device)
        self.opt = StackedAdam(self.sae.parameters(), lr=[1e-4] * n_saes)
        self.x = torch.randn(batch_size, d_model, device=device)
        self.x_in = self.x.expand(n_saes, *self.x.shape)
        self.W, self.b = torch.randn_like(self.sae.W_enc), self.sae.b_enc.detach().unsqueeze(1)
        self.device, self.autocast, self.step = torch.device(device), autocast, 0
        self.gemm_flop = 2 * n_saes * batch_size * d_model * self.sae.d_sae
        self.dead = dead

    def train(self, steps: int) -> float:
        """Seconds of `steps` training steps (train_step, as the trainer calls it)."""
        from saesweep.sae.step import train_step

        def step() -> None:
            self.hold_dead()
            train_step(self.sae, self.opt, self.x, self._next())

        return self._timed(lambda: [step() for _ in range(steps)])

    @torch.no_grad()
    def hold_dead(self) -> None:
        """Mark the first `dead` latents of every member dead (no-op for dead = 0)."""
        if self.dead:
            self.sae.tokens_since_fired[:, : self.dead] = self.sae.dead_tokens.max()

    def gemm(self) -> float:
        """Seconds of the stack's encoder GEMM alone, x @ W_enc + b_enc for every member."""
        from saesweep.sae.matmul import member_bmm

        with torch.no_grad():
            return self._timed(lambda: member_bmm(self.x_in, self.W, self.b))

    def _next(self) -> int:
        self.step += 1
        return self.step - 1

    def _timed(self, fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def sae_tokens_per_s(
    sae_cfg,
    d_model: int,
    n_saes: int,
    batch_size: int,
    steps: int = 5,
    device: str = "cpu",
    autocast: bool = False,
) -> float:
    """Tokens per second a stack of n_saes SAEs trains on (random data, after two warm-up
    steps; every SAE sees every token)."""
    stack = StackTimer(sae_cfg, d_model, n_saes, batch_size, device, autocast)
    stack.train(2)
    return steps * batch_size / stack.train(steps)


def bench_sae(args: argparse.Namespace) -> None:
    """Training tokens/s of each stack size in --n-saes against its encoder GEMM alone, in
    --repeat interleaved rounds (every stack's GEMM and steps in each round): medians and
    spreads of the step/GEMM ratio, tokens x SAEs/s over (GEMM FLOP/s / encoder FLOPs per
    token)."""
    from saesweep.memory import reuse_freed_memory
    from saesweep.sae import SAEConfig, SwitchConfig

    reuse_freed_memory()  # as the trainer does
    switch = SwitchConfig(n_experts=args.n_experts)
    held = 10**12 if args.dead_latents else None  # none dies by itself; the held ones stay
    cfg = SAEConfig(arch=args.arch, d_sae=args.n_latents, k=args.k, switch=switch, dead_tokens=held)
    stacks = {
        n: StackTimer(
            cfg, args.d_model, n, args.batch_size, args.device, args.bf16, args.dead_latents
        )
        for n in args.n_saes
    }
    for stack in stacks.values():
        stack.train(2)
    times: dict[int, list[tuple[float, float]]] = {n: [] for n in stacks}
    for _ in range(args.repeat):
        for n, stack in stacks.items():
            times[n].append((stack.gemm(), stack.train(args.steps) / args.steps))
    for n, stack in stacks.items():
        _print_sae_rates(args, n, stack, times[n])


def _print_sae_rates(args, n: int, stack: StackTimer, times: list[tuple[float, float]]) -> None:
    """Median (min-max) GEMM FLOP/s and step/GEMM ratio, then the tokens/s line (last: what
    gpu_check.sh reads)."""
    gflops = [stack.gemm_flop / g / 1e9 for g, _ in times]
    ratios = [g / s for g, s in times]
    rates = [args.batch_size / s for _, s in times]
    print(
        f"  encoder GEMM alone {_spread(gflops, '.0f')} GFLOP/s; tokens x SAEs/s over "
        f"(GEMM FLOP/s / encoder FLOPs per token): {_spread(ratios, '.2f')} "
        f"(median (min-max) of {len(times)} interleaved rounds)"
    )
    print(
        f"{n} {args.arch} SAE(s) d_model {args.d_model}, {args.n_latents} latents, "
        f"k={args.k}{f', {args.n_experts} experts' if args.arch == 'switch' else ''}, "
        f"batch {args.batch_size}, {'bf16 autocast' if args.bf16 else 'float32'} on "
        f"{args.device}{f', {args.dead_latents} dead latents' if args.dead_latents else ''}, "
        f"{n * statistics.median(rates):,.0f} tokens x SAEs/s: "
        f"{statistics.median(rates):,.0f} tokens/s per SAE"
    )


def _spread(values: list[float], fmt: str) -> str:
    """'median (min-max)' of values."""
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def bench_matmul(args: argparse.Namespace) -> None:
    """The stack's four products of a dense step (encode, decode and their transposes in the
    backward) by member_bmm and by torch.bmm, fastest of --repeat, GFLOP/s and the ratio; freed
    memory kept for reuse, as the trainer keeps it."""
    from saesweep.memory import reuse_freed_memory
    from saesweep.sae.matmul import member_bmm

    reuse_freed_memory()

    n, B, d, S = args.n_saes, args.batch_size, args.d_model, args.n_latents
    gen = torch.Generator().manual_seed(0)
    x, W, g = (torch.randn(n, *shape, generator=gen) for shape in ((B, d), (d, S), (B, S)))
    x, W, g = x.to(args.device), W.to(args.device), g.to(args.device)
    products = {
        "x @ W_enc": (x, W),
        "codes @ W_dec": (g, W.transpose(1, 2)),
        "x^T @ grad": (x.transpose(1, 2), g),
        "grad^T @ x": (g.transpose(1, 2), x),
    }
    flop = 2 * n * B * d * S
    for name, (a, b) in products.items():
        secs = {}
        for label, fn in (("torch.bmm", torch.bmm), ("member_bmm", member_bmm)):
            secs[label] = min(_timed(fn, a, b, args.device) for _ in range(args.repeat))
        bmm, ours = secs["torch.bmm"], secs["member_bmm"]
        print(
            f"{n} x {name:14s} {tuple(a.shape[1:])} @ {tuple(b.shape[1:])}: torch.bmm "
            f"{bmm * 1e3:7.1f} ms ({flop / bmm / 1e9:5.0f} GFLOP/s), member_bmm "
            f"{ours * 1e3:7.1f} ms ({flop / ours / 1e9:5.0f} GFLOP/s); bmm/member {bmm / ours:.2f}"
        )


def _timed(fn: Callable[[torch.Tensor, torch.Tensor], object], a, b, device: str) -> float:
    """Seconds of one call fn(a, b), the device synchronized."""
    start = time.perf_counter()
    fn(a, b)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _print_verdict(reader: Measured, sae_rate: float, args: argparse.Namespace) -> None:
    print(
        f"{args.n_saes} TopK SAE(s) (x{args.exp_factor}, k={args.k}, batch {args.batch_size}) "
        f"train at {sae_rate:,.0f} tokens/s on {torch.get_num_threads()} torch thread(s)"
    )
    slower = "storage (the Reader)" if reader.tokens_per_s < sae_rate else "compute (the SAEs)"
    print(f"bottleneck here: {slower}; reader/SAE {reader.tokens_per_s / sae_rate:.1f}")


# ---------------------------------------------------------------- collection


def forward_only(cfg, max_tokens: int) -> int:
    """The collection's forward passes over the same batches with the same hooks, no writing."""
    from saesweep.collect.model import HookedModel, load_model, resolve_hook
    from saesweep.collect.sequences import batched, make_batch, sequences
    from saesweep.collect.text import iter_documents

    model, tokenizer = load_model(cfg.model, cfg.revision, cfg.model_dtype, cfg.device)
    hooked = HookedModel(model, [resolve_hook(model, h)[0] for h in cfg.hooks])
    docs = iter_documents(
        cfg.dataset, cfg.text_column, cfg.dataset_config, cfg.split, cfg.streaming
    )
    seqs = sequences(docs, tokenizer, cfg.ctx_len, cfg.exclude_special)
    tokens = 0
    for seq_batch in batched(seqs, cfg.batch_size):
        if tokens >= max_tokens:
            break
        batch = make_batch(seq_batch, tokenizer.pad_token_id or 0)
        hooked.run(batch.input_ids, batch.attention_mask)
        tokens += batch.n_stored
    return tokens


def run_collect(cfg) -> int:
    from saesweep.collect.run import collect

    return collect(cfg).n_tokens


def bench_collect(args: argparse.Namespace) -> None:
    from saesweep.collect.config import CollectConfig, load_toml

    base = load_toml(Path(args.config)) if args.config else CollectConfig()
    from saesweep.memory import resolve_device

    base = _replace(
        base, max_tokens=args.max_tokens, progress=False, device=resolve_device(base.device)
    )
    forward_only(base, base.batch_size)  # warm-up: imports, model load, first-batch costs
    bare = measure("forward", lambda: forward_only(base, args.max_tokens), 0, 1)
    print(f"bare forward pass: {bare.tokens_per_s:,.0f} tokens/s ({bare.seconds:.1f} s)")
    with tempfile.TemporaryDirectory() as tmp:
        targets = {"local": args.out or f"{tmp}/collect"}
        if os.environ.get("S3_ENDPOINT_URL"):
            targets["s3"] = f"{args.s3_out.rstrip('/')}/run-{time.time_ns()}"
        else:
            print("s3: skipped (S3_ENDPOINT_URL is not set)")
        for (kind, out), dtype in itertools.product(targets.items(), args.act_dtypes):
            out = f"{out}-{dtype}"
            _ensure_bucket(open_store(out))
            cfg = _replace(base, out=out, act_dtype=dtype)
            run = measure(kind, lambda cfg=cfg: run_collect(cfg), 0, 1)
            print(
                f"collect {dtype} to {kind} ({out}): {run.tokens_per_s:,.0f} tokens/s "
                f"({run.seconds:.1f} s, {run.cpu_s / run.n_tokens * 1e6:.0f} CPU us/token); "
                f"collect/forward {run.tokens_per_s / bare.tokens_per_s:.2f}"
            )


def _replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="benchmarks/bench.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth", help="write a synthetic collection of random activations")
    s.add_argument("uri")
    s.add_argument("--gb", type=float, default=1.0)
    s.add_argument("--d-model", type=int, default=768)
    s.add_argument("--shard-tokens", type=int, default=16384)
    s.add_argument("--act-dtype", default="bfloat16", choices=sorted(ACT_DTYPE_NAMES))
    x = sub.add_parser("transcode", help="a collection again with acts in another dtype")
    x.add_argument("src")
    x.add_argument("dst")
    x.add_argument("--act-dtype", default="float8_e4m3fn", choices=sorted(ACT_DTYPE_NAMES))
    d = sub.add_parser("dtypes", help="bfloat16 against float8_e4m3fn: bytes/token and reads")
    d.add_argument("--gb", type=float, default=1.0, help="GB of the bfloat16 collection")
    d.add_argument("--d-model", type=int, default=768)
    d.add_argument("--shard-tokens", type=int, default=65536)
    d.add_argument("--batch-size", type=int, default=4096)
    d.add_argument("--repeat", type=int, default=3, help="report the fastest of this many runs")
    d.add_argument("--dir", default=None, help="local parent directory (default: a temporary one)")
    d.add_argument("--s3-out", default="s3://saesweep-bench/dtypes")
    e = sub.add_parser("decode", help="fp8 decode against bf16 widening, tokens/s")
    e.add_argument("--batch-size", type=int, default=4096)
    e.add_argument("--d-model", type=int, default=768)
    e.add_argument("--device", default="cpu")
    r = sub.add_parser("reader", help="Reader vs raw reads vs the naive loader, and SAE speed")
    r.add_argument("uri")
    r.add_argument("--hook", default=None)
    r.add_argument("--batch-size", type=int, default=4096)
    r.add_argument("--n-threads", type=int, default=2)
    r.add_argument("--s3-connections", type=int, default=16)
    r.add_argument("--shuffle-tokens", type=int, default=None, help="the Reader's window")
    r.add_argument("--cold", action="store_true", help="local: evict the files before each run")
    r.add_argument("--raw-threads", type=int, default=16, help="threads of the raw S3 GETs")
    r.add_argument("--repeat", type=int, default=3, help="report the fastest of this many runs")
    r.add_argument("--exp-factor", type=int, default=16)
    r.add_argument("--k", type=int, default=32)
    r.add_argument("--n-saes", type=int, default=1, help="SAEs trained on each batch")
    r.add_argument("--device", default="cpu", help="where the Reader delivers (cuda: GPU memory)")
    t = sub.add_parser("sae", help="training tokens/s of a stack of SAEs on random data")
    t.add_argument(
        "--arch", default="topk", choices=["topk", "batchtopk", "switch", "relu", "jumprelu"]
    )
    t.add_argument("--d-model", type=int, default=768)
    t.add_argument("--n-latents", type=int, default=24576)
    t.add_argument("--k", type=int, default=32)
    t.add_argument("--n-experts", type=int, default=32)
    t.add_argument(
        "--n-saes",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[1, 8],
        help="SAEs stacked on each batch; several (1,8) are timed in interleaved rounds",
    )
    t.add_argument("--batch-size", type=int, default=4096)
    t.add_argument("--steps", type=int, default=5, help="timed steps per round, after 2 warm-up")
    t.add_argument("--repeat", type=int, default=5, help="interleaved rounds (median, spread)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--bf16", action="store_true", help="bf16 autocast")
    t.add_argument(
        "--dead-latents",
        type=int,
        default=0,
        help="hold this many latents of every SAE dead, so that AuxK acts (TopK, BatchTopK)",
    )
    m = sub.add_parser("matmul", help="the stack's batched products: member_bmm vs torch.bmm")
    m.add_argument("--n-saes", type=int, default=3)
    m.add_argument("--batch-size", type=int, default=4096)
    m.add_argument("--d-model", type=int, default=384)
    m.add_argument("--n-latents", type=int, default=1536)
    m.add_argument("--repeat", type=int, default=7, help="report the fastest of this many runs")
    m.add_argument("--device", default="cpu")
    c = sub.add_parser("collect", help="collection tokens/s vs the bare forward pass")
    c.add_argument("--config", default="configs/demo.toml")
    c.add_argument("--max-tokens", type=int, default=20000)
    c.add_argument("--out", default=None, help="local output (default: a temporary directory)")
    c.add_argument("--s3-out", default="s3://saesweep-bench/collect")
    c.add_argument(
        "--act-dtypes",
        type=lambda s: s.split(","),
        default=["bfloat16"],
        help="collect once per dtype, e.g. bfloat16,float8_e4m3fn",
    )
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "synth":
        synth(args.uri, args.gb, args.d_model, args.shard_tokens, args.act_dtype)
    elif args.command == "transcode":
        transcode(args.src, args.dst, args.act_dtype)
    elif args.command == "dtypes":
        bench_dtypes(args)
    elif args.command == "decode":
        bench_decode(args)
    elif args.command == "reader":
        bench_reader(args)
    elif args.command == "sae":
        bench_sae(args)
    elif args.command == "matmul":
        bench_matmul(args)
    else:
        bench_collect(args)


if __name__ == "__main__":
    main()
