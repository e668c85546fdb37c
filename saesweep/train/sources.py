"""A group's data source as the trainer sees it: batches of every hook the group reads.

`store`: the Reader over a collection (one input hook per group, and the target hook of its
transcoders, in lockstep). `model`: collect.source's ModelSource, one forward pass per batch
for every hook of the group, targets included. Both yield {hook: [batch, d] float32 on the
group's device} and know each hook's input scale (normalize 'norm': E||x|| = sqrt(d)), their
position (for resume) and their held-out data (batches of the same dicts).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from saesweep.collect.config import CollectConfig, load_toml
from saesweep.collect.source import ModelSource, SourcePosition
from saesweep.configtools import parse_slice
from saesweep.data.reader import Reader, check_same_tokens
from saesweep.errors import UserError
from saesweep.evaluate.absorption import HeldOutTokens, LabelledTokens, stored_tokens
from saesweep.evaluate.downstream import HeldOutText, text_from_collection, text_from_config
from saesweep.format.manifest import find_hook
from saesweep.store import open_store
from saesweep.train.config import DataConfig, GroupConfig, HookChoice, RunConfig

NORM_SAMPLE_TOKENS = 1 << 15
"""With source 'model', the input scale is estimated from the first NORM_SAMPLE_TOKENS
stored tokens of the training text."""
LIVE_ABSORPTION_TOKEN_FACTOR = 2
"""With source 'model', absorption reads the first absorption.n_tokens x this many tokens of
the held-out documents (77 % of the demo text's tokens are alphabetic)."""


def hook_spec(data: DataConfig | HookChoice) -> str | None:
    """The hook a config reads: its hook, else 'resid.<layer>', else None (the only one)."""
    if data.hook is not None:
        return data.hook
    return f"resid.{data.layer}" if data.layer is not None else None


def live_input(run: RunConfig, collect_cfg: CollectConfig) -> str:
    """The hook a live run reads, as it specifies it (neither hook nor layer: the
    collection config's first hook)."""
    return hook_spec(run.train_hooks) or collect_cfg.hooks[0]


def live_hooks(runs: list[RunConfig], collect_cfg: CollectConfig) -> list[str]:
    """The hooks a live group's forward pass feeds, as its runs specify them: every run's
    input hook (live_input) and transcoder target."""
    targets = {target_spec(r.train_hooks) for r in runs} - {None}
    return sorted({live_input(r, collect_cfg) for r in runs} | targets)


def target_spec(data: DataConfig | HookChoice) -> str | None:
    """The target hook a config names: target_hook, else 'resid.<target_layer>', else None
    (an SAE: no target)."""
    if data.target_hook is not None:
        return data.target_hook
    return f"resid.{data.target_layer}" if data.target_layer is not None else None


def store_hooks(data: DataConfig) -> tuple[dict, dict | None]:
    """(metadata of the input hook, of the target hook or None) in the collection at data.uri;
    a target that is the input hook or stores other tokens is refused."""
    store = open_store(data.uri, data.anonymous)
    meta = find_hook(store, data.hook, data.layer)
    if data.target_hook is None and data.target_layer is None:
        return meta, None
    target = find_hook(store, data.target_hook, data.target_layer)
    if target["hook"] == meta["hook"]:
        raise UserError(
            f"the target hook {target['hook']} is the input hook; leave target_hook and "
            "target_layer unset for an ordinary SAE"
        )
    check_same_tokens(data.uri, meta, target)
    return meta, target


def open_reader(data: DataConfig, cfg: GroupConfig, train: bool) -> Reader:
    meta, target = store_hooks(data)
    return Reader(
        data.uri,
        hook=meta["hook"],
        extra_hooks=[target["hook"]] if target else [],
        batch_size=cfg.batch_size,
        shuffle=train,
        seed=data.seed,
        epochs=1,
        device=cfg.device,
        dtype=torch.float32,
        drop_last=train,
        shuffle_tokens=data.shuffle_tokens,
        n_threads=data.n_threads,
        shards=parse_slice(data.shards),
        on_corrupt=data.on_corrupt,
        retry_s=data.retry_s,
        anonymous=data.anonymous,
    )


class StoreSource:
    """The Reader over one hook of a collection (and its transcoders' target hook, in
    lockstep), repeated to n_train tokens."""

    def __init__(self, cfg: GroupConfig):
        self.cfg = cfg
        self.reader = open_reader(cfg.train_data, cfg, train=True)
        usable = len(self.reader) * cfg.batch_size
        if usable == 0:
            raise UserError(
                f"{cfg.train_data.uri} holds fewer tokens than one batch "
                f"({cfg.batch_size}); lower batch_size or collect more"
            )
        self.reader.epochs = math.ceil(cfg.n_train / usable)
        self.d_model, self.model_name = self.reader.d_model, self.reader.meta["model"]
        self.hooks = {hook_spec(cfg.train_data): self.reader.hook}
        """Spec (as configs name it) -> module path, targets included."""
        self.target = self.reader.hooks[1].hook if len(self.reader.hooks) > 1 else None
        if self.target is not None:
            self.hooks[target_spec(cfg.train_data)] = self.target

    def hook_of(self, run: RunConfig) -> str:
        return self.reader.hook

    def target_of(self, run: RunConfig) -> str:
        """The module path the run's SAE reconstructs (its input hook) or predicts."""
        return self.target or self.reader.hook

    def width(self, hook: str) -> int:
        return next(h.d_model for h in self.reader.hooks if h.hook == hook)

    def norm_scale(self, hook: str) -> float:
        return self.reader.norm_scale(hook)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return _dicts(self.reader)

    def state_dict(self) -> dict:
        return self.reader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state)

    def figures(self) -> dict[str, float]:
        return self.reader.figures()

    def held_out(self) -> Iterable[dict[str, torch.Tensor]]:
        """Held-out batches (evaluation reads up to n_val tokens): val_data, by default the
        train collection's last shard, its hooks those of train_data unless set."""
        cfg = self.cfg
        batch = min(cfg.batch_size, cfg.n_val)
        val = open_reader(cfg.held_out_data, dataclasses.replace(cfg, batch_size=batch), False)
        # named after the training hooks, which the stacks know (val may read other ones)
        names = dict(zip([h.hook for h in val.hooks], self.hooks.values(), strict=True))
        return ({names[h]: acts for h, acts in batch.items()} for batch in _dicts(val))


