"""How far a variant is from the machine's limit: the matrix-product arithmetic of one query, and the
int8 peak of the CPU that runs it.

* :func:`matmul_flops` counts ``2 * m * n * k`` for every matrix product of a transformer classifier, with
  sizes read from the modules, not the config, so a structurally pruned model is counted as it runs (bias,
  softmax, LayerNorm and GELU are not matrix products);
* :func:`int8_peak` turns ``/proc/cpuinfo`` and a core count into int8 operations per second (a
  multiply-accumulate is 2), each ISA of :data:`INT8_ISAS` with the assumption it rests on;
* :func:`share_of_peak` is FLOPs / latency / peak.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlib.config import MAX_LENGTH

CPUINFO = Path("/proc/cpuinfo")
CPUFREQ_MAX = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")  # kHz

# Attribute names of a layer's query and value projections (BERT, DistilBERT, MPNet, and *_proj models).
QUERY_NAMES = ("query", "q_lin", "q", "q_proj")
VALUE_NAMES = ("value", "v_lin", "v", "v_proj")


def _linears(module: Any, prefix: str = "") -> Iterator[tuple[str, int, int]]:
    """``(name, in_features, out_features)`` of every linear layer under ``module``, quantised ones included."""
    for name, child in module.named_modules(prefix=prefix):
        n_in, n_out = getattr(child, "in_features", None), getattr(child, "out_features", None)
        if isinstance(n_in, int) and isinstance(n_out, int):
            yield name, n_in, n_out


def encoder_layers(model: Any) -> tuple[str, list]:
    """``(name, layers)``: the model's transformer layers, the ``ModuleList`` holding the most linear layers."""
    import torch  # only a model count needs torch: the peak arithmetic runs without it

    candidates = ((sum(1 for _ in _linears(module)), name, list(module)) for name, module in model.named_modules()
                  if isinstance(module, torch.nn.ModuleList) and len(module))
    count, name, layers = max(candidates, key=lambda c: c[0], default=(0, "", []))
    if not count:
        raise TypeError(f"{type(model).__name__} has no list of layers with linear layers: not a transformer encoder.")
    return name, layers


def _find(layer: Any, names: tuple[str, ...]) -> tuple[Any, Any] | None:
    """``(owner, linear)`` for the first of ``names`` (a dotted path or attribute name) that is a linear layer."""
    modules = dict(layer.named_modules())
    for wanted in names:
        for path, module in modules.items():
            named = path == wanted or path.endswith("." + wanted)
            if named and isinstance(getattr(module, "out_features", None), int):
                return modules[path.rpartition(".")[0]], module  # "" is the layer itself
    return None


def layer_shape(layer: Any, default_head_size: int | None) -> dict:
    """What one layer's arithmetic depends on, read from its modules: attention and value widths, heads, head
    size, intermediate size, and its linears."""
    query, value = _find(layer, QUERY_NAMES), _find(layer, VALUE_NAMES)
    if query is None or value is None:
        raise TypeError(f"{type(layer).__name__} has no query / value projection named one of "
                        f"{QUERY_NAMES} / {VALUE_NAMES}: its attention products cannot be counted.")
    owner, q_linear = query
    width = q_linear.out_features
    head_size = getattr(owner, "attention_head_size", None) or default_head_size
    heads = width // head_size if head_size else None
    ffn = _find(layer, ("intermediate.dense", "ffn.lin1", "mlp.fc1", "fc1"))  # the FFN's first matrix
    linears = list(_linears(layer))
    intermediate = ffn[1].out_features if ffn else max(n_out for _, _, n_out in linears)
    return {"heads": heads, "head_size": head_size, "attention_width": width,
            "value_width": value[1].out_features, "intermediate_size": intermediate,
            "linears": [(n_in, n_out) for _, n_in, n_out in linears]}


