"""Collection against the real packaged MiniLM and tiny random-weight models, local store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import build
from transformers import AutoTokenizer

from saesweep.collect.config import CollectConfig, parse_cli
from saesweep.collect.model import HookedModel, load_model, resolve_hook
from saesweep.collect.run import collect, machine_lock
from saesweep.collect.sequences import special_template
from saesweep.errors import UserError
from saesweep.format.shards import SEQ_CHUNK_BITS, checksum, decode_shard
from saesweep.store import open_store

ROOT = Path(__file__).resolve().parents[1]


def small(out: Path | str, **kw) -> CollectConfig:
    base = dict(
        out=str(out), max_tokens=6000, shard_tokens=1500, batch_size=8, ctx_len=64, progress=False
    )
    return CollectConfig(**{**base, **kw})


def read_hook(uri: str, hook: str) -> dict[str, torch.Tensor]:
    """Every stored tensor of a hook, concatenated in manifest order, checksums verified."""
    store = open_store(uri)
    meta = store.get_json(f"{hook}/metadata.json")
    parts = []
    for shard in meta["shards"]:
        data = store.get(f"{hook}/{shard['name']}")
        assert checksum(data) == shard["checksum"]
        tensors = decode_shard(data)
        assert len(tensors["acts"]) == shard["n_tokens"]
        parts.append(tensors)
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def by_token(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors sorted by (sequence id, position), the order-free identity of a token."""
    key = tensors["seq_ids"] * 4096 + tensors["positions"].long()
    order = torch.argsort(key)
    return {k: v[order] for k, v in tensors.items()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    collect(small(out, act_dtype="float32"))
    return out


def test_demo_contract(demo):
    store = open_store(str(demo))
    meta = store.get_json("encoder.layer.3/metadata.json")
    assert meta["complete"] and meta["d_model"] == 384 and meta["layer"] == 3
    assert meta["n_tokens"] == sum(s["n_tokens"] for s in meta["shards"]) >= 6000
    assert len(meta["shards"]) >= 4
    cfg = store.get_json("cfg.json")
    assert cfg["config"]["model"] == "demo" and "torch" in cfg["versions"]
    tensors = read_hook(str(demo), "encoder.layer.3")
    assert tensors["acts"].shape == (meta["n_tokens"], 384)
    assert tensors["token_ids"].dtype == torch.int32
    tokenizer = AutoTokenizer.from_pretrained(_demo_path())
    special = set(tokenizer.all_special_ids)
    assert not special & set(tensors["token_ids"].tolist())
    assert torch.isfinite(tensors["acts"]).all()


def _demo_path() -> str:
    from saesweep.collect.model import model_path

    return model_path("demo")


def test_statistics_match_numpy(demo):
    store = open_store(str(demo))
    stats = store.get_json("encoder.layer.3/statistics.json")
    acts = read_hook(str(demo), "encoder.layer.3")["acts"].double().numpy()
    assert stats["n"] == len(acts)
    np.testing.assert_allclose(stats["mean"], acts.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats["std"], acts.std(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats["mean_norm"], np.linalg.norm(acts, axis=1).mean(), rtol=1e-10)


def test_token_ids_decode_to_the_corpus(demo):
    from saesweep.collect.text import demo_corpus

    tensors = by_token(read_hook(str(demo), "encoder.layer.3"))
    first_seq = tensors["seq_ids"][0].item()
    doc_index, chunk = first_seq >> SEQ_CHUNK_BITS, first_seq & ((1 << SEQ_CHUNK_BITS) - 1)
    assert (doc_index, chunk) == (0, 0)
    tokenizer = AutoTokenizer.from_pretrained(_demo_path())
    ids = tensors["token_ids"][tensors["seq_ids"] == first_seq].tolist()
    expected = tokenizer(next(demo_corpus()), add_special_tokens=False)["input_ids"][: len(ids)]
    assert ids == expected
    prefix, _ = special_template(tokenizer)
    assert tensors["positions"][0].item() == len(prefix)


def test_activations_equal_a_plain_forward_pass(demo):
    tensors = by_token(read_hook(str(demo), "encoder.layer.3"))
    seq = tensors["seq_ids"][0].item()
    rows = tensors["seq_ids"] == seq
    model, tokenizer = load_model("demo", None, "float32", "cpu")
    prefix, suffix = special_template(tokenizer)
    ids = tensors["token_ids"][rows].tolist()
    with torch.no_grad():
        hidden = model(
            input_ids=torch.tensor([prefix + ids + suffix]), output_hidden_states=True
        ).hidden_states[4][0]
    expected = hidden[len(prefix) : len(prefix) + len(ids)]
    torch.testing.assert_close(tensors["acts"][rows], expected, rtol=1e-4, atol=1e-4)


def test_two_machines_equal_one(tmp_path):
    cfg = small(
        tmp_path / "one", max_tokens=None, dataset=str(_docs(tmp_path)), act_dtype="float32"
    )
    collect(cfg)
    for m in range(2):
        collect(
            small(
                tmp_path / "two",
                max_tokens=None,
                dataset=cfg.dataset,
                act_dtype="float32",
                machine=m,
                n_machines=2,
            )
        )
    one = by_token(read_hook(str(tmp_path / "one"), "encoder.layer.3"))
    two = by_token(read_hook(str(tmp_path / "two"), "encoder.layer.3"))
    for key in ("token_ids", "seq_ids", "positions"):
        assert torch.equal(one[key], two[key])
    torch.testing.assert_close(one["acts"], two["acts"], rtol=1e-4, atol=1e-4)
    s1 = open_store(str(tmp_path / "one")).get_json("encoder.layer.3/statistics.json")
    s2 = open_store(str(tmp_path / "two")).get_json("encoder.layer.3/statistics.json")
    assert s1["n"] == s2["n"]
    np.testing.assert_allclose(s1["mean"], s2["mean"], atol=1e-5)


def _docs(tmp_path: Path) -> Path:
    """A .jsonl corpus of 40 documents of varied length."""
    from saesweep.collect.text import demo_corpus

    path = tmp_path / "docs.jsonl"
    docs = [d[: 200 + 37 * i] for i, d in zip(range(40), demo_corpus(), strict=False)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def _run_collect(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "collect.py"), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def main_exit(args: list[str], capsys) -> tuple[int, str]:
    """collect.py's main in this process: (exit status, stderr)."""
    from saesweep.collect.cli import main

    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("act_dtype", ["float32", "float8_e4m3fn"])
def test_resume_after_kill_9(tmp_path, act_dtype):
    args = [
        "--dataset",
        str(_docs(tmp_path)),
        "--shard-tokens",
        "300",
        "--batch-size",
        "2",
        "--ctx-len",
        "64",
        "--no-progress",
        "--act-dtype",
        act_dtype,
    ]
    proc = _run_collect([*args, "--out", str(tmp_path / "run")])
    from saesweep.collect.cli import main

    main([*args, "--out", str(tmp_path / "ref")])
    part = tmp_path / "run" / "parts" / "machine-0000-of-0001.json"
    for _ in range(6000):
        if proc.poll() is not None or _committed(part) >= 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_tokens = json.loads(part.read_text())["hooks"]["encoder.layer.3"]["shards"]
    assert not json.loads(part.read_text())["complete"]
    resumed = _run_collect([*args, "--out", str(tmp_path / "run")])
    assert resumed.wait() == 0, resumed.stderr.read()
    ref = by_token(read_hook(str(tmp_path / "ref"), "encoder.layer.3"))
    run = read_hook(str(tmp_path / "run"), "encoder.layer.3")
    keys = run["seq_ids"] * 4096 + run["positions"].long()
    assert len(torch.unique(keys)) == len(keys), "a token was stored twice"
    run = by_token(run)
    assert torch.equal(ref["token_ids"], run["token_ids"])
    assert torch.equal(ref["seq_ids"], run["seq_ids"])
    torch.testing.assert_close(ref["acts"], run["acts"])
    assert len(killed_tokens) >= 2


def _committed(part: Path) -> int:
    if not part.exists():
        return 0
    return len(json.loads(part.read_text())["hooks"].get("encoder.layer.3", {}).get("shards", []))


def test_a_collection_too_small_for_the_default_split_says_so(demo, tmp_path, capsys):
    """One shard cannot be both trained on and held out: collect.py says which flags fix it.
    The demo collection's shards get no such note."""
    collect(small(tmp_path / "one", max_tokens=600))
    meta = json.loads((tmp_path / "one/encoder.layer.3/metadata.json").read_text())
    assert len(meta["shards"]) == 1
    out = capsys.readouterr().out
    assert f"note: file://{tmp_path / 'one'} holds 1 shard(s) per hook" in out
    assert "(--max-tokens) or smaller shards (--shard-tokens)" in out
    assert "--train-data.shards ':' and --val-data.uri" in out
    collect(small(demo, act_dtype="float32"))  # complete already: merged again
    assert "note:" not in capsys.readouterr().out


def test_different_config_is_refused(demo, capsys):
    code, err = main_exit(
        [
            "--config",
            str(ROOT / "configs/demo.toml"),
            "--out",
            str(demo),
            "--ctx-len",
            "64",
            "--max-tokens",
            "6000",
            "--shard-tokens",
            "1500",
        ],
        capsys,
    )
    assert code == 2
    assert "holds a different collection" in err and "act_dtype" in err


def test_second_process_on_one_machine_index_is_refused(tmp_path):
    cfg = small(tmp_path / "c", max_tokens=1500)
    busy = "another process is collecting machine 0 of 1"
    with machine_lock(open_store(cfg.out), 0, 1), pytest.raises(UserError, match=busy):
        collect(cfg)
    assert collect(cfg).complete


def test_resume_with_other_model_weights_is_refused(tmp_path):
    cfg = small(tmp_path / "c", max_tokens=1500)
    collect(cfg)
    root = open_store(cfg.out)
    stored = root.get_json("cfg.json")
    root.put_json("cfg.json", stored | {"model_revision": "0123abc"})
    with pytest.raises(UserError, match="at revision 0123abc, but it now resolves to None"):
        collect(cfg)


@pytest.mark.parametrize(
    "family,paths",
    [
        (
            "gpt2",
            {
                "resid.1": "transformer.h.1",
                "mlp.1": "transformer.h.1.mlp",
                "attn.2": "transformer.h.2.attn",
            },
        ),
        (
            "llama",
            {
                "resid.0": "model.layers.0",
                "mlp.2": "model.layers.2.mlp",
                "attn.1": "model.layers.1.self_attn",
            },
        ),
        ("bert", {"resid.2": "encoder.layer.2", "mlp.0": "encoder.layer.0.output.dense"}),
    ],
)
def test_hook_short_forms(tmp_path_factory, family, paths):
    path = build(family, tmp_path_factory.getbasetemp())
    model, _ = load_model(str(path), None, "float32", "cpu")
    for short, full in paths.items():
        assert resolve_hook(model, short)[0] == full


def test_wrong_hook_names_the_closest(tmp_path_factory):
    path = build("gpt2", tmp_path_factory.getbasetemp())
    model, _ = load_model(str(path), None, "float32", "cpu")
    with pytest.raises(UserError, match="transformer.h.1"):
        resolve_hook(model, "transformer.h1")
    with pytest.raises(UserError, match="layers 0..2"):
        resolve_hook(model, "resid.7")


def test_forward_stops_after_last_hook(tmp_path_factory):
    path = build("llama", tmp_path_factory.getbasetemp())
    model, _ = load_model(str(path), None, "float32", "cpu")
    ran = []
    model.model.layers[2].register_forward_hook(lambda *a: ran.append(2))
    hooked = HookedModel(model, ["model.layers.1"])
    out = hooked.run(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long))
    assert out["model.layers.1"].shape == (1, 3, 32) and ran == []


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_collect_tiny_models(tmp_path, family):
    path = build(family, tmp_path)
    collect(
        small(
            tmp_path / "out",
            model=str(path),
            hooks=("resid.1", "mlp.2"),
            max_tokens=800,
            shard_tokens=300,
        )
    )
    store = open_store(str(tmp_path / "out"))
    metas = [m for m in (store.get_json(k) for k in store.list() if k.endswith("metadata.json"))]
    assert len(metas) == 2
    for meta in metas:
        tensors = read_hook(str(tmp_path / "out"), meta["hook"])
        assert tensors["acts"].shape == (meta["n_tokens"], 32) and meta["n_tokens"] >= 800
        assert tensors["acts"].dtype == torch.bfloat16
    assert torch.equal(*[read_hook(str(tmp_path / "out"), m["hook"])["token_ids"] for m in metas])


def test_float16_overflow_stops_the_collection(tmp_path):
    """A residual stream beyond float16's 65,504, collected as float16: one sentence, and no
    shard of inf committed."""
    source = build("gpt2", tmp_path)
    model, tokenizer = load_model(str(source), None, "float32", "cpu")
    with torch.no_grad():
        model.transformer.wte.weight.mul_(1e8)
    model.save_pretrained(tmp_path / "huge")
    tokenizer.save_pretrained(tmp_path / "huge")
    cfg = small(
        tmp_path / "out",
        model=str(tmp_path / "huge"),
        hooks=("resid.1",),
        act_dtype="float16",
        max_tokens=800,
        shard_tokens=300,
    )
    with pytest.raises(
        UserError,
        match=r"hook transformer.h.1 produced non-finite activations \(inf or NaN\) in batch 0 "
        r".*float16.*--act-dtype bfloat16 or float32",
    ):
        collect(cfg)
    part = tmp_path / "out" / "parts" / "machine-0000-of-0001.json"
    committed = json.loads(part.read_text())["hooks"] if part.exists() else {}
    assert committed == {} and not (tmp_path / "out" / "transformer.h.1" / "metadata.json").exists()


def test_local_text_sources(tmp_path):
    from saesweep.collect.text import iter_documents

    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.jsonl").write_text('{"body": "second"}\n{"body": "third"}\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["fourth"]}), tmp_path / "c.parquet")
    docs = list(iter_documents(str(tmp_path), "body"))
    assert docs == ["first document", "second", "third", "fourth"]
    with pytest.raises(UserError, match="no field 'text'"):
        list(iter_documents(str(tmp_path / "b.jsonl"), "text"))


def test_cli_flags_override_the_toml(tmp_path):
    cfg = parse_cli(
        [
            "--config",
            str(ROOT / "configs/demo.toml"),
            "--out",
            "s3://b/p",
            "--max-tokens",
            "7",
            "--shard-tokens",
            "9",
            "--machine",
            "1",
            "--n-machines",
            "3",
        ]
    )
    assert (cfg.out, cfg.max_tokens, cfg.shard_tokens, cfg.machine, cfg.n_machines) == (
        "s3://b/p",
        7,
        9,
        1,
        3,
    )
    assert cfg.hooks == ("resid.3",) and cfg.shard_tokens == 9


@pytest.mark.parametrize(
    "toml,message",
    [
        ('modle = "demo"\n', "unknown key 'modle' (did you mean 'model'?)"),
        ('ctx_len = "long"\n', "key 'ctx_len' has value 'long', expected int"),
        ("ctx_len = [\n", "not valid TOML"),
    ],
)
def test_bad_config_file(tmp_path, toml, message, capsys):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    code, err = main_exit(["--config", str(path)], capsys)
    assert code == 2 and message in err


def test_unknown_model_and_dataset_exit_2(tmp_path, capsys):
    code, err = main_exit(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "cannot load model" in err
    code, err = main_exit(
        ["--dataset", str(_docs(tmp_path)), "--text-column", "body", "--out", str(tmp_path / "o2")],
        capsys,
    )
    assert code == 2 and "no field 'body'" in err


@pytest.mark.parametrize("name", ["my_corpus.jsonl", "./corpus", "texts/*.txt"])
def test_a_missing_local_dataset_is_no_such_file_before_anything(tmp_path, capsys, name):
    """Named like a local file but not there: one sentence before the model loads, and the
    output location left as it was (not the hub's 'couldn't reach' after both)."""
    code, err = main_exit(["--dataset", name, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and f"no such file: {name} (a local dataset is" in err, err
    assert not (tmp_path / "o").exists()


def test_collect_on_slurm(tmp_path, slurm_cluster):
    out = tmp_path / "slurm"
    proc = _run_collect(
        [
            "--dataset",
            str(_docs(tmp_path)),
            "--out",
            str(out),
            "--n-machines",
            "2",
            "--slurm-acct",
            "test",
            "--gpus-per-group",
            "0",
            "--cpus-per-group",
            "1",
            "--slurm-log-dir",
            str(tmp_path / "logs"),
            "--ctx-len",
            "64",
            "--act-dtype",
            "float32",
            "--shard-tokens",
            "500",
        ]
    )
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr
    parts = [
        json.loads((out / "parts" / f"machine-{m:04d}-of-0002.json").read_text()) for m in range(2)
    ]
    assert all(p["complete"] for p in parts)
    merged = read_hook(str(out), "encoder.layer.3")
    assert sorted(set((merged["seq_ids"] >> SEQ_CHUNK_BITS).tolist())) == list(range(40))
    assert "on 2 Slurm tasks" in stdout


@pytest.fixture
def small_disk(tmp_path):
    """A real 3 MiB tmpfs mount (needs root, as on the CI machines)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_stops_cleanly(small_disk, capsys):
    out = small_disk / "coll"
    code, err = main_exit(
        [
            "--out",
            str(out),
            "--max-tokens",
            "8000",
            "--shard-tokens",
            "400",
            "--ctx-len",
            "64",
            "--batch-size",
            "8",
            "--act-dtype",
            "float32",
            "--no-progress",
        ],
        capsys,
    )
    assert code == 2 and "is full" in err and str(small_disk) in err
    part = json.loads((out / "parts/machine-0000-of-0001.json").read_text())
    shards = part["hooks"]["encoder.layer.3"]["shards"]
    assert shards and not part["complete"]
    store = open_store(str(out))
    for shard in shards:
        assert checksum(store.get(f"encoder.layer.3/{shard['name']}")) == shard["checksum"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
