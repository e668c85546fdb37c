"""Feature absorption (Chanin et al. 2024, "A is for Absorption"), the first-letter task as
SAEBench runs it, on held-out activations (a collection's stored ones, or a live group's
held-out documents run through the model): docs/evaluation.md defines it.

A probe per first letter is trained on activations of alphabetic tokens (labelled by decoding
their token ids); k-sparse probing on the SAE's latents finds each letter's main latents;
on probe-positive tokens the absorption fraction is the part of the reconstruction's projection
on the probe carried by other, probe-aligned latents instead of the main ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from saesweep.configtools import at_least, fraction
from saesweep.evaluate.downstream import load_run
from saesweep.format.collection import Collection
from saesweep.format.rundir import merge_metrics
from saesweep.sae.export import exported_acts

LETTERS = "abcdefghijklmnopqrstuvwxyz"
EPS = 1e-8


@dataclass(frozen=True)
class AbsorptionConfig:
    """Settings of the first-letter absorption evaluation (SAEBench's values as defaults)."""

    n_tokens: int = field(default=8192, metadata=at_least(0))
    """Alphabetic held-out tokens used at most (the first ones in stored order); 0 skips the
    evaluation in training."""
    test_every: int = field(default=5, metadata=at_least(2))
    """Tokens whose id is divisible by this are the test split (unseen words); the rest train."""
    min_probe_f1: float = field(default=0.6, metadata=fraction())
    """A letter is evaluated only when its probe reaches this F1 on the test split..."""
    min_true_positives: int = field(default=20, metadata=at_least(1))
    """... and has at least this many probe true positives in the test split."""
    max_k: int = field(default=10, metadata=at_least(1))
    """k-sparse probing tries k = 1 .. max_k latents per letter."""
    f1_jump: float = field(default=0.03, metadata=at_least(0))
    """k grows while the k-sparse probe's test F1 improves by more than this."""
    absorber_cos: float = field(default=0.1, metadata=fraction())
    """Absorption fraction: a latent can absorb when cos(decoder row, probe) is at least this."""
    max_absorbers: int = field(default=3, metadata=at_least(1))
    """Absorption fraction: at most this many absorbing latents per token."""
    full_cos: float = field(default=0.025, metadata=fraction())
    """Full absorption: the top projecting latent's cos with the probe must be at least this."""
    proportion: float = field(default=0.4, metadata=fraction())
    """The absorbing latents must carry at least this fraction of the probe projection."""
    l2: float = field(default=1e-3, metadata=at_least(0))
    """L2 penalty of the logistic probes (on standardized inputs)."""
    chunk: int = field(default=2048, metadata=at_least(1))
    """Tokens encoded by an SAE at once."""


def first_letters(token_ids: Tensor, tokenizer) -> Tensor:
    """[n] letter index (0 = a) of each token, -1 for tokens that are not alphabetic: the token
    decoded alone, stripped of spaces and a WordPiece '##', must be ASCII letters only."""
    ids = torch.unique(token_ids)
    table = torch.full((int(ids.max()) + 1,), -1, dtype=torch.long)
    for i in ids.tolist():
        text = tokenizer.decode([i]).strip().removeprefix("##")
        if text.isascii() and text.isalpha():
            table[i] = LETTERS.index(text[0].lower())
    return table[token_ids.long()]


def fit_logistic(x: Tensor, y: Tensor, l2: float) -> tuple[Tensor, Tensor]:
    """One-vs-rest logistic regressions, classes balanced: x [n, f], y [n, c] bool ->
    (w [f, c], b [c]) with logits x @ w + b. Fitted by L-BFGS in float64 on standardized x."""
    x, n = x.double(), len(x)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z, target = (x - mu) / sd, y.double()
    pos = target.sum(0).clamp_min(1)
    weight = torch.where(y, n / (2 * pos), n / (2 * (n - pos).clamp_min(1)))
    w = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = z @ w + b
        loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight)
        loss = loss * y.shape[1] + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach(), b.detach()
    return w / sd[:, None], b - (mu / sd) @ w


def f1_score(pred: Tensor, truth: Tensor) -> float:
    tp = float((pred & truth).sum())
    denom = float(pred.sum() + truth.sum())
    return 2 * tp / denom if denom else 0.0


@dataclass
class Task:
    """The labelled held-out tokens of one hook, split, and the probes trained on them."""

    x: Tensor
    letters: Tensor
    test: Tensor
    w: Tensor
    b: Tensor
    letter_ok: Tensor


