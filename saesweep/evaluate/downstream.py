"""Downstream fidelity: splice an SAE's reconstruction into the model and measure the damage.

Held-out sequences are rebuilt from a collection's stored token ids (no new text): tokens are
grouped by seq_id, ordered by position, and the tokenizer's special tokens are put back where
the collection left them out. The SAE's reconstruction replaces the hooked module's output at
the STORED positions only (the tokens the SAE was trained on); special tokens keep their clean
activations. Zero ablation zeroes the same positions. A transcoder replaces its target hook's
output with its prediction from its input hook's output in the same forward pass (the input
hook must run first). See docs/evaluation.md for the formulas.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from beartype import beartype
from jaxtyping import Bool, Float, jaxtyped
from torch import Tensor, nn

from saesweep.collect.config import CollectConfig
from saesweep.collect.model import add_hook, load_model
from saesweep.collect.sequences import Sequence, make_batch, special_template
from saesweep.collect.source import split_sequences
from saesweep.errors import UserError
from saesweep.format.collection import Collection, HookTensors
from saesweep.format.rundir import load_sae, merge_metrics
from saesweep.sae.export import apply_exported

Run = str | Path | tuple[dict, dict[str, Tensor]]
Positions = Literal["stored", "all"]


# ----- the SAE ----------------------------------------------------------------------------------


def load_run(run: Run) -> tuple[dict, dict[str, Tensor]]:
    """(cfg, state dict) of a run directory, or the pair itself."""
    if isinstance(run, tuple):
        return run
    path = Path(run)
    if not (path / "cfg.json").exists():
        raise UserError(f"{path} is not an SAE run directory (no cfg.json)")
    return load_sae(path)


def rebuild_sequences(
    tensors: dict[str, Tensor],
    tokenizer,
    exclude_special: bool,
    limit: int | None = None,
    *,
    ctx_len: int,
) -> list[Sequence]:
    """The model inputs of the stored sequences, in seq_id order (at most `limit`).

    With exclude_special the input is prefix + stored tokens + suffix (the tokenizer's
    special_template); a sequence whose stored positions are not exactly the content positions
    (a special token inside the text left a gap), or that is longer than the collection's
    ctx_len (which no collection writes), is skipped."""
    prefix, suffix = special_template(tokenizer) if exclude_special else ([], [])
    out = []
    for seq_id, tokens, positions in _grouped(tensors):
        expected = torch.arange(len(prefix), len(prefix) + len(tokens))
        too_long = len(prefix) + len(tokens) + len(suffix) > ctx_len
        if too_long or not torch.equal(positions, expected):
            continue
        ids = prefix + tokens.tolist() + suffix
        stored = [False] * len(prefix) + [True] * len(tokens) + [False] * len(suffix)
        out.append(Sequence(seq_id, ids, stored))
        if limit is not None and len(out) >= limit:
            break
    return out


def _grouped(tensors: dict[str, Tensor]) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(seq_id, token ids, positions) per sequence, positions ascending."""
    seq_ids, positions = tensors["seq_ids"].long(), tensors["positions"].long()
    order = torch.argsort(seq_ids * (1 << 24) + positions)
    seq_ids, positions = seq_ids[order], positions[order]
    tokens = tensors["token_ids"].long()[order]
    ids, counts = torch.unique_consecutive(seq_ids, return_counts=True)
    start = 0
    for seq_id, n in zip(ids.tolist(), counts.tolist(), strict=True):
        yield seq_id, tokens[start : start + n], positions[start : start + n]
        start += n


# ----- splicing ---------------------------------------------------------------------------------


class Splice:
    """A hook (collect.model.add_hook) that rewrites the tensor at one hook path at the
    positions of `mask` with `fn`, or leaves it alone while fn is None."""

    def __init__(self, model: nn.Module, path: str):
        self.fn: Callable[[Tensor], Tensor] | None = None
        self.mask: Tensor | None = None
        self.handle = add_hook(model, path, self._hook)

    def _hook(self, h: Tensor) -> Tensor | None:
        if self.fn is None:
            return None
        new = h.clone()
        rows = h[self.mask] if self.mask is not None else h.reshape(-1, h.shape[-1])
        out = self.fn(rows).to(h.dtype)
        if self.mask is not None:
            new[self.mask] = out
        else:
            new = out.reshape(h.shape)
        return new

    @contextlib.contextmanager
    def using(self, fn: Callable[[Tensor], Tensor] | None, mask: Tensor | None):
        self.fn, self.mask = fn, mask
        try:
            yield
        finally:
            self.fn, self.mask = None, None

    def remove(self) -> None:
        self.handle.remove()


