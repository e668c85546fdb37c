"""Look inside a collection, local or on S3: an interactive shell, or one command per call.

    python -m saesweep.shell URI                  # shell: ls, cd, pwd, filecount, sizecheck,
                                                  #        inspect, stats, verify, help, exit
    python -m saesweep.shell URI verify           # one command, then exit
    python -m saesweep.shell URI "cd encoder.layer.3; inspect 0"

In one-shot mode the exit status is 0 when every command succeeded (and `verify` found no bad
shard), 1 otherwise, and 2 when the store cannot be used at all (see docs/storage-format.md
for what the files hold).
"""

from __future__ import annotations

import cmd
import posixpath
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from saesweep.collect.model import load_tokenizer
from saesweep.configtools import parse_command, positional
from saesweep.errors import UserError, exit_on_user_error, printable
from saesweep.format.collection import Collection
from saesweep.format.manifest import PARTS, hook_manifests, is_metadata_key, metadata_key
from saesweep.format.shards import (
    ACT_DTYPES,
    SEQ_CHUNK_BITS,
    SHARD_TENSORS,
    bytes_per_token,
    checksum,
    decode_shard,
    safetensors_header,
)
from saesweep.store import Store, open_store

VERIFY_THREADS = 4
STATS_DIMS = 4
TEXT_CHARS = 1000


# ---------------------------------------------------------------- store helpers


def open_collection(uri: str, anonymous: bool = False) -> Store:
    """The store at `uri`, or a UserError when it cannot be read or holds no collection
    (`anonymous`: unsigned S3 reads, see open_store)."""
    store = open_store(uri, anonymous)
    try:
        found = store.exists("cfg.json") or any(_is_collection_key(k) for k in store.list())
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"cannot read the store at {uri}: {_one_line(err)}") from err
    if not found:
        raise UserError(
            f"{store.uri} holds no saesweep collection (no cfg.json, parts/ or "
            "<hook>/metadata.json); check the URI"
        )
    return store


def _is_collection_key(key: str) -> bool:
    return key.startswith(PARTS) or is_metadata_key(key)


def hook_metadata(store: Store, hook: str) -> dict:
    """`<hook>/metadata.json`, or {} while it is not written yet."""
    key = metadata_key(hook)
    return store.get_json(key) if store.exists(key) else {}


# ---------------------------------------------------------------- shard helpers


def acts_summary(acts: torch.Tensor) -> str:
    """NaN/Inf counts and min/max/mean over finite values, in row chunks (bounded memory)."""
    nan = inf = count = 0
    low, high, total = float("inf"), float("-inf"), 0.0
    for chunk in acts.split(4096):
        x = chunk.to(torch.float64)
        nan += int(torch.isnan(x).sum())
        inf += int(torch.isinf(x).sum())
        finite = x[torch.isfinite(x)]
        if len(finite):
            low, high = min(low, float(finite.min())), max(high, float(finite.max()))
            total, count = total + float(finite.sum()), count + len(finite)
    mean = total / count if count else float("nan")
    return f"NaN {nan}, Inf {inf}, min {low:.4g}, max {high:.4g}, mean {mean:.4g}"


def first_sequence(tensors: dict[str, torch.Tensor]) -> tuple[int, list[int], list[int]]:
    """(seq_id, token ids, positions) of the shard's first sequence, in position order."""
    seq_ids = tensors["seq_ids"]
    mask = seq_ids == seq_ids[0]
    positions = tensors["positions"][mask]
    order = positions.argsort()
    return int(seq_ids[0]), tensors["token_ids"][mask][order].tolist(), positions[order].tolist()


# ---------------------------------------------------------------- the shell


