"""PrimeVul reading: schema mappings, label checks, pairing, dedup, errors, the shipped and the real samples."""

from __future__ import annotations

import filecmp
import importlib.util
import json
import logging
import sys
from pathlib import Path

import datasets
import pytest

import ttc_lightning
from tests.helpers import REAL_PRIMEVUL, REPO, pair, v01, write
from ttc_lightning.data.primevul import (
    PrimeVulRecord,
    dedup_pairs,
    dedup_records,
    detect_schema,
    func_hash,
    hub_split_name,
    load_functions,
    load_pairs,
    load_records,
    pair_records,
    read_records,
    records_from_dataset,
    split_file,
)
from ttc_lightning.errors import TTCError

SAMPLE = Path(ttc_lightning.__file__).parent / "assets" / "primevul_sample"
V01_FIELDS = [
    "idx", "project", "commit_id", "project_url", "commit_url", "commit_message", "target", "func", "func_hash",
    "file_name", "file_hash", "cwe", "cve", "cve_desc", "nvd_url",
]  # fmt: skip


def test_func_hash_is_md5_of_the_function_without_whitespace():
    # md5(b"intf(){return0;}") = 615a62ec4f5e717ef2aa5ce3d75bf1e6 (hex), read as an integer
    assert func_hash("int f() {\n\treturn 0;\n}") == 0x615A62EC4F5E717EF2AA5CE3D75BF1E6


def test_v01_line_maps_every_field(tmp_path):
    row = v01(5, 1, "void g(void) {}", file_name="None", file_hash=None, cwe=["CWE-476", "CWE-20"], cve_desc=None)
    [record] = read_records(write(tmp_path / "f.jsonl", [row]))
    assert record == PrimeVulRecord(
        idx=5,
        project="proj",
        commit_id="c0ffee",
        target=1,
        func="void g(void) {}",
        func_hash=func_hash("void g(void) {}"),
        cwe=("CWE-476", "CWE-20"),
        cve="CVE-0000-0001",
        cve_desc=None,
        file_name=None,  # the release writes a missing file name as the string "None"
        commit_message="fix it",
    )
    assert record.primary_cwe == "CWE-476"
    assert record.line == 1


def test_original_release_schema_computes_the_hash(tmp_path):
    row = {"idx": 3, "project": "p", "commit_id": "abc", "target": 0, "func": "int h;", "hash": 99, "message": "m"}
    [record] = read_records(write(tmp_path / "orig.jsonl", [row]))
    assert (record.idx, record.target, record.commit_message, record.cwe) == (3, 0, "m", ())
    assert record.func_hash == func_hash("int h;")  # `hash` (99) is not trusted as a function hash


def test_detect_schema_by_column_names():
    assert detect_schema(V01_FIELDS) == "v0.1"
    assert detect_schema(["idx", "project", "commit_id", "target", "func", "hash"]) == "original"
    assert detect_schema(["project", "commit_id", "func", "hash", "is_vulnerable", "cwe"]) == "is_vulnerable"


def test_is_vulnerable_mirror_is_inverted_back():
    # the mirror stores is_vulnerable = (target == 0): three benign functions read True, the vulnerable one False
    rows = [
        {"project": "p", "commit_id": "c", "func": f"int f{i};", "hash": i, "is_vulnerable": i != 3, "cwe": ["CWE-20"]}
        for i in range(4)
    ]
    records = records_from_dataset(datasets.Dataset.from_list(rows), "mirror")
    assert [r.target for r in records] == [0, 0, 0, 1]
    assert [r.idx for r in records] == [1, 2, 3, 4]  # no idx column: row numbers


def test_json_loaded_through_datasets_gets_exact_hashes(tmp_path):
    # Arrow reads the 128-bit func_hash as a float64, losing digits; the record recomputes it from func
    path = write(tmp_path / "primevul_valid.jsonl", [v01(1, 0, "int a = 1;"), v01(2, 0, "int b = 2;")])
    dataset = datasets.load_dataset("json", data_files=str(path), split="train")
    records = records_from_dataset(dataset, "json")
    assert [r.func_hash for r in records] == [func_hash("int a = 1;"), func_hash("int b = 2;")]
    assert [r.file_name for r in records] == ["a.c", "a.c"]


