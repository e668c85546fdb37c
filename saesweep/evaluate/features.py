"""Feature inspection: the top-activating tokens of chosen SAE latents, in context, as HTML.

    uv run python -m saesweep.evaluate.features RUN_DIR --data URI --latents 0 5 17 \
        --top 20 --out page.html

Without --latents the informative latents are shown: those firing on 0.01 % to 1 % of the
tokens, by their largest activation (then the others that fired). The collection's shards are
scanned one at a time (no activations held beyond one shard); the contexts (the previous
--window stored tokens of the same sequence and the token itself) are read back afterwards from
the shards that hold the winning tokens.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import torch
from beartype import beartype
from jaxtyping import Float, jaxtyped
from torch import Tensor

from saesweep.collect.model import load_tokenizer
from saesweep.configtools import at_least, parse_command, positional
from saesweep.errors import UserError, exit_on_user_error
from saesweep.evaluate.downstream import Run, load_run
from saesweep.format.collection import Collection, HookShards
from saesweep.sae.export import exported_acts
from saesweep.store.file import write_atomic


@dataclass
class Hit:
    activation: float
    row: int
    """Index of the token among the scanned tokens (selected shards, manifest order)."""
    seq_id: int = -1
    position: int = -1
    token_id: int = -1
    context: list[int] = field(default_factory=list)
    """Token ids of the context; the last one is the hit's own token."""


@dataclass
class LatentReport:
    latent: int
    density: float
    """Fraction of scanned tokens on which the latent is > 0."""
    max_activation: float
    hits: list[Hit]


class TopK:
    """Running top-`k` values per column over row chunks, with each winner's global row."""

    def __init__(self, k: int, n_cols: int):
        self.k = k
        self.values = torch.full((0, n_cols), float("-inf"))
        self.rows = torch.zeros((0, n_cols), dtype=torch.int64)

    @jaxtyped(typechecker=beartype)
    def update(self, values: Float[Tensor, "c L"], first_row: int) -> None:
        """Merge the chunk's own top k (rows first_row...) into the running top k."""
        top, where = values.float().topk(min(self.k, len(values)), dim=0)
        all_values = torch.cat([self.values, top])
        all_rows = torch.cat([self.rows, where + first_row])
        top, where = all_values.topk(min(self.k, len(all_values)), dim=0)
        self.values, self.rows = top, all_rows.gather(0, where)


@dataclass
class Scan:
    latents: list[int]
    n_tokens: int
    fire_counts: Tensor
    top: TopK
    shard_offsets: list[int]
    """Global row of each selected shard's first token (plus the total at the end)."""


def check_width(cfg: dict, collection: Collection, hook: HookShards) -> None:
    """A UserError unless the SAE reads activations of the hook's width."""
    if cfg["d_in"] != hook.d_model:
        raise UserError(
            f"the SAE has d_in={cfg['d_in']} but {collection.uri} has width {hook.d_model}"
        )


@torch.no_grad()
def scan(
    cfg: dict,
    sd: dict[str, Tensor],
    collection: Collection,
    hook: HookShards,
    latents: list[int] | None,
    top: int,
    chunk: int = 4096,
) -> Scan:
    """Fire counts of every latent and the running top activations of `latents` (all when
    None) over the hook's chosen shards."""
    check_width(cfg, collection, hook)
    cols = list(range(cfg["d_sae"])) if latents is None else latents
    result = Scan(cols, 0, torch.zeros(cfg["d_sae"], dtype=torch.int64), TopK(top, len(cols)), [])
    index = torch.tensor(cols)
    for shard in range(len(hook.shards)):
        result.shard_offsets.append(result.n_tokens)
        acts = collection.read_shard(hook, shard, ("acts",))["acts"]
        for start in range(0, len(acts), chunk):
            a = exported_acts(cfg, sd, acts[start : start + chunk].to(sd["W_enc"].dtype))
            result.fire_counts += (a > 0).sum(0)
            result.top.update(a if latents is None else a[:, index], result.n_tokens + start)
        result.n_tokens += len(acts)
    result.shard_offsets.append(result.n_tokens)
    return result


