"""The generated pages (docs/results.md, docs/recipe.md, README's results block) and README's rules.

Each check is also run on a deliberately broken input, so a check that could never fail is caught.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = ("docs/results.md", "docs/recipe.md", "README.md")
MAX_README_LINES = 200
HEX_WORD = re.compile(r"\b[0-9a-f]{7,40}\b")
# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


@pytest.fixture(scope="module")
def build_docs(load_script):
    return load_script("scripts/build_docs.py")


def copy_sources(tmp_path: Path) -> Path:
    """A project root holding what the pages are built from: outputs/ (no model weights), README, docs."""
    root = tmp_path / "root"
    ignore = shutil.ignore_patterns("models", "checkpoints", "notebooks", "smoke", "*.onnx", "*.safetensors")
    shutil.copytree(REPO / "outputs", root / "outputs", ignore=ignore)
    base_notebooks = REPO / "outputs" / "notebooks" / "base"  # committed: the base run's wall times are read from it
    if base_notebooks.is_dir():
        shutil.copytree(base_notebooks, root / "outputs" / "notebooks" / "base")
    shutil.copytree(REPO / "docs", root / "docs")
    shutil.copy2(REPO / "README.md", root / "README.md")
    return root


# ---------------------------------------------------------------------------------------------
# (a) the committed pages are what the records give
# ---------------------------------------------------------------------------------------------


def test_regenerated_pages_are_byte_identical_to_the_committed_ones(build_docs, tmp_path):
    out = tmp_path / "out"
    assert build_docs.main(["--root", str(REPO), "--out", str(out)]) == 0
    for name in PAGES:
        committed = (REPO / name).read_bytes()
        assert (out / name).read_bytes() == committed, (
            f"{name} is stale: regenerate it with `.venv/bin/python scripts/build_docs.py`"
        )


def test_building_twice_gives_the_same_bytes(build_docs):
    assert build_docs.build(REPO) == build_docs.build(REPO)


def test_check_names_the_page_a_changed_record_makes_stale(build_docs, tmp_path, capsys):
    root = copy_sources(tmp_path)
    assert build_docs.main(["--root", str(root), "--check"]) == 0
    table = root / "outputs" / "tables" / "minilm" / "comparison.csv"
    table.write_text(table.read_text(encoding="utf-8").replace("0.87490909", "0.97490909", 1), encoding="utf-8")
    assert build_docs.main(["--root", str(root), "--check"]) == 1
    err = capsys.readouterr().err
    assert "docs/results.md is stale" in err and "README.md is stale" in err
    assert "docs/recipe.md" not in err  # the recipe page does not read the comparison table


def test_check_names_a_stale_recipe_page(build_docs, tmp_path, capsys):
    root = copy_sources(tmp_path)
    record = root / "outputs" / "recipe" / "01_teacher_recipe.json"
    record.write_text(record.read_text(encoding="utf-8").replace("0.9474", "0.9475"), encoding="utf-8")
    assert build_docs.main(["--root", str(root), "--check"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "docs/recipe.md is stale: regenerate it with `.venv/bin/python scripts/build_docs.py`."
    ]


def test_cross_vocabulary_section_reads_its_student_record_and_is_left_out_without_it(build_docs, tmp_path):
    root = copy_sources(tmp_path)
    record = root / "outputs" / "results" / "base-minilm" / "student.json"
    data = json.loads(record.read_text(encoding="utf-8"))
    section = "\n".join(build_docs.cross_vocabulary_section(root))
    assert f"| {data['accuracy']:.4f} | {data['threshold_accuracy']:.4f} |" in section
    record.write_text(json.dumps({**data, "accuracy": 0.12345}), encoding="utf-8")
    assert "| 0.1235 |" in "\n".join(build_docs.cross_vocabulary_section(root))
    record.unlink()
    assert build_docs.cross_vocabulary_section(root) == []


def test_check_as_a_command_exits_non_zero(tmp_path):
    root = copy_sources(tmp_path)
    (root / "docs" / "results.md").write_text("edited by hand\n", encoding="utf-8")
    script = REPO / "scripts" / "build_docs.py"
    done = subprocess.run([sys.executable, str(script), "--root", str(root), "--check"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 1, done.stderr
    assert "docs/results.md is stale" in done.stderr


def test_pages_hold_no_absolute_path(build_docs, tmp_path):
    root = copy_sources(tmp_path)
    for name, text in build_docs.build(root).items():
        assert str(root) not in text and str(REPO) not in text, name


def test_every_row_of_a_recipe_record_says_what_produced_it(build_docs, tmp_path):
    root = copy_sources(tmp_path)
    record = root / "outputs" / "recipe" / "09_seed.json"
    record.write_text(record.read_text(encoding="utf-8").replace('"command": "make run"', '"command": ""', 1),
                      encoding="utf-8")
    with pytest.raises(build_docs.DocsError, match="09_seed.json: row 0 has neither a command nor a procedure"):
        build_docs.build(root)


def test_every_recipe_table_keeps_a_validation_column_or_says_what_it_was_chosen_on(build_docs):
    for relative, record in build_docs.recipe_records(REPO):
        labels = [c["label"] for c in record.get("columns", [])]
        assert any("validation" in label for label in labels) or record.get("chosen_on"), relative


def test_readme_without_markers_is_refused(build_docs, tmp_path):
    root = copy_sources(tmp_path)
    readme = root / "README.md"
    readme.write_text(readme.read_text(encoding="utf-8").replace(build_docs.START, ""), encoding="utf-8")
    with pytest.raises(build_docs.DocsError, match="README.md: no"):
        build_docs.build(root)


# ---------------------------------------------------------------------------------------------
# (b) README: short, and no commit hash
# ---------------------------------------------------------------------------------------------


def git_commits(words: set[str]) -> set[str]:
    """The words that name a commit of this repository (``git cat-file -e <word>^{commit}``)."""
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        # Without the history, any hex word with a digit and a letter is taken for a hash.
        return {w for w in words if re.search(r"\d", w) and re.search(r"[a-f]", w)}
    return {
        w for w in words
        if subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{w}^{{commit}}"],
                          capture_output=True, check=False).returncode == 0
    }


def commit_hashes(text: str) -> set[str]:
    return git_commits(set(HEX_WORD.findall(text)))


def test_readme_is_at_most_200_lines():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; at most {MAX_README_LINES}"


def test_readme_has_no_commit_hash():
    assert commit_hashes((REPO / "README.md").read_text(encoding="utf-8")) == set()


def test_the_hash_check_finds_a_real_commit():
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=7", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()
    sample = f"the run at {head or '1e735d6'} took long"
    assert commit_hashes(sample) == {head or "1e735d6"}
    assert commit_hashes("0.8749 accuracy, 1234567 rows, deadbeef, 15250 queries") == set()


# ---------------------------------------------------------------------------------------------
# (c) every relative link points to an existing file (and heading, for a #fragment of a page)
# ---------------------------------------------------------------------------------------------


def anchors(page: Path) -> set[str]:
    from_headings = set()
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip()
            kept = "".join(ch for ch in title.lower() if ch.isalnum() or ch in " -_")
            from_headings.add(kept.replace(" ", "-"))
    return from_headings


def broken_links(page: Path, text: str) -> list[str]:
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.is_file():
            broken.append(target)
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(target)
    return broken


def test_every_relative_link_in_readme_and_docs_resolves():
    pages = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
    assert len(pages) >= 4
    for page in pages:
        assert broken_links(page, page.read_text(encoding="utf-8")) == [], page.name


def test_the_link_check_finds_a_broken_link():
    page = REPO / "docs" / "results.md"
    text = "[ok](recipe.md) ![fig](../outputs/figures/minilm/nope.png) [anchor](recipe.md#no-such-heading) [w](https://x.y)"
    assert broken_links(page, text) == ["../outputs/figures/minilm/nope.png", "recipe.md#no-such-heading"]


def test_recipe_page_shows_the_threshold_rules_record_with_the_chosen_rule_in_bold(build_docs, tmp_path):
    root = copy_sources(tmp_path)
    rule = {"rule": "in_scope_drop", "setting": 0.01, "described": "gives up at most 1 %", "threshold": 2500.0,
            "validation_in_scope_accuracy": 0.9412, "validation_oos_recall": 0.81, "validation_accuracy": 0.9301,
            "test_in_scope_accuracy": 0.9433, "test_oos_recall": 0.786, "test_accuracy": 0.9147}
    other = {**rule, "rule": "flag_rate", "setting": 0.05, "test_accuracy": 0.9001}
    source = {"command": "scripts/oos_rules.py --profile minilm", "env": {"git_commit": "abc1234", "cpu": "AMD EPYC"},
              "variants": {"student": {"oos_score": "mahalanobis", "validation_oos_auroc": 0.9866,
                                       "test_oos_auroc": 0.978, "test_accuracy": 0.8624, "rules": [rule, other]}}}
    (root / "outputs" / "oos" / "minilm").mkdir(parents=True, exist_ok=True)
    (root / "outputs" / "oos" / "minilm" / "threshold_rules.json").write_text(json.dumps(source), encoding="utf-8")
    record = {"title": "Out-of-scope detection: the threshold rule",
              "rules_from": "outputs/oos/minilm/threshold_rules.json",
              "chosen_rule": {"rule": "in_scope_drop", "setting": 0.01}, "chosen_on": "validation", "decision": "Kept."}
    (root / "outputs" / "recipe" / "20_threshold_rule.json").write_text(json.dumps(record), encoding="utf-8")
    page = build_docs.build(root)["docs/recipe.md"]
    assert "| **in_scope_drop 0.01** | 2500 | 0.9412 | 0.810 | 0.9301 | 0.9433 | 0.786 | 0.9147 |" in page
    assert "| flag_rate 0.05 | 2500 |" in page
    assert "**Decision.** Kept." in page


def test_width_depth_table_gives_each_pruned_candidate_its_recovery_epochs(build_docs, tmp_path):
    measured = {"validation_accuracy": 0.94, "test_accuracy": 0.85, "test_threshold_accuracy": 0.91}

    def candidate(ffn, heads, **extra):
        return {"layers": 3, "ffn_keep": ffn, "heads_keep": heads, "parameters": 1000, "intermediate_size": 768,
                "attention_heads": 6, "torch": measured, "student-onnx-fused-int8": measured, **extra}

    record = {"prune_epochs": 3, "candidates": {"3": candidate(1.0, 1.0), "3x0.5x1": candidate(0.5, 1.0),
                                                "3x0.5x0.5": candidate(0.5, 0.5, prune_epochs=6)}}
    (tmp_path / "width_depth.json").write_text(json.dumps(record))
    lines = build_docs.width_depth_tables(tmp_path, {"file": "width_depth.json"})
    header = next(line for line in lines if line.startswith("| candidate"))
    column = [cell.strip() for cell in header.strip("|").split("|")].index("recovery epochs")
    epochs = {cells[0]: cells[column] for line in lines if line.startswith("| 3")
              for cells in [[cell.strip() for cell in line.strip("|").split("|")]]}
    assert epochs == {"3": "—", "3x0.5x1": "3", "3x0.5x0.5": "6"}  # its own, else the record's; none unpruned