class LiveSource:
    """The model of the collection config `train_data.collect`, hooked at every hook the
    group's runs read (transcoders' targets are just more hooks); one forward pass per
    batch of sequences feeds all of them. It serves the group's ceil(n_train / batch_size)
    batches; with `train_data.cache_to` it also writes the training sequences it computes
    there as a collection, complete once the text's first epoch or the training ends."""

    def __init__(self, cfg: GroupConfig, runs: list[RunConfig]):
        collect_cfg = live_collect_config(cfg)
        self.cfg, self.collect_cfg = cfg, collect_cfg
        self.source = ModelSource(
            collect_cfg,
            live_hooks(runs, collect_cfg),
            cfg.batch_size,
            cfg.train_data.shuffle_tokens,
            cfg.train_data.seed,
            cache_to=cfg.train_data.cache_to,
        )
        self.d_model, self.model_name = self.source.d_model, collect_cfg.model
        self.hooks = self.source.hooks
        self.position = SourcePosition()
        self.served = 0
        """Batches served since the start of training (resumes included)."""
        self.n_batches = math.ceil(cfg.n_train / cfg.batch_size)
        for run in runs:
            if self.target_of(run) == self.hook_of(run) and target_spec(run.train_hooks):
                raise UserError(
                    f"the target hook {self.hook_of(run)} is the input hook; leave target_hook "
                    "and target_layer unset for an ordinary SAE"
                )
        self.scales = self._norm_scales()

    def hook_of(self, run: RunConfig) -> str:
        return self.hooks[live_input(run, self.collect_cfg)]

    def target_of(self, run: RunConfig) -> str:
        """The module path the run's SAE reconstructs (its input hook) or predicts."""
        spec = target_spec(run.train_hooks)
        return self.hooks[spec] if spec is not None else self.hook_of(run)

    def width(self, hook: str) -> int:
        return self.d_model

    def norm_scale(self, hook: str) -> float:
        return self.scales[hook]

    def _norm_scales(self) -> dict[str, float]:
        sample = self.source.first_tokens(NORM_SAMPLE_TOKENS)
        return {
            path: math.sqrt(self.d_model) / float(sample[spec].float().norm(dim=1).mean())
            for spec, path in self.hooks.items()
        }

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch, position in self.source.batches(self.position, self.n_batches - self.served):
            self.position, self.served = position, self.served + 1
            yield {path: batch.acts[spec].float() for spec, path in self.hooks.items()}
        if self.source.cache is not None:
            self.source.cache.finish()

    def state_dict(self) -> dict:
        """The position after the last batch served. The cache first commits every sequence
        computed so far, so a resume from this state recomputes nothing it lacks and writes
        only sequences it does not hold."""
        if self.source.cache is not None:
            self.source.cache.flush()
        return vars(self.position) | {"served": self.served}

    def load_state_dict(self, state: dict) -> None:
        position = dict(state)
        self.served = position.pop("served")
        self.position = SourcePosition(**position)

    def figures(self) -> dict[str, float]:
        return {}

    def held_out(self) -> list[dict[str, torch.Tensor]]:
        """Up to n_val tokens of the held-out documents, every hook from the same forward
        passes."""
        cfg = self.cfg
        val = ModelSource(
            self.collect_cfg, list(self.hooks), min(cfg.batch_size, cfg.n_val), cfg.n_val, 0, "val"
        )
        out, tokens = [], 0
        for batch, pos in val.batches():
            if pos.epoch > 0:
                break
            out.append({path: batch.acts[spec].float() for spec, path in self.hooks.items()})
            tokens += len(batch.token_ids)
            if tokens >= cfg.n_val:
                break
        return out


