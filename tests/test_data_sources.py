"""Data sources: every local kind read back with origins, prepared once as ArrayRecord and
reused, bad lines named by file and line (or skipped and counted), Grain access, TFDS catalog
through `tfds.testing.mock_data`."""
from __future__ import annotations

import glob
import json
import os
import pickle

import pytest

from ftjax.data.errors import DataError
from ftjax.data.formats import to_canonical
from ftjax.data.sources import open_source, parse_spec


def _write(path, text: str) -> str:
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return str(path)


def _all(src):
    return [src[i] for i in range(len(src))], [src.origin(i) for i in range(len(src))]


@pytest.fixture
def dd(tmp_path):
    return str(tmp_path / "data_dir")


# ---------------------------------------------------------------------------------------------
# Every local kind, with origins


def test_jsonl_records_and_line_origins(tmp_path, dd):
    p = _write(tmp_path / "a.jsonl", '{"text": "héllo", "label": "x"}\n\n'
                                     '{"text": "yo", "label": 2, "tags": [1, {"k": null}]}\n')
    src = open_source(f"jsonl:{p}", data_dir=dd)
    records, origins = _all(src)
    assert records == [{"text": "héllo", "label": "x"},
                       {"text": "yo", "label": 2, "tags": [1, {"k": None}]}]
    assert origins == [(p, 1), (p, 3)]  # the blank line 2 is not a record
    assert src.origin_str(1) == f"{p}:3"
    assert src.skipped == [] and src.built


def test_json_list_and_data_object(tmp_path, dd):
    a = _write(tmp_path / "list.json", '[\n  {"t": 1},\n\n  {"t": "two",\n   "u": [3]}\n]\n')
    b = _write(tmp_path / "obj.json", '{"version": {"x": [1, 2]},\n "data": [{"t": 1},\n'
                                      '  {"t": 2}]}')
    assert _all(open_source(a, data_dir=dd)) == ([{"t": 1}, {"t": "two", "u": [3]}],
                                                 [(a, 2), (a, 4)])
    assert _all(open_source(f"json:{b}", data_dir=dd)) == ([{"t": 1}, {"t": 2}],
                                                           [(b, 2), (b, 3)])


def test_csv_quoted_newlines_and_row_origins(tmp_path, dd):
    p = _write(tmp_path / "d.csv", 'text,label\n"line one\nline two, with comma",pos\n'
                                   'plain,"neg"\n\n"say ""hi""",pos\n')
    records, origins = _all(open_source(p, data_dir=dd))
    assert records == [{"text": "line one\nline two, with comma", "label": "pos"},
                       {"text": "plain", "label": "neg"},
                       {"text": 'say "hi"', "label": "pos"}]
    assert origins == [(p, 2), (p, 4), (p, 6)]  # the line where each row starts


def test_parquet_rows(tmp_path, dd):
    import pyarrow as pa
    import pyarrow.parquet as pq
    p = str(tmp_path / "d.parquet")
    table = pa.table({"prompt": ["a", "b", "c"], "score": [1.5, 2.0, float("nan")],
                      "messages": [[{"role": "user", "content": "hi"}], [], None]})
    pq.write_table(table, p, row_group_size=2)
    records, origins = _all(open_source(f"parquet:{p}", data_dir=dd))
    assert records == [{"prompt": "a", "score": 1.5,
                        "messages": [{"role": "user", "content": "hi"}]},
                       {"prompt": "b", "score": 2.0, "messages": []},
                       {"prompt": "c", "score": None, "messages": None}]
    assert origins == [(p, 1), (p, 2), (p, 3)]


def test_text_lines_paragraphs_and_files(tmp_path, dd):
    p = _write(tmp_path / "t.txt", "first para\nstill first\n\n\nsecond para\n")
    assert _all(open_source(p, data_dir=dd)) == (
        [{"text": "first para"}, {"text": "still first"}, {"text": "second para"}],
        [(p, 1), (p, 2), (p, 5)])
    assert _all(open_source(f"text:{p}", data_dir=dd, text_unit="paragraph")) == (
        [{"text": "first para\nstill first"}, {"text": "second para"}], [(p, 1), (p, 5)])
    assert _all(open_source(p, data_dir=dd, text_unit="file"))[0] == [
        {"text": "first para\nstill first\n\n\nsecond para\n"}]


def test_globs_lists_and_comma_paths_keep_sorted_file_order(tmp_path, dd):
    b = _write(tmp_path / "b.jsonl", '{"i": 2}\n{"i": 3}\n')
    a = _write(tmp_path / "a.jsonl", '{"i": 1}\n')
    want = ([{"i": 1}, {"i": 2}, {"i": 3}], [(a, 1), (b, 1), (b, 2)])
    assert _all(open_source(f"jsonl:{tmp_path}/*.jsonl", data_dir=dd)) == want
    assert _all(open_source([f"jsonl:{a}", f"jsonl:{b}"], data_dir=dd)) == want
    assert _all(open_source(f"{a},{b}", data_dir=dd)) == want
    assert parse_spec("tfds:glue/sst2:validation") == ("tfds", ["glue/sst2:validation"])


