"""Collection manifests: per-machine part files, and the merged metadata.json/statistics.json.

Each machine commits its shards to its own part file `parts/machine-I-of-M.json`, so machines
never write the same object. `<hook>/metadata.json` and `<hook>/statistics.json` are the merge
of all parts; they are written (always with identical content) once every part is complete,
and after each commit when there is a single machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from saesweep.errors import UserError, printable
from saesweep.format.names import checked_name, checked_records
from saesweep.format.quant import QuantError
from saesweep.format.shards import (
    ACT_DTYPES,
    KNOWN_SCHEMA_VERSIONS,
    SCHEMA_VERSION,
    RunningStats,
    schema_version,
    shard_name,
)
from saesweep.store import Store

PARTS = "parts/"
"""Where the machines' part files live, under the collection root."""


def part_key(machine: int, n_machines: int) -> str:
    return f"{PARTS}machine-{machine:04d}-of-{n_machines:04d}.json"


def is_part_key(key: str) -> bool:
    return key.startswith(PARTS) and key.endswith(".json")


def metadata_key(hook: str) -> str:
    return f"{hook}/metadata.json"


def is_metadata_key(key: str) -> bool:
    """Whether `key` is a hook's metadata.json (directly under a hook directory)."""
    return key.endswith("/metadata.json") and key.count("/") == 1


@dataclass
class HookPart:
    shards: list[dict] = field(default_factory=list)
    stats: RunningStats | None = None
    quant: QuantError | None = None
    """Quantization error of sampled tokens (scaled 8-bit collections), None otherwise."""


@dataclass
class Part:
    """What one machine has committed."""

    machine: int
    n_machines: int
    complete: bool = False
    seq_done: int = 0
    """Machine-local ordinal of the next sequence to collect."""
    hooks: dict[str, HookPart] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return sum(s["n_tokens"] for s in next(iter(self.hooks.values()), HookPart()).shards)

    def to_json(self) -> dict:
        hooks = {
            h: {"shards": p.shards, "stats": p.stats.to_json() if p.stats else None}
            | ({"quant": p.quant.to_json()} if p.quant else {})
            for h, p in self.hooks.items()
        }
        return {
            "schema_version": SCHEMA_VERSION,
            "machine": self.machine,
            "n_machines": self.n_machines,
            "complete": self.complete,
            "seq_done": self.seq_done,
            "hooks": hooks,
        }

    @classmethod
    def from_json(cls, obj: dict) -> Part:
        hooks = {
            h: HookPart(
                p["shards"],
                RunningStats.from_json(p["stats"]) if p["stats"] else None,
                QuantError.from_json(p["quant"]) if p.get("quant") else None,
            )
            for h, p in obj["hooks"].items()
        }
        return cls(obj["machine"], obj["n_machines"], obj["complete"], obj["seq_done"], hooks)


def load_part(store: Store, machine: int, n_machines: int) -> Part:
    """A machine's committed part (empty if none)."""
    key = part_key(machine, n_machines)
    if not store.exists(key):
        return Part(machine, n_machines)
    return read_part(store, key, machine)


def read_part(store: Store, key: str, machine: int | None = None) -> Part:
    """The part file at `key`, its hook and shard names and sizes checked; for `machine`'s own
    part also that its shards are numbered 0, 1, ... in order (a resume writes the next)."""
    obj, where = store.get_json(key), store.child(key)
    hooks = obj.get("hooks") if isinstance(obj, dict) else None
    if not isinstance(hooks, dict):
        raise UserError(f"{where} has no 'hooks' object; it is damaged")
    for hook, hook_part in hooks.items():
        checked_name(hook, where, "a hook")
        shards = (hook_part or {}).get("shards")
        if machine is not None and isinstance(shards, list):
            _check_sequence(where, hook, shards, machine)
        checked_records(shards, f"{where} (hook {hook})")
    return Part.from_json(obj)


def _check_sequence(where: str, hook: str, shards: list, machine: int) -> None:
    names = [s.get("name") if isinstance(s, dict) else None for s in shards]
    if names != [shard_name(machine, i) for i in range(len(names))]:
        raise UserError(
            f"{where} lists {hook} shards out of sequence (a version before "
            "2026-12-01 could skip a shard whose write failed); delete that part file and "
            f"machine {machine}'s shards to collect them again"
        )


def read_metadata(store: Store, key: str) -> dict:
    """The metadata.json at `key` (from a listing), its names checked: the hook it names is
    the directory it lies in, and its shards are plain names."""
    meta, where, directory = store.get_json(key), store.child(key), key.split("/")[0]
    checked_name(directory, store.uri, "a hook directory")
    hook = meta.get("hook") if isinstance(meta, dict) else None
    if hook != directory:
        raise UserError(
            f"{where} names hook {printable(repr(hook))}, not the directory {directory!r} it "
            "lies in; the collection is damaged or was not written by saesweep"
        )
    checked_records(meta.get("shards"), where)
    _check_version_and_dtype(meta, where)
    return meta