def matmul_flops(model: Any, tokens: float) -> dict:
    """Matrix-product FLOPs of one query of ``tokens`` tokens (possibly a mean) through ``model``: per layer every
    linear over ``tokens`` rows plus ``Q K^T`` and ``P V`` (``2 * T^2`` times the attention / value width); the
    linears outside the layers (pooler, classifier) see one row. Returns ``total``, its parts and ``layers``."""
    if not tokens > 0:
        raise ValueError(f"tokens must be > 0, got {tokens!r}.")
    prefix, layers = encoder_layers(model)
    config = getattr(model, "config", None)
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    default_head_size = hidden // heads if hidden and heads else None
    shapes = [layer_shape(layer, default_head_size) for layer in layers]
    linear = sum(2 * tokens * n_in * n_out for shape in shapes for n_in, n_out in shape["linears"])
    attention = sum(2 * tokens**2 * (s["attention_width"] + s["value_width"]) for s in shapes)
    in_layers = prefix + "."
    head = sum(2 * n_in * n_out for name, n_in, n_out in _linears(model) if not name.startswith(in_layers))
    return {"total": float(linear + attention + head), "linear": float(linear), "attention": float(attention),
            "head": float(head), "tokens": float(tokens),
            "layers": [{k: v for k, v in s.items() if k != "linears"} for s in shapes]}


@dataclass(frozen=True)
class Int8Isa:
    """One row of the peak table: the ISA, the cpuinfo flags it needs, int8 operations per cycle per core and
    the assumption behind that number."""

    name: str
    flags: frozenset[str]
    ops_per_cycle: int
    assumption: str


INT8_ISAS: tuple[Int8Isa, ...] = (
    # AMX comes first only to be recognised; int8_peak states why its row is not the headline figure.
    Int8Isa("amx_int8", frozenset({"amx_int8", "amx_tile"}), 2048,
            "one TDPBUSD per 16 cycles per core, 16 x 16 x 64 u8*s8 multiply-accumulates each "
            "(1024 MACs = 2048 ops/cycle)"),
    Int8Isa("avx512_vnni", frozenset({"avx512_vnni", "avx512f"}), 256,
            "two 512-bit VPDPBUSD per cycle per core, 64 u8*s8 multiply-accumulates each (2 x 64 MACs = "
            "256 ops/cycle): Intel Xeon server cores with two AVX-512 FMA ports; a core that splits 512-bit "
            "instructions into two 256-bit halves (AMD Zen 4) issues half of this"),
    Int8Isa("avx512bw", frozenset({"avx512bw"}), 256,
            "two 512-bit VPMADDUBSW per cycle per core, 64 u8*s8 multiply-accumulates each (256 ops/cycle), "
            "the VPMADDWD + VPADDD widening that follows counted as free: an upper bound"),
    Int8Isa("avx_vnni", frozenset({"avx_vnni", "avx2"}), 128,
            "two 256-bit VPDPBUSD per cycle per core, 32 u8*s8 multiply-accumulates each (128 ops/cycle)"),
    Int8Isa("avx2", frozenset({"avx2"}), 128,
            "no VNNI: the VPMADDUBSW path, two 256-bit VPMADDUBSW per cycle per core, 32 u8*s8 "
            "multiply-accumulates each (128 ops/cycle), the VPMADDWD + VPADDD widening that follows counted "
            "as free: an upper bound"),
)
AMX_NOTE = ("AMX is present but the headline peak is AVX-512 VNNI's: ONNX Runtime's MLAS has an AMX u8s8 GEMM "
            "but falls back to AVX-512 VNNI for small GEMMs (a single query has fewer rows than one 16-row "
            "tile), torch's dynamic int8 Linear runs FBGEMM (AVX2 / AVX-512 VNNI, no AMX); OpenVINO's oneDNN "
            "kernels may use AMX, so amx_peak_gops is the ceiling for them")