# ---------------------------------------------------------------------------------------------
# Prepared once, reused; changes rebuild


def _array_record_files(src):
    files = sorted(glob.glob(os.path.join(src.cache_dir, "*.array_record*")))
    assert files, f"no array_record files in {src.cache_dir}"
    return files


def test_prepared_once_then_reused_and_rebuilt_on_change(tmp_path, dd, capfd):
    p = _write(tmp_path / "a.jsonl", '{"i": 1}\n{"i": 2}\n')
    first = open_source(p, data_dir=dd)
    assert first.built
    # It says what happens (a local build, once), not TFDS' "Downloading and preparing".
    out = capfd.readouterr()
    assert f"data: building the ArrayRecord cache of {p} in {first.cache_dir}" in out.out
    assert "ownload" not in out.out + out.err
    files = _array_record_files(first)
    mtimes = [os.stat(f).st_mtime_ns for f in files]

    again = open_source(p, data_dir=dd)
    assert not again.built
    out = capfd.readouterr()
    assert f"data: reusing the ArrayRecord cache of {p} in {first.cache_dir}" in out.out
    assert "building" not in out.out and "ownload" not in out.out + out.err
    assert again.cache_dir == first.cache_dir
    assert [os.stat(f).st_mtime_ns for f in _array_record_files(again)] == mtimes
    assert _all(again) == _all(first)

    _write(p, '{"i": 1}\n{"i": 2}\n{"i": 3}\n')  # new contents -> new key, rebuilt
    changed = open_source(p, data_dir=dd)
    assert changed.built and changed.cache_dir != first.cache_dir and len(changed) == 3
    # Options are part of the key too.
    assert open_source(p, data_dir=dd, on_error="skip").built


def test_source_is_grain_and_pickle_compatible(tmp_path, dd):
    import grain
    p = _write(tmp_path / "a.jsonl", "".join(json.dumps({"i": i}) + "\n" for i in range(10)))
    src = open_source(p, data_dir=dd, field_map={"n": "i"})
    ds = grain.MapDataset.source(src).map(lambda r: r["n"] * 10)
    assert list(ds) == [i * 10 for i in range(10)]
    clone = pickle.loads(pickle.dumps(src))  # Grain worker processes pickle the source
    assert _all(clone) == _all(src)
    assert src[-1] == {"n": 9}
    assert src.__getitems__([3, 0, -1]) == [src[3], src[0], src[9]]
    with pytest.raises(IndexError, match="out of range"):
        src[10]


def test_split_slicing_and_bad_split(tmp_path, dd):
    p = _write(tmp_path / "a.jsonl", "".join(json.dumps({"i": i}) + "\n" for i in range(10)))
    head = open_source(p, data_dir=dd, split="train[:30%]")
    assert _all(head) == ([{"i": 0}, {"i": 1}, {"i": 2}], [(p, 1), (p, 2), (p, 3)])
    with pytest.raises(DataError, match="one split, 'train'.*split='validation'"):
        open_source(p, data_dir=dd, split="validation")


# ---------------------------------------------------------------------------------------------
# Bad input


def test_malformed_jsonl_line_names_file_line_and_snippet(tmp_path, dd):
    p = _write(tmp_path / "bad.jsonl", '{"i": 1}\n{"i": 2}\n{"i": 3, oops}\n{"i": 4}\n')
    with pytest.raises(DataError) as e:
        open_source(p, data_dir=dd)
    msg = str(e.value)
    assert f"{p}:3" in msg and "malformed JSON" in msg and '{"i": 3, oops}' in msg
    assert "on_error='skip'" in msg


def test_skip_mode_counts_skipped_lines_and_keeps_them_on_reuse(tmp_path, dd):
    p = _write(tmp_path / "bad.jsonl", '{"i": 1}\n{"i": 2\n[1, 2]\n"str"\n{"i": 5}\n')
    src = open_source(p, data_dir=dd, on_error="skip")
    assert _all(src) == ([{"i": 1}, {"i": 5}], [(p, 1), (p, 5)])
    assert [o for o, _ in src.skipped] == [(p, 2), (p, 3), (p, 4)]
    reasons = [r for _, r in src.skipped]
    assert "malformed JSON" in reasons[0]
    assert "got list" in reasons[1] and "got str" in reasons[2]
    again = open_source(p, data_dir=dd, on_error="skip")
    assert not again.built and again.skipped == src.skipped


