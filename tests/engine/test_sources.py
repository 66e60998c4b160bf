"""Data sources: every file type reads the records its JSONL twin holds; broken files name themselves;
several weighted sources mix deterministically; the cache key covers every source."""

import csv
import gzip
import json
import sys
from dataclasses import replace

import numpy as np
import pytest
from data_fixtures import alpaca_rows, trained_tokenizers, write_jsonl

from packtune.config import DataConfig, DataSource, dump_config, load_config
from packtune.data import format_report, prepare_dataset
from packtune.data.dataset import _in_order
from packtune.data.readers import count_records, open_records
from packtune.data.sources import OpenSource
from packtune.errors import ConfigError, DataError

ROWS = alpaca_rows(300)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return trained_tokenizers(tmp_path_factory)["sp"]


def prepare(sp_model, path=None, sources=(), workers=1, cache_dir=None, **kw):
    cfg = DataConfig(
        path=str(path or ""), sources=list(sources), tokenizer=str(sp_model), max_tokens=512,
        cache_dir=cache_dir or "", **kw,
    )
    return prepare_dataset(cfg, num_workers=workers, use_cache=cache_dir is not None)


def write_csv(path, records, opener=open):
    with opener(path, "wt", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def zstd_bytes(data: bytes) -> bytes:
    zstandard = pytest.importorskip("zstandard")
    return zstandard.ZstdCompressor().compress(data)


def write_arrow(path, records, stream=False, batch=64):
    pa = pytest.importorskip("pyarrow")
    table = pa.Table.from_pylist(records)
    new = pa.ipc.new_stream if stream else pa.ipc.new_file
    with new(str(path), table.schema) as writer:
        writer.write_table(table, max_chunksize=batch)
    return path


def write_saved_dataset(folder, records):
    """The layout `datasets.Dataset.save_to_disk` writes: Arrow stream shards listed in state.json."""
    folder.mkdir(parents=True)
    names = [f"data-0000{i}-of-00002.arrow" for i in range(2)]
    for name, part in zip(names, (records[:120], records[120:]), strict=True):
        write_arrow(folder / name, part, stream=True)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
    (folder / "dataset_info.json").write_text("{}")
    return folder


def write_parquet(path, rows_or_table, **kw):
    pa = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    table = rows_or_table if isinstance(rows_or_table, pa.Table) else pa.Table.from_pylist(rows_or_table)
    parquet.write_table(table, path, **kw)
    return path


def write_with_datasets(folder, records):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(records).save_to_disk(str(folder), num_shards=3)


JSONL = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
WRITERS = {
    "d.jsonl.gz": lambda p: p.write_bytes(gzip.compress(JSONL)),
    "d.jsonl.zst": lambda p: p.write_bytes(zstd_bytes(JSONL)),
    "d.json": lambda p: p.write_text(json.dumps(ROWS, indent=1)),
    "d.json.gz": lambda p: p.write_bytes(gzip.compress(json.dumps(ROWS).encode())),
    "d.csv": lambda p: write_csv(p, ROWS),
    "d.csv.gz": lambda p: write_csv(p, ROWS, gzip.open),
    "d.parquet": lambda p: write_parquet(p, ROWS, row_group_size=50),
    "d.feather": lambda p: write_arrow(p, ROWS),
    "d.arrow": lambda p: write_arrow(p, ROWS, stream=True),
    "saved": lambda p: write_saved_dataset(p, ROWS),
    "saved_by_datasets": lambda p: write_with_datasets(p, ROWS),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_every_source_type_reads_the_jsonl_rows(name, sp_model, tmp_path):
    path = tmp_path / name
    WRITERS[name](path)
    jsonl = prepare(sp_model, write_jsonl(tmp_path / "d.jsonl", ROWS))
    other = prepare(sp_model, path)
    for key in ("tokens", "mask", "offsets"):
        assert np.array_equal(getattr(jsonl, key), getattr(other, key)), key
    assert other.report["rows"] == other.report["kept"] == count_records(path) == 300
    assert other.report["sources"] == [
        {"path": str(path), "format": "alpaca", "weight": 1.0, "read": 300, "rows": 300, "kept": 300}
    ]
    if name.endswith(("parquet", "feather", "arrow")) or name.startswith("saved"):
        assert list(other.lines) == list(range(300))  # record indices
    elif name.startswith("d.jsonl"):
        assert list(other.lines) == list(jsonl.lines) == list(range(1, 301))


def test_csv_lines_count_the_header_and_quoted_newlines(tmp_path):
    records = [{"text": "one\ntwo"}, {"text": "three"}]
    stream = open_records(write_csv(tmp_path / "d.csv", records))
    assert stream.columns == {"text": "string"}
    assert list(stream.records) == [(2, records[0]), (4, records[1])]


def test_broken_files_name_themselves(sp_model, tmp_path):
    gz = tmp_path / "t.jsonl.gz"
    data = gzip.compress(JSONL)
    gz.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"^{gz}: cannot read the file after line \d+ \(corrupt or trunc"):
        prepare(sp_model, gz)
    zst = tmp_path / "t.jsonl.zst"
    data = zstd_bytes("".join(json.dumps(r) + "\n" for r in alpaca_rows(3000, seed=1)).encode())
    zst.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"^{zst}: cannot read the file after line \d+ .*truncated"):
        prepare(sp_model, zst)
    short = tmp_path / "short.jsonl.zst"
    short.write_bytes(zstd_bytes(JSONL)[:40])
    with pytest.raises(DataError, match=rf"^{short}: cannot read the file .*truncated"):
        prepare(sp_model, short)
    arrow = write_arrow(tmp_path / "c.arrow", ROWS)
    arrow.write_bytes(arrow.read_bytes()[:2000])
    with pytest.raises(DataError, match=rf"^{arrow}: cannot read the file"):
        prepare(sp_model, arrow)
    garbage = tmp_path / "g.parquet"
    garbage.write_bytes(b"not parquet at all" * 10)
    with pytest.raises(DataError, match=rf"^{garbage}: cannot read the file"):
        prepare(sp_model, garbage)


