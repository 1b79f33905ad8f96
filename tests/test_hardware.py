"""GPU spec table, name matching, dtype support and user spec files."""

import csv
import dataclasses
import json
import subprocess
import sys
from importlib import resources

import pytest

from llmco2_serve.carbon.footprint import die_embodied_co2_kg
from llmco2_serve.hardware.gpus import (
    DTYPES,
    GPUSpec,
    GPUSpecError,
    UnknownGPUError,
    UnsupportedDtypeError,
    canonical_dtype,
    compute_dtype_for,
    gpu_spec,
    known_gpus,
    load_gpu_spec_file,
    resolve_gpu,
)

# Every device name the issue lists, exactly as NVML reports it, and the row it must reach.
NVML_NAMES = {
    "NVIDIA H100 80GB HBM3": "H100-SXM-80GB",
    "NVIDIA H100 PCIe": "H100-PCIe-80GB",
    "NVIDIA H100 NVL": "H100-NVL-94GB",
    "NVIDIA H200": "H200-SXM-141GB",
    "NVIDIA H200 NVL": "H200-NVL-141GB",
    "Tesla T4": "T4",
    "NVIDIA L4": "L4",
    "NVIDIA A10G": "A10G",
    "Tesla V100-SXM2-16GB": "V100-SXM2-16GB",
    "Tesla V100-SXM2-32GB": "V100-SXM2-32GB",
    "NVIDIA A100-SXM4-40GB": "A100-SXM-40GB",
    "NVIDIA A100-SXM4-80GB": "A100-SXM-80GB",
    "NVIDIA A100-PCIE-40GB": "A100-PCIe-40GB",
    "NVIDIA A100 80GB PCIe": "A100-PCIe-80GB",
    "NVIDIA B200": "B200-SXM-180GB",
    "NVIDIA L40S": "L40S",
}


def _csv_rows():
    text = resources.files("llmco2_serve.data").joinpath("gpus.csv").read_text(encoding="utf-8")
    return list(csv.DictReader(text.splitlines()))


# --- table content ----------------------------------------------------------------------------

def test_table_has_required_gpus_with_sources():
    names = [g.name for g in known_gpus()]
    assert names == [r["name"] for r in _csv_rows()]
    for required in set(NVML_NAMES.values()):
        assert required in names
    for g in known_gpus():
        assert g.source.strip(), g.name


def test_peaks_are_dense_not_the_papers_sparse_figures():
    h100 = gpu_spec("H100-SXM-80GB")
    # paper Table 2 says FP16 1979 / INT8 3958: the 2:4-sparse figures; dense is half
    assert h100.peak_tflops["float16"] == pytest.approx(1979 / 2, rel=1e-3)
    assert h100.peak_tflops["int8"] == pytest.approx(3958 / 2, rel=1e-3)
    assert h100.peak_flops_per_s("bfloat16") == pytest.approx(989.4e12)
    a100 = gpu_spec("A100-SXM-80GB")
    assert a100.peak_flops_per_s("float16") == pytest.approx(312e12)
    assert a100.peak_flops_per_s("int8") == pytest.approx(624e12)
    assert a100.peak_flops_per_s("int4") == pytest.approx(1248e12)
    # T4 has no sparsity, so the paper's numbers are dense already
    t4 = gpu_spec("T4")
    t4_peaks = (t4.peak_tflops["float32"], t4.peak_tflops["float16"], t4.peak_tflops["int8"])
    assert t4_peaks == (8.1, 65.0, 130.0)
    assert gpu_spec("L4").peak_tflops["float16"] == 121.0  # paper: 242 (sparse)


