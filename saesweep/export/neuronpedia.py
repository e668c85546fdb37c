"""Neuronpedia's bulk-import layout, as SAEDashboard's exporter writes it
(sae_dashboard/neuronpedia/neuronpedia_export.py): per run, MODEL_ID/SOURCE_ID/ with
release.jsonl, model.jsonl, sourceset.jsonl, source.jsonl, features/batch-N.jsonl.gz (density,
activation histogram, top and bottom logits) and activations/batch-N.jsonl.gz (top activating
contexts: tokens, values, max value). Every run of a sweep is gathered from one pass over the
collection: each shard of a hook is read once (verified, through Collection) for all the runs
on that hook.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from saesweep.configtools import at_least, positional
from saesweep.evaluate.features import collection_tokenizer
from saesweep.export import export_format
from saesweep.export import neuronpedia_rows as np_rows
from saesweep.export.feature_stats import FeatureStats, ShardTokens
from saesweep.export.logit_effects import logit_effects, unembedding
from saesweep.export.output import staged_output
from saesweep.export.runs import LoadedRun, runs_by_hook
from saesweep.format.collection import Collection, HookShards
from saesweep.store.file import write_atomic


@dataclass(frozen=True)
class NeuronpediaCommand:
    """Neuronpedia's bulk-import layout (OUT/MODEL_ID/SOURCE_ID/*.jsonl, features/ and
    activations/batch-N.jsonl.gz) of every run, from one pass over the collection."""

    runs: positional(tuple[str, ...], "RUN_OR_SWEEP_DIR")
    """Finished run directories, or sweep directories (each stands for all its runs)."""
    collection: str
    """The collection to find each latent's top contexts in (a path, file://PATH or
    s3://BUCKET/PREFIX), holding each run's hook."""
    out: str
    """The directory to write (new, or empty)."""
    model_id: str | None = None
    """Neuronpedia's id of the model (default: the collection's model name, its last path
    part, lowercased)."""
    source_set: str = "saesweep"
    """The source set (Neuronpedia's SAE family); a run's source is LAYER-SOURCE_SET__RUN."""
    release: str | None = None
    """The release the source set belongs to (default: the source set's name)."""
    creator_id: str = np_rows.DEFAULT_CREATOR_ID
    """Neuronpedia's id of the creator (default: SAEDashboard's)."""
    creator_name: str = "saesweep"
    """The creator's name shown on the release."""
    top: int = field(default=20, metadata=at_least(1))
    """Top activating contexts per latent."""
    window: int = field(default=24, metadata=at_least(0))
    """Tokens of the same sequence shown before each top token."""
    after: int = field(default=8, metadata=at_least(0))
    """Tokens of the same sequence shown after each top token."""
    batch_size: int = field(default=128, metadata=at_least(1))
    """Features per batch-N.jsonl.gz file."""
    shards: str = ":"
    """Python slice over the collection's shards, e.g. ':-1' or '-1:'."""
    model: str | None = None
    """The model whose tokenizer decodes tokens and whose unembedding gives each latent's
    top and bottom logits (default: the collection's model)."""
    anonymous: bool = False
    """S3 URIs: send unsigned requests (a public bucket) even when AWS credentials are
    configured."""
    progress: bool = True
    """Show a progress bar over the collection's shards."""


@dataclass(frozen=True)
class Vocabulary:
    """The model's tokens as the export shows them: a token id's text, and the unembedding
    W_U [d_model, d_vocab] (None for a model without one)."""

    decode: Callable[[int], str]
    w_u: Tensor | None


@dataclass
class Member:
    """One run in the export: its name, hook and dashboard data."""

    name: str
    hook: str
    stats: FeatureStats


def member(r: LoadedRun, command: NeuronpediaCommand) -> Member:
    stats = FeatureStats(r.cfg, r.weights, command.top, command.window, command.after)
    return Member(r.name, r.cfg["hook_name"], stats)


def gather_hook(collection: Collection, hook: HookShards, members: list[Member], bar) -> int:
    """Every member's dashboard data from the hook's shards, each read once; sequences."""
    names, first_row, n_seq = ("acts", "token_ids", "seq_ids", "positions"), 0, 0
    for shard in range(len(hook.shards)):
        t = collection.read_shard(hook, shard, names)
        tokens = ShardTokens(t["acts"], t["token_ids"], t["seq_ids"], t["positions"], first_row)
        for m in members:
            m.stats.add_shard(tokens)
        first_row += len(t["acts"])
        n_seq += len(torch.unique(t["seq_ids"]))
        bar.update(1)
    return n_seq