def sae_fn(cfg: dict, sd: dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
    dtype = sd["W_enc"].dtype
    return lambda x: apply_exported(cfg, sd, x.to(dtype))


def zero_fn(x: Tensor) -> Tensor:
    return torch.zeros_like(x)


def is_causal(model: nn.Module) -> bool:
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


# ----- scores -----------------------------------------------------------------------------------


@jaxtyped(typechecker=beartype)
def token_ce(
    logits: Float[Tensor, "B T V"], input_ids: Tensor, attention_mask: Tensor
) -> tuple[float, int]:
    """(sum of next-token cross-entropies in float64, number of predictions) over real tokens."""
    valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).bool()
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    return float(ce[valid].double().sum()), int(valid.sum())


@jaxtyped(typechecker=beartype)
def token_kl(
    clean: Float[Tensor, "B T V"], other: Float[Tensor, "B T V"], valid: Bool[Tensor, "B T"]
) -> float:
    """Sum over real positions of KL(softmax(clean) || softmax(other)), in float64."""
    p = clean[valid].double().log_softmax(-1)
    q = other[valid].double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum())


@jaxtyped(typechecker=beartype)
def hidden_sse(
    clean: Float[Tensor, "B T d"], other: Float[Tensor, "B T d"], valid: Bool[Tensor, "B T"]
) -> float:
    """Sum over real positions of ||other - clean||^2, in float64."""
    return float((other[valid].double() - clean[valid].double()).pow(2).sum())


class Totals:
    """float64 sums of one evaluation: per condition CE/KL (causal) or SSE (encoder)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, value: float, count: int) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value
        self.counts[key] = self.counts.get(key, 0) + count

    def mean(self, key: str) -> float:
        return self.sums[key] / max(self.counts[key], 1)


# ----- the evaluation ---------------------------------------------------------------------------


def downstream_metrics(
    run: Run,
    collection_uri: str,
    n_sequences: int = 64,
    device: str = "cpu",
    *,
    shards: str = "-1:",
    batch_size: int = 8,
    positions: Positions = "stored",
    model: str | None = None,
    anonymous: bool = False,
) -> dict:
    """Downstream fidelity of one SAE on n_sequences held-out sequences of the collection.

    Causal LMs: ce_clean, ce_sae, ce_zero, loss_recovered, kl. Encoders: final_mse_sae,
    final_mse_zero, final_recovered. `shards` picks the held-out shards (the trainer's default
    validation slice is '-1:'); `model` overrides the model named by the collection."""
    return downstream_metrics_many(
        [run], collection_uri, n_sequences, device, shards=shards, batch_size=batch_size,
        positions=positions, model=model, anonymous=anonymous,
    )[0]  # fmt: skip


def downstream_metrics_many(
    runs: list[Run],
    collection_uri: str,
    n_sequences: int = 64,
    device: str = "cpu",
    *,
    shards: str = "-1:",
    batch_size: int = 8,
    positions: Positions = "stored",
    model: str | None = None,
    anonymous: bool = False,
) -> list[dict]:
    """downstream_metrics of several SAEs, sharing the model, the data and the clean pass."""
    saes = [load_run(r) for r in runs]
    hooks = sorted({_hooks(cfg)[0] for cfg, _ in saes})
    text = text_from_collection(
        collection_uri, hooks, n_sequences, device, shards=shards, model=model,
        anonymous=anonymous,
    )  # fmt: skip
    return measure(text, saes, n_sequences, batch_size, positions)


@dataclass
class HeldOutText:
    """What downstream fidelity runs on, prepared once for any number of evaluations: the
    model, its tokenizer and, by input hook (as SAE configs name it), held-out sequences, the
    module path and the width; `source` says how the sequences were chosen (it is recorded
    in the results)."""

    lm: nn.Module
    tokenizer: object
    device: str
    seqs: dict[str, list[Sequence]]
    paths: dict[str, str]
    widths: dict[str, int]
    source: dict


def text_from_collection(
    uri: str,
    hooks: list[str],
    n_sequences: int,
    device: str = "cpu",
    *,
    shards: str = "-1:",
    model: str | None = None,
    anonymous: bool = False,
) -> HeldOutText:
    """The first n_sequences complete sequences of each hook's selected shards, rebuilt from
    their stored token ids, and the model the collection names (or `model`)."""
    collection = Collection.open(uri, anonymous)
    colls = {h: collection.read(collection.choose(collection.hook(h), shards)) for h in hooks}
    lm, tokenizer = _load_model(next(iter(colls.values())), model, device)
    seqs = {}
    for hook, coll in colls.items():
        exclude_special = coll.meta.get("exclude_special", True)
        seqs[hook] = rebuild_sequences(
            coll.tensors, tokenizer, exclude_special, n_sequences, ctx_len=coll.meta["ctx_len"]
        )
        if not seqs[hook]:
            raise UserError(f"{uri} shards {shards!r} hold no complete sequence")
    paths = {hook: coll.meta["hook"] for hook, coll in colls.items()}
    widths = {hook: coll.meta["d_model"] for hook, coll in colls.items()}
    source = {"downstream_shards": shards}
    return HeldOutText(lm, tokenizer, device, seqs, paths, widths, source)


def text_from_config(
    cfg: CollectConfig, hooks: list[str], n_sequences: int, device: str = "cpu"
) -> HeldOutText:
    """The first n_sequences sequences of a collection config's held-out documents (what a
    live source validates on) for each of `hooks` (module paths), and the config's model."""
    lm, tokenizer = load_model(
        cfg.model, cfg.revision, cfg.model_dtype, device, trust_remote_code=cfg.trust_remote_code
    )
    seqs = list(itertools.islice(split_sequences(cfg, tokenizer, "val"), n_sequences))
    if not seqs:
        raise UserError(f"the held-out documents of {cfg.dataset} hold no sequence")
    width = int(lm.config.hidden_size)
    return HeldOutText(
        lm, tokenizer, device, dict.fromkeys(hooks, seqs), {h: h for h in hooks},
        dict.fromkeys(hooks, width), {"downstream_split": "val"},
    )  # fmt: skip


