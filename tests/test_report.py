"""The sweep report on a real small sweep: tiny GPT-2 activations, SAEs trained in seconds."""

from __future__ import annotations

import csv
import dataclasses
import html
import json
import re
import shutil
from pathlib import Path
from xml.etree import ElementTree

import matplotlib
import pytest
from chromium import Chromium
from groups import group_trainer
from matplotlib.image import imread
from tiny_models import build

from saesweep.collect.config import CollectConfig
from saesweep.collect.run import collect
from saesweep.evaluate.absorption import AbsorptionConfig, add_absorption
from saesweep.evaluate.health import HealthConfig, assess
from saesweep.evaluate.report import (
    LOG_PAD,
    RECOMMENDATION_RULE,
    best_runs,
    log_ticks,
    plot_pareto,
    recommend,
    varied_params,
    write_report,
)
from saesweep.sae import SAEConfig
from saesweep.sae.config import ObjectiveConfig
from saesweep.train.config import DataConfig, TrainConfig
from saesweep.train.layout import run_dir, state_dir

SAES = [
    ("topk", 1e-3, 4, 4e-4),
    ("topk", 3e-3, 4, 4e-4),
    ("topk", 1e-2, 4, 4e-4),
    ("topk", 3e-3, 8, 4e-4),
    ("relu", 3e-3, 4, 4e-4),
    ("relu", 3e-3, 4, 4e-3),
]
"""(arch, lr, k, sparsity_coeff) of the sweep's runs: an lr sweep at fixed k, a second k, a
second architecture at two sparsity coefficients."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished sweep directory (runs/run-NNN with checkpoints and metrics.json, with
    downstream loss recovered), before any report."""
    root = tmp_path_factory.mktemp("report")
    model = str(build("gpt2", root / "models"))
    uri = str(root / "coll")
    collect(
        CollectConfig(
            model=model,
            hooks=("resid.1",),
            out=uri,
            max_tokens=900,
            shard_tokens=300,
            ctx_len=32,
            batch_size=4,
            act_dtype="float32",
            progress=False,
        )
    )
    base = TrainConfig(
        train_data=DataConfig(uri=uri, shards=":-1", collect=""),
        val_data=DataConfig(uri="", shards="-1:", collect=""),
        n_train=2048,
        n_val=300,
        batch_size=64,
        warmup_steps=2,
        ckpt_every=100,
        wandb_mode="disabled",
        downstream_sequences=4,
        device="cpu",
    )
    cfgs = [
        dataclasses.replace(
            base,
            lr=lr,
            seed=i,
            sae=SAEConfig(arch=arch, d_sae=128, k=k),
            objective=ObjectiveConfig(sparsity_coeff=coeff),
        )
        for i, (arch, lr, k, coeff) in enumerate(SAES)
    ]
    sweep_dir = root / "sweep-test"
    dirs = [run_dir(sweep_dir, i, c.tag) for i, c in enumerate(cfgs)]
    group_trainer(cfgs, dirs, state_dir(sweep_dir, 0)).train()
    return sweep_dir


@pytest.fixture
def sweep(trained, tmp_path) -> Path:
    """A private copy of the trained sweep, for a test to change and report on."""
    return Path(shutil.copytree(trained, tmp_path / trained.name))


def metrics(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.glob("runs/*/metrics.json"))]


