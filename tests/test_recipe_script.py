"""scripts/recipe.py, the script behind the README's recipe figures, on tiny models and a data slice."""

from __future__ import annotations

import pytest

from kdlib.config import RunConfig
from kdlib.models import load_classifier, make_tiny_model, make_tiny_tokenizer, num_layers, save_model

LABELS = ["alarm", "music", "oos"]


@pytest.fixture(scope="module")
def recipe(load_script):
    return load_script("scripts/recipe.py")


@pytest.fixture()
def setup(tmp_path, intent_csv_folder):
    folder = intent_csv_folder
    teacher_dir = tmp_path / "teacher"
    save_model(make_tiny_model("tiny-bert", LABELS, num_layers=4), make_tiny_tokenizer(), teacher_dir)
    return folder, teacher_dir


def test_recipe_trains_a_student_with_the_chosen_layers(recipe, setup, tmp_path):
    folder, teacher_dir = setup
    summary = recipe.main(["student", "--profile", "smoke", "-p", "teacher_model", str(teacher_dir),
                           "-p", "data_source", str(folder), "-p", "epochs", "1", "-p", "batch_size", "8",
                           "-p", "keep_layers", "[0, 3]", "--save", str(tmp_path / "student")])
    assert summary["recipe"]["keep_layers"] == [0, 3]
    assert set(summary["test"]) >= {"accuracy", "in_scope_accuracy", "oos_recall"}
    assert 0.0 <= summary["validation_accuracy"] <= 1.0 and summary["machine"]["threads"] == 1
    assert num_layers(load_classifier(tmp_path / "student", LABELS)) == 2


def test_recipe_is_reproducible(recipe, setup):
    folder, teacher_dir = setup
    argv = ["teacher", "--profile", "smoke", "-p", "teacher", str(teacher_dir), "-p", "data_source", str(folder),
            "-p", "finetune_epochs", "1", "-p", "finetune_batch_size", "8", "-p", "finetune_learning_rate", "1e-3"]
    assert recipe.main(argv)["test"] == recipe.main(argv)["test"]


def test_recipe_rejects_malformed_layers_before_any_work(recipe, capsys):
    with pytest.raises(SystemExit):
        recipe.main(["student", "-p", "teacher_model", "x", "-p", "keep_layers", "[one, three]"])
    assert "keep_layers = ['one', 'three']: must be a layer count" in capsys.readouterr().err


def test_oos_scores_script_reports_each_score_on_validation_and_test(load_script, setup, tmp_path):
    from kdlib import TorchPredictor, load_intent_data, load_tokenizer
    from kdlib.oos import MahalanobisScore, detection_metrics, oos_scores

    script = load_script("scripts/oos_scores.py")
    folder, teacher_dir = setup
    rows = script.main([str(teacher_dir), "--profile", "smoke", "-p", "data_source", str(folder)])
    assert set(rows) == {"msp", "energy", "mahalanobis"}
    # The validation AUROC is the score's, computed from the model's validation logits (or features,
    # the Mahalanobis score fit on the training split).
    data = load_intent_data(str(folder))
    predictor = TorchPredictor(load_classifier(teacher_dir, LABELS), load_tokenizer(teacher_dir))
    logits, features = predictor.logits_and_features(data["validation"]["text"])
    is_oos = [LABELS[i] == "oos" for i in data["validation"]["label"]]
    oos = LABELS.index("oos")
    fit = MahalanobisScore(predictor.logits_and_features(data["train"]["text"])[1], data["train"]["label"], oos)
    scores = {"msp": oos_scores(logits, "msp", oos), "energy": oos_scores(logits, "energy", oos),
              "mahalanobis": fit(features)}
    for score, values in scores.items():
        expected = detection_metrics(values, is_oos)["oos_auroc"]
        assert rows[score]["validation_auroc"] == pytest.approx(expected, abs=1e-6)
        assert 0 <= rows[score]["test_threshold_accuracy"] <= 1


