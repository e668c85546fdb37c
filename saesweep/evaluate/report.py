"""Sweep results: health verdicts, a table, results.csv, pareto.png and report.html.

uv run python -m saesweep.evaluate.report SWEEP_DIR [SWEEP_DIR ...]
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from saesweep.configtools import parse_command, positional, spelled_out
from saesweep.errors import UserError, exit_on_user_error
from saesweep.evaluate.health import HealthConfig, assess, fidelity_key
from saesweep.format.rundir import check_unit, write_json
from saesweep.sae.config import SAEConfig
from saesweep.sae.registry import ARCHITECTURES, section_readers

COLUMNS = (
    "run",
    "arch",
    "d_sae",
    "k",
    "lr",
    "fvu",
    "l0",
    "dead_pct",
    "mse",
    "loss_recovered",
    "absorption",
    "absorption_letters",
    "health",
    "health_reasons",
    "tokens_seen",
    "failed",
    "tag",
    "sweep",
)


def load_results(sweep_dirs: list[Path], health: HealthConfig | None = None) -> list[dict]:
    """One row per run: COLUMNS, with its health verdict under `health` (default thresholds
    when None), plus "_path" (its metrics.json), "_metrics" (its contents), "_health" (the
    Health) and "_params" (its configuration, see run_params)."""
    rows = []
    for sweep_dir in sweep_dirs:
        for path in sorted(sweep_dir.glob("runs/*/metrics.json")):
            metrics = json.loads(path.read_text())
            verdict = assess(metrics, health)
            params = run_params(path.parent, metrics)
            row = {c: metrics.get(c, "") for c in COLUMNS} | {
                "loss_recovered": metrics.get(fidelity_key(metrics), ""),
                "health": verdict.verdict,
                "health_reasons": verdict.summary(),
                "sweep": sweep_dir.name,
            }
            private = {"_path": path, "_metrics": metrics, "_health": verdict}
            rows.append(row | private | {"_params": params})
    return rows


IGNORED = ("seed", "tag")
"""Config fields never taken as what a sweep varies: the seed differs in every run (base +
index) and the tag is a label."""
RESOLVED = (
    "lr",
    "sae.arch",
    "sae.d_sae",
    "sae.exp_factor",
    "sae.k",
    "train_data.hook",
    "train_data.layer",
)
"""Config fields replaced by the values the run resolved: lr, arch, d_sae, k (None where the
architecture has none) from metrics.json, hook (the module read, for a hook or a layer) from
cfg.json."""


def run_params(run_dir: Path, metrics: dict) -> dict:
    """The run's configuration as flat dotted keys (`objective.sparsity_coeff`,
    `train_data.layer`), from cfg.json's saesweep_config, with the resolved lr, arch, d_sae, k
    and hook."""
    cfg_path = run_dir / "cfg.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    check_unit(run_dir, cfg, metrics)
    tree = cfg.get("saesweep_config", {})
    if isinstance(tree.get("sae"), dict):  # older runs spell architecture options flat
        tree = tree | {"sae": spelled_out(SAEConfig, tree["sae"])}
    flat = _flatten(tree)
    params = {k: v for k, v in flat.items() if k not in IGNORED + RESOLVED}
    resolved = {k: metrics.get(k) for k in ("arch", "lr", "d_sae", "k")}
    return params | resolved | {"hook": cfg.get("hook_name")}


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


FIRST = ("arch", "lr", "d_sae", "k", "hook")
"""Varied parameters listed first, in this order; the others follow alphabetically."""

TOPK_FAMILY = ("topk", "batchtopk", "matryoshka", "switch")
ARCH_SPECIFIC = {
    "sae.aux_k": (*TOPK_FAMILY, "crosscoder"),
    "sae.aux_coeff": (*TOPK_FAMILY, "crosscoder"),
    "objective.sparsity_coeff": ("relu", "jumprelu", "clt", "crosscoder"),
    "objective.target_l0": ("jumprelu", "crosscoder"),
    "objective.load_balance_coeff": ("switch",),
}
"""Shared parameters that only some architectures read (SAEConfig's and ObjectiveConfig's
docstrings), and which (a CLT's or crosscoder's by its architecture, whatever its
activation); a parameter set to None (k of ReLU, an architecture's default
init_encoder_scale) applies to no run either."""


def readers(param: str) -> tuple[str, ...] | None:
    """The architectures that read `param` (an architecture's section `sae.<arch>.<field>`:
    registry.section_readers), None for all."""
    parts = param.split(".")
    if len(parts) == 3 and parts[0] == "sae" and parts[1] in ARCHITECTURES:
        return section_readers(parts[1])
    return ARCH_SPECIFIC.get(param)


def applies(row: dict, param: str) -> bool:
    """Whether the run reads the parameter: not None, and of its architecture's."""
    archs = readers(param)
    return row["_params"].get(param) is not None and (archs is None or row["arch"] in archs)