def test_fp8_only_on_ada_hopper_blackwell():
    with_fp8 = {g.name for g in known_gpus() if "fp8" in g.peak_tflops}
    assert with_fp8 == {
        "L4", "L40S", "H100-SXM-80GB", "H100-PCIe-80GB", "H100-NVL-94GB",
        "H200-SXM-141GB", "H200-NVL-141GB", "B200-SXM-180GB",
    }
    assert {g.name for g in known_gpus() if "bfloat16" not in g.peak_tflops} == {
        "T4", "V100-SXM2-16GB", "V100-SXM2-32GB",
    }


def test_paper_table2_memory_and_network_values():
    # paper Table 2 memory GB/s: T4 320, L4 300, A100 2039, H100 3350; network: A100 600, H100 900
    assert gpu_spec("T4").memory_bandwidth_bytes_per_s() == pytest.approx(320e9)
    assert gpu_spec("L4").memory_bandwidth_bytes_per_s() == pytest.approx(300e9)
    assert gpu_spec("A100-80GB").memory_bandwidth_bytes_per_s() == pytest.approx(2039e9)
    assert gpu_spec("H100").memory_bandwidth_bytes_per_s() == pytest.approx(3350e9)
    assert gpu_spec("A100-80GB").network_bandwidth_bytes_per_s() == pytest.approx(600e9)
    assert gpu_spec("H100").network_bandwidth_bytes_per_s() == pytest.approx(900e9)


def test_network_falls_back_to_pcie_without_nvlink():
    t4 = gpu_spec("T4")
    assert t4.nvlink_bandwidth_gb_s == 0.0
    assert t4.network_bandwidth_bytes_per_s() == pytest.approx(32e9)  # PCIe Gen3 x16
    assert gpu_spec("A100-PCIe-80GB").network_bandwidth_bytes_per_s() == pytest.approx(64e9)
    assert gpu_spec("H100 PCIe").network_bandwidth_bytes_per_s() == pytest.approx(128e9)
    assert gpu_spec("B200").network_bandwidth_bytes_per_s() == pytest.approx(1800e9)


def test_embodied_carbon_is_computed_from_die_node_and_memory():
    for g in known_gpus():
        assert g.embodied_co2_kg == pytest.approx(
            die_embodied_co2_kg(g.die_area_mm2, g.process_nm, g.memory_gb)
        ), g.name
    assert "embodied_co2_kg" not in _csv_rows()[0]  # not hand-typed in the table
    assert gpu_spec("H100").embodied_co2_kg == pytest.approx(46.652)
    assert gpu_spec("T4").embodied_co2_kg == pytest.approx(12.94)
    # A10G: Samsung 8 nm interpolates to 1.52 kg/cm^2: 6.284 * 1.52 + 24 * 0.4
    assert gpu_spec("A10G").embodied_co2_kg == pytest.approx(6.284 * 1.52 + 9.6)


# --- name matching ----------------------------------------------------------------------------

@pytest.mark.parametrize(("nvml_name", "canonical"), sorted(NVML_NAMES.items()))
def test_every_listed_nvml_name_matches(nvml_name, canonical):
    assert gpu_spec(nvml_name).name == canonical


def test_every_nvml_name_in_the_table_matches_its_row():
    for row in _csv_rows():
        for nvml_name in row["nvml_names"].split("|"):
            assert gpu_spec(nvml_name).name == row["name"]
        for alias in filter(None, row["aliases"].split("|")):
            assert gpu_spec(alias).name == row["name"]


@pytest.mark.parametrize(
    ("query", "canonical"),
    [
        ("h100", "H100-SXM-80GB"),
        ("H100", "H100-SXM-80GB"),
        ("A100-80GB", "A100-SXM-80GB"),
        ("a100_80gb", "A100-SXM-80GB"),
        ("a100", "A100-SXM-40GB"),
        ("t4", "T4"),
        ("  nvidia   h100  80gb hbm3 ", "H100-SXM-80GB"),
        ("NVIDIA A100 80GB PCIE", "A100-PCIe-80GB"),
        ("tesla v100-sxm2-32gb", "V100-SXM2-32GB"),
        ("A100-SXM4-40GB", "A100-SXM-40GB"),  # older drivers dropped the NVIDIA prefix
        ("A100-SXM-80GB", "A100-SXM-80GB"),
        ("h200", "H200-SXM-141GB"),
        ("l40s", "L40S"),
    ],
)
def test_aliases_and_spacing(query, canonical):
    assert gpu_spec(query).name == canonical