def test_recipe_search_shares_one_study_and_resumes_it(recipe, setup, tmp_path):
    folder, teacher_dir = setup
    journal = tmp_path / "study.journal"
    argv = ["search", "--profile", "smoke", "-p", "teacher_model", str(teacher_dir), "-p", "data_source", str(folder),
            "-p", "batch_size", "16", "-p", "search_storage", str(journal)]
    first = recipe.main([*argv, "-p", "n_trials", "2"])
    assert [t["trial"] for t in first["trials"]] == [0, 1]
    finished = [t for t in first["trials"] if t["state"] == "COMPLETE"]
    best = max(finished, key=lambda t: t["accuracy"])
    assert first["best"] == {k: best[k] for k in ("epochs", "alpha", "temperature", "hidden_weight")}
    assert all(5 <= t["epochs"] <= 10 and 0 <= t["alpha"] <= 1 for t in first["trials"])
    # The same storage again, with a larger budget: only the missing trial runs, the first two are kept.
    second = recipe.main([*argv, "-p", "n_trials", "3"])
    assert [t["trial"] for t in second["trials"]] == [0, 1, 2]
    assert second["trials"][:2] == first["trials"]


def test_recipe_latency_search_chooses_from_the_front_and_saves_it(recipe, setup, tmp_path):
    """search_latency: notebook 02's accuracy + latency search, the student's depth searched too."""
    import matplotlib.image
    import pandas as pd

    from kdlib.search import choose_from_front, open_study

    folder, teacher_dir = setup
    journal, saved = tmp_path / "latency.journal", tmp_path / "saved"
    summary = recipe.main(["search", "--profile", "smoke", "-p", "teacher_model", str(teacher_dir), "-p", "data_source",
                           str(folder), "-p", "batch_size", "16", "-p", "search_storage", str(journal),
                           "-p", "n_trials", "2", "-p", "search_latency", "true", "--save", str(saved)])
    trials = pd.DataFrame(summary["trials"])
    assert list(trials["trial"]) == [0, 1] and set(trials["state"]) == {"COMPLETE"}
    assert trials["student_layers"].between(1, 4).all()  # 1 to the teacher's 4 layers
    assert (trials["latency_ms"] > 0).all() and trials["pareto"].any()
    study = open_study(journal, study_name="distillation-latency", directions=("maximize", "minimize"))
    assert summary["best"] == choose_from_front(study)
    written = pd.read_csv(saved / "trials.csv")
    assert written[["trial", "student_layers", "accuracy", "latency_ms"]].equals(
        trials[["trial", "student_layers", "accuracy", "latency_ms"]])
    figure = (saved / "trials.svg").read_text()  # text stays text in kdlib's SVGs
    assert "Pareto front" in figure and "student layers" in figure and "no accuracy + latency search" not in figure
    assert matplotlib.image.imread(saved / "trials.png").size > 0


@pytest.mark.parametrize("missing", [["-p", "n_trials", "2"], ["-p", "search_storage", "s.journal"]])
def test_recipe_search_needs_trials_and_storage_before_any_work(recipe, capsys, tmp_path, missing):
    with pytest.raises(SystemExit):
        recipe.main(["search", "-p", "teacher_model", str(tmp_path / "absent"), *missing])
    assert "search_storage" in capsys.readouterr().err and not (tmp_path / "absent").exists()


@pytest.mark.parametrize("argv", [["student", "-p", "teacher_model", "{absent}"],
                                  ["teacher", "-p", "teacher", "{absent}"]])
def test_recipe_refuses_a_missing_model_folder_before_any_work(recipe, capsys, monkeypatch, tmp_path, argv):
    monkeypatch.setattr(RunConfig, "load_data", lambda *a, **k: pytest.fail("data loaded before the check"))
    absent = tmp_path / "absent"
    with pytest.raises(SystemExit) as stop:
        recipe.main([arg.format(absent=absent) for arg in argv])
    assert stop.value.code == 2 and f"{absent} does not exist" in capsys.readouterr().err


def test_recipe_refuses_a_student_not_made_of_teacher_layers_before_any_work(recipe, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(RunConfig, "load_data", lambda *a, **k: pytest.fail("data loaded before the check"))
    with pytest.raises(SystemExit) as stop:
        recipe.main(["student", "-p", "teacher_model", str(tmp_path / "absent"), "-p", "student_init", "pretrained",
                     "-p", "student", "tiny-distilbert"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "student_init must be 'teacher_layers', not 'pretrained'" in err


def test_oos_scores_refuses_a_missing_model_folder_before_any_work(load_script, capsys, monkeypatch, tmp_path):
    script = load_script("scripts/oos_scores.py")
    monkeypatch.setattr(RunConfig, "load_data", lambda *a, **k: pytest.fail("data loaded before the check"))
    with pytest.raises(SystemExit) as stop:
        script.main([str(tmp_path / "absent")])
    assert stop.value.code == 2 and "absent does not exist" in capsys.readouterr().err
