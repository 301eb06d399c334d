"""Structured pruning: the cut shapes, equality with the masked full model, reload, fusion and the checks."""

from __future__ import annotations

import onnx
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from transformers import BertConfig, BertForSequenceClassification

from kdlib.config import ConfigError, load_config
from kdlib.inference import export_onnx_fused
from kdlib.models import (
    PRUNED_HEADS_KEY,
    _label_maps,
    load_classifier,
    make_tiny_model,
    make_tiny_tokenizer,
    save_model,
    shrink_layers,
)
from kdlib.prune import (
    Importance,
    choose_kept,
    importance_scores,
    kept_count,
    prune_and_recover,
    prune_model,
)
from kdlib.run import check_run
from kdlib.train import student_arguments

LABELS = ["balance", "book_flight", "play_music"]
TEXTS = ["what is my balance", "book a flight to rome", "play some jazz", "how much money do i have",
         "i need a plane ticket", "put on a song", "check my account", "fly me to paris", "music please"]


def bert(seed: int = 0, heads: int = 4, layers: int = 2) -> BertForSequenceClassification:
    tokenizer = make_tiny_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=64, max_position_embeddings=128, **_label_maps(LABELS))
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():  # larger weights than the init's, so that heads and neurons matter to the logits
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)
    return model


def texts_dataset() -> Dataset:
    features = Features({"text": Value("string"), "label": ClassLabel(names=LABELS)})
    return Dataset.from_dict({"text": TEXTS, "label": [0, 1, 2] * 3}, features=features)