def test_near_names_do_not_cross_match():
    # the SXM and PCIe 80 GB A100s differ in bandwidth and TDP: never conflate them
    assert gpu_spec("NVIDIA A100 80GB PCIe").tdp_w == 300.0
    assert gpu_spec("NVIDIA A100-SXM4-80GB").tdp_w == 400.0
    assert gpu_spec("NVIDIA H100 NVL").memory_gb == 94.0


def test_unknown_gpu_error_lists_known_gpus_and_how_to_supply_a_spec():
    with pytest.raises(UnknownGPUError) as info:
        gpu_spec("NVIDIA GeForce RTX 4090")
    err = info.value
    assert isinstance(err, LookupError)
    msg = str(err)
    assert "NVIDIA GeForce RTX 4090" in msg
    for name in ("T4", "H100-SXM-80GB", "B200-SXM-180GB", "L40S"):
        assert name in msg
    assert "spec_file" in msg and "load_gpu_spec_file" in msg
    assert "peak_tflops" in msg and "memory_bandwidth_gb_s" in msg
    assert err.name == "NVIDIA GeForce RTX 4090"
    assert err.known == tuple(g.name for g in known_gpus())


def test_unknown_gpu_error_suggests_close_names():
    with pytest.raises(UnknownGPUError) as info:
        gpu_spec("NVIDIA H10O 80GB HBM3")
    assert info.value.suggestions[0] == "H100-SXM-80GB"
    assert "Did you mean: H100-SXM-80GB" in str(info.value)


def test_gpu_spec_rejects_non_string():
    with pytest.raises(TypeError):
        gpu_spec(None)  # type: ignore[arg-type]


def test_table_is_loaded_lazily_not_at_import():
    code = (
        "import llmco2_serve.hardware.gpus as h, llmco2_serve.carbon.footprint;"
        "n = h._load_table.cache_info().currsize;"
        "h.gpu_spec('t4');"
        "print(n, h._load_table.cache_info().currsize)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "1"]


def test_specs_are_shared_and_immutable():
    assert gpu_spec("h100") is gpu_spec("NVIDIA H100 80GB HBM3")
    g = gpu_spec("h100")
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.tdp_w = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        g.peak_tflops["float16"] = 1.0  # type: ignore[index]
    lst = known_gpus()
    lst.clear()
    assert len(known_gpus()) == 16
    assert len({g, gpu_spec("t4")}) == 2  # hashable


# --- dtypes -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("gpu", "dtype"),
    [("T4", "bfloat16"), ("T4", "fp8"), ("A100-SXM-80GB", "fp8"), ("H100", "int4"),
     ("V100", "bf16"), ("L4", "int4")],
)
def test_unsupported_dtype_raises_naming_dtype_and_gpu(gpu, dtype):
    spec = gpu_spec(gpu)
    with pytest.raises(UnsupportedDtypeError) as info:
        spec.peak_flops_per_s(dtype)
    err = info.value
    assert err.dtype == canonical_dtype(dtype)
    assert err.gpu_name == spec.name
    assert spec.name in str(err) and err.dtype in str(err)
    assert "compute_dtype_for" in str(err)
    assert not spec.supports(dtype)


def test_unknown_dtype_is_a_value_error_not_unsupported():
    with pytest.raises(ValueError, match="unknown dtype 'float64'") as info:
        gpu_spec("h100").peak_flops_per_s("float64")
    assert not isinstance(info.value, UnsupportedDtypeError)