def make_task(x: Tensor, token_ids: Tensor, letters: Tensor, cfg: AbsorptionConfig) -> Task:
    """Keep the first n_tokens alphabetic tokens, split them by token id, train the probes and
    mark the letters that can be evaluated."""
    keep = torch.nonzero(letters >= 0).flatten()[: cfg.n_tokens]
    x, letters, ids = x[keep].float(), letters[keep], token_ids[keep].long()
    test = ids % cfg.test_every == 0
    onehot = F.one_hot(letters, len(LETTERS)).bool()
    w, b = fit_logistic(x[~test], onehot[~test], cfg.l2)
    positive = (x[test].double() @ w + b) > 0
    f1 = torch.tensor([f1_score(positive[:, c], onehot[test][:, c]) for c in range(len(LETTERS))])
    true_pos = (positive & onehot[test]).sum(0)
    ok = (f1 >= cfg.min_probe_f1) & (true_pos >= cfg.min_true_positives)
    return Task(x, letters, test, w.float(), b.float(), ok)


Sae = tuple[dict, dict[str, Tensor]]


def _encoded(sae: Sae, x: Tensor, chunk: int):
    """(slice, latent activations) of x, `chunk` tokens at a time."""
    cfg, sd = sae
    for start in range(0, len(x), chunk):
        part = slice(start, start + chunk)
        with torch.no_grad():
            yield part, exported_acts(cfg, sd, x[part]).float()


def main_latents(task: Task, sae: Sae, cfg: AbsorptionConfig) -> dict[int, list[int]]:
    """letter -> its main latents, for the letters that can be evaluated: latents ranked by
    mean activation on the letter's train tokens minus on the others' (k-sparse probing); k
    grows while a probe on the top k latents gains more than f1_jump test F1."""
    train, test = task.x[~task.test], task.x[task.test]
    y_train, y_test = task.letters[~task.test], task.letters[task.test]
    onehot = F.one_hot(y_train, len(LETTERS)).double()
    sums, total = 0, 0
    for part, a in _encoded(sae, train, cfg.chunk):
        sums = sums + onehot[part].T @ a.double()
        total = total + a.double().sum(0)
    n_pos = onehot.sum(0)[:, None]
    diff = sums / n_pos.clamp_min(1) - (total - sums) / (len(train) - n_pos).clamp_min(1)
    ranked = diff.topk(min(cfg.max_k, diff.shape[1]), dim=1).indices
    cols = ranked.unique()
    a_train = torch.cat([a[:, cols] for _, a in _encoded(sae, train, cfg.chunk)])
    a_test = torch.cat([a[:, cols] for _, a in _encoded(sae, test, cfg.chunk)])
    where = torch.searchsorted(cols, ranked)
    return {
        c: _split_latents(
            a_train[:, where[c]], y_train == c, a_test[:, where[c]], y_test == c, ranked[c], cfg
        )
        for c in torch.nonzero(task.letter_ok).flatten().tolist()
    }


def _split_latents(
    a_train: Tensor, y_train: Tensor, a_test: Tensor, y_test: Tensor, ranked: Tensor, cfg
) -> list[int]:
    best, chosen = -math.inf, []
    for k in range(1, len(ranked) + 1):
        w, b = fit_logistic(a_train[:, :k], y_train[:, None], cfg.l2)
        f1 = f1_score((a_test[:, :k].double() @ w + b)[:, 0] > 0, y_test)
        if f1 <= best + cfg.f1_jump:
            break
        best, chosen = f1, ranked[:k].tolist()
    return chosen


def token_absorption(
    probe_proj: Tensor, contrib: Tensor, acts: Tensor, cos: Tensor, main: list[int], cfg
) -> tuple[Tensor, Tensor]:
    """Per token (probe_proj [m] = x . p, contrib [m, d_sae] = a_j (W_dec_j . p), acts
    [m, d_sae], cos [d_sae] = cos(W_dec_j, p)): (absorption fraction [m], full absorption
    [m] bool)."""
    is_main = torch.zeros(contrib.shape[1], dtype=torch.bool)
    is_main[main] = True
    main_proj = contrib[:, is_main].sum(1)
    candidates = contrib.masked_fill(is_main | (cos < cfg.absorber_cos), 0).clamp_min(0)
    absorbing = candidates.topk(min(cfg.max_absorbers, len(cos)), dim=1).values.sum(1)
    share = torch.where(probe_proj > 0, absorbing / probe_proj.clamp_min(EPS), 0)
    absorbed = torch.minimum(absorbing, probe_proj - main_proj)
    frac = (absorbed / (absorbed + main_proj).clamp_min(EPS)).clamp(0, 1)
    frac = torch.where(main_proj <= 0, 1.0, frac)
    frac = torch.where((main_proj >= probe_proj) | (share < cfg.proportion), 0.0, frac)
    top, top_latent = contrib.max(1)
    full = (acts[:, is_main] < EPS).all(1) & (cos[top_latent] >= cfg.full_cos)
    full &= (probe_proj > 0) & (top >= cfg.proportion * probe_proj)
    return frac, full