class Shell(cmd.Cmd):
    """Commands over one collection; paths are store keys, relative to the current prefix."""

    intro = "saesweep collection shell: type help for the commands, exit to leave."

    def __init__(self, store: Store, download: bool = False):
        super().__init__()
        self.store, self.cwd, self.download = store, "", download
        self.collection = Collection(store)
        self.status = 0
        """Worst outcome so far: 0 ok, 1 a command failed, 2 the store failed."""
        self._tokenizers: dict[str, object] = {}

    # -- plumbing

    @property
    def prompt(self) -> str:
        return printable(f"{self._uri(self.cwd)}> ")

    def _uri(self, key: str) -> str:
        return self.store.child(key) if key else self.store.uri

    def _resolve(self, path: str) -> str:
        """Store key of `path`: absolute from the collection root when it starts with '/'."""
        path = path.strip()
        joined = path if path.startswith("/") else posixpath.join("/", self.cwd, path)
        key = posixpath.normpath(joined).lstrip("/")
        return "" if key == "." else key

    def _fail(self, message: str, status: int = 1) -> None:
        say(f"error: {message}", file=sys.stderr, flush=True)
        self.status = max(self.status, status)

    def onecmd(self, line: str) -> bool:
        try:
            return bool(super().onecmd(line))
        except UserError as err:
            self._fail(str(err), 2)
        except Exception as err:
            self._fail(_describe(err))
        return False

    def emptyline(self) -> bool:
        return False

    def default(self, line: str) -> bool:
        self._fail(f"unknown command {line.split()[0]!r}; type help for the commands")
        return False

    def _children(self, prefix: str) -> dict[str, tuple[int, int]]:
        """Immediate children of `prefix` -> (objects, bytes); directories end with '/'."""
        children: dict[str, tuple[int, int]] = {}
        for key, size in self.store.list_sizes(prefix).items():
            rest = key[len(prefix) + 1 :] if prefix else key
            head, sep, _ = rest.partition("/")
            name = head + sep
            n, total = children.get(name, (0, 0))
            children[name] = (n + 1, total + size)
        return dict(sorted(children.items()))

    def _complete(self, text: str, dirs_only: bool) -> list[str]:
        names = self._children(self.cwd)
        return [n for n in names if n.startswith(text) and (n.endswith("/") or not dirs_only)]

    def _scoped_hooks(self) -> dict[str, list[dict]]:
        """The hooks under (or containing) the current prefix."""
        cwd = self.cwd
        return {
            hook: shards
            for hook, shards in hook_manifests(self.store).items()
            if not cwd or cwd == hook or cwd.startswith(hook + "/") or hook.startswith(cwd + "/")
        }

    # -- navigation

    def do_ls(self, arg: str) -> None:
        """ls [PATH]: objects and directories at PATH (default: here), with sizes in bytes."""
        prefix = self._resolve(arg)
        children = self._children(prefix)
        if not children:
            raise FileNotFoundError(f"nothing at {self._uri(prefix)}")
        for name, (n, size) in children.items():
            suffix = f"  ({n:,} object{'s' * (n != 1)})" if name.endswith("/") else ""
            say(f"{size:>15,}  {name or posixpath.basename(prefix)}{suffix}")

    def do_cd(self, arg: str) -> None:
        """cd [PATH]: change the current prefix ('..' goes up, '/' or nothing goes to the root)."""
        target = self._resolve(arg or "/")
        if target and not any(k != target for k in self.store.list(target)):
            raise FileNotFoundError(f"no directory {self._uri(target)}")
        self.cwd = target

    def complete_cd(self, text, line, begidx, endidx) -> list[str]:
        return self._complete(text, dirs_only=True)

    def complete_ls(self, text, line, begidx, endidx) -> list[str]:
        return self._complete(text, dirs_only=False)

    def do_pwd(self, arg: str) -> None:
        """pwd: the URI of the current prefix."""
        say(self._uri(self.cwd))

    def do_filecount(self, arg: str) -> None:
        """filecount: number of objects under the current prefix (recursively)."""
        n = len(self.store.list(self.cwd))
        say(f"{n:,} objects under {self._uri(self.cwd)}")

    # -- checks

    def do_sizecheck(self, arg: str) -> None:
        """sizecheck: total bytes here, and per hook the bytes per token and whether every
        shard's size equals its manifest n_bytes."""
        sizes = self.store.list_sizes(self.cwd)
        total = sum(sizes.values())
        say(f"total {total:,} bytes ({_human(total)}) in {len(sizes):,} objects")
        for hook, shards in self._scoped_hooks().items():
            self._size_report(hook, shards)

    def _size_report(self, hook: str, shards: list[dict]) -> None:
        sizes = self.store.list_sizes(hook)
        n_tokens = sum(s["n_tokens"] for s in shards)
        n_bytes = sum(sizes.get(f"{hook}/{s['name']}", 0) for s in shards)
        per_token = f"{n_bytes / n_tokens:,.1f}" if n_tokens else "-"
        meta = hook_metadata(self.store, hook)
        payload = ""
        if meta.get("dtype") in ACT_DTYPES and "d_model" in meta:
            width = bytes_per_token(meta["dtype"], meta["d_model"])
            payload = f" (tensor data alone: {width:,})"
        say(
            f"{hook}: {len(shards):,} shards, {n_tokens:,} tokens, {n_bytes:,} bytes, "
            f"{per_token} bytes/token{payload}"
        )
        bad = [(s["name"], sizes.get(f"{hook}/{s['name']}"), s["n_bytes"]) for s in shards]
        bad = [b for b in bad if b[1] != b[2]]
        for name, found, wanted in bad:
            what = "missing" if found is None else f"{found:,} bytes"
            say(f"  SIZE MISMATCH {hook}/{name}: {what}, manifest n_bytes {wanted:,}")
        listed = {f"{hook}/{s['name']}" for s in shards}
        extra = [k for k in sizes if k.endswith(".safetensors") and k not in listed]
        if extra:
            say(f"  {len(extra)} shard file(s) not in the manifest (in flight or abandoned)")
        say(f"  shard sizes {'all match' if not bad else 'DO NOT match'} the manifest")
        if bad:
            self.status = max(self.status, 1)

    def do_verify(self, arg: str) -> None:
        """verify: checksum every shard of every hook manifest; prints the bad ones."""
        jobs = [(h, s) for h, shards in hook_manifests(self.store).items() for s in shards]
        with ThreadPoolExecutor(VERIFY_THREADS) as pool:
            problems = list(
                pool.map(
                    lambda j: self.collection.shard_problem(f"{j[0]}/{j[1]['name']}", j[1]), jobs
                )
            )
        bad = [(h, s["name"], p) for (h, s), p in zip(jobs, problems, strict=True) if p]
        for hook, name, problem in bad:
            say(f"BAD {hook}/{name}: {problem}")
        hooks = len({h for h, _ in jobs})
        verdict = "all ok" if not bad else f"{len(bad)} BAD"
        say(f"verified {len(jobs):,} shards in {hooks} hook(s): {verdict}")
        if bad:
            self.status = max(self.status, 1)

    # -- contents

    def do_inspect(self, arg: str) -> None:
        """inspect SHARD: tensors, value checks, checksum and the first sequence's text.
        SHARD is a path, or an index into the manifest of the hook you are in."""
        if not arg.strip():
            raise ValueError("usage: inspect SHARD (a path, or the shard's index in the manifest)")
        key = self._shard_key(arg.strip())
        hook, name = posixpath.split(key)
        record = {s["name"]: s for s in hook_manifests(self.store).get(hook, [])}.get(name)
        size = self.store.size(key)
        if record is not None and size != record["n_bytes"]:
            raise ValueError(
                f"{self._uri(key)} holds {size:,} bytes, its manifest n_bytes "
                f"{record['n_bytes']:,}; not read (verify lists such shards)"
            )
        data = self.store.get(key)
        header, _ = safetensors_header(data, self._uri(key))
        tensors = decode_shard(data, where=self._uri(key), raw=True)
        say(f"shard {self._uri(key)}: {len(data):,} bytes")
        say(f"header metadata: {header.get('__metadata__', {})}")
        order = [t for t in SHARD_TENSORS if t in tensors] + sorted(set(tensors) - {*SHARD_TENSORS})
        for tname in order:
            tensor = tensors[tname]
            say(f"  {tname}: shape {list(tensor.shape)} dtype {str(tensor.dtype)[6:]}")
        if "acts" in tensors:
            acts = decode_shard(data, ("acts",), self._uri(key))["acts"]
            say(f"acts: {acts_summary(acts)}")
            self._quantization_line(hook)
        say(self._checksum_line(data, record))
        if {"seq_ids", "token_ids", "positions"} <= set(tensors) and len(tensors["seq_ids"]):
            self._show_first_sequence(tensors, hook)

    def _quantization_line(self, hook: str) -> None:
        """The hook's quantization report (scaled 8-bit collections), if it has one."""
        meta = hook_metadata(self.store, hook)
        report = meta.get("quantization")
        if isinstance(report, dict):
            say(
                f"quantization ({meta.get('dtype')}, "
                f"{report.get('sample_tokens', 0):,} tokens sampled): relative RMS error "
                f"{report.get('rel_rms_error', float('nan')):.3g}, largest element error "
                f"{report.get('max_abs_error', float('nan')):.3g}"
            )

    def complete_inspect(self, text, line, begidx, endidx) -> list[str]:
        return self._complete(text, dirs_only=False)

    def _shard_key(self, arg: str) -> str:
        if not arg.isdigit():
            return self._resolve(arg)
        hook = self._current_hook()
        shards = hook_manifests(self.store).get(hook, [])
        if int(arg) >= len(shards):
            raise ValueError(f"hook {hook} has {len(shards)} shards; index {arg} is out of range")
        return f"{hook}/{shards[int(arg)]['name']}"

    def _current_hook(self) -> str:
        hooks = list(hook_manifests(self.store))
        here = self.cwd.split("/")[0]
        if here in hooks:
            return here
        if len(hooks) == 1:
            return hooks[0]
        raise ValueError("a shard index needs a hook: cd into one first, or give a path")

    @staticmethod
    def _checksum_line(data: bytes, record: dict | None) -> str:
        found = checksum(data)
        if record is None:
            return f"checksum not checked: the shard is not in a manifest ({found})"
        if found == record["checksum"]:
            return f"checksum ok ({found})"
        return f"checksum MISMATCH: manifest {record['checksum']}, file {found}"

    def _show_first_sequence(self, tensors: dict[str, torch.Tensor], hook: str) -> None:
        seq_id, ids, positions = first_sequence(tensors)
        doc, chunk = seq_id >> SEQ_CHUNK_BITS, seq_id & ((1 << SEQ_CHUNK_BITS) - 1)
        say(
            f"first sequence: seq_id {seq_id} (document {doc}, chunk {chunk}), "
            f"{len(ids)} tokens at positions {positions[0]}..{positions[-1]}"
        )
        say(f"token_ids: {ids[:16]}{' ...' if len(ids) > 16 else ''}")
        tokenizer, model = self._tokenizer(hook)
        if tokenizer is None:
            say(f"text: (not decoded: cannot load the tokenizer of model {model!r})")
            return
        text = tokenizer.decode(ids)
        more = f" ... ({len(text) - TEXT_CHARS:,} more chars)" if len(text) > TEXT_CHARS else ""
        say(f"text: {text[:TEXT_CHARS]}{more}")

    def _tokenizer(self, hook: str):
        """(tokenizer or None, model name) for the collection, from metadata.json/cfg.json."""
        model = hook_metadata(self.store, hook).get("model") or self.collection.config.get("model")
        if model is None:
            return None, None
        if model not in self._tokenizers:
            try:
                found = load_tokenizer(model, self.collection.config.get("revision"), self.download)
            except UserError:
                found = None
            self._tokenizers[model] = found
        return self._tokenizers[model], model

    def do_stats(self, arg: str) -> None:
        """stats [HOOK]: tokens, mean norm and a few dims of mean/std from statistics.json
        (HOOK: directory or short name; default: the hooks here)."""
        hooks = self._pick_hooks(arg.strip())
        if not hooks:
            raise ValueError("no hooks here")
        for hook in hooks:
            self._stats_report(hook)

    def _pick_hooks(self, name: str) -> list[str]:
        hooks = list(self._scoped_hooks()) if not name else list(hook_manifests(self.store))
        if not name:
            return hooks
        for hook in hooks:
            if name in (hook, hook_metadata(self.store, hook).get("short_name")):
                return [hook]
        raise ValueError(f"no hook {name!r}; hooks: {', '.join(hooks) or 'none'}")

    def _stats_report(self, hook: str) -> None:
        key = f"{hook}/statistics.json"
        if not self.store.exists(key):
            say(f"{hook}: no statistics.json yet")
            return
        stats, meta = self.store.get_json(key), hook_metadata(self.store, hook)
        mean, std, k = stats["mean"], stats["std"], STATS_DIMS
        agree = "" if "n_tokens" not in meta else _agree(stats["n"], meta["n_tokens"])
        say(f"{hook}: n {stats['n']:,} tokens{agree}, mean norm {stats['mean_norm']:.6g}")
        say(f"  mean[:{k}] {_floats(mean[:k])}  std[:{k}] {_floats(std[:k])}  ({len(mean)} dims)")
        avg_std = sum(std) / max(len(std), 1)
        avg_abs_mean = sum(abs(m) for m in mean) / max(len(mean), 1)
        say(f"  over all dims: mean |mean| {avg_abs_mean:.4g}, mean std {avg_std:.4g}")

    # -- leaving

    def do_exit(self, arg: str) -> bool:
        """exit: leave the shell."""
        return True

    do_quit = do_exit

    def do_EOF(self, arg: str) -> bool:
        """Ctrl-D leaves the shell."""
        say()
        return True