def test_hub_split_names_of_known_mirrors():
    kth = ["train_paired", "valid_paired", "test_paired", "train_unpaired", "valid_unpaired", "test_unpaired"]
    assert hub_split_name(kth, "valid", paired=True, paired_config=False) == "valid_paired"
    assert hub_split_name(kth, "train", paired=False, paired_config=False) == "train_unpaired"
    plain = ["train", "validation", "test"]  # colin/PrimeVul: a "default" and a "paired" config
    assert hub_split_name(plain, "valid", paired=False, paired_config=False) == "validation"
    assert hub_split_name(plain, "test", paired=True, paired_config=True) == "test"
    with pytest.raises(TTCError, match="no paired split for 'test'"):
        hub_split_name(plain, "test", paired=True, paired_config=False)


def test_hf_path_loads_through_datasets(monkeypatch):
    rows = [
        {"idx": 1, "project": "p", "commit_id": "c", "func": "int v;", "is_vulnerable": False},
        {"idx": 2, "project": "p", "commit_id": "c", "func": "int w;", "is_vulnerable": True},
    ]
    calls = []
    monkeypatch.setattr(datasets, "get_dataset_config_names", lambda repo: ["default"])
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda repo, config: ["train_paired", "valid_paired"])

    def load_dataset(repo, config, split):
        calls.append((repo, config, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    [p] = load_pairs("hf://ASSERT-KTH/PrimeVul", "valid")
    assert calls == [("ASSERT-KTH/PrimeVul", None, "valid_paired")]
    assert (p.vulnerable.func, p.fixed.func) == ("int v;", "int w;")


def test_unreachable_hub_dataset_is_a_ttc_error(monkeypatch):
    def offline(repo):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "get_dataset_config_names", offline)
    with pytest.raises(TTCError, match=r"hf://org/none: cannot read the dataset \(ConnectionError: no network\)"):
        load_records("hf://org/none", "train")


def test_mostly_vulnerable_unpaired_split_is_refused_as_inverted(tmp_path):
    rows = [v01(1, 1, "int a;"), v01(2, 1, "int b;"), v01(3, 1, "int c;"), v01(4, 0, "int d;")]
    write(tmp_path / "primevul_train.jsonl", rows)
    with pytest.raises(TTCError, match=r"3 of 4 functions are labelled vulnerable.*labels_inverted=True"):
        load_records(tmp_path, "train")
    assert [r.target for r in load_records(tmp_path, "train", labels_inverted=True)] == [0, 0, 0, 1]
    assert [r.target for r in load_records(tmp_path, "train", check_labels=False)] == [1, 1, 1, 0]


def test_fixed_first_pairs_are_refused_as_inverted(tmp_path):
    rows = [r for n in range(3) for r in reversed(pair(n))]
    write(tmp_path / "primevul_test_paired.jsonl", rows)
    with pytest.raises(TTCError, match="3 of 3 pairs list the fixed function .* look inverted"):
        load_pairs(tmp_path, "test")
    assert len(load_pairs(tmp_path, "test", labels_inverted=True)) == 3


def test_adjacent_lines_pair_and_mispairs_say_why(tmp_path):
    rows = pair(0) + [pair(1)[0], pair(2)[1]] + [pair(3)[0], pair(3)[0] | {"idx": 99, "func": "x"}]
    records = read_records(write(tmp_path / "p.jsonl", rows))
    pairs, mispairs = pair_records(records, "p.jsonl")
    assert [(p.vulnerable.idx, p.fixed.idx, p.pair_id) for p in pairs] == [(1, 2, "1-2")]
    assert [str(m) for m in mispairs] == [
        "lines 3-4 (idx 11/22): commit_id commit1 != commit2",
        "lines 5-6 (idx 31/99): targets 1, 1 (expected 1, 0)",
    ]


def test_load_pairs_drops_and_reports_a_mispair(tmp_path, caplog):
    rows = pair(0) + pair(1) + [pair(2)[0], pair(9)[1]] + pair(3)
    write(tmp_path / "primevul_train_paired.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="ttc"):
        pairs = load_pairs(tmp_path, "train")
    assert [p.vulnerable.idx for p in pairs] == [1, 11, 31]
    assert "dropped 1 mispaired line pairs, e.g. lines 5-6 (idx 21/92)" in caplog.text


def test_unpaired_file_read_as_paired_is_an_error(tmp_path):
    rows = [v01(i, 0, f"int f{i};", commit=f"c{i}") for i in range(6)]
    write(tmp_path / "primevul_valid_paired.jsonl", rows)
    with pytest.raises(TTCError, match=r"3 of 3 line pairs are not vulnerable/fixed pairs \(is it an unpaired file"):
        load_pairs(tmp_path, "valid")


def test_whitespace_only_pairs_and_duplicate_pairs_are_dropped(tmp_path):
    same = [v01(1, 1, "int f() { return 0; }"), v01(2, 0, "int f()\n{\n\treturn 0;\n}")]
    rows = pair(0) + same + pair(0) + pair(1)
    write(tmp_path / "primevul_train_paired.jsonl", rows)
    # 4 pairs: one differs only in whitespace, one repeats pair 0
    assert [p.vulnerable.idx for p in load_pairs(tmp_path, "train")] == [1, 11]


def test_functions_are_deduplicated_by_hash(tmp_path):
    rows = [v01(1, 0, "int a;"), v01(2, 0, "int  a ;"), v01(3, 1, "int b;")]
    write(tmp_path / "primevul_train.jsonl", rows)
    # "int a;" and "int  a ;" hash alike (whitespace removed), so idx 2 goes
    assert [r.idx for r in load_functions(tmp_path, "train")] == [1, 3]


def test_dedup_helpers_keep_first_occurrence(tmp_path):
    records = read_records(write(tmp_path / "f.jsonl", pair(0) + pair(0)))
    assert [r.idx for r in dedup_records(records)] == [1, 2]
    pairs, _ = pair_records(records, "f")
    assert len(dedup_pairs(pairs)) == 1


def test_split_file_resolution(tmp_path):
    paired = write(tmp_path / "primevul_valid_paired.jsonl", pair(0))
    single = write(tmp_path / "mine.jsonl", pair(0))
    assert split_file(tmp_path, "valid", paired=True) == paired
    assert split_file(single, "anything", paired=True) == single
    with pytest.raises(TTCError, match=r"primevul_valid.jsonl: file not found \(split 'valid', paired=False\)"):
        split_file(tmp_path, "valid", paired=False)
    with pytest.raises(TTCError, match="no such file or directory"):
        split_file(tmp_path / "missing", "train", paired=False)
    (tmp_path / "primevul_train.jsonl").mkdir()  # not "file not found" beside a listing that shows its name
    with pytest.raises(TTCError, match=r"primevul_train.jsonl: not a regular file \(split 'train', paired=False\)"):
        split_file(tmp_path, "train", paired=False)


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(v01(1, 0, "int a;")) + "\n{not json\n")
    with pytest.raises(TTCError, match=r"bad.jsonl:2: malformed JSON"):
        read_records(path)


def test_missing_field_names_file_line_and_field(tmp_path):
    row = v01(2, 0, "int b;")
    del row["commit_id"]
    path = write(tmp_path / "f.jsonl", [v01(1, 0, "int a;"), row])
    with pytest.raises(TTCError, match=r"f.jsonl:2: commit_id: required field is missing"):
        read_records(path)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("target", "1", "expected 0 or 1"),
        ("target", True, "expected 0 or 1"),
        ("func", "", "expected a non-empty string"),
        ("idx", "7", "expected an integer"),
        ("cwe", [787], "expected a list of CWE ids"),
        ("cve_desc", 3, "expected a string or null"),
        ("func_hash", "abc", "expected an integer"),
    ],
)
def test_mistyped_field_names_file_line_and_field(tmp_path, field, value, expected):
    path = write(tmp_path / "f.jsonl", [v01(1, 0, "int a;") | {field: value}])
    with pytest.raises(TTCError, match=rf"f.jsonl:1: {field}: {expected}"):
        read_records(path)