def reports(result: Scan, shown: list[int]) -> list[LatentReport]:
    """Per shown latent: density, max activation, hits (positive activations only)."""
    col = {lat: i for i, lat in enumerate(result.latents)}
    out = []
    for latent in shown:
        values, rows = result.top.values[:, col[latent]], result.top.rows[:, col[latent]]
        hits = [Hit(float(v), int(r)) for v, r in zip(values, rows, strict=True) if v > 0]
        density = float(result.fire_counts[latent]) / max(result.n_tokens, 1)
        out.append(LatentReport(latent, density, hits[0].activation if hits else 0.0, hits))
    return out


DENSITY_BAND = (1e-4, 1e-2)
"""Densities of the latents shown by default: rare enough to mean something specific,
frequent enough to have examples (the densest latents, often 20 % of tokens, rarely do)."""


def informative(result: Scan, n: int) -> list[int]:
    """The n latents shown without --latents: those whose density lies in DENSITY_BAND, by
    their largest activation; then, when fewer, the other latents that fired, the same way."""
    density = result.fire_counts.double() / max(result.n_tokens, 1)
    peak = result.top.values[0] if len(result.top.values) else torch.zeros(len(density))
    low, high = DENSITY_BAND
    in_band = (density >= low) & (density <= high)
    fired = [i for i in range(len(density)) if result.fire_counts[i] > 0]
    return sorted(fired, key=lambda i: (not bool(in_band[i]), -float(peak[i]), i))[:n]


def add_contexts(
    latent_reports: list[LatentReport],
    result: Scan,
    collection: Collection,
    hook: HookShards,
    window: int,
) -> None:
    """Fill each hit's seq_id, position, token id and context from the shard holding its row.
    A sequence never spans shards, so the whole context is in that shard."""
    hits = [h for r in latent_reports for h in r.hits]
    offsets = torch.tensor(result.shard_offsets)
    by_shard: dict[int, list[Hit]] = {}
    for h in hits:
        shard = int(torch.searchsorted(offsets, h.row, right=True)) - 1
        by_shard.setdefault(shard, []).append(h)
    for s, shard_hits in by_shard.items():
        t = collection.read_shard(hook, s, ("token_ids", "seq_ids", "positions"))
        for h in shard_hits:
            row = h.row - result.shard_offsets[s]
            h.seq_id, h.position = int(t["seq_ids"][row]), int(t["positions"][row])
            h.token_id = int(t["token_ids"][row])
            same = (t["seq_ids"] == h.seq_id) & (t["positions"] <= h.position)
            same &= t["positions"] >= h.position - window
            rows = same.nonzero().flatten()
            rows = rows[t["positions"][rows].argsort()]
            h.context = t["token_ids"][rows].tolist()


def inspect_features(
    run: Run,
    uri: str,
    latents: list[int] | None = None,
    top: int = 20,
    *,
    n_default: int = 10,
    window: int = 10,
    shards: str = ":",
    anonymous: bool = False,
) -> tuple[list[LatentReport], int]:
    """(reports of the latents, in the given order or the `informative` ones; tokens scanned).
    `anonymous`: unsigned S3 reads (see open_store)."""
    cfg, sd = load_run(run)
    bad = [lat for lat in latents or [] if not 0 <= lat < cfg["d_sae"]]
    if bad:
        raise UserError(f"latents {bad} are out of range: the SAE has {cfg['d_sae']} latents")
    collection = Collection.open(uri, anonymous)
    hook = collection.choose(collection.hook(cfg.get("hook_name")), shards)
    result = scan(cfg, sd, collection, hook, latents, top)
    shown = latents if latents is not None else informative(result, n_default)
    out = reports(result, shown)
    add_contexts(out, result, collection, hook, window)
    return out, result.n_tokens


# ----- HTML -------------------------------------------------------------------------------------

STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 70em; }
table { border-collapse: collapse; }
td { padding: 2px 8px; vertical-align: top; }
td.act { text-align: right; font-family: monospace; color: #555; }
td.ctx { font-family: monospace; white-space: pre-wrap; }
mark { background: #ffb347; font-weight: bold; }
"""


def token_text(tokenizer, token_id: int) -> str:
    text = tokenizer.decode([token_id])
    return text if text.strip() else repr(text)[1:-1] or "\u2423"


def context_html(tokenizer, hit: Hit) -> str:
    """The context's tokens, separated by thin spaces, the last (the hit) highlighted."""
    parts = [html.escape(token_text(tokenizer, t)) for t in hit.context]
    if parts:
        parts[-1] = f"<mark>{parts[-1]}</mark>"
    return "\u2009".join(parts)


def render_html(latent_reports: list[LatentReport], tokenizer, title: str, n_tokens: int) -> str:
    sections = [f"<h1>{html.escape(title)}</h1><p>{n_tokens:,} tokens scanned.</p>"]
    for r in latent_reports:
        rows = "".join(
            f'<tr><td class="act">{h.activation:.4g}</td>'
            f'<td class="ctx">{context_html(tokenizer, h)}</td></tr>'
            for h in r.hits
        )
        sections.append(
            f'<section id="latent-{r.latent}"><h2>Latent {r.latent}</h2>'
            f"<p>density {r.density:.4%} &middot; max activation {r.max_activation:.4g} "
            f"&middot; {len(r.hits)} top tokens</p>"
            f"<table>{rows or '<tr><td>never fires on the scanned tokens</td></tr>'}</table>"
            "</section>"
        )
    body = "\n".join(sections)
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>{body}</body></html>\n"
    )


def collection_tokenizer(config: dict, override: str | None):
    """The tokenizer of `override`, else of the model the collection's cfg.json names."""
    name = override or config.get("model")
    if not name:
        raise UserError("the collection's cfg.json names no model; give --model")
    return load_tokenizer(name, config.get("revision"))


def write_page(
    run_dir: Path,
    uri: str,
    out: Path,
    latents: list[int] | None,
    top: int,
    *,
    n_default: int = 10,
    window: int = 10,
    shards: str = ":",
    model: str | None = None,
    anonymous: bool = False,
) -> list[LatentReport]:
    """Inspect the latents and write the HTML page to `out` (atomically)."""
    run = load_run(run_dir)
    found, n_tokens = inspect_features(
        run, uri, latents, top, n_default=n_default, window=window, shards=shards,
        anonymous=anonymous,
    )  # fmt: skip
    config = Collection.open(uri, anonymous).config
    page = render_html(found, collection_tokenizer(config, model), f"{run_dir} on {uri}", n_tokens)
    write_atomic(out, lambda f: f.write(page.encode("utf-8")))
    return found


PROGRAM = "python -m saesweep.evaluate.features"
USAGE = f"""usage: {PROGRAM} RUN_DIR --data URI [--latents N ...]
                [--n-latents N] [--top N] [--window N] [--shards SLICE] [--model NAME]
                [--anonymous] [--out PAGE.html]
"""


@dataclass(frozen=True)
class FeaturesCommand:
    """The top-activating tokens of an SAE's latents, in context, as an HTML page."""

    run_dir: positional(str, "RUN_DIR")
    """Trained SAE directory (cfg.json and weights)."""
    data: str
    """Collection URI (a path, file://PATH or s3://BUCKET/PREFIX)."""
    latents: tuple[int, ...] | None = None
    """Latents to show (--latents 0 5 17); default: the informative ones."""
    n_latents: int = field(default=10, metadata=at_least(1))
    """Without --latents: how many latents to show."""
    top: int = field(default=20, metadata=at_least(1))
    """Top tokens shown per latent."""
    window: int = field(default=10, metadata=at_least(0))
    """Previous tokens of the same sequence shown before each top token."""
    shards: str = ":"
    """Python slice over the collection's shards, e.g. ':-1' or '-1:'."""
    model: str | None = None
    """Tokenizer to decode with (default: the collection's model)."""
    anonymous: bool = False
    """S3 URIs: send unsigned requests (a public bucket) even when AWS credentials are
    configured; without credentials reads are unsigned anyway."""
    out: str = "features.html"
    """The HTML page to write."""


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_command(argv, FeaturesCommand, PROGRAM, USAGE)
    found = write_page(
        Path(args.run_dir),
        args.data,
        Path(args.out),
        None if args.latents is None else list(args.latents),
        args.top,
        n_default=args.n_latents,
        window=args.window,
        shards=args.shards,
        model=args.model,
        anonymous=args.anonymous,
    )
    print(f"wrote {args.out} ({len(found)} latents)")


if __name__ == "__main__":
    main()