def varied_params(rows: list[dict]) -> list[str]:
    """The configuration keys that take at least two values among the runs they apply to;
    an architecture-specific one, among the runs of one architecture."""
    keys = {k for r in rows for k in r["_params"]}
    ordered = [k for k in FIRST if k in keys] + sorted(keys - set(FIRST))
    return [k for k in ordered if _varies(rows, k)]


def _varies(rows: list[dict], param: str) -> bool:
    apply = [r for r in rows if applies(r, param)]
    groups = [[r for r in apply if r["arch"] == a] for a in {r["arch"] for r in apply}]
    if readers(param) is None:
        groups = [apply]
    return any(len({json.dumps(r["_params"][param]) for r in g}) > 1 for g in groups)


BEST = {"fvu": min, "mse": min, "dead_pct": min, "loss_recovered": max, "absorption": min}
"""Metrics with a best run, and which end is best (L0 has none: it is chosen, not won)."""


def best_runs(rows: list[dict]) -> dict[str, dict]:
    """metric -> the best row among runs that did not fail and measured the metric."""
    best = {}
    for metric, pick in BEST.items():
        ok = [r for r in rows if not r["failed"] and _finite(r[metric])]
        if ok:
            best[metric] = pick(ok, key=lambda r, m=metric: r[m])
    return best


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value) -> bool:
    return _number(value) and math.isfinite(value)


def record_health(rows: list[dict], health: HealthConfig | None = None) -> None:
    """Write each row's verdict into its run's metrics.json (atomically): `health`,
    `health_reasons`, `health_not_measured`, `health_notes` and the `health_thresholds` it was
    judged by."""
    thresholds = dataclasses.asdict(health or HealthConfig())
    for row in rows:
        verdict = row["_health"]
        fields = {
            "health": verdict.verdict,
            "health_reasons": list(verdict.reasons),
            "health_not_measured": list(verdict.not_measured),
            "health_notes": list(verdict.notes),
            "health_thresholds": thresholds,
        }
        write_json(row["_path"], row["_metrics"] | fields)


RECOMMENDATION_RULE = (
    "Recommended run per architecture: among its runs that pass health (those that warn when "
    "none passes), the highest loss recovered, or the lowest FVU where loss recovered is not "
    "measured."
)


@dataclass(frozen=True)
class Recommendation:
    """An architecture's recommended run (None when every run of it failed) and why."""

    arch: str
    row: dict | None
    why: str

    def line(self) -> str:
        run = self.row["run"] if self.row else "none"
        return f"{self.arch}: {run}: {self.why}"


def recommend(rows: list[dict]) -> list[Recommendation]:
    """RECOMMENDATION_RULE applied to each architecture (in name order)."""
    return [_recommend(arch, [r for r in rows if r["arch"] == arch]) for arch in _archs(rows)]


def _archs(rows: list[dict]) -> list[str]:
    return sorted({r["arch"] for r in rows})