def test_odd_line_count_in_paired_file(tmp_path):
    write(tmp_path / "primevul_test_paired.jsonl", pair(0) + pair(1)[:1])
    with pytest.raises(TTCError, match="3 records, an odd number"):
        load_pairs(tmp_path, "test")


def test_hash_mismatch_is_logged(tmp_path, caplog):
    path = write(tmp_path / "f.jsonl", [v01(1, 0, "int a;", func_hash=5)])
    with caplog.at_level(logging.WARNING, logger="ttc"):
        [record] = read_records(path)
    assert record.func_hash == 5
    assert "1 records have a func_hash that does not match their func" in caplog.text


# The shipped sample


def test_shipped_sample_is_valid_v01():
    pairs = [p for split in ("train", "valid", "test") for p in load_pairs(SAMPLE, split)]
    assert len(pairs) >= 16
    assert len({p.vulnerable.primary_cwe for p in pairs}) >= 6
    for p in pairs:
        assert p.vulnerable.commit_id == p.fixed.commit_id and len(p.vulnerable.commit_id) == 40
        assert p.vulnerable.cwe == p.fixed.cwe and p.vulnerable.cve == p.fixed.cve
        assert p.vulnerable.cve.startswith("CVE-0000-")  # fictional ids only
        assert 10 <= p.vulnerable.func.count("\n") + 1 <= 60
    for path in sorted(SAMPLE.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            assert list(row) == V01_FIELDS
            assert row["func_hash"] == func_hash(row["func"])
            assert json.dumps(row) == line  # written the way the release is


def test_shipped_unpaired_files_hold_the_paired_functions_and_benign_extras():
    for split in ("train", "valid", "test"):
        paired = {r.func_hash for p in load_pairs(SAMPLE, split) for r in (p.vulnerable, p.fixed)}
        functions = load_functions(SAMPLE, split)
        assert paired < {r.func_hash for r in functions}
        assert all(r.target == 0 for r in functions if r.func_hash not in paired)


def test_sample_script_rewrites_the_shipped_files_exactly(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("make_primevul_sample", REPO / "scripts" / "make_primevul_sample.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    written = module.write_sample(tmp_path)
    assert sorted(p.name for p in written) == sorted(p.name for p in SAMPLE.glob("*.jsonl"))
    for path in written:
        assert filecmp.cmp(path, SAMPLE / path.name, shallow=False), path.name


# The verbatim sample of real PrimeVul records, beside the repository


def real_sample() -> Path:
    if not REAL_PRIMEVUL.is_dir():
        pytest.skip("the real PrimeVul sample is not present beside the repository")
    return REAL_PRIMEVUL


def test_real_paired_samples_load_as_pairs():
    real = real_sample()
    test_pairs = load_pairs(real / "test_paired_sample.jsonl", "test")
    valid_pairs = load_pairs(real / "valid_paired_sample.jsonl", "valid")
    assert (len(test_pairs), len(valid_pairs)) == (12, 8)
    records = [r for p in test_pairs + valid_pairs for r in (p.vulnerable, p.fixed)]
    assert all(r.func_hash == func_hash(r.func) for r in records)
    no_file = {r.idx for r in records if r.file_name is None}
    assert no_file == {220909, 195082, 221413, 195084, 221432, 195362, 224950}


def test_real_sample_keeps_c_escapes():
    records = read_records(real_sample() / "valid_paired_sample.jsonl")
    [hhvm] = [r for r in records if r.idx == 195486]
    assert "'\\b'" in hhvm.func  # the C source has the two characters backslash, b inside quotes