def sae_absorption(task: Task, sae: Sae, cfg: AbsorptionConfig) -> dict:
    """The absorption metrics of one SAE on a task (NaN when no letter can be evaluated)."""
    main = main_latents(task, sae, cfg)
    dirs = F.normalize(task.w.T, dim=1)
    w_dec = sae[1]["W_dec"].float()
    proj = dirs @ w_dec.T
    cos = proj / w_dec.norm(dim=1).clamp_min(EPS)
    x, y = task.x[task.test], task.letters[task.test]
    positive = (x @ task.w + task.b) > 0
    fracs, fulls = {c: [] for c in main}, {c: [] for c in main}
    for part, a in _encoded(sae, x, cfg.chunk):
        for c, latents in main.items():
            sel = (y[part] == c) & positive[part, c]
            frac, full = token_absorption(
                x[part][sel] @ dirs[c], a[sel] * proj[c], a[sel], cos[c], latents, cfg
            )
            fracs[c].append(frac)
            fulls[c].append(full)
    by_letter = {LETTERS[c]: float(torch.cat(fracs[c]).double().mean()) for c in main}
    full_rate = [float(torch.cat(fulls[c]).double().mean()) for c in main]
    return {
        "absorption": _mean(list(by_letter.values())),
        "absorption_full": _mean(full_rate),
        "absorption_split_latents": _mean([len(m) - 1 for m in main.values()]),
        "absorption_letters": len(main),
        "absorption_by_letter": by_letter,
    } | ({} if main else not_measured(_no_probe(task, cfg)))


def not_measured(reason: str) -> dict:
    """The metrics.json entry of an absorption not measured: why, in a few words."""
    return {"absorption_reason": reason}


def _no_probe(task: Task, cfg: AbsorptionConfig) -> str:
    return (
        f"0 letters with a probe of F1 >= {cfg.min_probe_f1:g} and {cfg.min_true_positives} "
        f"test true positives, over {len(task.x):,} alphabetic held-out tokens; 1 needed"
    )


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


@dataclass(frozen=True)
class LabelledTokens:
    """Held-out activations of one hook, the ids of their tokens and the tokenizer that
    decodes them: what the first-letter task is made of."""

    acts: Tensor
    token_ids: Tensor
    tokenizer: object


HeldOutTokens = Callable[[list[str]], Iterator[tuple[str, LabelledTokens]]]
"""Given module paths, each one's labelled held-out tokens (read or computed when asked)."""


def stored_tokens(uri: str, shards: str = "-1:", anonymous: bool = False) -> HeldOutTokens:
    """The held-out tokens of a collection: the selected shards of each hook, in stored
    order, and the tokenizer of the model the collection names."""
    from saesweep.evaluate.features import collection_tokenizer

    def read(hooks: list[str]) -> Iterator[tuple[str, LabelledTokens]]:
        collection = Collection.open(uri, anonymous)
        for hook in hooks:
            coll = collection.read(collection.choose(collection.hook(hook), shards), ("acts",))
            tokenizer = collection_tokenizer({"model": coll.meta["model"]} | coll.config, None)
            yield hook, LabelledTokens(coll.tensors["acts"], coll.tensors["token_ids"], tokenizer)

    return read


def absorption_of(
    runs: list, tokens: HeldOutTokens, cfg: AbsorptionConfig, recorded: dict
) -> list[dict]:
    """The absorption metrics of several SAEs (run directories or (cfg, state dict) pairs),
    each with `recorded` (where its tokens came from): per hook, the tokens are labelled and
    probed once for all its SAEs."""
    saes = [load_run(r) for r in runs]
    results: list[dict] = [{}] * len(saes)
    for hook, held_out in tokens(sorted({s[0]["hook_name"] for s in saes})):
        letters = first_letters(held_out.token_ids, held_out.tokenizer)
        task = (
            make_task(held_out.acts, held_out.token_ids, letters, cfg)
            if letters.ge(0).any()
            else None
        )
        for i, sae in enumerate(saes):
            if sae[0]["hook_name"] == hook:
                results[i] = _hook_absorption(task, sae, cfg, len(letters)) | recorded
    return results


def _hook_absorption(task: Task | None, sae: Sae, cfg: AbsorptionConfig, n_read: int) -> dict:
    if task is None:
        return not_measured(f"0 alphabetic tokens among {n_read:,} held-out tokens") | {
            "absorption_tokens": 0
        }
    return sae_absorption(task, sae, cfg) | {"absorption_tokens": len(task.x)}


def absorption_metrics(
    runs: list,
    uri: str,
    shards: str = "-1:",
    cfg: AbsorptionConfig | None = None,
    anonymous: bool = False,
) -> list[dict]:
    """The absorption metrics of several SAEs on a collection's held-out shards."""
    tokens = stored_tokens(uri, shards, anonymous)
    return absorption_of(runs, tokens, cfg or AbsorptionConfig(), {"absorption_shards": shards})


def add_absorption(
    run_dirs: list[Path],
    uri: str,
    shards: str = "-1:",
    cfg: AbsorptionConfig | None = None,
    anonymous: bool = False,
) -> list[dict]:
    """Add the absorption metrics on a collection's held-out shards to each run's
    metrics.json."""
    dirs = [Path(d) for d in run_dirs]
    results = absorption_metrics(dirs, uri, shards, cfg, anonymous)
    merge_metrics(dirs, results)
    return results