def _recommend(arch: str, runs: list[dict]) -> Recommendation:
    for level, verb in (("pass", "passes"), ("warn", "warns")):
        pool = [r for r in runs if r["health"] == level]
        metric = "loss_recovered" if measured(pool, "loss_recovered") else "fvu"
        pool = [r for r in pool if _finite(r[metric])]
        if pool:
            best = BEST[metric](pool, key=lambda r, m=metric: r[m])
            end = "highest" if metric == "loss_recovered" else "lowest"
            among = f"the {end} of {len(pool)} that {level}" if len(pool) > 1 else "its only one"
            health = f"{verb} health" if level == "pass" else "no run passes health; it warns"
            if level == "warn":
                health += f" ({best['health_reasons']})"
            return Recommendation(
                arch,
                best,
                f"{health}; {TITLES[metric]} {_fmt(best[metric])} ({among}); "
                f"FVU {_fmt(best['fvu'])} at L0 {_fmt(best['l0'])}",
            )
    return Recommendation(arch, None, f"every one of its {len(runs)} runs fails health")


TABLE_HEADER = ("run", "arch", "d_sae", "k", "lr", "FVU", "L0", "dead %", "loss recovered")
"""The printed table's columns, then health."""


def format_table(rows: list[dict]) -> str:
    """The printed table, one line per run that did not pass, with its reasons, then the
    recommended run per architecture."""
    header, printed = (*TABLE_HEADER, "health"), [_printed(r) for r in rows]
    widths = [max(len(p[0]) for p in printed) + 2] + [
        max(10, len(h), *(len(p[i]) for p in printed)) + 1 for i, h in enumerate(header) if i
    ]
    lines = [_line(header, widths)] + [_line(p, widths) for p in printed]
    unhealthy = [r for r in rows if r["_health"].reasons]
    lines += [f"{r['run']}: {r['health']}: {r['health_reasons']}" for r in unhealthy]
    lines.append(RECOMMENDATION_RULE)
    lines += [f"  {rec.line()}" for rec in recommend(rows)]
    return "\n".join(lines)


def _printed(r: dict) -> tuple[str, ...]:
    return (
        r["run"],
        r["arch"],
        str(r["d_sae"]),
        "-" if r["k"] in ("", None) else str(r["k"]),
        f"{r['lr']:.2e}",
        f"{r['fvu']:.4f}",
        f"{r['l0']:.1f}",
        f"{r['dead_pct']:.1f}",
        f"{r['loss_recovered']:.3f}" if r["loss_recovered"] != "" else "-",
        r["health"],
    )


def _line(cells: tuple[str, ...], widths: list[int]) -> str:
    return f"{cells[0]:<{widths[0]}s}" + "".join(
        f"{c:>{w}s}" for c, w in zip(cells[1:], widths[1:], strict=True)
    )


def pareto_front(rows: list[dict], metric: str = "fvu") -> list[dict]:
    """Runs no other run beats on both L0 and `metric` (its better end as in BEST)."""
    sign = -1 if BEST[metric] is max else 1
    ok = [(r["l0"], sign * r[metric], r) for r in rows if not r["failed"] and _finite(r[metric])]
    return [
        r
        for l0, m, r in ok
        if not any(o_l0 <= l0 and o_m <= m and (o_l0, o_m) != (l0, m) for o_l0, o_m, _ in ok)
    ]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


FONT = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 9}
"""Type that reads at a laptop's width, where the report shows an image at about 1,300 px."""


def measured(rows: list[dict], metric: str) -> bool:
    return any(_finite(r[metric]) for r in rows)


def plot_pareto(rows: list[dict], path: Path) -> None:
    """L0 against FVU, and against loss recovered and absorption where measured: one series per
    architecture, frontiers dashed, the best run starred."""
    plt = _pyplot()
    metrics = ["fvu"] + [m for m in ("loss_recovered", "absorption") if measured(rows, m)]
    best = best_runs(rows)
    with plt.rc_context(FONT):
        fig, axes = plt.subplots(
            1, len(metrics), figsize=(6.5 * len(metrics), 5), dpi=110, squeeze=False
        )
        for ax, metric in zip(axes[0], metrics, strict=True):
            _scatter(ax, rows, metric, best.get(metric))
        fig.tight_layout()
        fig.savefig(path)
    plt.close(fig)