def results_csv(sweep: Path) -> list[dict]:
    with open(sweep / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_every_run_gets_its_verdict_everywhere(sweep, capsys):
    before = metrics(sweep)
    assert all("loss_recovered" in m for m in before)
    rows = write_report(sweep)
    after, table = metrics(sweep), results_csv(sweep)
    printed = capsys.readouterr().out
    assert len(rows) == len(table) == len(SAES)
    for old, new, line in zip(before, after, table, strict=True):
        health = assess(old)
        assert new["health"] == line["health"] == health.verdict
        assert new["health_reasons"] == list(health.reasons)
        assert new["health_not_measured"] == list(health.not_measured)
        assert "absorption" in new["health_not_measured"]
        assert line["health_reasons"] == health.summary()
        assert new["health_thresholds"] == dataclasses.asdict(HealthConfig())
        assert {k: new[k] for k in old} == old
        assert f"{new['run']}: {health.verdict}: {health.summary()}" in printed or (
            not health.reasons
        )
    assert "class='health-" in (sweep / "report.html").read_text()


def test_dead_latents_fail_with_the_reason(sweep, capsys):
    path = sorted(sweep.glob("runs/*/metrics.json"))[1]
    changed = json.loads(path.read_text())
    changed |= {"dead_pct": 34.375, "l0": float(changed["k"] or 64)}  # L0 healthy, by k or not
    changed["loss_recovered"] = 0.95
    path.write_text(json.dumps(changed))
    write_report(sweep)
    run = changed["run"]
    assert json.loads(path.read_text())["health"] == "fail"
    assert json.loads(path.read_text())["health_reasons"] == ["dead 34 % > 20 %"]
    line = next(r for r in results_csv(sweep) if r["run"] == run)
    missing = f"absorption not measured ({changed['absorption_reason']})"
    assert (line["health"], line["health_reasons"]) == ("fail", f"dead 34 % > 20 %; {missing}")
    assert f"{run}: fail: dead 34 % > 20 %; {missing}" in capsys.readouterr().out
    assert "dead 34 % &gt; 20 %" in (sweep / "report.html").read_text()


def test_thresholds_come_from_the_report_call(sweep):
    strict = HealthConfig(l0_min=0.0, l0_max=1.0, l0_k_factor=1.0)
    write_report(sweep, health=strict)
    for m in metrics(sweep):
        assert m["health_thresholds"]["l0_max"] == 1.0
        if m["k"] is None:  # L0 learned: the absolute bounds
            assert m["health"] in ("warn", "fail")
            assert f"L0 {m['l0']:.0f} > 1" in m["health_reasons"]
        elif m["l0"] != m["k"]:  # BatchTopK: L0 near k, not equal
            assert any(r.endswith(f"(k {m['k']})") for r in m["health_reasons"])


def test_the_report_finds_what_the_sweep_varies(sweep):
    rows = write_report(sweep)
    assert varied_params(rows) == ["arch", "lr", "k", "objective.sparsity_coeff"]
    table = results_csv(sweep)
    assert list(table[0])[-1] == "objective.sparsity_coeff"
    assert [float(r["objective.sparsity_coeff"]) for r in table] == [s[3] for s in SAES]
    assert [float(r["lr"]) for r in table] == [s[1] for s in SAES]
    assert [r["k"] for r in table] == ["4", "4", "4", "8", "", ""]
    params = 4  # a row per parameter, its 4 metrics side by side, 1,360 px wide
    assert imread(sweep / "sweep.png").shape[:2] == (340 * params, 1360)
    assert imread(sweep / "pareto.png").shape[:2] == (550, 2 * 715)


def test_an_lr_sweep_at_fixed_k_is_plotted_against_lr(sweep):
    for run in sorted(sweep.glob("runs/*"))[3:]:
        shutil.rmtree(run)
    rows = write_report(sweep)
    assert varied_params(rows) == ["lr"]
    assert imread(sweep / "sweep.png").shape[:2] == (340, 1360)


def test_best_run_per_metric(sweep):
    rows = write_report(sweep)
    runs = [m for m in metrics(sweep) if not m["failed"]]
    best = best_runs(rows)
    assert best["fvu"]["run"] == min(runs, key=lambda m: m["fvu"])["run"]
    assert best["loss_recovered"]["run"] == max(runs, key=lambda m: m["loss_recovered"])["run"]
    assert best["dead_pct"]["dead_pct"] == min(m["dead_pct"] for m in runs)
    assert "l0" not in best
    page = (sweep / "report.html").read_text()
    assert page.count("title='best fvu'") == 1
    assert f"FVU: {best['fvu']['run']} " in page


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = Chromium(tmp_path_factory.mktemp("chromium"))
    yield chromium
    chromium.close()


RENDERED = """(async () => {
  const images = [...document.images];
  await Promise.all(images.map((i) => i.decode()));
  const rows = [...document.querySelectorAll("#runs tbody tr")];
  return {
    images: images.map((i) => [i.naturalWidth, i.naturalHeight, i.clientWidth > 0]),
    runs: rows.map((r) => r.children[0].textContent),
    health: rows.map((r) => r.querySelector("td.health").textContent),
    best: [...document.querySelectorAll("td.best")].map((td) => td.title).sort(),
  };
})()"""

SORT_BY = """((column) => {
  const th = [...document.querySelectorAll("#runs th")].find((h) => h.textContent === column);
  const runs = () =>
    [...document.querySelectorAll("#runs tbody tr")].map((r) => r.children[0].textContent);
  th.click();
  const up = runs();
  th.click();
  return [up, runs()];
})"""


def test_report_renders_in_a_real_browser(sweep, browser):
    rows = write_report(sweep)
    assert browser.open((sweep / "report.html").as_uri()) == []
    page = browser.evaluate(RENDERED)
    assert page["images"] == [[1430, 550, True], [1360, 4 * 340, True]]
    assert page["runs"] == [r["run"] for r in rows]
    assert page["health"] == [r["health"] for r in rows]
    assert page["best"] == ["best dead_pct", "best fvu", "best loss_recovered", "best mse"]
    by_fvu = [r["run"] for r in sorted(rows, key=lambda r: r["fvu"])]
    assert browser.evaluate(f"{SORT_BY}('fvu')") == [by_fvu, by_fvu[::-1]]
    by_k = [r["run"] for r in sorted(rows, key=lambda r: r["k"] or float("inf"))]
    assert browser.evaluate(f"{SORT_BY}('k')")[0] == by_k


def test_the_browser_check_sees_errors(browser, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text(
        "<!doctype html><link rel='icon' href='data:,'><img src='missing.png'>"
        "<script>console.error('boom')</script><script>notAFunction()</script>"
    )
    errors = browser.open(page.as_uri())
    assert len(errors) == 3
    assert any("boom" in e for e in errors)
    assert any("notAFunction is not defined" in e for e in errors)
    assert any("missing.png" in e or "ERR_FILE_NOT_FOUND" in e for e in errors)


def test_absorption_of_every_run_reaches_the_report(sweep):
    uri = json.loads((sweep / "runs/run-000/cfg.json").read_text())["saesweep_config"]
    uri = uri["train_data"]["uri"]
    lenient = AbsorptionConfig(min_probe_f1=0.0, min_true_positives=1, max_k=3)
    added = add_absorption(sorted(sweep.glob("runs/*")), uri, shards=":", cfg=lenient)
    assert len({a["absorption_tokens"] for a in added}) == 1
    for a in added:
        assert a["absorption_letters"] >= 1
        assert 0.0 <= a["absorption"] <= 1.0
        assert 0.0 <= a["absorption_full"] <= 1.0
    rows = write_report(sweep)
    table = results_csv(sweep)
    for a, m, line in zip(added, metrics(sweep), table, strict=True):
        assert float(line["absorption"]) == pytest.approx(a["absorption"])
        assert m["absorption_by_letter"] == a["absorption_by_letter"]
        assert "absorption" not in m["health_not_measured"]
        assert int(line["absorption_letters"]) == a["absorption_letters"] < 20
        (note,) = m["health_notes"]
        assert note.endswith(f" indicative ({a['absorption_letters']} letters < 20)")
        assert float(note.split()[1]) == pytest.approx(a["absorption"], abs=5e-3)
        assert note in line["health_reasons"]
        assert not any("absorption" in r for r in m["health_reasons"]), "fewer than 20 letters"
    assert best_runs(rows)["absorption"]["absorption"] == min(a["absorption"] for a in added)
    assert imread(sweep / "pareto.png").shape[:2] == (550, 3 * 715)


def _x_tick_labels(svg: Path) -> list[list[str]]:
    """The x tick labels of each panel as rendered into an SVG (text kept as text)."""
    root = ElementTree.parse(svg).getroot()
    groups = _ids(root, "axes_")
    return [
        ["".join(t.itertext()).strip() for g in _ids(axes, "xtick_") for t in g.iter(f"{SVG}text")]
        for axes in groups
    ]


SVG = "{http://www.w3.org/2000/svg}"


def _ids(tree, prefix: str) -> list:
    return [g for g in tree.iter(f"{SVG}g") if g.get("id", "").startswith(prefix)]


@pytest.mark.parametrize("archs", [("topk",), ("topk", "relu")])
def test_l0_axes_label_their_ticks(sweep, tmp_path, archs):
    """Every L0 axis has labelled ticks, also where L0 spans less than a decade (topk's 4-8)."""
    rows = [r for r in write_report(sweep) if r["arch"] in archs]
    svg = tmp_path / "pareto.svg"
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        plot_pareto(rows, svg)
    l0 = [r["l0"] for r in rows]
    expected = [f"{t:g}" for t in log_ticks(min(l0) / LOG_PAD, max(l0) * LOG_PAD)]
    assert len(expected) >= 2
    assert _x_tick_labels(svg) == [expected, expected]  # FVU, loss recovered


@pytest.mark.parametrize(
    ("low", "high", "ticks"),
    [
        (16 / 1.25, 16 * 1.25, [15, 20]),
        (12.9 / 1.25, 16.4 * 1.25, [12, 15, 20]),
        (6.7 / 1.25, 16 * 1.25, [6, 8, 10, 15, 20]),
        (8e-4, 1.25e-2, [1e-3, 2e-3, 5e-3, 1e-2]),
        (0.8, 1250, [1, 10, 100, 1000]),
    ],
)
def test_log_ticks_are_round_and_enough(low, high, ticks):
    assert log_ticks(low, high) == pytest.approx(ticks)


def _rows(*runs: tuple[str, dict]) -> list[dict]:
    return [{"arch": arch, "_params": params} for arch, params in runs]


def test_a_parameter_varies_only_among_the_runs_it_applies_to():
    """k of ReLU (None), Switch's experts on other architectures and an architecture's own
    sparsity coefficient do not make a panel; two values within one architecture do."""
    demo = _rows(
        ("topk", {"k": 16, "sae.switch.n_experts": 8, "objective.sparsity_coeff": 4e-4}),
        ("switch", {"k": 16, "sae.switch.n_experts": 4, "objective.sparsity_coeff": 4e-4}),
        ("relu", {"k": None, "sae.switch.n_experts": 8, "objective.sparsity_coeff": 1e-2}),
        ("jumprelu", {"k": None, "sae.switch.n_experts": 8, "objective.sparsity_coeff": 5e-3}),
        ("jumprelu", {"k": None, "sae.init_encoder_scale": 1.0, "sae.switch.n_experts": 8}),
    )
    demo[4]["_params"]["objective.sparsity_coeff"] = 5e-3
    assert varied_params(demo) == []
    demo[4]["_params"]["objective.sparsity_coeff"] = 1e-2
    demo[0]["_params"]["k"] = 32
    assert varied_params(demo) == ["k", "objective.sparsity_coeff"]


def test_the_grid_drops_what_does_not_vary_where_it_applies(sweep):
    """Without the k-8 run, k is 4 in every run that has one (ReLU has none): no k panel."""
    shutil.rmtree(sorted(sweep.glob("runs/*"))[3])
    rows = write_report(sweep)
    assert varied_params(rows) == ["arch", "lr", "objective.sparsity_coeff"]
    assert imread(sweep / "sweep.png").shape[:2] == (3 * 340, 1360)


def test_runs_with_k_pass_the_l0_check(sweep):
    """TopK's L0 equals its k by construction: judged against k, not 20-200 (k 4 and 8 here)."""
    write_report(sweep)
    with_k = [m for m in metrics(sweep) if m["k"] is not None]
    assert {m["k"] for m in with_k} == {4, 8}
    assert all(m["k"] / 2 <= m["l0"] <= m["k"] < 20 for m in with_k)
    assert not any(r.startswith("L0") for m in with_k for r in m["health_reasons"])


def test_a_recommended_run_per_architecture(sweep, capsys):
    rows = write_report(sweep)
    printed = capsys.readouterr().out
    recs = recommend(rows)
    assert [rec.arch for rec in recs] == ["relu", "topk"]
    for rec in recs:
        runs = [r for r in rows if r["arch"] == rec.arch]
        passing = [r for r in runs if r["health"] == "pass"] or [
            r for r in runs if r["health"] == "warn"
        ]
        assert rec.row is max(passing, key=lambda r: r["loss_recovered"])
        assert f"loss recovered {rec.row['loss_recovered']:.4g}" in rec.why
        assert f"  {rec.arch}: {rec.row['run']}: {rec.why}" in printed
    assert RECOMMENDATION_RULE in printed
    page = (sweep / "report.html").read_text()
    assert page.index("id='recommended'") < page.index("id='summary'") < page.index("<img")


def test_absorption_not_measured_says_why(sweep):
    """The tiny GPT-2's held-out text gives no letter a probe: metrics.json, results.csv and
    the page say so, with the counts."""
    write_report(sweep)
    for m, line in zip(metrics(sweep), results_csv(sweep), strict=True):
        assert "absorption" in m["health_not_measured"]
        assert re.fullmatch(
            r"0 letters with a probe of F1 >= 0.6 and 20 test true positives, "
            r"over [\d,]+ alphabetic held-out tokens; 1 needed",
            m["absorption_reason"],
        )
        assert f"absorption not measured ({m['absorption_reason']})" in line["health_reasons"]
    assert html.escape(m["absorption_reason"]) in (sweep / "report.html").read_text()


LAID_OUT = """(() => {
  const wrap = document.querySelector(".wrap");
  const page = document.documentElement;
  return {
    table: [wrap.scrollWidth, wrap.clientWidth],
    page: [page.scrollWidth, page.clientWidth],
    recommended: [...document.querySelectorAll("#recommended li")].map((li) => li.textContent),
    headers: [...document.querySelectorAll("#runs th")].map((th) => th.textContent),
  };
})()"""


@pytest.mark.parametrize("width", [1280, 1400])
def test_report_reads_at_a_laptops_width(sweep, browser, width):
    """At a laptop's width the table needs no sideways scrolling, the recommendation opens
    the page and the grid shows one row of panels per varied parameter."""
    rows = write_report(sweep)
    browser.resize(width, 900)
    try:
        assert browser.open((sweep / "report.html").as_uri()) == []
        page = browser.evaluate(LAID_OUT)
        images = browser.evaluate(RENDERED)["images"]
    finally:
        browser.resize(800, 600)
    assert page["table"][0] <= page["table"][1] and page["page"][0] <= page["page"][1]
    assert page["recommended"] == [
        f"{r.arch}: {r.line().partition(': ')[2]}" for r in recommend(rows)
    ]
    assert "loss_recovered" in page["headers"] and "tokens_seen" not in page["headers"]
    assert images[1][:2] == [1360, 340 * len(varied_params(rows))]
