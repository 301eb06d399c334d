"""kdlib with an MPNet classifier (the base profile's all-mpnet-base-v2 is one), on a tiny random MPNet:
layers, students from teacher layers, the two-layer head, inputs without token_type_ids, saving and
loading, and every variant's export (ONNX Runtime fuses no MPNet attention: said in a warning)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from transformers import AutoConfig, MPNetConfig, MPNetForMaskedLM, MPNetForSequenceClassification

import kdlib.models as models
from kdlib.inference import OnnxPredictor, TorchPredictor, build_variants, export_onnx, export_onnx_fused
from kdlib.models import (
    classifier_layer,
    forward_inputs,
    load_classifier,
    make_tiny_tokenizer,
    model_labels,
    num_layers,
    reference_num_layers,
    save_model,
    student_from_teacher,
)
from kdlib.quantize import parameter_breakdown

LABELS = ["book_flight", "oos", "play_music", "weather"]
TEXTS = ["book me a flight to paris", "play some jazz please", "will it rain tomorrow?"]
PREFIX = "mpnet.encoder.layer."

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def tiny_mpnet_config(num_layers: int = 2, **overrides) -> MPNetConfig:
    """MPNet at the tiny models' sizes over the tiny tokenizer's vocabulary (no download)."""
    tokenizer = make_tiny_tokenizer()
    return MPNetConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id,
                       **overrides)


def tiny_mpnet(num_layers: int = 2, seed: int = 0, labels=LABELS) -> MPNetForSequenceClassification:
    config = tiny_mpnet_config(num_layers, id2label=dict(enumerate(labels)),
                               label2id={name: i for i, name in enumerate(labels)})
    torch.manual_seed(seed)
    return MPNetForSequenceClassification(config).eval()


@torch.no_grad()
def outputs_of(model) -> tuple[torch.Tensor, torch.Tensor]:
    batch = forward_inputs(model, dict(make_tiny_tokenizer()(TEXTS, return_tensors="pt", padding=True)))
    out = model.eval()(**batch, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


def test_mpnet_layers_are_found_and_counted():
    model = tiny_mpnet(num_layers=3)
    prefix, layers = models._layer_list(model)
    assert prefix == "mpnet.encoder.layer" and len(layers) == 3
    assert num_layers(model) == 3


def test_mpnet_takes_no_token_type_ids():
    batch = dict(make_tiny_tokenizer()(TEXTS, return_tensors="pt", padding=True))
    assert "token_type_ids" in batch
    assert set(forward_inputs(tiny_mpnet(), batch)) == {"input_ids", "attention_mask"}


def test_student_from_an_mpnet_teacher_keeps_its_layers_and_the_encoders_relative_bias():
    teacher = tiny_mpnet(num_layers=4, seed=3)
    student = student_from_teacher(teacher)  # DistilBERT's rule: every other layer, ending with the last
    assert type(student) is MPNetForSequenceClassification
    assert num_layers(student) == 2 and student.config.num_hidden_layers == 2
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    for key, value in student_state.items():
        if key.startswith(PREFIX):
            index, rest = key[len(PREFIX):].split(".", 1)
            source = f"{PREFIX}{[1, 3][int(index)]}.{rest}"
        else:  # embeddings, the encoder's relative position bias, the head
            source = key
        assert torch.equal(value, teacher_state[source]), key
    assert "mpnet.encoder.relative_attention_bias.weight" in student_state
    assert model_labels(student) == LABELS


def test_an_mpnet_student_with_every_layer_computes_what_its_teacher_does():
    teacher = tiny_mpnet(num_layers=2, seed=5)
    student = student_from_teacher(teacher, [0, 1])
    for got, expected in zip(outputs_of(student), outputs_of(teacher), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    swapped = student_from_teacher(teacher, [1, 0])
    assert not torch.allclose(outputs_of(swapped)[1], outputs_of(teacher)[1], atol=1e-4)


def test_the_mpnet_head_is_its_out_proj_and_labels_are_aligned_by_name(tmp_path):
    model = tiny_mpnet(seed=7)
    head = classifier_layer(model)
    assert head is model.classifier.out_proj and head.out_features == len(LABELS)
    with torch.no_grad():
        head.bias.copy_(torch.arange(len(LABELS), dtype=torch.float32) * 10)
    folder = save_model(model, make_tiny_tokenizer(), tmp_path / "mpnet")
    reordered = list(reversed(LABELS))
    loaded = load_classifier(folder, reordered)
    assert model_labels(loaded) == reordered
    torch.testing.assert_close(outputs_of(loaded)[0], outputs_of(model)[0].flip(-1))


def test_an_mpnet_base_encoder_gets_a_fresh_head_and_its_depth_is_read_from_its_config(tmp_path):
    folder = tmp_path / "encoder"
    torch.manual_seed(0)
    MPNetForMaskedLM(tiny_mpnet_config(num_layers=2)).save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    assert AutoConfig.from_pretrained(folder).architectures == ["MPNetForMaskedLM"]
    assert reference_num_layers(folder) == 2
    model = load_classifier(folder, LABELS, seed=1)
    assert isinstance(model, MPNetForSequenceClassification) and model_labels(model) == LABELS
    again = load_classifier(folder, LABELS, seed=1)
    torch.testing.assert_close(classifier_layer(again).weight, classifier_layer(model).weight, rtol=0, atol=0)


def test_the_relative_position_bias_counts_with_the_transformer_layers():
    table = parameter_breakdown({"mpnet": tiny_mpnet()})
    head = sum(p.numel() for n, p in tiny_mpnet().named_parameters() if n.startswith("classifier."))
    assert table.loc["head (pooler, classifier)", "mpnet parameters"] == head


def test_an_mpnet_classifier_exports_to_onnx_and_predicts_as_pytorch(tmp_path):
    model, tokenizer = tiny_mpnet(seed=9), make_tiny_tokenizer()
    path = export_onnx(model, tokenizer, tmp_path / "model.onnx")  # checked against PyTorch inside
    onnx_logits = OnnxPredictor(path, tokenizer).logits(TEXTS)
    np.testing.assert_allclose(onnx_logits, TorchPredictor(model, tokenizer).logits(TEXTS), atol=1e-4)


def test_the_fused_export_of_mpnet_says_its_attention_is_not_fused_and_stays_correct(tmp_path):
    model, tokenizer = tiny_mpnet(seed=9), make_tiny_tokenizer()
    with pytest.warns(RuntimeWarning, match="fused no attention in this mpnet graph") as caught:
        path = export_onnx_fused(model, tokenizer, tmp_path / "fused.onnx")
    assert "2 fused GELUs" in str(caught[0].message)  # one per layer: the other fusions still apply
    np.testing.assert_allclose(OnnxPredictor(path, tokenizer).logits(TEXTS),
                               TorchPredictor(model, tokenizer).logits(TEXTS), atol=1e-3)


def test_a_bert_fused_export_warns_of_nothing(tmp_path):
    model = models.make_tiny_model("tiny-bert", LABELS)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        export_onnx_fused(model, make_tiny_tokenizer(), tmp_path / "fused.onnx")


def test_every_variant_of_an_mpnet_student_is_built(tmp_path):
    model, tokenizer = tiny_mpnet(seed=11), make_tiny_tokenizer()
    with pytest.warns(RuntimeWarning, match="fused no attention"):
        variants = build_variants(model, tokenizer, tmp_path, threads=1)
    assert set(variants) == {"student-int8", "student-onnx", "student-onnx-int8", "student-onnx-fused-int8"}
    for name, predictor in variants.items():
        assert predictor.logits(TEXTS).shape == (len(TEXTS), len(LABELS)), name
