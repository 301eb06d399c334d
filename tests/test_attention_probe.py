"""scripts/attention_probe.py: its MiniLM loss against a hand computation, and that it reaches training."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kdlib.models import make_tiny_model, make_tiny_tokenizer, save_model
from kdlib.train import DistillationTrainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LABELS = ["alarm", "music", "oos"]


@pytest.fixture(scope="module")
def probe(load_script):
    return load_script("scripts/attention_probe.py")


def hand_attention_kl(teacher_attention, student_attention, mask):
    """KL of the probabilities the models return themselves (eager attention), loop by loop."""
    per_example = []
    for b in range(mask.shape[0]):
        n, heads, total = int(mask[b].sum()), teacher_attention.shape[1], 0.0
        for h in range(heads):
            for i in range(n):
                p, q = teacher_attention[b, h, i, :n].double(), student_attention[b, h, i, :n].double()
                total += float((p * (p.log() - q.log())).sum())
        per_example.append(total / (n * heads))
    return per_example


def test_attention_kl_matches_the_models_own_attention_probabilities(probe):
    teacher = make_tiny_model("tiny-bert", LABELS, seed=0)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for param in student.parameters():
            param.add_(0.3 * torch.randn_like(param))
    tokenizer = make_tiny_tokenizer()
    batch = tokenizer(["set an alarm for seven please", "music"], padding=True, return_tensors="pt")
    found = {}
    for name, model in (("teacher", teacher), ("student", student)):
        model.eval().set_attn_implementation("eager")
        projections, heads = probe.last_layer_projections(model)
        with torch.no_grad():
            attentions = model(**batch, output_attentions=True).attentions[-1]
        found[name] = (dict(projections), attentions)
    mask = batch["attention_mask"]
    assert mask[1].sum() < mask.shape[1]  # the second query is padded: padding must be left out
    got = probe.relation_kl((found["teacher"][0]["query"], found["teacher"][0]["key"]),
                            (found["student"][0]["query"], found["student"][0]["key"]), heads, mask)
    assert got.tolist() == pytest.approx(hand_attention_kl(found["teacher"][1], found["student"][1], mask), rel=1e-4)
    assert min(got.tolist()) > 0.01
    same = probe.attention_transfer_loss(found["teacher"][0], found["teacher"][0], heads, mask)
    assert same.abs().max() < 1e-6


def test_the_term_reaches_training_and_weight_zero_is_the_plain_recipe(probe, tmp_path, intent_csv_folder):
    teacher_dir = tmp_path / "teacher"
    save_model(make_tiny_model("tiny-bert", LABELS, num_layers=4), make_tiny_tokenizer(), teacher_dir)
    argv = ["student", "--profile", "smoke", "-p", "teacher_model", str(teacher_dir), "-p", "data_source",
            str(intent_csv_folder), "-p", "epochs", "1", "-p", "batch_size", "8", "-p", "keep_layers", "[0, 3]"]
    original = DistillationTrainer.compute_loss
    weights = {}
    for name, extra in (("plain", None), ("zero", "0"), ("heavy", "50")):
        run = argv + ["--save", str(tmp_path / name)]
        if extra is None:
            probe.recipe.main(run + ["-p", "cache_teacher_logits", "false"])
        else:
            assert probe.main(["--weight", extra] + run)["attention_weight"] == float(extra)
        weights[name] = load_file(tmp_path / name / "model.safetensors")
    assert DistillationTrainer.compute_loss is original  # the probe's loss lives in its own subclass
    assert all(torch.equal(weights["zero"][k], weights["plain"][k]) for k in weights["plain"])
    query = "bert.encoder.layer.1.attention.self.query.weight"
    assert not torch.allclose(weights["heavy"][query], weights["plain"][query])


def test_the_probe_refuses_a_negative_weight_and_other_modes(probe, capsys):
    with pytest.raises(SystemExit):
        probe.main(["--weight", "-1", "student", "-p", "teacher_model", "x"])
    assert "--weight must be a finite number >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        probe.main(["--weight", "inf", "student", "-p", "teacher_model", "x"])
    assert "--weight must be a finite number >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        probe.main(["--weight", "1", "teacher"])
    assert "student mode" in capsys.readouterr().err


def test_no_script_imports_mock():
    """The probe reaches the trainer through ``train_model``'s ``trainer_class``, not by patching kdlib."""
    found = []
    for path in sorted((Path(__file__).resolve().parent.parent / "scripts").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module or ''}.{alias.name}" for alias in node.names]
            else:
                continue
            found += [f"{path.name}:{node.lineno} {name}" for name in names if "mock" in name.split(".")]
    assert found == []