def measure(
    text: HeldOutText,
    saes: list[tuple[dict, dict[str, Tensor]]],
    n_sequences: int,
    batch_size: int = 8,
    positions: Positions = "stored",
) -> list[dict]:
    """Downstream fidelity of each SAE (cfg, state dict) on the first n_sequences sequences
    of `text` for its input hook; SAEs reading one hook (and predicting one target) share
    the clean pass."""
    results: list[dict | None] = [None] * len(saes)
    for hook, target in sorted({_hooks(cfg) for cfg, _ in saes}, key=str):
        if hook not in text.seqs:
            raise UserError(f"no held-out sequences were prepared for hook {hook}")
        members = [i for i, (cfg, _) in enumerate(saes) if _hooks(cfg) == (hook, target)]
        _check_width(hook, text.widths[hook], [saes[i][0] for i in members])
        seqs = text.seqs[hook][:n_sequences]
        sds = [{k: v.to(text.device) for k, v in saes[i][1].items()} for i in members]
        fns = [sae_fn(saes[i][0], sd) for i, sd in zip(members, sds, strict=True)]
        hooks = (text.paths[hook], target)
        totals = _evaluate(text, hooks, seqs, fns, batch_size, positions)
        chosen = text.source | {
            "downstream_sequences": len(seqs),
            "downstream_positions": positions,
        }
        for j, i in enumerate(members):
            results[i] = _summarize(totals, j, is_causal(text.lm)) | chosen
    return results  # type: ignore[return-value]


def _hooks(cfg: dict) -> tuple[str, str | None]:
    """(input hook, target hook or None) of an SAE's cfg.json."""
    return cfg["hook_name"], cfg.get("hook_name_out")


def _load_model(coll: HookTensors, override: str | None, device: str):
    """The model a collection names loads from local files and the cache only (a collection
    may come from anyone); one the caller names explicitly may be downloaded."""
    name = override or coll.config.get("model") or coll.meta["model"]
    dtype = coll.config.get("model_dtype", "float32")
    return load_model(
        name, coll.config.get("revision"), dtype, device, download=override is not None
    )


def _check_width(hook: str, width: int, cfgs: list[dict]) -> None:
    for cfg in cfgs:
        if cfg["d_in"] != width:
            raise UserError(f"the SAE has d_in={cfg['d_in']} but hook {hook} has width {width}")


