"""Result records on disk (one JSON per run and variant) and the comparison table built from them."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from kdlib import io as kdlib_io
from kdlib import report
from kdlib.report import (
    TABLE_COLUMNS,
    comparison_table,
    load_run,
    load_runs,
    save_benchmark,
    save_record,
    to_markdown,
    write_table,
)


def metrics(accuracy: float, time_ms: float, size_mb: float, threads: int = 2, **extra) -> dict:
    """A record like the one ``PerformanceBenchmark.run_benchmark()`` produces (the fields used here)."""
    return {
        "accuracy": accuracy,
        "time_avg_ms": time_ms,
        "size_mb": size_mb,
        "env": {"threads": threads},
        **extra,
    }


def files_in(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------
# Records on disk
# ---------------------------------------------------------------------------------------------


def test_save_then_load_round_trip(tmp_path):
    student = metrics(0.86, 7.0, 66.0, num_parameters=66_000_000, predictor={"backend": "pytorch"})
    path = save_record(tmp_path, "cpu2", "student", student)
    save_record(tmp_path, "cpu2", "teacher", metrics(0.87, 14.0, 87.0))
    assert path == tmp_path / "cpu2" / "student.json"
    records = load_run(tmp_path, "cpu2")
    assert [r["variant"] for r in records] == ["student", "teacher"]  # sorted by variant name
    assert records[0] == {"run": "cpu2", "variant": "student", **student}
    assert files_in(tmp_path / "cpu2") == ["student.json", "teacher.json"]  # no temp files left


def test_non_finite_numbers_become_null(tmp_path):
    path = save_record(tmp_path, "r", "v", metrics(float("nan"), float("inf"), 1.0))
    json.loads(path.read_text())  # strict JSON: no NaN / Infinity tokens
    (record,) = load_run(tmp_path, "r")
    assert record["accuracy"] is None and record["time_avg_ms"] is None


def test_two_runs_are_kept_side_by_side(tmp_path):
    save_record(tmp_path, "run-a", "teacher", metrics(0.87, 14.0, 87.0))
    a_file = tmp_path / "run-a" / "teacher.json"
    a_bytes = a_file.read_bytes()
    run_b = {"teacher": metrics(0.87, 20.0, 87.0), "student": metrics(0.86, 9.0, 66.0)}
    save_benchmark(tmp_path, "run-b", run_b)
    assert a_file.read_bytes() == a_bytes
    assert files_in(tmp_path) == ["run-a", "run-b"]
    assert [r["time_avg_ms"] for r in load_run(tmp_path, "run-a")] == [14.0]
    both = load_runs(tmp_path, ["run-a", "run-b"])
    assert [(r["run"], r["variant"]) for r in both] == [
        ("run-a", "teacher"),
        ("run-b", "student"),
        ("run-b", "teacher"),
    ]


def test_rerunning_a_variant_replaces_only_that_record(tmp_path):
    save_record(tmp_path, "r", "teacher", metrics(0.87, 14.0, 87.0))
    save_record(tmp_path, "r", "student", metrics(0.80, 7.0, 66.0))
    teacher_bytes = (tmp_path / "r" / "teacher.json").read_bytes()
    save_record(tmp_path, "r", "student", metrics(0.86, 6.5, 66.0))
    assert (tmp_path / "r" / "teacher.json").read_bytes() == teacher_bytes
    records = {r["variant"]: r for r in load_run(tmp_path, "r")}
    assert records["student"]["accuracy"] == 0.86 and records["student"]["time_avg_ms"] == 6.5
    assert files_in(tmp_path / "r") == ["student.json", "teacher.json"]


def test_failed_rename_keeps_the_earlier_record(tmp_path, monkeypatch):
    path = save_record(tmp_path, "r", "student", metrics(0.80, 7.0, 66.0))
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(report.os, "replace", broken_replace)
    with pytest.raises(OSError, match="simulated crash"):
        save_record(tmp_path, "r", "student", metrics(0.86, 6.5, 66.0))
    assert path.read_bytes() == before
    assert files_in(tmp_path / "r") == ["student.json"]


def test_failed_write_midway_keeps_the_earlier_record(tmp_path, monkeypatch):
    path = save_record(tmp_path, "r", "student", metrics(0.80, 7.0, 66.0))
    before = path.read_bytes()
    real_open = open

    class HalfWriter:
        """Writes half of the text, then fails (a full disk, a killed process)."""

        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, text):
            self.handle.write(text[: len(text) // 2])
            self.handle.flush()
            raise OSError("No space left on device")

    # atomic_open writes through the builtin open(); a module global shadows it for this test.
    monkeypatch.setattr(kdlib_io, "open", lambda *a, **k: HalfWriter(real_open(*a, **k)), raising=False)
    with pytest.raises(OSError, match="No space left"):
        save_record(tmp_path, "r", "student", metrics(0.86, 6.5, 66.0, note="x" * 10_000))
    assert path.read_bytes() == before
    assert files_in(tmp_path / "r") == ["student.json"]


@pytest.mark.parametrize("bad", ["../x", "..", "a/b", "", ".hidden", "-flag", "x y"])
def test_invalid_run_name_is_a_clear_error(tmp_path, bad):
    with pytest.raises(ValueError, match="Run name"):
        save_record(tmp_path, bad, "teacher", metrics(0.87, 14.0, 87.0))
    with pytest.raises(ValueError, match="Run name"):
        load_run(tmp_path, bad)
    assert list(tmp_path.iterdir()) == []


def test_invalid_variant_name_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="Variant name"):
        save_record(tmp_path, "r", "../../teacher", metrics(0.87, 14.0, 87.0))


def test_missing_run_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_run(tmp_path, "never-ran")
    assert str(tmp_path / "never-ran") in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_run(tmp_path, "empty")


def test_corrupt_record_is_a_clear_error(tmp_path):
    save_record(tmp_path, "r", "teacher", metrics(0.87, 14.0, 87.0))
    (tmp_path / "r" / "student.json").write_text("{not json")
    with pytest.raises(ValueError, match="student.json"):
        load_run(tmp_path, "r")


def test_record_names_come_from_the_arguments(tmp_path):
    # Re-saving a loaded record under another run must not keep the old run name inside the file.
    old = save_record(tmp_path, "old", "teacher", metrics(0.87, 14.0, 87.0))
    save_record(tmp_path, "new", "teacher", json.loads(old.read_text()))
    assert load_run(tmp_path, "new")[0]["run"] == "new"


def test_load_run_is_sorted_by_variant_name(tmp_path):
    for variant in ("teacher", "student-int8", "student"):
        save_record(tmp_path, "r", variant, metrics(0.8, 1.0, 1.0))
    assert [r["variant"] for r in load_run(tmp_path, "r")] == ["student", "student-int8", "teacher"]


def test_records_get_ordinary_file_permissions(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    path = save_record(tmp_path, "r", "teacher", metrics(0.87, 14.0, 87.0))
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


# ---------------------------------------------------------------------------------------------
# Comparison table
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def two_run_table(tmp_path) -> pd.DataFrame:
    save_benchmark(tmp_path, "a", {"teacher": metrics(0.80, 10.0, 100.0), "student": metrics(0.7, 4.0, 25.0)})
    save_benchmark(
        tmp_path,
        "b",
        {
            "teacher": metrics(0.80, 20.0, 80.0, threads=4),
            "student": metrics(0.70, 5.0, 20.0, threads=4),
            "student-int8": metrics(0.69, 2.5, 8.0, threads=4),
        },
    )
    return comparison_table(load_runs(tmp_path, ["a", "b"]))


def test_comparison_table_columns_and_ratios_per_run(two_run_table):
    table = two_run_table
    assert list(table.columns) == TABLE_COLUMNS
    rows = {(r.run, r.variant): r for r in table.itertuples()}
    # Run a: teacher 10 ms / 100 MB. student: 10 / 4 = 2.5x faster, 25 / 100 = 0.25 the size.
    assert rows["a", "teacher"].speedup_vs_baseline == 1.0
    assert rows["a", "teacher"].size_ratio_vs_baseline == 1.0
    assert rows["a", "student"].speedup_vs_baseline == pytest.approx(2.5)
    assert rows["a", "student"].size_ratio_vs_baseline == pytest.approx(0.25)
    # Run b has its own teacher (20 ms / 80 MB): student 20 / 5 = 4x, 20 / 80 = 0.25;
    # student-int8 20 / 2.5 = 8x, 8 / 80 = 0.1. Not against run a's teacher (which would give 2 and 4).
    assert rows["b", "student"].speedup_vs_baseline == pytest.approx(4.0)
    assert rows["b", "student"].size_ratio_vs_baseline == pytest.approx(0.25)
    assert rows["b", "student-int8"].speedup_vs_baseline == pytest.approx(8.0)
    assert rows["b", "student-int8"].size_ratio_vs_baseline == pytest.approx(0.1)
    assert rows["a", "student"].threads == 2 and rows["b", "student"].threads == 4


def test_comparison_table_run_without_baseline_has_no_ratios():
    record = {"run": "c", "variant": "student", "accuracy": 0.7, "time_avg_ms": 5.0, "size_mb": 2.0}
    table = comparison_table([record])
    assert list(table.columns) == TABLE_COLUMNS
    assert pd.isna(table.loc[0, "speedup_vs_baseline"]) and pd.isna(table.loc[0, "size_ratio_vs_baseline"])
    assert pd.isna(table.loc[0, "threads"])


def test_comparison_table_other_baseline():
    records = [
        {"run": "a", "variant": "teacher", "time_avg_ms": 10.0, "size_mb": 100.0},
        {"run": "a", "variant": "student", "time_avg_ms": 5.0, "size_mb": 50.0},
    ]
    table = comparison_table(records, baseline="student")
    assert table["variant"].tolist() == ["student", "teacher"], "the baseline comes first"
    assert table["speedup_vs_baseline"].astype(float).tolist() == [1.0, 0.5]
    assert table["size_ratio_vs_baseline"].astype(float).tolist() == [1.0, 2.0]


def test_to_markdown_rows(two_run_table):
    columns = ["run", "variant", "accuracy", "speedup_vs_baseline", "size_ratio_vs_baseline"]
    ordered = two_run_table.sort_values(["run", "variant"], ignore_index=True)
    text = to_markdown(ordered[columns])
    assert text.splitlines() == [
        "| run | variant | accuracy | speedup_vs_baseline | size_ratio_vs_baseline |",
        "|---|---|---|---|---|",
        "| a | student | 0.7 | 2.5 | 0.25 |",
        "| a | teacher | 0.8 | 1 | 1 |",
        "| b | student | 0.7 | 4 | 0.25 |",
        "| b | student-int8 | 0.69 | 8 | 0.1 |",
        "| b | teacher | 0.8 | 1 | 1 |",
    ]
    assert text.endswith("\n")


def test_to_markdown_blank_for_missing_values():
    table = pd.DataFrame({"variant": ["x"], "time_avg_ms": [float("nan")], "size_mb": [None]})
    assert to_markdown(table).splitlines()[-1] == "| x |  |  |"


def test_write_table_csv_reads_back_the_same(tmp_path, two_run_table):
    csv_path, md_path = write_table(two_run_table, tmp_path / "out" / "comparison")
    assert (csv_path.name, md_path.name) == ("comparison.csv", "comparison.md")
    back = pd.read_csv(csv_path)
    assert list(back.columns) == TABLE_COLUMNS
    expected = two_run_table.copy()
    for column in TABLE_COLUMNS[2:]:
        expected[column] = pd.to_numeric(expected[column]).astype(float)
        back[column] = back[column].astype(float)
    for column in ("run", "variant"):
        assert back[column].tolist() == expected[column].tolist()
    pd.testing.assert_frame_equal(back[TABLE_COLUMNS[2:]], expected[TABLE_COLUMNS[2:]])
    assert md_path.read_text() == to_markdown(two_run_table)
    assert files_in(tmp_path / "out") == ["comparison.csv", "comparison.md"]


def test_model_paths_inside_the_project_are_saved_relative(tmp_path):
    from kdlib.io import project_root
    from kdlib.report import portable_ref

    inside = project_root() / "outputs" / "models" / "x" / "student"
    assert portable_ref(str(inside)) == "outputs/models/x/student"
    assert portable_ref(str(tmp_path / "elsewhere")) == str(tmp_path / "elsewhere")
    assert portable_ref("distilbert-base-uncased") == "distilbert-base-uncased"
    path = save_record(tmp_path, "r", "student", {"model_ref": str(inside), "accuracy": 0.5})
    assert json.loads(path.read_text())["model_ref"] == "outputs/models/x/student"


# ---------------------------------------------------------------------------------------------
# Lineage: 03 never mixes records of different models
# ---------------------------------------------------------------------------------------------


def _lineage_records(changes: dict | None = None):
    records = [
        {"run": "r", "variant": "teacher", "fingerprint": "t-fp", "weights_digest": "T1"},
        {"run": "r", "variant": "student", "fingerprint": "s-fp", "teacher_weights_digest": "T1"},
        {"run": "r", "variant": "student-onnx", "fingerprint": "s-fp", "teacher_weights_digest": "T1"},
    ]
    for (index, key), value in (changes or {}).items():
        records[index][key] = value
    return records


def test_records_of_one_model_lineage_compare():
    report.check_lineage(_lineage_records())


def test_a_variant_of_another_training_is_refused():
    records = _lineage_records({(2, "fingerprint"): "old-fp"})
    with pytest.raises(ValueError, match=r"student-onnx \(old-fp\).*delete the stale records"):
        report.check_lineage(records)


def test_students_of_another_teacher_are_refused():
    records = _lineage_records({(0, "weights_digest"): "T2"})
    with pytest.raises(ValueError, match="student, student-onnx were not distilled from this teacher"):
        report.check_lineage(records)


def test_records_without_identity_are_refused(tmp_path):
    report.save_record(tmp_path, "r", "teacher", {"accuracy": 0.9})
    report.save_record(tmp_path, "r", "student", {"accuracy": 0.8}, fingerprint="s", teacher_weights_digest="T")
    with pytest.raises(ValueError, match="mixes results of different models"):
        report.check_lineage(report.load_run(tmp_path, "r"))


def test_identity_is_saved_in_the_record(tmp_path):
    path = report.save_record(
        tmp_path, "r", "student", {"accuracy": 0.8}, fingerprint="abc", teacher_weights_digest="T"
    )
    record = json.loads(path.read_text())
    assert record["fingerprint"] == "abc" and record["teacher_weights_digest"] == "T"