TITLES = {
    "fvu": "FVU",
    "loss_recovered": "loss recovered",
    "l0": "L0",
    "dead_pct": "dead latents %",
    "absorption": "absorption",
}
LABELS = {
    "fvu": "FVU (fraction of variance unexplained, lower is better)",
    "loss_recovered": "loss recovered (higher is better)",
    "absorption": "mean absorption fraction (lower is better)",
}


def _scatter(ax, rows: list[dict], metric: str, best: dict | None) -> None:
    ok = [r for r in rows if not r["failed"] and _finite(r[metric])]
    for arch in sorted({r["arch"] for r in ok}):
        pts = [r for r in ok if r["arch"] == arch]
        ys = [r[metric] for r in pts]
        ax.scatter([r["l0"] for r in pts], ys, label=arch, s=45, alpha=0.85, c=_color(rows, arch))
    front = sorted(pareto_front(rows, metric), key=lambda r: r["l0"])
    if front:
        ax.plot([r["l0"] for r in front], [r[metric] for r in front], "k--", lw=1, label="frontier")
    _star(ax, best and best["l0"], best and best[metric], metric)
    _log_x(ax, [r["l0"] for r in ok])
    ax.set_xlabel("L0 (active latents per token, log scale)")
    ax.set_ylabel(LABELS[metric])
    ax.set_title(f"L0 against {TITLES[metric]}, held-out activations")
    ax.grid(alpha=0.3)
    ax.legend()


LOG_MANTISSAS = (
    (1,),
    (1, 2, 5),
    (1, 1.5, 2, 3, 4, 5, 6, 8),
    (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9),
)
"""Tick values of a log axis, each row denser than the one before: 10^n, 1-2-5, then more."""
LOG_PAD = 1.25
"""A log axis reaches this factor beyond the smallest and largest value."""


def log_ticks(low: float, high: float) -> list[float]:
    """Round tick values within [low, high] (low > 0): the sparsest row of LOG_MANTISSAS that
    gives three, else the densest's (two or fewer, when the range is narrow)."""
    decades = range(math.floor(math.log10(low)), math.floor(math.log10(high)) + 1)
    for mantissas in LOG_MANTISSAS:
        ticks = [float(f"{m}e{e}") for e in decades for m in mantissas]
        ticks = [t for t in ticks if low <= t <= high]
        if len(ticks) >= 3:
            break
    return ticks