def _check_version_and_dtype(meta: dict, where: str) -> None:
    """Refuse metadata this reader would misread: a newer schema, or an unknown dtype."""
    version = meta.get("schema_version")
    if version not in KNOWN_SCHEMA_VERSIONS:
        raise UserError(
            f"{where} has schema_version {printable(repr(version))}, which this saesweep does "
            f"not read (it reads {', '.join(map(str, KNOWN_SCHEMA_VERSIONS))}); upgrade "
            "saesweep to read this collection"
        )
    if meta.get("dtype") not in ACT_DTYPES:
        raise UserError(
            f"{where} stores acts as dtype {printable(repr(meta.get('dtype')))}, which this "
            f"saesweep does not read (it reads {', '.join(ACT_DTYPES)}); upgrade saesweep or "
            "recollect with a dtype it reads"
        )


def load_parts(store: Store, n_machines: int) -> list[Part]:
    return [load_part(store, m, n_machines) for m in range(n_machines)]


def write_merged(store: Store, parts: list[Part], hook_info: dict[str, dict]) -> None:
    """Write metadata.json and statistics.json of every hook from the parts."""
    complete = all(p.complete for p in parts)
    for hook, info in hook_info.items():
        shards, stats, quant = merged_shards(parts, hook), None, None
        for part in parts:
            hp = part.hooks.get(hook, HookPart())
            if hp.stats:
                stats = hp.stats if stats is None else stats.merge(hp.stats)
            if hp.quant:
                quant = hp.quant if quant is None else quant.merge(hp.quant)
        meta = {
            **info,
            "schema_version": schema_version(info["dtype"]),
            "complete": complete,
            "n_tokens": sum(s["n_tokens"] for s in shards),
            "shards": shards,
        }
        if quant is not None:
            meta["quantization"] = quant.report()
        store.put_json(metadata_key(hook), meta)
        if stats is not None:
            store.put_json(f"{hook}/statistics.json", stats.summary())


def merged_shards(parts: list[Part], hook: str) -> list[dict]:
    """The shard records of `hook` from every part, in machine order, each with its machine."""
    return [
        {**s, "machine": part.machine}
        for part in parts
        for s in part.hooks.get(hook, HookPart()).shards
    ]


def list_hooks(store: Store) -> list[dict]:
    """metadata.json of every hook in the collection at `store`."""
    return [read_metadata(store, k) for k in store.list() if is_metadata_key(k)]


def hook_manifests(store: Store) -> dict[str, list[dict]]:
    """Hook directory -> its shard records: from metadata.json, else merged from the machines'
    part files (a multi-machine collection writes metadata.json only when every part is done)."""
    keys = store.list()
    manifests = {
        k.split("/")[0]: read_metadata(store, k)["shards"] for k in keys if is_metadata_key(k)
    }
    parts = [read_part(store, k) for k in keys if is_part_key(k)]
    for hook in {h for part in parts for h in part.hooks} - set(manifests):
        manifests[hook] = merged_shards(parts, hook)
    return dict(sorted(manifests.items()))


def choose_hook(
    uri: str, hooks: list[dict], hook: str | None = None, layer: int | None = None
) -> dict:
    """The metadata of the one hook among `hooks` (those of the collection at `uri`) matching
    `hook` (path or short form) and/or `layer`."""
    if not hooks:
        raise UserError(
            f"{uri} holds no collection (no <hook>/metadata.json); "
            "run collect.py first or check the URI"
        )
    matches = [
        m
        for m in hooks
        if (hook is None or hook in (m["hook"], m.get("short_name")))
        and (layer is None or m.get("layer") == layer)
    ]
    names = ", ".join(m["hook"] for m in hooks)
    if not matches:
        raise UserError(
            f"{uri} has no hook matching hook={hook!r} layer={layer!r}; it holds: {names}"
        )
    if len(matches) > 1:
        raise UserError(f"{uri} holds several hooks ({names}); choose one with hook= or layer=")
    meta = matches[0]
    if not meta["complete"]:
        raise UserError(
            f"the collection at {uri} is not complete yet: rerun or wait for "
            "its collect.py machines to finish"
        )
    return meta


def read_statistics(store: Store, hook: str) -> dict:
    """A hook's statistics.json; a missing one is a UserError (it is written only when a part
    has statistics)."""
    try:
        return store.get_json(f"{hook}/statistics.json")
    except FileNotFoundError:
        raise UserError(
            f"{store.child(hook)} has no statistics.json, which normalize='norm' needs; "
            "recollect it or train with normalize 'none'"
        ) from None
