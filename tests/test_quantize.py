"""`export --quantize`: the denoiser's linear weights in int8 / packed int4 through diffusers'
optimum-quanto backend, reloaded by stock diffusers from safetensors (docs/quantization.md)."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError

import pytest
from conftest import NO_DIFCOMPRESS_CHECK, assert_one_line_error, run_export, run_python

pytest.importorskip("optimum.quanto", reason="the quantize extra: pip install 'difcompress[quantize]'")

pytestmark = pytest.mark.usefixtures("single_thread")

SCHEMES = ("int8", "int4")
# id: fixture; "t2i" is the embedded digits-t2i teacher (docs/embedded.md), a real SD-layout pipeline
CASES = {"pixel": "tiny_model_dir", "sd": "tiny_sd_dir", "t2i": "digits_t2i_dir"}
PROMPTED = ("sd", "t2i")

# One interpreter, without difcompress, loads and samples every quantized folder: the stock
# call, and the one the card shows (the fp16 variant in fp16).
_LOADS = """
import sys, torch, numpy as np, diffusers
from optimum.quanto import QLinear

def sample(pipe, case):
    pipe.set_progress_bar_config(disable=True)
    args = dict(num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    if case in ("sd", "t2i"):
        args.update(prompt="a 3", height=16, width=16, guidance_scale=1.0)
    images = pipe(**args).images
    assert images.shape[0] == 1 and np.isfinite(images).all(), images
    return "finite"

def card_pipeline(out):
    # the card's own quantized-encoders snippet: the last python block of its README
    block = open(out + "/README.md").read().split("```python")[-1].split("```")[0]
    scope = {}
    exec(block, scope)
    return scope["pipe"]

def check(case, out):
    if case == "sd-te":
        pipe = card_pipeline(out)
        encoded = [m for m in pipe.text_encoder.modules() if isinstance(m, QLinear)]
        assert encoded and all(m.weight.qtype.bits == 8 for m in encoded), "text encoder not quantized"
        return f"{len(encoded)} encoder qlinear " + sample(pipe, "sd")
    plain = diffusers.DiffusionPipeline.from_pretrained(out)                 # the stock call
    linears = [m for m in plain.unet.modules() if isinstance(m, QLinear)]
    assert linears and all(m.weight.qtype.bits in (4, 8) for m in linears)
    said = [f"{len(linears)} qlinear"]
    # transformers keeps an fp16 text encoder in fp16 while diffusers loads the U-Net in fp32,
    # so a plain-loaded fp16 SD folder (quantized or not) samples only in one dtype: the card's call.
    if case not in ("sd", "t2i"):
        said.append(sample(plain, case))
    card = diffusers.DiffusionPipeline.from_pretrained(out, variant="fp16", torch_dtype=torch.float16)
    said.append(sample(card, case))
    return " ".join(said)

for case, out in zip(*[iter(sys.argv[1:])] * 2):
    try:
        print(case, out, "ok", check(case, out))
    except Exception as err:
        print(case, out, "failed:", repr(err)[-2000:].replace(chr(10), " "))
"""


@pytest.fixture(scope="module")
def digits_t2i_dir():
    from difcompress.builtin import builtin_model_path

    return builtin_model_path("digits-t2i")


@pytest.fixture(scope="module")
def quantized_exports(request, tmp_path_factory):
    """Each case exported in fp16 and with each scheme, and what stock diffusers said of each
    quantized folder."""
    exports, argv = {}, []
    for case, fixture in CASES.items():
        source = request.getfixturevalue(fixture)
        root = tmp_path_factory.mktemp(f"quantize-{case}")
        exports[case, "fp16"] = (root / "fp16", run_export(source, root / "fp16", dtype="fp16"))
        for scheme in SCHEMES:
            out = root / scheme
            exports[case, scheme] = (out, run_export(source, out, dtype="fp16", quantize=scheme))
            argv += [case, str(out)]
    source, root = request.getfixturevalue("tiny_sd_dir"), tmp_path_factory.mktemp("quantize-sd-te")
    exports["sd", "int8-te"] = (root / "q", run_export(source, root / "q", dtype="fp16", quantize="int8",
                                                       quantize_text_encoders=True))
    argv += ["sd-te", str(root / "q")]
    proc = run_python(f"import sys; sys.argv = ['-', *{argv!r}]\n" + _LOADS + NO_DIFCOMPRESS_CHECK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = {line.split(" ", 2)[1]: line.split(" ", 2)[2] for line in proc.stdout.splitlines() if " " in line}
    return exports, said


def _tensor_bytes(path) -> int:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("case", list(CASES))
def test_a_quantized_export_is_safetensors_smaller_and_reloads_in_stock_diffusers(case, scheme, quantized_exports):
    from huggingface_hub import ModelCard

    exports, said = quantized_exports
    out, info = exports[case, scheme]
    fp16_out, _ = exports[case, "fp16"]
    assert said.get(str(out), "").startswith("ok "), said.get(str(out))
    assert said[str(out)].endswith("finite" if case in PROMPTED else "finite finite"), said[str(out)]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < (fp16_out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert (out / "unet" / "diffusion_pytorch_model.fp16.safetensors").samefile(weights)
    assert info["quantize"]["denoiser_weight_bytes"] == weights.stat().st_size
    assert json.loads((out / "unet" / "config.json").read_text())["quantization_config"]["weights_dtype"] == scheme
    for part in ("vae", "text_encoder") if case in PROMPTED else ():  # the other components as fp16 writes them
        [plain] = [p for p in (out / part).glob("*.safetensors") if ".fp16." not in p.name]
        assert plain.stat().st_size == next((fp16_out / part).glob(plain.name)).stat().st_size
    recorded = json.loads((out / "difcompress.json").read_text())["export"]["quantize"]
    version = recorded["backend_version"]
    assert recorded["scheme"] == scheme and recorded["backend"] == "optimum-quanto" and version[0].isdigit()
    # The memory estimate's weight bytes are the tensor bytes stock diffusers wrote (headers aside).
    memory = info["inference_memory"]
    assert memory["exported"] == scheme and [r["scheme"] for r in memory["rows"]] == [None, "int8", "int4"]
    estimated = next(r for r in memory["rows"] if r["scheme"] == scheme)
    assert estimated["weights"]["unet"] == _tensor_bytes(weights)
    assert estimated["peak_bytes"] > estimated["weight_bytes"] and estimated["fits_gb"] == [8, 12, 16, 24]
    card = ModelCard.load(out / "README.md")
    assert "## Memory" in card.content and "(this folder)" in card.content
    assert f"{scheme} weights of the unet" in card.content and f"optimum-quanto {version}" in card.content
    assert "quantized" in card.data.tags


def test_export_prints_the_weight_bytes(tiny_model_dir, tmp_path, run_cli):
    code, out, err = run_cli("export", tiny_model_dir, "-o", tmp_path / "q", "--dtype", "bf16", "--quantize", "int8")
    assert code == 0, err
    printed = " ".join(out.split())
    assert "int8 denoiser weights via optimum-quanto" in printed and "of weights (" in printed, printed
    assert (tmp_path / "q" / "unet" / "diffusion_pytorch_model.bf16.safetensors").is_file()


def test_quantize_needs_fp16_or_bf16(tiny_model_dir, tmp_path, run_cli):
    code, _, err = run_cli("export", tiny_model_dir, "-o", tmp_path / "q", "--quantize", "int8")
    line = assert_one_line_error(code, err, 2)
    assert "--dtype fp16 or bf16" in line and not (tmp_path / "q").exists()


def test_an_unknown_scheme_is_one_line_listing_the_schemes(tiny_model_dir, tmp_path, run_cli):
    code, _, err = run_cli("export", tiny_model_dir, "-o", tmp_path / "q", "--dtype", "fp16", "--quantize", "nf4")
    line = assert_one_line_error(code, err, 2)
    assert "'nf4'" in line and all(f"'{s}'" in line for s in SCHEMES), line


def test_a_missing_backend_says_how_to_install_it(tiny_model_dir, tmp_path, run_cli, monkeypatch):
    import difcompress.artifacts.quantize as quantize

    def absent(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(quantize, "version", absent)
    code, _, err = run_cli("export", tiny_model_dir, "-o", tmp_path / "q", "--dtype", "fp16", "--quantize", "int4")
    line = assert_one_line_error(code, err, 2)
    assert "pip install 'difcompress[quantize]'" in line and not (tmp_path / "q").exists()


def test_an_already_quantized_folder_is_refused(quantized_exports, tmp_path, run_cli):
    source, _ = quantized_exports[0]["pixel", "int8"]
    code, _, err = run_cli("export", source, "-o", tmp_path / "again", "--dtype", "fp16", "--quantize", "int4")
    line = assert_one_line_error(code, err, 2)
    assert "already quantized" in line and "unet (quanto int8)" in line, line


def test_a_scheme_the_installed_backend_lacks_is_one_line(tiny_model_dir, tmp_path, run_cli, monkeypatch):
    import difcompress.artifacts.quantize as quantize

    monkeypatch.setattr(quantize, "installed_qtypes", lambda: {"qint8", "qfloat8"})  # an optimum-quanto without int4
    code, _, err = run_cli("export", tiny_model_dir, "-o", tmp_path / "q", "--dtype", "fp16", "--quantize", "int4")
    line = assert_one_line_error(code, err, 2)
    assert "has no qint4" in line and "pip install -U optimum-quanto" in line and not (tmp_path / "q").exists()


def test_a_backend_older_than_diffusers_accepts_is_one_line(tiny_model_dir, tmp_path, run_cli, monkeypatch):
    import difcompress.artifacts.quantize as quantize

    monkeypatch.setattr(quantize, "is_optimum_quanto_version", lambda op, v: False)
    code, _, err = run_cli("export", tiny_model_dir, "-o", tmp_path / "q", "--dtype", "fp16", "--quantize", "int8")
    line = assert_one_line_error(code, err, 2)
    assert ">= 0.2.6" in line and not (tmp_path / "q").exists()


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_distilling_from_a_quantized_export_is_refused(role, quantized_exports, tiny_model_dir, tmp_path, run_cli):
    quantized, _ = quantized_exports[0]["pixel", "int8"]
    student, teacher = (quantized, tiny_model_dir) if role == "student" else (tiny_model_dir, quantized)
    code, _, err = run_cli("distill", "--student", student, "--teacher", teacher, "-o", tmp_path / "run",
                           "--data", tmp_path, "--steps", "1")
    line = assert_one_line_error(code, err, 2)
    assert "already quantized" in line and f"a quantized {role} cannot be distilled" in line, line
    assert str(tiny_model_dir.resolve()) in line or str(tiny_model_dir) in line, line  # the export's source
    assert not (tmp_path / "run").exists()


def test_text_encoders_quantize_as_the_card_loads_them(quantized_exports):
    """transformers cannot save quanto weights: the encoders stay fp16 in the folder and the
    card's PipelineQuantizationConfig call quantizes them as the pipeline loads (run above)."""
    exports, said = quantized_exports
    out, info = exports["sd", "int8-te"]
    assert said.get(str(out), "").startswith("ok ") and said[str(out)].endswith("finite"), said.get(str(out))
    assert "encoder qlinear" in said[str(out)]
    recorded = info["quantize"]["text_encoders"]
    assert recorded["components"] == ["text_encoder"] and recorded["transformers_version"][0].isdigit()
    memory = info["inference_memory"]
    assert memory["quantized"] == "denoiser and text encoders"
    int8 = next(r for r in memory["rows"] if r["scheme"] == "int8")
    plain = exports["sd", "int8"][1]["inference_memory"]["rows"][1]
    assert int8["weights"]["text_encoder"] < plain["weights"]["text_encoder"]
    assert "PipelineQuantizationConfig" in (out / "README.md").read_text()


def test_quantize_text_encoders_needs_a_scheme_and_text_encoders(tiny_model_dir, tiny_sd_dir, tmp_path, run_cli):
    code, _, err = run_cli("export", tiny_sd_dir, "-o", tmp_path / "a", "--dtype", "fp16", "--quantize-text-encoders")
    assert "needs --quantize" in assert_one_line_error(code, err, 2)
    code, _, err = run_cli("export", tiny_model_dir, "-o", tmp_path / "b", "--dtype", "fp16", "--quantize", "int8",
                           "--quantize-text-encoders")
    assert "has no text encoders" in assert_one_line_error(code, err, 2)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