@pytest.mark.parametrize(
    ("name", "canonical"),
    [("fp16", "float16"), ("HALF", "float16"), ("torch.bfloat16", "bfloat16"), ("bf16", "bfloat16"),
     ("float8_e4m3fn", "fp8"), ("fp32", "float32"), (" int4 ", "int4"), ("tf32", "tf32")],
)
def test_canonical_dtype(name, canonical):
    assert canonical_dtype(name) == canonical


def test_canonical_dtype_accepts_torch_dtype_like_objects():
    class FakeTorchDtype:
        def __str__(self):
            return "torch.float16"

    assert canonical_dtype(FakeTorchDtype()) == "float16"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("weight", "activation", "expected"),
    [
        ("int4", "float16", "float16"),     # AWQ/GPTQ W4A16
        ("int4", "bf16", "bfloat16"),
        ("int8", "float16", "float16"),     # W8A16
        ("fp8", "bfloat16", "bfloat16"),    # Marlin fp8 on Ampere
        ("int8", "int8", "int8"),           # W8A8 SmoothQuant
        ("fp8", "fp8", "fp8"),
        ("int4", "int8", "int8"),           # W4A8
        ("bfloat16", "bfloat16", "bfloat16"),
    ],
)
def test_compute_dtype_for(weight, activation, expected):
    assert compute_dtype_for(weight, activation) == expected


def test_compute_dtype_for_defaults_to_float16_activations():
    assert compute_dtype_for("int4") == "float16"


@pytest.mark.parametrize(
    ("weight", "activation"), [("int8", "fp8"), ("float16", "int8"), ("float16", "bfloat16")]
)
def test_compute_dtype_for_rejects_impossible_pairs(weight, activation):
    with pytest.raises(ValueError, match="no GEMM"):
        compute_dtype_for(weight, activation)


def test_weight_only_fp8_on_a100_goes_through_compute_dtype():
    a100 = gpu_spec("a100")
    with pytest.raises(UnsupportedDtypeError):
        a100.peak_flops_per_s("fp8")
    assert a100.peak_flops_per_s(compute_dtype_for("fp8", "bfloat16")) == pytest.approx(312e12)


# --- GPUSpec validation -----------------------------------------------------------------------

def _spec_kwargs(**overrides):
    kwargs = dict(
        name="X", peak_tflops={"fp16": 100.0, "int8": 200}, memory_gb=16,
        memory_bandwidth_gb_s=500, nvlink_bandwidth_gb_s=0, pcie_bandwidth_gb_s=64, tdp_w=150,
        die_area_mm2=400, process_nm=7, embodied_co2_kg=12.8, source="s",
    )
    kwargs.update(overrides)
    return kwargs


def test_gpuspec_canonicalizes_peak_keys_and_converts_numbers():
    g = GPUSpec(**_spec_kwargs())
    assert dict(g.peak_tflops) == {"float16": 100.0, "int8": 200.0}
    assert g.supported_dtypes == ("float16", "int8")
    assert isinstance(g.memory_gb, float) and g.memory_gb == 16.0
    assert g.network_bandwidth_bytes_per_s() == pytest.approx(64e9)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(name=""), "name"),
        (dict(peak_tflops={}), "peak_tflops"),
        (dict(peak_tflops={"fp64": 1.0}), "peak_tflops"),
        (dict(peak_tflops={"fp16": 1.0, "float16": 2.0}), "peak_tflops"),
        (dict(peak_tflops={"fp16": 0.0}), "peak_tflops"),
        (dict(nvlink_bandwidth_gb_s=-1), "nvlink_bandwidth_gb_s"),
        (dict(pcie_bandwidth_gb_s=0), "pcie_bandwidth_gb_s"),
        (dict(tdp_w=float("nan")), "tdp_w"),
        (dict(memory_gb="80"), "memory_gb"),
        (dict(process_nm=True), "process_nm"),
    ],
)
def test_gpuspec_rejects_bad_fields(overrides, field):
    with pytest.raises(GPUSpecError, match=field) as info:
        GPUSpec(**_spec_kwargs(**overrides))
    assert info.value.field_name == field