def _log_x(ax, values: list[float]) -> None:
    """A log x axis over `values` (positive) with every tick labelled, however narrow the
    range: matplotlib's own labels only 10^n, none when the values lie within a decade."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    if not values:
        return
    low, high = min(values) / LOG_PAD, max(values) * LOG_PAD
    ticks = log_ticks(low, high)
    ax.set_xlim(low, high)
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def _color(rows: list[dict], arch: str) -> str:
    """The same color for an architecture in every panel."""
    return f"C{sorted({r['arch'] for r in rows}).index(arch) % 10}"


def _star(ax, x, y, metric: str) -> None:
    if x is not None:
        ax.scatter(
            [x],
            [y],
            marker="*",
            s=260,
            facecolor="none",
            edgecolor="k",
            lw=1.3,
            label=f"best {TITLES[metric]}",
            zorder=3,
        )


SWEPT_METRICS = ("fvu", "loss_recovered", "absorption", "l0", "dead_pct")
"""The metrics plotted against each varied parameter (loss_recovered, absorption: where
measured)."""
GRID_WIDTH_IN, GRID_ROW_IN, GRID_DPI, GRID_MAX_COLUMNS = 13.6, 3.4, 100, 4
"""The grid of metrics against parameters: 1,360 px wide (a laptop's width) whatever its
number of panels, 340 px per row, at most 4 panels in a row."""


def plot_sweep(rows: list[dict], params: list[str], path: Path) -> None:
    """A grid: each parameter the sweep varies against each metric, a parameter's panels on
    its own row(s), one series per architecture, the best run per metric starred."""
    plt = _pyplot()
    metrics = [m for m in SWEPT_METRICS if measured(rows, m)]
    columns = len(metrics) if len(metrics) <= GRID_MAX_COLUMNS else 3
    per_param = -(-len(metrics) // columns)
    best = best_runs(rows)
    with plt.rc_context(FONT):
        fig, axes = plt.subplots(
            per_param * len(params),
            columns,
            figsize=(GRID_WIDTH_IN, GRID_ROW_IN * per_param * len(params)),
            dpi=GRID_DPI,
            squeeze=False,
        )
        for j, param in enumerate(params):
            axis = _param_axis(rows, param)
            panels = axes[j * per_param : (j + 1) * per_param].flat
            for ax, metric in itertools.zip_longest(panels, metrics):
                if metric is None:
                    ax.remove()
                    continue
                _against(ax, rows, axis, metric, best.get(metric))
                ax.set_xlabel(param)
        fig.tight_layout()
        fig.savefig(path)
    plt.close(fig)


def _param_axis(rows: list[dict], param: str) -> dict:
    """How to place a parameter on an x axis: {"x": run -> position (None: not set, or not
    read by the run's architecture), "ticks": categorical labels or None, "log": whether
    numeric values span a decade or more}."""
    values = {r["run"] + r["sweep"]: r["_params"][param] for r in rows if applies(r, param)}
    values |= {r["run"] + r["sweep"]: None for r in rows if not applies(r, param)}
    numbers = [v for v in values.values() if v is not None]
    if numbers and all(_finite(v) for v in numbers):
        log = min(numbers) > 0 and max(numbers) / min(numbers) >= 10
        return {"x": values, "ticks": None, "log": log}
    labels = sorted({json.dumps(v) if not isinstance(v, str) else v for v in numbers}, key=_natural)
    where = {label: i for i, label in enumerate(labels)}
    x = {
        k: None if v is None else where[v if isinstance(v, str) else json.dumps(v)]
        for k, v in values.items()
    }
    return {"x": x, "ticks": labels, "log": False}


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _against(ax, rows: list[dict], axis: dict, metric: str, best: dict | None) -> None:
    placed = [(axis["x"][r["run"] + r["sweep"]], r) for r in rows if not r["failed"]]
    placed = [(x, r) for x, r in placed if x is not None and _finite(r[metric])]
    for arch in sorted({r["arch"] for _, r in placed}):
        pts = [(x, r[metric]) for x, r in placed if r["arch"] == arch]
        ax.scatter(*zip(*pts, strict=True), label=arch, s=30, alpha=0.85, c=_color(rows, arch))
    hit = [x for x, r in placed if best is not None and r is best]
    _star(ax, hit[0] if hit else None, best and best[metric], metric)
    if axis["log"]:
        _log_x(ax, [x for x, _ in placed])
    if axis["ticks"] is not None:
        ax.set_xticks(range(len(axis["ticks"])), axis["ticks"], rotation=20)
    ax.set_ylabel(TITLES[metric])
    ax.grid(alpha=0.3)
    if placed:
        ax.legend()


STYLE = (
    "body{font-family:sans-serif;margin:1em 2em}img{max-width:100%}"
    "#recommended li{margin:0.3em 0}.wrap{overflow-x:auto}"
    "table{border-collapse:collapse;font-size:13px}td,th{padding:2px 6px;text-align:right;"
    "border-bottom:1px solid #ddd}th{cursor:pointer;background:#f3f3f3;position:sticky;top:0;"
    "vertical-align:bottom;max-width:7em}"
    "th[data-dir=asc]::after{content:' \\25b2'}th[data-dir=desc]::after{content:' \\25bc'}"
    "td.reasons{text-align:left;min-width:14em}td.best{font-weight:bold;background:#e6f4ea}"
    ".health-pass td.health{background:#c8e6c9}.health-warn td.health{background:#fff3c4}"
    ".health-fail td.health{background:#ffcdd2}"
)

SORT_JS = """
document.querySelectorAll("#runs th").forEach((th, i) => th.addEventListener("click", () => {
  const body = document.querySelector("#runs tbody");
  const dir = th.dataset.dir === "asc" ? -1 : 1;
  document.querySelectorAll("#runs th").forEach((h) => delete h.dataset.dir);
  th.dataset.dir = dir === 1 ? "asc" : "desc";
  const num = th.dataset.type === "num";
  const key = (tr) => {
    const v = tr.children[i].dataset.v;
    return num ? (v === "" ? Infinity : Number(v)) : v;
  };
  const order = (a, b) => (key(a) < key(b) ? -1 : key(a) > key(b) ? 1 : 0) * dir;
  body.append(...[...body.rows].sort(order));
}));
"""
"""Click a header: sort the rows by that column (numerically for numeric columns; runs
without a value last), click again to reverse."""


def write_html(
    rows: list[dict], columns: list[str], images: dict[str, Path], path: Path, title: str
) -> None:
    """A page that needs nothing else: the recommended runs, a summary, the images inlined,
    the sortable table."""
    figures = "".join(
        f"<h2>{html.escape(caption)}</h2><img alt='{html.escape(caption)}' "
        f"src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'>"
        for caption, p in images.items()
    )
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<link rel='icon' href='data:,'><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{_recommended(rows)}{_summary(rows)}{figures}"
        "<h2>Runs</h2><p>Click a column header to sort; &#9733; marks the best run per metric; "
        "results.csv has every column.</p>"
        f"<div class='wrap'>{_table(rows, page_columns(rows, columns))}</div>"
        f"<script>{SORT_JS}</script></body></html>\n"
    )


def _recommended(rows: list[dict]) -> str:
    items = "".join(
        f"<li><b>{html.escape(rec.arch)}</b>: {html.escape(rec.line().partition(': ')[2])}</li>"
        for rec in recommend(rows)
    )
    return (
        f"<section id='recommended'><h2>Recommended runs</h2>"
        f"<p>{html.escape(RECOMMENDATION_RULE)}</p><ul>{items}</ul></section>"
    )


def _summary(rows: list[dict]) -> str:
    counts = {v: sum(r["health"] == v for r in rows) for v in ("pass", "warn", "fail")}
    health = ", ".join(f"{n} {v}" for v, n in counts.items())
    best = "; ".join(
        f"{TITLES.get(m, m)}: {r['run']} ({_fmt(r[m])})" for m, r in best_runs(rows).items()
    )
    varied = ", ".join(varied_params(rows)) or "nothing"
    encoder = any(_encoder_score(r["_metrics"]) for r in rows) and (
        " For encoder models, which have no language-model loss, loss recovered is that of the "
        "final hidden states (final_recovered in metrics.json)."
    )
    return (
        f"<p id='summary'>{len(rows)} runs. Health: {health}. The sweep varies: "
        f"{html.escape(varied)}. Best: {html.escape(best or 'none')}.{encoder or ''}</p>"
    )


def _encoder_score(metrics: dict) -> bool:
    """Whether the run's loss recovered is the encoder's final-hidden-state score."""
    return fidelity_key(metrics) == "final_recovered" and "final_recovered" in metrics


PAGE_OMITS = ("absorption_letters", "tokens_seen", "failed", "tag")
"""results.csv columns the page leaves out, so that its table fits a laptop's width."""


def page_columns(rows: list[dict], columns: list[str]) -> list[str]:
    """The table's columns on the page: results.csv's but PAGE_OMITS, and `sweep` only when
    the report shows more than one sweep."""
    one_sweep = len({r["sweep"] for r in rows}) == 1
    return [c for c in columns if c not in PAGE_OMITS and not (c == "sweep" and one_sweep)]


def _table(rows: list[dict], columns: list[str]) -> str:
    numeric = {
        c: any(_number(r[c]) for r in rows)
        and all(_number(r[c]) or r[c] in ("", None) for r in rows)
        for c in columns
    }
    head = "".join(
        f"<th{' data-type=num' if numeric[c] else ''}>{_header(c)}</th>" for c in columns
    )
    best = {m: r for m, r in best_runs(rows).items()}
    body = "".join(
        f"<tr class='health-{r['health']}'>"
        + "".join(_cell(r, c, best.get(c) is r) for c in columns)
        + "</tr>"
        for r in rows
    )
    return f"<table id='runs'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _header(column: str) -> str:
    """A column name that may wrap after its dots and underscores."""
    return re.sub(r"([._])", r"\1<wbr>", html.escape(column))


def _cell(row: dict, column: str, best: bool) -> str:
    value = row[column]
    raw = repr(value) if _finite(value) else ("" if _number(value) or value is None else str(value))
    shown = _fmt(value) + (" \u2605" if best else "")
    kind = {"health": "health", "health_reasons": "reasons"}.get(column, "best" if best else "")
    cls = f" class='{kind}'" if kind else ""
    title = f" title='best {html.escape(column)}'" if best else ""
    return f"<td{cls}{title} data-v='{html.escape(raw)}'>{html.escape(shown)}</td>"


def _fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(
    sweep_dir: Path, others: list[Path] | None = None, health: HealthConfig | None = None
) -> list[dict]:
    """Judge every run's health (thresholds `health`, default HealthConfig()) into its
    metrics.json, print the table and write results.csv, pareto.png, sweep.png (when the
    sweep varies anything) and report.html into sweep_dir (`others`: more sweep directories
    shown beside it, their verdicts rewritten too)."""
    rows = load_results([sweep_dir, *(others or [])], health)
    if not rows:
        print(f"no finished runs under {sweep_dir}")
        return rows
    record_health(rows, health)
    print(format_table(rows))
    params = varied_params(rows)
    columns = [*COLUMNS, *(p for p in params if p not in COLUMNS)]
    for row in rows:
        row.update({p: _cell_value(row["_params"].get(p)) for p in columns if p not in COLUMNS})
    with open(sweep_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    images = {"L0 against reconstruction and downstream fidelity": sweep_dir / "pareto.png"}
    plot_pareto(rows, images["L0 against reconstruction and downstream fidelity"])
    if params:
        images["Metrics against what the sweep varies"] = sweep_dir / "sweep.png"
        plot_sweep(rows, params, sweep_dir / "sweep.png")
    write_html(rows, columns, images, sweep_dir / "report.html", sweep_dir.name)
    print(f"report: {sweep_dir / 'report.html'}")
    return rows


def _cell_value(value):
    """A parameter as a table cell: numbers and strings as they are, the rest as JSON."""
    if value is None:
        return ""
    return value if isinstance(value, str) or _number(value) else json.dumps(value)


PROGRAM = "python -m saesweep.evaluate.report"
USAGE = f"usage: {PROGRAM} SWEEP_DIR [SWEEP_DIR ...]\n"


@dataclass(frozen=True)
class ReportCommand:
    """Judge the runs of sweep directories with the default health thresholds and write the
    first one's table, results.csv, plots and report.html."""

    sweep_dirs: positional(tuple[str, ...], "SWEEP_DIR")
    """Sweep directories; the report goes into the first, the others are shown beside it."""


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_command(argv, ReportCommand, PROGRAM, USAGE)
    dirs = [Path(d) for d in args.sweep_dirs]
    for missing in (d for d in dirs if not d.is_dir()):
        raise UserError(f"{missing} is not a directory; give sweep directories (runs/NAME-TIME)")
    write_report(dirs[0], dirs[1:])


if __name__ == "__main__":
    main()