def _dicts(reader: Reader) -> Iterator[dict[str, torch.Tensor]]:
    """The reader's batches as {hook: acts}."""
    for batch in reader:
        yield batch if isinstance(batch, dict) else {reader.hook: batch}


def live_collect_config(cfg: GroupConfig) -> CollectConfig:
    """The collection config a live source runs (train_data.collect), on the group's device."""
    collect_cfg = load_toml(Path(cfg.train_data.collect))
    return dataclasses.replace(collect_cfg, device=cfg.device, progress=False)


def held_out_text(cfg: GroupConfig, hooks: list[str], n_sequences: int) -> HeldOutText:
    """The model and held-out sequences downstream fidelity runs on for a group reading
    `hooks` (module paths): the held-out documents of a live source, the held-out shards of
    a store. Any rank can prepare it (it needs no source)."""
    if cfg.train_data.source == "model":
        return text_from_config(live_collect_config(cfg), hooks, n_sequences, cfg.device)
    data = cfg.held_out_data
    return text_from_collection(
        data.uri, hooks, n_sequences, cfg.device, shards=data.shards, anonymous=data.anonymous
    )


def held_out_tokens(cfg: GroupConfig) -> tuple[HeldOutTokens, dict]:
    """The labelled held-out tokens absorption runs on and what its results record of them:
    the held-out documents of a live source (computed when asked), the held-out shards of a
    store."""
    if cfg.train_data.source == "model":
        return _live_tokens(cfg), {"absorption_split": "val"}
    data = cfg.held_out_data
    return stored_tokens(data.uri, data.shards, data.anonymous), {"absorption_shards": data.shards}


def _live_tokens(cfg: GroupConfig) -> HeldOutTokens:
    n_tokens = cfg.absorption.n_tokens * LIVE_ABSORPTION_TOKEN_FACTOR

    def compute(hooks: list[str]) -> Iterator[tuple[str, LabelledTokens]]:
        source = ModelSource(live_collect_config(cfg), hooks, 1, 1, 0, "val")
        window = source.first_window(n_tokens)
        for hook in hooks:
            acts = window.acts[hook].float().cpu()
            yield hook, LabelledTokens(acts, window.token_ids, source.tokenizer)

    return compute


def open_source(cfg: GroupConfig, runs: list[RunConfig]) -> StoreSource | LiveSource:
    if cfg.train_data.source == "model":
        return LiveSource(cfg, runs)
    return StoreSource(cfg)