def test_wrong_record_type_is_named(tmp_path, dd):
    p = _write(tmp_path / "arr.jsonl", '{"i": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"arr\.jsonl:2: expected a JSON object per line, got list"):
        open_source(p, data_dir=dd)
    q = _write(tmp_path / "arr.json", '[{"i": 1},\n 7]')
    with pytest.raises(DataError, match=r"arr\.json:2: expected a JSON object per element"):
        open_source(q, data_dir=dd)


def test_malformed_json_file_names_line(tmp_path, dd):
    p = _write(tmp_path / "bad.json", '[\n {"i": 1},\n {"i": 2,,}\n]')
    with pytest.raises(DataError, match=r"bad\.json:3: malformed JSON \(.*column 10\): "
                                        r"' \{\"i\": 2,,\}'"):
        open_source(p, data_dir=dd)
    q = _write(tmp_path / "dict.json", '{"rows": [{"i": 1}]}')
    with pytest.raises(DataError, match=r"list of records or \{\"data\": \[...\]\}; found dict "
                                         r"with keys \['rows'\]"):
        open_source(q, data_dir=dd)


def test_csv_row_with_wrong_field_count(tmp_path, dd):
    p = _write(tmp_path / "bad.csv", 'text,label\nok,pos\ntoo,many,fields\n')
    with pytest.raises(DataError, match=r"bad\.csv:3: CSV row has 3 fields but the header has 2 "
                                        r".*'too,many,fields'"):
        open_source(p, data_dir=dd)
    src = open_source(p, data_dir=dd, on_error="skip")
    assert len(src) == 1 and src.skipped[0][0] == (p, 3)
    dup = _write(tmp_path / "dup.csv", 'text,text\na,b\n')
    with pytest.raises(DataError, match="repeats column names"):
        open_source(dup, data_dir=dd)


def test_empty_inputs_are_clear_errors(tmp_path, dd):
    for name, text in (("e.jsonl", ""), ("blank.jsonl", "\n\n"), ("h.csv", "text,label\n"),
                       ("e.json", "[]"), ("e.txt", "\n")):
        p = _write(tmp_path / name, text)
        with pytest.raises(DataError, match=f"{p} (is empty|has no records)"):
            open_source(p, data_dir=dd)
    p = _write(tmp_path / "allbad.jsonl", "nope\n{\n")
    with pytest.raises(DataError, match="no valid records.*all 2 were skipped"):
        open_source(p, data_dir=dd, on_error="skip")


def test_bad_specs(tmp_path, dd):
    with pytest.raises(DataError, match="does not exist"):
        open_source(f"jsonl:{tmp_path}/missing.jsonl", data_dir=dd)
    with pytest.raises(DataError, match="matches no files"):
        open_source(f"jsonl:{tmp_path}/*.jsonl", data_dir=dd)
    with pytest.raises(DataError, match="unknown data source kind 'xml'"):
        open_source("xml:foo.xml", data_dir=dd)
    with pytest.raises(DataError, match="cannot tell the format"):
        open_source(str(tmp_path / "foo.dat"), data_dir=dd)
    with pytest.raises(DataError, match="on_error="):
        open_source("tfds:x:train", data_dir=dd, on_error="ignore")


def test_records_flow_into_to_canonical_with_origins(tmp_path, dd):
    p = _write(tmp_path / "qa.jsonl", '{"question": "2+2?", "answer": "4"}\n'
                                      '{"question": "3+3?"}\n')
    fm = {"instruction": "question", "output": "answer"}
    src = open_source(p, data_dir=dd)
    assert to_canonical(src[0], "instruction", fm, src.origin_str(0)) == {"messages": [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    with pytest.raises(DataError, match=rf"{p}:2: .*no field 'answer' \(mapped from 'output'\) "
                                        r"\(fields present: \['question'\]\)"):
        to_canonical(src[1], "instruction", fm, src.origin_str(1))


# ---------------------------------------------------------------------------------------------
# TFDS catalog


def test_tfds_catalog_by_name_with_mock_data(tmp_path):
    import tensorflow_datasets as tfds
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        src = open_source("tfds:imdb_reviews/plain_text:test", data_dir=str(tmp_path),
                          field_map={"review": "text"})
        assert len(src) == 6
        records = [src[i] for i in range(6)]
        for r in records:
            assert set(r) == {"review", "label"}
            assert isinstance(r["review"], str) and r["label"] in ("neg", "pos")
        assert src.origin(4) == ("tfds:imdb_reviews/plain_text:test", 5)
        ex = to_canonical(records[0], "classification", {"text": "review"}, src.origin_str(0))
        assert ex == {"text": records[0]["review"], "label": records[0]["label"]}
        same = open_source("tfds:imdb_reviews/plain_text", split="test", data_dir=str(tmp_path))
        assert same[0]["text"] == records[0]["review"]
        versioned = open_source("tfds:imdb_reviews/plain_text:1.0.0:test", data_dir=str(tmp_path))
        assert versioned.spec == "tfds:imdb_reviews/plain_text:1.0.0:test"
        assert versioned[0]["text"] == records[0]["review"]
    with pytest.raises(DataError, match="cannot open TFDS dataset 'no_such_dataset_xyz'"):
        open_source("tfds:no_such_dataset_xyz:train", data_dir=str(tmp_path), download=False)
