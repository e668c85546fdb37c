"""A group's data source as the trainer sees it (TrainingSource): batches of every hook the
group reads, and its held-out activations, text and tokens.

`store`: the Reader over a collection (one input hook per group, and the target hook of its
transcoders and its CLTs' layers, in lockstep). `model`: collect.source's ModelSource, one
forward pass per batch for every hook of the group, targets and CLTs' layers included. Both
yield {hook: [batch, d] float32 on the group's device} and know each hook's input scale
(normalize 'norm': E||x|| = sqrt(d)), their position (for resume) and their held-out data
(batches of the same dicts, the model and sequences of downstream fidelity, the labelled
tokens of absorption). train.distributed's SharedSource serves either to every process of a
group.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import torch

from saesweep.collect.config import CollectConfig, load_toml
from saesweep.collect.source import ModelSource, SourcePosition
from saesweep.configtools import parse_slice
from saesweep.data.hooksets import joined, parts
from saesweep.data.normalizer import SAMPLE_TOKENS, Normalizer
from saesweep.data.reader import Reader
from saesweep.errors import UserError
from saesweep.evaluate.absorption import HeldOutTokens, LabelledTokens, stored_tokens
from saesweep.evaluate.downstream import HeldOutText, text_from_collection, text_from_config
from saesweep.format.collection import Collection
from saesweep.sae.registry import architecture
from saesweep.train.config import DataConfig, GroupConfig, HookChoice, RunConfig

LIVE_ABSORPTION_TOKEN_FACTOR = 2
"""With source 'model', absorption reads the first absorption.n_tokens x this many tokens of
the held-out documents (77 % of the demo text's tokens are alphabetic)."""


class TrainingSource(Protocol):
    """What the trainer reads a group's data through."""

    d_model: int
    model_name: str
    hooks: dict[str, str]
    """Hook spec (as configs name it) -> module path, transcoders' targets included."""
    normalizer: Normalizer
    """The input scale of every served hook the group trains with (train_data.normalize)."""

    def hook_of(self, run: RunConfig) -> str:
        """The module path a run's SAE reads."""

    def target_of(self, run: RunConfig) -> str:
        """The module path a run's SAE reconstructs (its input hook) or predicts."""

    def width(self, hook: str) -> int:
        """The width of a served hook (a module path)."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Training batches {module path: [batch, d] float32}, from the current position."""

    def state_dict(self) -> dict:
        """The position after the last batch served (for resume)."""

    def load_state_dict(self, state: dict) -> None:
        """Continue from a position `state_dict` gave."""

    def figures(self) -> dict[str, float]:
        """Live figures for logging."""

    def held_out_activations(self, n_tokens: int, batch_size: int | None) -> list[dict]:
        """Up to n_tokens held-out tokens ({module path: acts}, every hook's rows the same
        tokens) in memory, in batches of batch_size (None: one batch)."""

    def held_out_text(self, hooks: list[str], n_sequences: int) -> HeldOutText:
        """The model and held-out sequences downstream fidelity runs on, for `hooks`."""

    def held_out_tokens(self) -> tuple[HeldOutTokens, dict]:
        """The labelled held-out tokens absorption runs on, and what its results record."""


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
    input hook (live_input) and transcoder target, and every hook of its layered runs."""
    single = [r for r in runs if layered_specs(r) is None]
    targets = {target_spec(r.train_hooks) for r in single} - {None}
    inputs = {live_input(r, collect_cfg) for r in single}
    return sorted(inputs | targets | set(layered_hooks(runs)))


def layered_specs(run: RunConfig) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(input hooks, target hooks) of a run whose architecture names its hooks itself (a
    CLT's layers: StackedSAE.hook_specs), else None."""
    return architecture(run.sae.arch).hook_specs(run.sae)


def layered_keys(run: RunConfig, hooks: dict[str, str]) -> tuple[str, str] | None:
    """(input key, target key) of a layered run: its hooks' module paths (`hooks`: spec ->
    path) joined (data/hooksets.py); None for a run of one hook."""
    specs = layered_specs(run)
    if specs is None:
        return None
    inputs, targets = specs
    return joined(hooks[s] for s in inputs), joined(hooks[s] for s in targets)


def layered_hooks(runs: Sequence[RunConfig]) -> list[str]:
    """Every hook the layered runs of a group read, inputs and targets, in first-use order."""
    specs = [s for run in runs if (s := layered_specs(run)) is not None]
    return list(dict.fromkeys(h for inputs, targets in specs for h in (*inputs, *targets)))


def with_primary_hook(data: DataConfig, runs: Sequence[RunConfig]) -> DataConfig:
    """`data`, naming the first hook of its layered runs where it names none and every run is
    layered (the reader then needs no hook of its own)."""
    layered = layered_hooks(runs)
    if data.hook is not None or data.layer is not None or not layered:
        return data
    if any(layered_specs(run) is None for run in runs):
        return data
    return dataclasses.replace(data, hook=layered[0])


def target_spec(data: DataConfig | HookChoice) -> str | None:
    """The target hook a config names: target_hook, else 'resid.<target_layer>', else None
    (an SAE: no target)."""
    if data.target_hook is not None:
        return data.target_hook
    return f"resid.{data.target_layer}" if data.target_layer is not None else None


def store_hooks(collection: Collection, data: DataConfig) -> tuple[dict, dict | None]:
    """(metadata of the input hook, of the target hook or None) that `data` names in
    `collection`; a target that is the input hook or stores other tokens is refused."""
    meta = collection.hook(data.hook, data.layer)
    if data.target_hook is None and data.target_layer is None:
        return meta, None
    target = collection.hook(data.target_hook, data.target_layer)
    if target["hook"] == meta["hook"]:
        raise UserError(
            f"the target hook {target['hook']} is the input hook; leave target_hook and "
            "target_layer unset for an ordinary SAE"
        )
    collection.check_same_tokens(meta, target)
    return meta, target


def open_reader(
    data: DataConfig, cfg: GroupConfig, train: bool, layered: Sequence[str] = ()
) -> Reader:
    """The reader of `data`'s hook, its target and the `layered` runs' hooks, in lockstep."""
    collection = Collection.open(data.uri, data.anonymous)
    meta, target = store_hooks(collection, data)
    extra = [target["hook"]] if target else []
    extra += [collection.hook(spec)["hook"] for spec in layered]
    return Reader(
        collection,
        hook=meta["hook"],
        extra_hooks=[h for h in dict.fromkeys(extra) if h != meta["hook"]],
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


class HeldOutFromConfig:
    """held_out_text and held_out_tokens from a source's config alone (its `text_for` and
    `tokens_for`), which any process of a group can prepare without the source."""

    cfg: GroupConfig

    def held_out_text(self, hooks: list[str], n_sequences: int) -> HeldOutText:
        return self.text_for(self.cfg, hooks, n_sequences)

    def held_out_tokens(self) -> tuple[HeldOutTokens, dict]:
        return self.tokens_for(self.cfg)


class StoreSource(HeldOutFromConfig):
    """The Reader over one hook of a collection (and its transcoders' target hook, and the
    hooks of its layered runs, all in lockstep), repeated to n_train tokens. Its hooks are the
    group's and those its layered runs (CLTs) name; every other run reads the group's."""

    def __init__(self, cfg: GroupConfig, runs: Sequence[RunConfig] = ()):
        self.cfg, self.runs = cfg, list(runs)
        self.layered = layered_hooks(runs)
        data = with_primary_hook(cfg.train_data, runs)
        self.reader = open_reader(data, cfg, train=True, layered=self.layered)
        usable = len(self.reader) * cfg.batch_size
        if usable == 0:
            raise UserError(
                f"{cfg.train_data.uri} holds fewer tokens than one batch "
                f"({cfg.batch_size}); lower batch_size or collect more"
            )
        self.reader.epochs = math.ceil(cfg.n_train / usable)
        self.d_model, self.model_name = self.reader.d_model, self.reader.meta["model"]
        self.hooks = {hook_spec(data): self.reader.hook}
        """Spec (as configs name it) -> module path, targets and layered hooks included."""
        self.target = self.reader.hooks[1].hook if target_spec(data) is not None else None
        if self.target is not None:
            self.hooks[target_spec(data)] = self.target
        collection = self.reader.collection
        self.hooks |= {spec: collection.hook(spec)["hook"] for spec in self.layered}
        self.normalizer = chosen_normalizer(
            cfg,
            self.hooks.values(),
            lambda: Normalizer.from_statistics(self.reader.collection, self.reader.hooks),
        )

    def hook_of(self, run: RunConfig) -> str:
        """The module path the run's SAE reads (a layered run's: its hooks' key)."""
        keys = layered_keys(run, self.hooks)
        return self.reader.hook if keys is None else keys[0]

    def target_of(self, run: RunConfig) -> str:
        """The module path the run's SAE reconstructs (its input hook) or predicts."""
        keys = layered_keys(run, self.hooks)
        return (self.target or self.reader.hook) if keys is None else keys[1]

    def width(self, hook: str) -> int:
        """A hook's width; a key of several hooks (hooksets): their common width."""
        widths = {h.d_model for h in self.reader.hooks if h.hook in parts(hook)}
        if len(widths) != 1:
            raise UserError(f"the hooks {', '.join(parts(hook))} differ in width: {widths}")
        return widths.pop()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return _dicts(self.reader)

    def state_dict(self) -> dict:
        return self.reader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state)

    def figures(self) -> dict[str, float]:
        return self.reader.figures()

    def held_out_activations(self, n_tokens: int, batch_size: int | None) -> list[dict]:
        """From val_data, by default the train collection's last shard, its hooks those of
        train_data unless set."""
        cfg = self.cfg
        batch = min(cfg.batch_size, cfg.n_val)
        data = with_primary_hook(cfg.held_out_data, self.runs)
        val = open_reader(data, dataclasses.replace(cfg, batch_size=batch), False, self.layered)
        # named after the training hooks, which the stacks know (val may read other ones)
        trained = dict.fromkeys(self.hooks.values())  # two specs may name one module
        names = dict(zip([h.hook for h in val.hooks], trained, strict=True))
        batches = ({names[h]: acts for h, acts in batch.items()} for batch in _dicts(val))
        return keep_tokens(batches, n_tokens, batch_size)

    @staticmethod
    def text_for(cfg: GroupConfig, hooks: list[str], n_sequences: int) -> HeldOutText:
        """held_out_text of a store config: its held-out shards (no source needed)."""
        data = cfg.held_out_data
        return text_from_collection(
            data.uri, hooks, n_sequences, cfg.device, shards=data.shards, anonymous=data.anonymous
        )

    @staticmethod
    def tokens_for(cfg: GroupConfig) -> tuple[HeldOutTokens, dict]:
        """held_out_tokens of a store config: its held-out shards (no source needed)."""
        data = cfg.held_out_data
        tokens = stored_tokens(data.uri, data.shards, data.anonymous)
        return tokens, {"absorption_shards": data.shards}


class LiveSource(HeldOutFromConfig):
    """The model of the collection config `train_data.collect`, hooked at every hook the
    group's runs read (transcoders' targets and CLTs' layers are just more hooks); one
    forward pass per batch of sequences feeds all of them. It serves the group's
    ceil(n_train / batch_size) batches; with `train_data.cache_to` it also writes the
    training sequences it computes there as a collection, complete once the text's first
    epoch or the training ends."""

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
        self.normalizer = chosen_normalizer(cfg, self.hooks.values(), self._sampled_normalizer)

    def hook_of(self, run: RunConfig) -> str:
        """The module path the run's SAE reads (a layered run's: its hooks' key)."""
        keys = layered_keys(run, self.hooks)
        return self.hooks[live_input(run, self.collect_cfg)] if keys is None else keys[0]

    def target_of(self, run: RunConfig) -> str:
        """The module path the run's SAE reconstructs (its input hook) or predicts."""
        keys, spec = layered_keys(run, self.hooks), target_spec(run.train_hooks)
        if keys is not None:
            return keys[1]
        return self.hooks[spec] if spec is not None else self.hook_of(run)

    def width(self, hook: str) -> int:
        return self.d_model

    def _sampled_normalizer(self) -> Normalizer:
        sample = self.source.first_tokens(SAMPLE_TOKENS)
        return Normalizer.from_sample({path: sample[spec] for spec, path in self.hooks.items()})

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

    def held_out_activations(self, n_tokens: int, batch_size: int | None) -> list[dict]:
        """From the held-out documents, every hook from the same forward passes."""
        return keep_tokens(self._held_out_batches(), n_tokens, batch_size)

    def _held_out_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Up to n_val tokens of the held-out documents (their first epoch)."""
        cfg = self.cfg
        val = ModelSource(
            self.collect_cfg, list(self.hooks), min(cfg.batch_size, cfg.n_val), cfg.n_val, 0, "val"
        )
        tokens = 0
        for batch, pos in val.batches():
            if pos.epoch > 0:
                return
            yield {path: batch.acts[spec].float() for spec, path in self.hooks.items()}
            tokens += len(batch.token_ids)
            if tokens >= cfg.n_val:
                return

    @staticmethod
    def text_for(cfg: GroupConfig, hooks: list[str], n_sequences: int) -> HeldOutText:
        """held_out_text of a live config: its held-out documents (no source needed)."""
        return text_from_config(live_collect_config(cfg), hooks, n_sequences, cfg.device)

    @staticmethod
    def tokens_for(cfg: GroupConfig) -> tuple[HeldOutTokens, dict]:
        """held_out_tokens of a live config: its held-out documents, computed when asked."""
        return _live_tokens(cfg), {"absorption_split": "val"}


def _dicts(reader: Reader) -> Iterator[dict[str, torch.Tensor]]:
    """The reader's batches as {hook: acts}."""
    for batch in reader:
        yield batch if isinstance(batch, dict) else {reader.hook: batch}


def live_collect_config(cfg: GroupConfig) -> CollectConfig:
    """The collection config a live source runs (train_data.collect), on the group's device."""
    collect_cfg = load_toml(Path(cfg.train_data.collect))
    return dataclasses.replace(collect_cfg, device=cfg.device, progress=False)


def _live_tokens(cfg: GroupConfig) -> HeldOutTokens:
    n_tokens = cfg.absorption.n_tokens * LIVE_ABSORPTION_TOKEN_FACTOR

    def compute(hooks: list[str]) -> Iterator[tuple[str, LabelledTokens]]:
        source = ModelSource(live_collect_config(cfg), hooks, 1, 1, 0, "val")
        window = source.first_window(n_tokens)
        for hook in hooks:
            acts = window.acts[hook].float().cpu()
            yield hook, LabelledTokens(acts, window.token_ids, source.tokenizer)

    return compute


def chosen_normalizer(
    cfg: GroupConfig, hooks: Iterable[str], estimate: Callable[[], Normalizer]
) -> Normalizer:
    """The normalizer train_data.normalize chooses: 'norm' estimates the scales, 'none' is 1
    for every hook."""
    return estimate() if cfg.train_data.normalize == "norm" else Normalizer.unit(hooks)


def source_class(cfg: GroupConfig) -> type[StoreSource] | type[LiveSource]:
    """The source a group's train_data.source names."""
    return LiveSource if cfg.train_data.source == "model" else StoreSource


def open_source(cfg: GroupConfig, runs: list[RunConfig]) -> TrainingSource:
    return source_class(cfg)(cfg, runs)


def keep_tokens(
    batches: Iterable[dict[str, torch.Tensor]], n_tokens: int, batch_size: int | None
) -> list[dict]:
    """Up to n_tokens of `batches` ({hook: acts}, rows the same tokens in every hook), in
    memory: batches of batch_size (None: one batch)."""
    kept, tokens = [], 0
    for batch in batches:
        kept.append({h: acts[: n_tokens - tokens].clone() for h, acts in batch.items()})
        tokens += len(next(iter(kept[-1].values())))
        if tokens >= n_tokens:
            break
    whole = {h: torch.cat([b[h] for b in kept]) for h in kept[0]}
    if batch_size is None:
        return [whole]
    parts = {h: acts.split(batch_size) for h, acts in whole.items()}
    return [dict(zip(parts, chunk, strict=True)) for chunk in zip(*parts.values(), strict=True)]