# ---------------------------------------------------------------- formatting


def say(*parts: object, file=None, flush: bool = False) -> None:
    """print, with names from the collection made harmless: no terminal escapes or carriage
    returns that could rewrite what was printed (newlines and tabs are kept)."""
    text = printable(" ".join(str(p) for p in parts), keep="\n\t")
    print(text, file=file or sys.stdout, flush=flush)


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _describe(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError) and err.filename:
        return f"{err.filename} does not exist"
    if isinstance(err, IsADirectoryError) and err.filename:
        return f"{err.filename} is a directory, not a file"
    if isinstance(err, KeyError):
        return f"a manifest or shard lacks the field {err.args[0]!r}"
    return _one_line(err)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError


def _floats(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _agree(n: int, n_tokens: int) -> str:
    return " (= metadata n_tokens)" if n == n_tokens else f" (metadata n_tokens {n_tokens:,}!)"


# ---------------------------------------------------------------- entry point


PROGRAM = "python -m saesweep.shell"
USAGE = f"usage: {PROGRAM} [--download] [--anonymous] URI [COMMAND ...]\n"


@dataclass(frozen=True)
class ShellCommand:
    """Inspect a saesweep collection: run COMMAND and exit, or open a shell."""

    uri: positional(str, "URI")
    """The collection root: a path, file://PATH or s3://BUCKET/PREFIX."""
    command: positional(tuple[str, ...], "[COMMAND ...]", rest=True) = ()
    """Command to run, e.g. verify (several: separate with ';'), then exit; without one the
    shell opens. Every argument after the first word of the command belongs to it."""
    download: bool = False
    """Let `inspect` download the model's tokenizer from the hub (default: local only)."""
    anonymous: bool = False
    """S3 URIs: send unsigned requests (a public bucket) even when AWS credentials are
    configured; without credentials reads are unsigned anyway."""


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_command(argv, ShellCommand, PROGRAM, USAGE)
    shell = Shell(open_collection(args.uri, args.anonymous), download=args.download)
    if args.command:
        for line in " ".join(args.command).split(";"):
            shell.onecmd(line.strip())
        return shell.status
    try:
        shell.cmdloop()
    except KeyboardInterrupt:
        say()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