def test_saved_dataset_dict_asks_for_a_split(sp_model, tmp_path):
    folder = tmp_path / "dict"
    write_saved_dataset(folder / "train", ROWS)
    write_saved_dataset(folder / "test", ROWS[:10])
    (folder / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    message = rf"^{folder}: a saved DatasetDict; set the path to one split: test, train$"
    with pytest.raises(DataError, match=message):
        prepare(sp_model, folder)
    assert len(prepare(sp_model, folder / "test")) == 10


def test_wrong_parquet_schema(sp_model, tmp_path):
    pa = pytest.importorskip("pyarrow")
    missing = write_parquet(tmp_path / "m.parquet", [{"instruction": r["instruction"]} for r in ROWS])
    with pytest.raises(DataError, match=rf"^{missing}: no column 'output', which the alpaca format needs"):
        prepare(sp_model, missing, format="alpaca")
    numbers = pa.table({"instruction": ["a", "b"], "output": pa.array([1, 2], pa.int64())})
    typed = write_parquet(tmp_path / "t.parquet", numbers)
    with pytest.raises(DataError, match=rf"^{typed}: column 'output' is int64, expected a string"):
        prepare(sp_model, typed)
    nulls = write_parquet(tmp_path / "n.parquet", [*ROWS[:3], {"instruction": "x", "output": None}])
    with pytest.raises(DataError, match=rf"^{nulls}: record 3: missing field 'output'"):
        prepare(sp_model, nulls)


def test_csv_row_with_a_missing_column(sp_model, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,output\nSay hi,hi\n"two\nlines",ok\nno output here\nSay yo,yo\n')
    with pytest.raises(DataError, match=rf"^{path}:5: expected 2 columns \(instruction, output\), got 1"):
        prepare(sp_model, path)
    ds = prepare(sp_model, path, skip_bad_records=True)
    assert ds.report["dropped"] == {"wrong_columns": 1} and ds.report["kept"] == 3
    assert list(ds.lines) == [2, 3, 6]


def test_missing_extra_is_named(sp_model, tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "d.parquet", ROWS)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(DataError, match=rf"^{path}: reading this file needs pyarrow: pip install pyarrow"):
        prepare(sp_model, path)


def renamed(records):
    return [{"q": r["instruction"], "a": r["output"]} for r in records]


def two_sources(tmp_path, weights=(2.5, 0.5)):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS[:100])
    b = write_parquet(tmp_path / "b.parquet", renamed(ROWS[100:140]))
    return [
        DataSource(path=str(a), weight=weights[0]),
        DataSource(path=str(b), format="alpaca", field_map=["instruction=q", "output=a"], weight=weights[1]),
    ]


def test_weights_repeat_and_subsample_deterministically(sp_model, tmp_path):
    sources = two_sources(tmp_path)
    ds = prepare(sp_model, sources=sources)
    # a: 100 records x 2 + a seeded 50; b: 40 records x 0.5 = a seeded 20.
    counts = [(s["read"], s["rows"], s["kept"]) for s in ds.report["sources"]]
    assert counts == [(100, 250, 250), (40, 20, 20)]
    assert ds.report["rows"] == ds.report["kept"] == len(ds) == 270
    lines_a, lines_b = ds.lines[:250], ds.lines[250:]
    copies = np.bincount(lines_a, minlength=101)[1:]
    assert sorted(set(copies)) == [2, 3] and (copies == 3).sum() == 50
    assert len(set(lines_b)) == 20 and set(lines_b) <= set(range(40))
    again = prepare(sp_model, sources=sources, workers=2)
    for key in ("tokens", "mask", "offsets", "lines"):
        assert np.array_equal(getattr(ds, key), getattr(again, key)), key
    reseeded = prepare(sp_model, sources=sources, mix_seed=1)
    assert len(reseeded) == 270 and not np.array_equal(reseeded.lines, ds.lines)
    text = format_report(ds.report)
    assert text.startswith("data: 270 records read after source weights (alpaca format")
    line = (f"source {sources[1].path} (alpaca, weight 0.5): 40 records in the file, 20 after weighting, "
            "20 kept")
    assert line in text


def test_cache_key_covers_every_source(sp_model, tmp_path):
    cache = str(tmp_path / "cache")
    sources = two_sources(tmp_path)
    first = prepare(sp_model, sources=sources, cache_dir=cache)
    assert prepare(sp_model, sources=sources, cache_dir=cache).report["cache"] == "hit"
    variants = [
        [sources[0], replace(sources[1], weight=1.0)],
        [sources[0], replace(sources[1], field_map=["instruction=q", "output=a", "system=s"])],
        [replace(sources[0], format="alpaca"), sources[1]],
        sources[:1],
    ]
    paths = {first.cache_path}
    for variant in variants:
        ds = prepare(sp_model, sources=variant, cache_dir=cache)
        assert ds.report["cache"] == "written"
        paths.add(ds.cache_path)
    write_parquet(tmp_path / "b.parquet", renamed(ROWS[140:180]))
    edited = prepare(sp_model, sources=sources, cache_dir=cache)
    assert edited.report["cache"] == "written"
    paths.add(edited.cache_path)
    assert len(paths) == 2 + len(variants)


def test_sources_in_the_config(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[data]\nmax_tokens = 512\n[[data.sources]]\npath = "a.jsonl"\n'
        '[[data.sources]]\npath = "b.parquet"\nformat = "alpaca"\nfield_map = ["output=a"]\nweight = 0.5\n'
    )
    cfg = load_config(path, ["data.max_tokens=256"])
    assert cfg.data.max_tokens == 256
    assert cfg.data.sources == [
        DataSource(path="a.jsonl"),
        DataSource(path="b.parquet", format="alpaca", field_map=["output=a"], weight=0.5),
    ]
    dumped = tmp_path / "dumped.toml"
    dumped.write_text(dump_config(cfg))
    assert load_config(dumped) == cfg
    override = load_config(None, ['data.sources=[{path = "c.csv", weight = 2}]'])
    assert override.data.sources == [DataSource(path="c.csv", weight=2.0)]
    path.write_text('[[data.sources]]\npath = "a.jsonl"\nwieght = 2\n')
    with pytest.raises(ConfigError, match=r"data.sources\[0\]: unknown key 'wieght'; did you mean 'weight'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"data.sources\[0\].weight: expected float, got str"):
        load_config(None, ['data.sources=[{path = "a", weight = "2"}]'])


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (DataConfig(), "data.path is not set"),
        (DataConfig(path="a", sources=[DataSource(path="b")]), "data.path and .* are both set"),
        (DataConfig(sources=[DataSource(path="a", weight=0.0)]), r"sources\[0\].weight: must be a number >"),
        (DataConfig(sources=[DataSource(path="a", format="alpacca")]), r"sources\[0\].format: 'alpacca'"),
        (DataConfig(sources=[DataSource()]), r"sources\[0\].path is not set"),
    ],
)
def test_bad_source_settings(cfg, message, sp_model):
    cfg.tokenizer = str(sp_model)
    with pytest.raises(ConfigError, match=message):
        prepare_dataset(cfg, use_cache=False)


def test_rows_stream_lazily(tmp_path):
    """The first chunk comes before the file is read to its (truncated) end, and no more than
    `window` chunks wait in the worker pool at once."""
    records = alpaca_rows(3000, seed=1)
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    spec = {"path": str(path), "format": "auto", "field_map": [], "weight": 1.0}
    chunks = OpenSource(spec, skip_bad_records=False).chunks(100, 0, 0)
    copies, first = next(chunks)
    assert copies == 1 and [n for n, _ in first] == list(range(1, 101))
    with pytest.raises(DataError, match="cannot read the file after line"):
        list(chunks)

    class Pool:
        waiting = most = 0

        def apply_async(self, fn, args):
            Pool.waiting += 1
            Pool.most = max(Pool.most, Pool.waiting)
            return self

        def get(self):
            Pool.waiting -= 1
            return {}

    tasks = ((0, 1, [(i, b"")]) for i in range(20))
    assert len(list(_in_order(Pool(), tasks, 4))) == 20 and Pool.most == 4