def layer_of(hook: str) -> int:
    """The layer a hook names: its first number (0 when it has none)."""
    found = re.search(r"\d+", hook)
    return int(found.group()) if found else 0


def write_jsonl(path: Path, rows: list[dict], compress: bool = False) -> None:
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    data = gzip.compress(data, compresslevel=5) if compress else data
    write_atomic(path, lambda f: f.write(data))


def feature_rows(
    m: Member, r: np_rows.Release, source_id: str, latents: range, vocab: Vocabulary
) -> tuple:
    """(Feature rows, Activation rows) of the latents."""
    features, activations = [], []
    w_dec = m.stats.weights["W_dec"][latents.start : latents.stop]
    for latent, logits in zip(latents, logit_effects(w_dec, vocab.w_u, vocab.decode), strict=True):
        examples = m.stats.top_examples(latent)
        for e in examples:
            tokens = [vocab.decode(t) for t in e.token_ids]
            values = [round(v, 5) for v in e.values]
            activations.append(np_rows.activation_row(r, source_id, latent, tokens, values, e.at))
        peak = max((max(e.values) for e in examples), default=0.0)
        density = float(m.stats.fire_counts[latent]) / max(m.stats.n_tokens, 1)
        hist_values, hist_heights = m.stats.histogram.bars(latent)
        data = np_rows.FeatureData(
            latent, round(peak, 5), density, hist_values, hist_heights, logits
        )
        features.append(np_rows.feature_row(r, source_id, data))
    return features, activations


def write_source(
    m: Member, r: np_rows.Release, out: Path, source: dict, batch_size: int, vocab: Vocabulary
) -> None:
    """A run's source directory: the four metadata files, then the batches."""
    source_dir = out / r.model_id / source["id"]
    description = f"saesweep SAEs on {source['dataset']}"
    write_jsonl(source_dir / "release.jsonl", [np_rows.release_row(r, description)])
    write_jsonl(source_dir / "model.jsonl", [np_rows.model_row(r)])
    write_jsonl(source_dir / "sourceset.jsonl", [np_rows.sourceset_row(r, description)])
    write_jsonl(source_dir / "source.jsonl", [source])
    d_sae = m.stats.cfg["d_sae"]
    for b, start in enumerate(range(0, d_sae, batch_size)):
        latents = range(start, min(start + batch_size, d_sae))
        features, activations = feature_rows(m, r, source["id"], latents, vocab)
        write_jsonl(source_dir / "features" / f"batch-{b}.jsonl.gz", features, True)
        write_jsonl(source_dir / "activations" / f"batch-{b}.jsonl.gz", activations, True)


def release_of(command: NeuronpediaCommand, collection: Collection) -> np_rows.Release:
    """The rows' shared fields; the model id by default the model's name, lowercased."""
    model = command.model or collection.config.get("model") or "model"
    model_id = command.model_id or Path(model).name.lower()
    release = command.release or command.source_set
    created = datetime.now().isoformat()
    return np_rows.Release(
        model_id, command.source_set, release, command.creator_id, command.creator_name, created
    )


@export_format("neuronpedia", NeuronpediaCommand)
def write_neuronpedia(command: NeuronpediaCommand) -> None:
    collection = Collection.open(command.collection, command.anonymous)
    tokenizer = collection_tokenizer(collection.config, command.model)
    release = release_of(command, collection)
    w_u = unembedding(collection.config, command.model)
    vocab = Vocabulary(lambda token_id: tokenizer.decode([token_id]), w_u)

    with staged_output(Path(command.out)) as staged:
        grouped = runs_by_hook(
            command.runs, collection, command.shards, lambda r: member(r, command)
        )
        n_shards = sum(len(hook.shards) for hook, _ in grouped.values())
        with tqdm(total=n_shards, desc="neuronpedia", disable=not command.progress) as bar:
            for hook, members in grouped.values():
                n_seq = gather_hook(collection, hook, members, bar)
                for m in members:
                    source_id = f"{layer_of(m.hook)}-{command.source_set}__{m.name}"
                    source = np_rows.source_row(
                        release, source_id, command.collection, n_seq, hook.meta["ctx_len"]
                    )
                    write_source(m, release, staged, source, command.batch_size, vocab)
    n_runs = sum(len(members) for _, members in grouped.values())
    print(f"wrote {command.out}: Neuronpedia's import of {n_runs} runs")
