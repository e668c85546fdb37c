"""Text sources: the built-in demo corpus, local files, and HF datasets (streaming)."""

from __future__ import annotations

import ast
import glob
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from saesweep.errors import UserError

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


def iter_documents(
    dataset: str,
    text_column: str,
    dataset_config: str | None = None,
    split: str = "train",
    streaming: bool = True,
) -> Iterator[str]:
    """Documents in a fixed order, so every machine sees the same numbering."""
    if dataset == "demo":
        return demo_corpus()
    files = local_files(dataset)
    if files:
        return (doc for f in files for doc in _read_file(f, text_column))
    return _hf_documents(dataset, dataset_config, split, text_column, streaming)


def check_dataset(spec: str) -> None:
    """Refuse a dataset that names local files (a path with a text suffix, a glob, or one that
    starts with '.' or '/') but finds none: before a model loads or a file is written,
    not as the hub's 'couldn't reach' after both."""
    if spec == "demo" or local_files(spec):
        return
    looks_local = (
        Path(spec).suffix in LOCAL_SUFFIXES
        or any(c in spec for c in "*?[")
        or spec.startswith((".", "/"))
    )
    if looks_local:
        raise UserError(
            f"no such file: {spec} (a local dataset is a {', '.join(LOCAL_SUFFIXES)} file, a "
            "directory or a glob); check the path, or give 'demo' or an HF dataset name"
        )


def demo_corpus() -> Iterator[str]:
    """One document per standard-library module: its docstrings, read with ast (no imports)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        if skip.intersection(path.relative_to(root).parts):
            continue
        text = module_docstrings(path)
        if text:
            yield text


def module_docstrings(path: Path) -> str:
    """A Python file's module, class and function docstrings, by ast; "" when it does not parse."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    nodes = [
        tree,
        *(
            n
            for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        ),
    ]
    docs = (ast.get_docstring(n) for n in nodes)
    return "\n\n".join(d for d in docs if d)


def local_files(spec: str) -> list[Path]:
    """Files named by a path, directory or glob; [] when `spec` names no local file."""
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise UserError(f"directory {spec} holds no {', '.join(LOCAL_SUFFIXES)} files")
        return files
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise UserError(
                f"cannot read {spec}: text files must end in {', '.join(LOCAL_SUFFIXES)}"
            )
        return [path]
    return [Path(p) for p in sorted(glob.glob(spec)) if Path(p).suffix in LOCAL_SUFFIXES]


def _read_file(path: Path, text_column: str) -> Iterator[str]:
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8")
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield _column(json.loads(line), text_column, f"{path}:{line_no}")
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_column not in table.column_names:
            raise UserError(
                f"{path} has no column {text_column!r} (columns: "
                f"{', '.join(table.column_names)}); set --text-column"
            )
        yield from table.column(text_column).to_pylist()


def _column(row: dict, text_column: str, where: str) -> str:
    if text_column not in row:
        raise UserError(
            f"{where} has no field {text_column!r} (fields: {', '.join(row)}); set --text-column"
        )
    return row[text_column]


def _hf_documents(
    name: str, config: str | None, split: str, text_column: str, streaming: bool
) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as err:  # datasets raises many types for a missing or unreachable dataset
        raise UserError(
            f"cannot load dataset {name!r} (split {split!r}): {str(err).splitlines()[0]}"
        ) from None
    columns = ds.column_names
    if columns is not None and text_column not in columns:
        raise UserError(
            f"dataset {name!r} has no column {text_column!r} (columns: "
            f"{', '.join(columns)}); set --text-column"
        )
    for i, row in enumerate(ds):
        yield _column(row, text_column, f"dataset {name!r} row {i}")