def parse_cpuinfo(text: str) -> dict:
    """The first processor's ``model name``, ``vendor_id``, ISA ``flags`` (x86) or ``Features`` (Arm)
    and ``cpu MHz`` from the text of ``/proc/cpuinfo``."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
        elif fields and not line.strip():
            break  # the end of the first processor's block
    mhz = fields.get("cpu mhz")
    try:
        clock = float(mhz) if mhz else None
    except ValueError:
        clock = None
    return {
        "model_name": fields.get("model name"),
        "vendor": fields.get("vendor_id"),
        "flags": frozenset((fields.get("flags") or fields.get("features") or "").split()),
        "cpu_mhz": clock,
    }


def max_clock_mhz(cpuinfo_text: str, cpufreq_max_khz: str | None = None) -> tuple[float | None, str]:
    """``(MHz, source)``: cpufreq's ``cpuinfo_max_freq`` (kHz) where given, else cpuinfo's ``cpu MHz``, else
    ``(None, reason)``."""
    if cpufreq_max_khz and cpufreq_max_khz.strip().isdigit() and int(cpufreq_max_khz) > 0:
        return int(cpufreq_max_khz) / 1000, "cpufreq cpuinfo_max_freq"
    mhz = parse_cpuinfo(cpuinfo_text)["cpu_mhz"]
    if mhz:
        return mhz, "/proc/cpuinfo cpu MHz (no cpufreq max: the reported clock, turbo may run higher)"
    return None, "no clock in cpufreq or /proc/cpuinfo"


def int8_isa(flags: frozenset[str] | set[str]) -> Int8Isa | None:
    """The best row of :data:`INT8_ISAS` whose flags are all present (None: no int8 SIMD in the table)."""
    return next((isa for isa in INT8_ISAS if isa.flags <= flags), None)


def int8_peak(cpuinfo_text: str, cores: int, cpufreq_max_khz: str | None = None) -> dict:
    """The int8 peak of ``cores`` cores of the CPU ``cpuinfo_text`` describes, with its assumption: ``peak_gops``
    = ops per cycle per core x clock x cores (None, with the reason, where the ISA or clock is unknown). With AMX
    the headline is the AVX-512 VNNI peak (:data:`AMX_NOTE` says why) and ``amx_peak_gops`` the AMX one."""
    if not (isinstance(cores, int) and cores >= 1):
        raise ValueError(f"cores must be a whole number >= 1 (the timing threads), got {cores!r}.")
    info = parse_cpuinfo(cpuinfo_text)
    mhz, clock_source = max_clock_mhz(cpuinfo_text, cpufreq_max_khz)
    isa = int8_isa(info["flags"])
    amx = isa if isa is not None and isa.name == "amx_int8" else None
    if amx is not None:
        isa = int8_isa(info["flags"] - {"amx_int8"}) or amx
    peak = amx_peak = None
    if isa is None:
        assumption = ("no int8 SIMD ISA of the table (AMX, AVX-512 VNNI, AVX-512BW, AVX-VNNI, AVX2) in the cpuinfo "
                      "flags: no peak")
    elif mhz is None:
        assumption = f"{isa.assumption}; {clock_source}: no peak"
    else:
        peak = isa.ops_per_cycle * mhz * 1e6 * cores / 1e9
        notes = [isa.assumption, f"clock {mhz:.0f} MHz ({clock_source})", f"{cores} cores = the timing threads"]
        if amx is not None:
            amx_peak = amx.ops_per_cycle * mhz * 1e6 * cores / 1e9
            notes.append(AMX_NOTE)
        assumption = "; ".join(notes)
    return {"cpu": info["model_name"], "vendor": info["vendor"], "isa": isa.name if isa else None,
            "ops_per_cycle_per_core": isa.ops_per_cycle if isa else None, "clock_mhz": mhz,
            "clock_source": clock_source, "cores": cores, "peak_gops": peak, "amx_peak_gops": amx_peak,
            "assumption": assumption}


def machine_int8_peak(cores: int, cpuinfo: Path = CPUINFO, cpufreq: Path = CPUFREQ_MAX) -> dict:
    """:func:`int8_peak` of this machine, from ``/proc/cpuinfo`` and cpufreq's max clock where present."""
    text = cpuinfo.read_text(errors="replace") if cpuinfo.is_file() else ""
    khz = cpufreq.read_text().strip() if cpufreq.is_file() else None
    return int8_peak(text, cores, khz)


def share_of_peak(flops: float, p50_ms: float, peak_gops: float | None) -> float | None:
    """FLOPs / latency / peak: the share of the int8 peak a query's arithmetic reached (None without a peak)."""
    if not peak_gops or not p50_ms > 0:
        return None
    return flops / (p50_ms / 1e3) / (peak_gops * 1e9)


def mean_tokens(tokenizer: Any, texts: list[str], max_length: int = MAX_LENGTH) -> float:
    """Mean token count of ``texts`` one at a time (no padding; truncated at ``max_length`` as predictors do)."""
    if not texts:
        raise ValueError("mean_tokens needs at least one text.")
    counts = [len(tokenizer(text, truncation=True, max_length=max_length)["input_ids"]) for text in texts]
    return sum(counts) / len(counts)

