"""kdlib.flops: matrix-product FLOPs of one query against hand counts (full, pruned-shaped, DistilBERT,
int8), and the int8 peak read from sample /proc/cpuinfo texts of each CPU family."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
)

from kdlib.flops import (
    int8_isa,
    int8_peak,
    machine_int8_peak,
    matmul_flops,
    max_clock_mhz,
    mean_tokens,
    parse_cpuinfo,
    share_of_peak,
)
from kdlib.inference import quantize_dynamic_int8
from kdlib.models import make_tiny_tokenizer

# hidden 32, 2 layers, 4 heads of 8, FFN 64, 3 labels; a query of 10 tokens.
T = 10
# Per layer: Q, K, V, attention output (4 x 32 x 32) and the FFN (32 x 64, 64 x 32) per token:
# 4096 + 4096 = 8192 multiply-accumulates, x 2 x 10 tokens = 163_840; scores Q K^T and context P V:
# 2 x 10 x 10 x 32 each = 12_800. Pooler 32 x 32 and classifier 32 x 3 on one vector: 2 x (1024 + 96) = 2_240.
FULL_LAYER = 163_840 + 12_800
HEAD = 2_240
FULL = 2 * FULL_LAYER + HEAD  # 355_520


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(config).eval()


def test_a_tiny_bert_counts_what_the_hand_count_says():
    counted = matmul_flops(tiny_bert(), T)
    assert counted["total"] == FULL == 355_520
    assert (counted["linear"], counted["attention"], counted["head"]) == (2 * 163_840, 2 * 12_800, HEAD)
    assert counted["layers"] == [{"heads": 4, "head_size": 8, "attention_width": 32, "value_width": 32,
                                  "intermediate_size": 64}] * 2


def test_the_attention_products_grow_with_the_square_of_the_tokens():
    model = tiny_bert()
    short, long = matmul_flops(model, 10), matmul_flops(model, 20)
    assert long["linear"] == 2 * short["linear"] and long["attention"] == 4 * short["attention"]
    assert long["head"] == short["head"]


def test_a_pruned_shaped_model_counts_its_smaller_matrices():
    """Layer 0 keeps 2 of its 4 heads and 40 of its 64 FFN neurons; the config still says 32 / 64."""
    model = tiny_bert()
    layer = model.bert.encoder.layer[0]
    attention = layer.attention.self
    for name in ("query", "key", "value"):
        setattr(attention, name, torch.nn.Linear(32, 16))
    attention.num_attention_heads, attention.all_head_size = 2, 16
    layer.attention.output.dense = torch.nn.Linear(16, 32)
    layer.intermediate.dense = torch.nn.Linear(32, 40)
    layer.output.dense = torch.nn.Linear(40, 32)
    with torch.inference_mode():  # a model that runs, not only one that counts
        assert model(input_ids=torch.ones(1, T, dtype=torch.long)).logits.shape == (1, 3)
    # Layer 0: 3 x 32 x 16 + 16 x 32 + 32 x 40 + 40 x 32 = 4608 MACs per token, x 2 x 10 = 92_160;
    # scores and context 2 x 10 x 10 x 16 each = 6_400.
    counted = matmul_flops(model, T)
    assert counted["total"] == 92_160 + 6_400 + FULL_LAYER + HEAD == 277_440
    assert counted["total"] < FULL
    assert counted["layers"][0] == {"heads": 2, "head_size": 8, "attention_width": 16, "value_width": 16,
                                    "intermediate_size": 40}
    assert model.config.hidden_size == 32 and model.config.intermediate_size == 64  # read from the modules


def test_a_model_pruned_by_kdlib_counts_fewer_flops():
    from kdlib import models

    if not hasattr(models, "shrink_layers"):
        pytest.skip("kdlib.models has no shrink_layers (structured pruning) in this tree")
    model = tiny_bert()
    models.shrink_layers(model, [[0, 2]] * 2, [range(48)] * 2)
    counted = matmul_flops(model, T)
    # Per layer: 3 x 32 x 16 + 16 x 32 + 32 x 48 + 48 x 32 = 5120 MACs per token, x 20 = 102_400; 6_400 attention.
    assert counted["total"] == 2 * (102_400 + 6_400) + HEAD
    assert [layer["heads"] for layer in counted["layers"]] == [2, 2]


def test_distilbert_and_an_int8_model_count_like_the_bert_they_mirror():
    config = DistilBertConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                              max_position_embeddings=64, num_labels=3)
    distil = DistilBertForSequenceClassification(config).eval()  # pre_classifier + classifier: the same head
    assert matmul_flops(distil, T)["total"] == FULL
    assert matmul_flops(quantize_dynamic_int8(tiny_bert()), T)["total"] == FULL


def test_a_bad_token_count_or_a_model_without_layers_is_refused():
    with pytest.raises(ValueError, match="tokens must be > 0"):
        matmul_flops(tiny_bert(), 0)
    with pytest.raises(TypeError, match="not a transformer encoder"):
        matmul_flops(torch.nn.Sequential(torch.nn.Linear(4, 4)), T)


def test_mean_tokens_counts_each_text_alone():
    tokenizer = make_tiny_tokenizer()
    texts = ["set an alarm", "play some music please now"]
    counts = [len(tokenizer(t)["input_ids"]) for t in texts]
    assert counts[0] != counts[1]
    assert mean_tokens(tokenizer, texts) == sum(counts) / 2


# ---------------------------------------------------------------------------------------------
# The int8 peak from /proc/cpuinfo
# ---------------------------------------------------------------------------------------------


def cpuinfo(model: str, vendor: str, flags: str, mhz: str = "2250.000", processors: int = 2) -> str:
    block = ("processor\t: {n}\nvendor_id\t: {vendor}\nmodel name\t: {model}\ncpu MHz\t\t: {mhz}\n"
             "flags\t\t: fpu vme de pse tsc msr sse sse2 ssse3 sse4_1 sse4_2 {flags}\n\n")
    return "".join(block.format(n=n, vendor=vendor, model=model, mhz=mhz if n == 0 else "1.0", flags=flags)
                   for n in range(processors))


AVX2 = cpuinfo("AMD EPYC 7B12", "AuthenticAMD", "avx f16c fma avx2 bmi2")
VNNI = cpuinfo("AMD EPYC 9B14", "AuthenticAMD", "avx fma avx2 avx512f avx512bw avx512vl avx512_vnni avx512_bf16",
               mhz="2600.000")
AMX = cpuinfo("Intel(R) Xeon(R) Platinum 8481C", "GenuineIntel",
              "avx fma avx2 avx512f avx512bw avx512_vnni avx_vnni amx_bf16 amx_tile amx_int8", mhz="2000.000")
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes sha1 crc32\nCPU part\t: 0xd0c\n\n"


def test_cpuinfo_is_read_from_the_first_processor():
    info = parse_cpuinfo(VNNI)
    assert (info["model_name"], info["vendor"], info["cpu_mhz"]) == ("AMD EPYC 9B14", "AuthenticAMD", 2600.0)
    assert {"avx512_vnni", "avx2"} <= info["flags"] and "amx_int8" not in info["flags"]
    assert parse_cpuinfo(ARM)["flags"] == {"fp", "asimd", "evtstrm", "aes", "sha1", "crc32"}


def test_an_avx2_only_cpu_peaks_at_the_vpmaddubsw_path():
    peak = int8_peak(AVX2, 2)
    assert (peak["isa"], peak["ops_per_cycle_per_core"], peak["clock_mhz"]) == ("avx2", 128, 2250.0)
    assert peak["peak_gops"] == pytest.approx(128 * 2.25 * 2)  # 576 GOP/s
    assert "VPMADDUBSW" in peak["assumption"] and "upper bound" in peak["assumption"]
    assert peak["amx_peak_gops"] is None


def test_an_avx512_vnni_cpu_peaks_at_two_vnni_ports_and_prefers_the_cpufreq_max_clock():
    peak = int8_peak(VNNI, 2, cpufreq_max_khz="3500000\n")
    assert (peak["isa"], peak["ops_per_cycle_per_core"], peak["clock_mhz"]) == ("avx512_vnni", 256, 3500.0)
    assert peak["clock_source"] == "cpufreq cpuinfo_max_freq"
    assert peak["peak_gops"] == pytest.approx(256 * 3.5 * 2)  # 1792 GOP/s
    assert "2 x 64 MACs = 256 ops/cycle" in peak["assumption"] and "Zen 4" in peak["assumption"]
    assert int8_peak(VNNI, 1)["peak_gops"] == pytest.approx(256 * 2.6)  # cpu MHz without cpufreq, one core


def test_an_amx_cpu_keeps_the_vnni_peak_and_states_amx_beside_it():
    peak = int8_peak(AMX, 2)
    assert (peak["isa"], peak["ops_per_cycle_per_core"]) == ("avx512_vnni", 256)
    assert peak["peak_gops"] == pytest.approx(256 * 2.0 * 2)
    assert peak["amx_peak_gops"] == pytest.approx(2048 * 2.0 * 2)
    assert "AMX" in peak["assumption"] and "ONNX Runtime" in peak["assumption"] and "FBGEMM" in peak["assumption"]
    assert int8_isa(parse_cpuinfo(AMX)["flags"]).name == "amx_int8"


def test_a_cpu_without_a_known_int8_isa_or_clock_has_no_peak():
    arm = int8_peak(ARM, 2)
    assert arm["isa"] is None and arm["peak_gops"] is None and "no int8 SIMD ISA" in arm["assumption"]
    no_clock = int8_peak(AVX2.replace("cpu MHz", "cpu speed"), 2)
    assert no_clock["isa"] == "avx2" and no_clock["peak_gops"] is None and "no peak" in no_clock["assumption"]
    assert max_clock_mhz(AVX2, "0") == (2250.0, max_clock_mhz(AVX2)[1])  # a zero cpufreq value is ignored
    with pytest.raises(ValueError, match="cores must be a whole number >= 1"):
        int8_peak(AVX2, 0)


def test_the_machine_peak_reads_the_files_it_is_given(tmp_path):
    (tmp_path / "cpuinfo").write_text(VNNI)
    (tmp_path / "max_freq").write_text("3000000\n")
    peak = machine_int8_peak(2, tmp_path / "cpuinfo", tmp_path / "max_freq")
    assert peak["peak_gops"] == pytest.approx(256 * 3.0 * 2) and peak["cores"] == 2
    assert machine_int8_peak(2, tmp_path / "nothing", tmp_path / "nothing")["peak_gops"] is None


def test_the_share_of_peak_is_flops_over_time_over_peak():
    assert share_of_peak(1e9, 1.0, 1000.0) == pytest.approx(1.0)  # 1 GFLOP in 1 ms on 1000 GOP/s
    assert share_of_peak(1.11e8, 0.5, 1329.0) == pytest.approx(1.11e8 / 5e-4 / 1.329e12)
    assert share_of_peak(1e9, 1.0, None) is None