def logits(model, texts=TEXTS) -> torch.Tensor:
    inputs = make_tiny_tokenizer()(list(texts), padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


def random_importance(model, seed: int = 1) -> Importance:
    generator = torch.Generator().manual_seed(seed)
    layers = model.config.num_hidden_layers
    return Importance(heads=torch.rand(layers, model.config.num_attention_heads, generator=generator),
                      neurons=torch.rand(layers, model.config.intermediate_size, generator=generator))


def test_pruned_shapes_and_config():
    model = bert()
    pruned = prune_model(model, random_importance(model), ffn_keep=0.25, heads_keep=0.5)
    for layer in pruned.bert.encoder.layer:
        assert layer.attention.self.query.out_features == layer.attention.self.value.out_features == 2 * 8
        assert layer.attention.output.dense.in_features == 16
        assert layer.intermediate.dense.out_features == layer.output.dense.in_features == 16
    assert pruned.config.intermediate_size == 16 and getattr(pruned.config, PRUNED_HEADS_KEY) == 2
    assert model.bert.encoder.layer[0].attention.self.query.out_features == 32  # the original is untouched


def test_pruned_logits_equal_the_masked_full_model():
    model = bert()
    importance = random_importance(model)
    heads, neurons = choose_kept(importance, ffn_keep=0.5, heads_keep=0.5)
    pruned = prune_model(model, importance, ffn_keep=0.5, heads_keep=0.5)
    masked = bert()  # the same weights, with the removed heads' and neurons' outputs zeroed instead
    with torch.no_grad():
        for layer, keep_heads, keep_neurons in zip(masked.bert.encoder.layer, heads, neurons, strict=True):
            for h in set(range(4)) - set(keep_heads):
                layer.attention.output.dense.weight[:, h * 8 : (h + 1) * 8] = 0
            layer.output.dense.weight[:, sorted(set(range(64)) - set(keep_neurons))] = 0
    torch.testing.assert_close(logits(pruned), logits(masked), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(pruned), logits(bert()), atol=1e-3)  # pruning did change something


def test_pruned_model_reloads_with_its_sizes(tmp_path):
    model = bert()
    pruned = prune_model(model, random_importance(model), ffn_keep=0.5, heads_keep=0.25)
    save_model(pruned, make_tiny_tokenizer(), tmp_path / "pruned")
    reloaded = load_classifier(tmp_path / "pruned", LABELS)
    assert reloaded.bert.encoder.layer[1].attention.self.key.out_features == 8
    torch.testing.assert_close(logits(reloaded), logits(pruned))


def test_pruned_model_fuses_and_matches(tmp_path):
    model = bert()
    pruned = prune_model(model, random_importance(model), ffn_keep=0.5, heads_keep=0.5)
    path = export_onnx_fused(pruned, make_tiny_tokenizer(), tmp_path / "fused.onnx")  # checks parity itself
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    assert ops.count("Attention") == 2, sorted(set(ops))


def test_importance_is_zero_for_a_head_the_model_ignores_and_repeatable():
    model = bert()
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.output.dense.weight[:, 8:16] = 0  # head 1 of layer 0 reaches nothing
        model.bert.encoder.layer[1].output.dense.weight[:, 5] = 0  # neuron 5 of layer 1 too
    first = importance_scores(model, make_tiny_tokenizer(), texts_dataset(), batch_size=4)
    again = importance_scores(model, make_tiny_tokenizer(), texts_dataset(), batch_size=4)
    assert first.heads[0, 1] == 0 and (first.heads[0, [0, 2, 3]] > 0).all()
    assert first.neurons[1, 5] == 0 and first.neurons[1].sum() > 0
    torch.testing.assert_close(first.heads, again.heads)
    assert all(p.grad is None for p in model.parameters())
    heads, _ = choose_kept(first, ffn_keep=1.0, heads_keep=0.75)
    assert 1 not in heads[0]


def test_shares_are_checked_with_the_parameter_named():
    assert kept_count(0.5, 12, "heads_keep") == 6
    with pytest.raises(ValueError, match="heads_keep=0.04 keeps none of a layer's 12: use at least 0.0833"):
        kept_count(0.04, 12, "heads_keep")
    with pytest.raises(ValueError, match=r"ffn_keep must be a share in \(0, 1\]"):
        kept_count(1.5, 64, "ffn_keep")
    with pytest.raises(ValueError, match="same number in every layer"):
        shrink_layers(bert(), [[0], [0, 1]], [[0], [0]])
    with pytest.raises(TypeError, match="BERT-family"):
        shrink_layers(make_tiny_model("tiny-distilbert", LABELS), [[0]], [[0]])


def test_a_run_that_prunes_every_head_is_refused_before_any_work(tmp_path):
    config = load_config("smoke", output_dir=str(tmp_path / "out"), heads_keep=0.2)
    with pytest.raises(ConfigError, match=r"heads_keep = 0.2: the student's layers have 2 attention heads .*"
                                          r"-p heads_keep 0.5 or more"):
        check_run(config, ["02_distill"])
    assert not (tmp_path / "out").exists()


def test_prune_and_recover_trains_the_pruned_student(tmp_path):
    data = DatasetDict({"train": texts_dataset(), "validation": texts_dataset()})
    teacher = make_tiny_model("tiny-bert", LABELS)
    student = make_tiny_model("tiny-bert", LABELS, seed=1)
    config = load_config("smoke", ffn_keep=0.5, heads_keep=0.5, prune_epochs=1)
    args = student_arguments(config, tmp_path / "checkpoints")
    result = prune_and_recover(student, make_tiny_tokenizer(), data, args, config, teacher=teacher,
                               fingerprint="abc")
    pruned = result.training.model
    assert pruned.bert.encoder.layer[0].intermediate.dense.out_features == 32
    assert pruned.bert.encoder.layer[0].attention.self.query.out_features == 16
    assert len(result.training.epoch_table) == 1 and result.fingerprint != "abc"
    assert [len(kept) for kept in result.kept_heads] == [1, 1]


def test_head_importance_figure_outlines_the_kept_heads():
    from matplotlib.patches import Rectangle

    from kdlib.plots import plot_head_importance

    figure = plot_head_importance(torch.tensor([[1.0, 3.0, 0.0], [2.0, 2.0, 2.0]]).numpy(), [[1], [0, 2]])
    outlined = [p for p in figure.axes[0].patches if isinstance(p, Rectangle)]
    assert sorted((p.get_x() + 0.5, p.get_y() + 0.5) for p in outlined) == [(0, 1), (1, 0), (2, 1)]
    assert figure.axes[0].images[0].get_array()[0, 1] == pytest.approx(0.75)  # a share of its layer's total
    with pytest.raises(ValueError, match="kept heads per layer"):
        plot_head_importance(torch.ones(2, 3).numpy(), [[0]])
