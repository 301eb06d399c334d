"""kdlib: measure a transformer text classifier and make it smaller and faster by distillation.

Everything a notebook uses is importable from ``kdlib`` itself (``from kdlib import PerformanceBenchmark``);
``__all__`` is the list. One module per concept:

* :mod:`kdlib.io` - the project root and the atomic writes every output goes through;
* :mod:`kdlib.session` - seeds, threads, the device, library versions;
* :mod:`kdlib.config` - the run configuration (every default), its validation and fingerprint;
* :mod:`kdlib.paths` - every path of a run (``RunPaths``) and its lock;
* :mod:`kdlib.data` - intent data from every source, checked on the way in;
* :mod:`kdlib.models` - model references, classifiers with the data's labels, students from teacher layers,
  the tiny models built in code (``tiny-bert``, ``tiny-distilbert``);
* :mod:`kdlib.packaged` - ``all-mpnet-base-v2`` assembled from the split zip its five PyPI packages ship;
* :mod:`kdlib.train` - fine-tuning and distillation with the ``transformers`` Trainer;
* :mod:`kdlib.prune` - structured pruning: the least important heads and FFN neurons removed, then recovery;
* :mod:`kdlib.search` - the Optuna search over the distillation's hyperparameters (pruned, shareable);
* :mod:`kdlib.inference` - predictors and their int8 / ONNX Runtime variants, parity checks;
* :mod:`kdlib.benchmark` - ``PerformanceBenchmark``: accuracy, size, latency;
* :mod:`kdlib.metrics` - classification metrics (accuracy, macro-F1, the CLINC150 OOS metrics);
* :mod:`kdlib.oos` - out-of-scope scores, AUROC / FPR95, a threshold chosen on validation;
* :mod:`kdlib.report` - result records, comparison tables, the model card;
* :mod:`kdlib.quantize` - quantisation by hand: one layer's scale and zero point, int8 against fp32, sizes;
* :mod:`kdlib.recommend` - the one rule that picks the variant to deploy from the comparison table;
* :mod:`kdlib.plots` - the figures; :mod:`kdlib.narrate` - the conclusions written from a run's records;
* :mod:`kdlib.run` - the headless runner behind ``make run``;
* :mod:`kdlib.testing` - synthetic intents for tests and demos.

Names are imported on first use, so ``python -m kdlib.run`` and a notebook's first cell validate their
parameters before torch loads. The modules form layers without an import cycle (``tests/test_layers.py``).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "config": [
        "RunConfig", "ConfigError", "load_config", "config_from_notebook", "TEACHER_FIELDS", "STUDENT_FIELDS",
        "default_keep_layers",
    ],
    "io": ["project_root"],
    "paths": ["RunPaths"],
    "session": ["prepare_session"],
    "data": [
        "DataError", "load_intent_data", "resolve_data_source", "subsample", "label_names", "describe",
        "examples_frame", "data_digest",
    ],
    "models": [
        "load_tokenizer", "load_classifier", "needs_fine_tuning", "init_student", "check_tokenizers_compatible",
        "share_vocabulary", "save_model", "num_layers", "weights_digest",
    ],
    "train": [
        "DistillationTrainer", "DistillationTrainingArguments", "teacher_arguments", "student_arguments", "train_model",
        "soft_targets",
    ],
    "search": [
        "hyperparameter_search", "search_from_config", "student_factory", "search_layers", "latency_objective",
        "search_trials", "open_study", "plan_distillation",
    ],
    "inference": [
        "Predictor", "TorchPredictor", "PipelinePredictor", "OnnxPredictor", "build_variants", "parity_check",
    ],
    "benchmark": [
        "PerformanceBenchmark", "BenchmarkOptions", "BenchmarkResult", "measure_quality", "compute_size",
        "time_pipeline",
    ],
    "oos": ["oos_scores", "detection_metrics", "choose_threshold", "apply_threshold", "ThresholdRule", "oos_options"],
    "report": [
        "save_benchmark", "load_runs", "check_lineage", "comparison_table", "summary_frame", "write_table",
        "portable_ref", "oos_table", "write_model_card", "card_dataset", "base_model_id", "training_hyperparameters",
        "write_student_card",
    ],
    "quantize": ["layer_weight", "quantize_by_hand", "time_matmul", "parameter_breakdown", "size_arithmetic"],
    "recommend": ["recommend_variant", "recommendation", "pareto_front"],
    "plots": ["plot_metrics", "plot_training_curves", "plot_soft_targets", "plot_oos_scores", "plot_oos_vs_latency",
              "plot_search", "plot_weight_histogram", "plot_head_importance"],
    "prune": ["prune_and_recover", "is_pruning", "importance_scores", "prune_model"],
    "narrate": ["interpret_baseline", "interpret_distillation", "interpret_comparison", "interpret_search"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
_SUBMODULES = (*_EXPORTS, "metrics", "run", "testing")

__all__ = ["__version__", *_MODULE_OF]


def __getattr__(name: str) -> Any:
    """``kdlib.X`` for every name in ``__all__`` and every submodule, imported when first asked for."""
    if name in _MODULE_OF:
        value = getattr(importlib.import_module(f"kdlib.{_MODULE_OF[name]}"), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"kdlib.{name}")
    else:
        raise AttributeError(f"module 'kdlib' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBMODULES})