# --- user spec files --------------------------------------------------------------------------

def _write(tmp_path, data, name="gpu.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("gpu", ["H100-SXM-80GB", "T4", "B200-SXM-180GB"])
def test_spec_file_round_trip(tmp_path, gpu):
    spec = gpu_spec(gpu)
    loaded = load_gpu_spec_file(_write(tmp_path, spec.to_dict()))
    assert loaded == spec
    assert loaded.peak_flops_per_s("float32") == spec.peak_flops_per_s("float32")


def test_spec_file_without_embodied_or_source_computes_them(tmp_path):
    data = gpu_spec("h100").to_dict()
    del data["embodied_co2_kg"], data["source"]
    data["name"] = "My-H100"
    path = _write(tmp_path, data)
    spec = load_gpu_spec_file(str(path))
    assert spec.name == "My-H100"
    assert spec.embodied_co2_kg == pytest.approx(46.652)
    assert str(path) in spec.source


def test_spec_file_null_peak_means_unsupported(tmp_path):
    data = gpu_spec("a100").to_dict()
    data["peak_tflops"]["fp8"] = None
    spec = load_gpu_spec_file(_write(tmp_path, data))
    assert not spec.supports("fp8")


def test_spec_file_lists_every_missing_and_unknown_field(tmp_path):
    data = gpu_spec("t4").to_dict()
    del data["tdp_w"], data["memory_gb"]
    data["memory_bandwith_gb_s"] = 1.0  # typo
    path = _write(tmp_path, data)
    with pytest.raises(GPUSpecError) as info:
        load_gpu_spec_file(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "missing field(s): memory_gb, tdp_w" in msg
    assert "unknown field(s): memory_bandwith_gb_s" in msg


@pytest.mark.parametrize(
    ("field", "value"),
    [("tdp_w", -700), ("memory_gb", "80"), ("peak_tflops", {"float16": "fast"}),
     ("peak_tflops", {"float128": 1.0}), ("peak_tflops", [1, 2]), ("nvlink_bandwidth_gb_s", None),
     ("name", 7), ("die_area_mm2", 0)],
)
def test_spec_file_bad_value_names_file_and_field(tmp_path, field, value):
    data = gpu_spec("t4").to_dict()
    data[field] = value
    path = _write(tmp_path, data)
    with pytest.raises(GPUSpecError) as info:
        load_gpu_spec_file(path)
    assert str(path) in str(info.value)
    assert field in str(info.value)
    assert info.value.field_name == field


def test_spec_file_bad_json_and_non_object(tmp_path):
    with pytest.raises(GPUSpecError, match="not valid JSON"):
        load_gpu_spec_file(_write(tmp_path, "{name: H100", "a.json"))
    with pytest.raises(GPUSpecError, match="expected a JSON object"):
        load_gpu_spec_file(_write(tmp_path, "[1, 2]", "b.json"))
    with pytest.raises(FileNotFoundError):
        load_gpu_spec_file(tmp_path / "missing.json")


def test_resolve_gpu(tmp_path):
    data = gpu_spec("l4").to_dict()
    data["name"] = "Custom-L4"
    path = _write(tmp_path, data)
    assert resolve_gpu("h100", spec_file=path).name == "Custom-L4"  # the file wins
    assert resolve_gpu(spec_file=str(path)).name == "Custom-L4"
    assert resolve_gpu("NVIDIA L40S").name == "L40S"
    with pytest.raises(ValueError, match="spec_file"):
        resolve_gpu()
    with pytest.raises(UnknownGPUError):
        resolve_gpu("MI300X")


def test_dtypes_constant():
    assert DTYPES == ("float32", "tf32", "float16", "bfloat16", "fp8", "int8", "int4")