@torch.inference_mode()
def _evaluate(
    text: HeldOutText,
    hooks: tuple[str, str | None],
    seqs: list[Sequence],
    fns: list[Callable[[Tensor], Tensor]],
    batch_size: int,
    positions: Positions,
) -> Totals:
    """hooks: (input hook, target hook or None); with a target the fns are transcoders,
    splicing the target with their prediction from the input hook of the same pass."""
    lm, tokenizer, device = text.lm, text.tokenizer, text.device
    hook, target = hooks
    capture = Capture(lm, hook) if target is not None else None
    splice, totals = Splice(lm, target or hook), Totals()
    if capture is not None:
        fns = [_from_input(capture, splice, fn, hook, target) for fn in fns]
    try:
        for start in range(0, len(seqs), batch_size):
            batch = make_batch(seqs[start : start + batch_size], tokenizer.pad_token_id or 0)
            ids, attn = batch.input_ids.to(device), batch.attention_mask.to(device)
            mask = batch.stored.to(device) if positions == "stored" else attn.bool()

            def run(fn, ids=ids, attn=attn, mask=mask):
                with splice.using(fn, mask):
                    return _final(lm, ids, attn)

            clean = run(None)
            _accumulate(totals, "zero", clean, run(zero_fn), ids, attn, lm)
            for j, fn in enumerate(fns):
                _accumulate(totals, f"sae{j}", clean, run(fn), ids, attn, lm)
            if is_causal(lm):
                totals.add("ce_clean", *token_ce(clean, ids, attn))
    finally:
        splice.remove()
        if capture is not None:
            capture.remove()
    return totals


class Capture:
    """Hooks keeping the tensor at one hook path of the model's current forward pass (None
    until the hook has run in it)."""

    def __init__(self, model: nn.Module, path: str):
        self.out: Tensor | None = None
        self.handles = [
            model.register_forward_pre_hook(self._reset),
            add_hook(model, path, self._keep),
        ]

    def _reset(self, module, inputs):
        self.out = None

    def _keep(self, h: Tensor) -> None:
        self.out = h

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _from_input(capture: Capture, splice: Splice, fn, hook: str, target: str):
    """A splice function for the target hook that applies the transcoder `fn` to the input
    hook's rows of the same forward pass (at the splice's positions)."""

    def apply(rows: Tensor) -> Tensor:
        if capture.out is None:
            raise UserError(f"the transcoder's input hook {hook} does not run before {target}")
        x = capture.out
        return fn(x[splice.mask] if splice.mask is not None else x.reshape(-1, x.shape[-1]))

    return apply


def _final(lm: nn.Module, ids: Tensor, attn: Tensor) -> Tensor:
    """Logits (causal LM) or final hidden states (encoder), float32."""
    out = lm(input_ids=ids, attention_mask=attn, use_cache=False)
    return (out.logits if is_causal(lm) else out.last_hidden_state).float()


def _accumulate(
    totals: Totals, key: str, clean: Tensor, other: Tensor, ids: Tensor, attn: Tensor, lm
) -> None:
    valid = attn.bool()
    if is_causal(lm):
        totals.add(f"ce_{key}", *token_ce(other, ids, attn))
        totals.add(f"kl_{key}", token_kl(clean, other, valid), int(valid.sum()))
    else:
        n = int(valid.sum()) * clean.shape[-1]
        totals.add(f"mse_{key}", hidden_sse(clean, other, valid), n)


def _summarize(totals: Totals, j: int, causal: bool) -> dict:
    if causal:
        clean, sae, zero = (totals.mean(k) for k in ("ce_clean", f"ce_sae{j}", "ce_zero"))
        return {
            "ce_clean": clean,
            "ce_sae": sae,
            "ce_zero": zero,
            "loss_recovered": (zero - sae) / (zero - clean) if zero != clean else float("nan"),
            "kl": totals.mean(f"kl_sae{j}"),
            "kl_zero": totals.mean("kl_zero"),
        }
    sae, zero = totals.mean(f"mse_sae{j}"), totals.mean("mse_zero")
    return {
        "final_mse_sae": sae,
        "final_mse_zero": zero,
        "final_recovered": 1 - sae / zero if zero > 0 else float("nan"),
    }


def add_downstream(
    run_dirs: list[Path],
    uri: str,
    n_sequences: int = 64,
    device: str = "cpu",
    *,
    shards: str = "-1:",
    batch_size: int = 8,
    anonymous: bool = False,
) -> list[dict]:
    """Add the downstream metrics to each run's metrics.json (rewritten atomically)."""
    dirs = [Path(d) for d in run_dirs]
    results = downstream_metrics_many(
        dirs, uri, n_sequences, device, shards=shards, batch_size=batch_size, anonymous=anonymous
    )
    merge_metrics(dirs, results)
    return results
