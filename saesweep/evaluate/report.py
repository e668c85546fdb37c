"""Sweep results: health verdicts, a table, results.csv, pareto.png and report.html.

uv run python -m saesweep.evaluate.report SWEEP_DIR [SWEEP_DIR ...]
"""

from __future__ import annotations

import csv
import dataclasses
import html
import json
import sys
from pathlib import Path

from saesweep.evaluate.health import HealthConfig, assess, fidelity_key
from saesweep.train.checkpoint import write_json

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
    "health",
    "health_reasons",
    "tokens_seen",
    "failed",
    "tag",
    "sweep",
)


def load_results(sweep_dirs: list[Path], health: HealthConfig | None = None) -> list[dict]:
    """One row per run (COLUMNS, plus "_path": its metrics.json and "_metrics": its contents),
    with its health verdict under `health` (default thresholds when None)."""
    rows = []
    for sweep_dir in sweep_dirs:
        for path in sorted(sweep_dir.glob("runs/*/metrics.json")):
            metrics = json.loads(path.read_text())
            verdict = assess(metrics, health)
            row = {c: metrics.get(c, "") for c in COLUMNS} | {
                "loss_recovered": metrics.get(fidelity_key(metrics), ""),
                "health": verdict.verdict,
                "health_reasons": verdict.summary(),
                "sweep": sweep_dir.name,
            }
            rows.append(row | {"_path": path, "_metrics": metrics, "_health": verdict})
    return rows


def record_health(rows: list[dict], health: HealthConfig | None = None) -> None:
    """Write each row's verdict into its run's metrics.json (atomically): `health`,
    `health_reasons`, `health_not_measured` and the `health_thresholds` it was judged by."""
    thresholds = dataclasses.asdict(health or HealthConfig())
    for row in rows:
        verdict = row["_health"]
        fields = {
            "health": verdict.verdict,
            "health_reasons": list(verdict.reasons),
            "health_not_measured": list(verdict.not_measured),
            "health_thresholds": thresholds,
        }
        write_json(row["_path"], row["_metrics"] | fields)


def format_table(rows: list[dict]) -> str:
    """The printed table, then one line per run that did not pass, with its reasons."""
    header = ("run", "arch", "d_sae", "k", "lr", "FVU", "L0", "dead %", "recovered", "health")
    width = max(len(r["run"]) for r in rows) + 2
    lines = [f"{header[0]:<{width}s}" + "".join(f"{h:>11s}" for h in header[1:])]
    for r in rows:
        recovered = f"{r['loss_recovered']:.3f}" if r["loss_recovered"] != "" else "-"
        cells = (
            r["arch"],
            str(r["d_sae"]),
            "-" if r["k"] in ("", None) else str(r["k"]),
            f"{r['lr']:.2e}",
            f"{r['fvu']:.4f}",
            f"{r['l0']:.1f}",
            f"{r['dead_pct']:.1f}",
            recovered,
            r["health"],
        )
        lines.append(f"{r['run']:<{width}s}" + "".join(f"{c:>11s}" for c in cells))
    unhealthy = [r for r in rows if r["_health"].reasons]
    lines += [f"{r['run']}: {r['health']}: {r['health_reasons']}" for r in unhealthy]
    return "\n".join(lines)


def pareto_front(rows: list[dict], metric: str = "fvu") -> list[dict]:
    """Runs no other run beats on both L0 and `metric` (lower is better for fvu, higher for
    loss_recovered)."""
    sign = -1 if metric == "loss_recovered" else 1
    ok = [(r["l0"], sign * r[metric], r) for r in rows if not r["failed"] and r[metric] != ""]
    return [
        r
        for l0, m, r in ok
        if not any(o_l0 <= l0 and o_m <= m and (o_l0, o_m) != (l0, m) for o_l0, o_m, _ in ok)
    ]


def plot_pareto(rows: list[dict], path: Path) -> None:
    """L0 against FVU, and against loss recovered where available; frontiers dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["fvu"] + (["loss_recovered"] if any(r["loss_recovered"] != "" for r in rows) else [])
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(6.5 * len(metrics), 5), dpi=120, squeeze=False
    )
    for ax, metric in zip(axes[0], metrics, strict=True):
        _scatter(ax, rows, metric)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


TITLES = {"fvu": "FVU", "loss_recovered": "downstream score"}
LABELS = {
    "fvu": "FVU (fraction of variance unexplained, lower is better)",
    "loss_recovered": "downstream score recovered (higher is better)",
}


def _scatter(ax, rows: list[dict], metric: str) -> None:
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ok = [r for r in rows if not r["failed"] and r[metric] != ""]
    for arch in sorted({r["arch"] for r in ok}):
        pts = [r for r in ok if r["arch"] == arch]
        ax.scatter([r["l0"] for r in pts], [r[metric] for r in pts], label=arch, s=45, alpha=0.85)
    front = sorted(pareto_front(rows, metric), key=lambda r: r["l0"])
    if front:
        ax.plot(
            [r["l0"] for r in front],
            [r[metric] for r in front],
            "k--",
            lw=1,
            label="Pareto frontier",
        )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("L0 (active latents per token, log scale)")
    ax.set_ylabel(LABELS[metric])
    ax.set_title(f"L0 against {TITLES[metric]}, held-out activations")
    ax.grid(alpha=0.3)
    ax.legend()


def write_html(rows: list[dict], path: Path, title: str) -> None:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join(
        f"<tr class='health-{r['health']}'>"
        + "".join(f"<td>{html.escape(_fmt(r[c]))}</td>" for c in COLUMNS)
        + "</tr>"
        for r in rows
    )
    path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        "</title><style>body{font-family:sans-serif}td,th{padding:2px 8px;"
        "text-align:right}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><img src='pareto.png' alt='L0 against FVU'>"
        f"<table><tr>{head}</tr>{body}</table></body></html>\n"
    )


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(
    sweep_dir: Path, others: list[Path] | None = None, health: HealthConfig | None = None
) -> list[dict]:
    """Judge every run's health (thresholds `health`, default HealthConfig()) into its
    metrics.json, print the table and write results.csv, pareto.png and report.html into
    sweep_dir (`others`: more sweep directories shown beside it, their verdicts rewritten too)."""
    rows = load_results([sweep_dir, *(others or [])], health)
    if not rows:
        print(f"no finished runs under {sweep_dir}")
        return rows
    record_health(rows, health)
    print(format_table(rows))
    with open(sweep_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot_pareto(rows, sweep_dir / "pareto.png")
    write_html(rows, sweep_dir / "report.html", sweep_dir.name)
    print(f"report: {sweep_dir / 'report.html'}")
    return rows


if __name__ == "__main__":
    dirs = [Path(p) for p in sys.argv[1:]]
    if not dirs:
        sys.exit("usage: python -m saesweep.evaluate.report SWEEP_DIR [SWEEP_DIR ...]")
    write_report(dirs[0], dirs[1:])
