"""Every command's --json output has the documented keys (docs/output-format.md), the
schema version, and absolute paths."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from pathlib import Path

import pytest
from conftest import run_python

pytestmark = pytest.mark.usefixtures("single_thread")

DOCS = (Path(__file__).resolve().parents[1] / "docs" / "output-format.md").read_text()
KEYS = {
    "prune": {"source", "family", "latent", "ratio", "importance", "mode", "widths", "params", "macs",
              "params_reduction", "macs_reduction", "requested_channel_reduction", "importance_timesteps",
              "warnings", "output"},
    "distill": {"steps", "resumed_from_step", "final", "settings", "data", "latent_cache", "output"},
    "eval": {"models", "protocol", "grid", "device", "sampler", "sampler_steps", "output"},
    "export": {"source", "teacher", "family", "model_class", "pipeline_tag", "pruning", "distill", "distill_steps",
               "objective", "params", "macs", "dtype", "inference_memory", "eval", "eval_protocol",
               "stock_diffusers_loadable", "autoencoder", "num_classes", "license", "datasets", "output",
               "size_on_disk_bytes", "quantize", "weight_bytes"},
    "stats": {"output", "feature_dim", "extractor", "mode", "source", "kind", "count", "size", "split"},
}
EVAL_ROW = {"model", "path", "family", "latent", "params", "macs", "latency_s_per_image", "throughput_img_s",
            "pipeline_s_per_image", "pipeline_batch_size",
            "peak_memory_bytes", "peak_memory_kind", "batch_size", "steps", "denoiser_calls_per_step", "fid", "kid",
            "num_samples"}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    from difcompress.cli import main

    root = tmp_path_factory.mktemp("json")
    commands = {
        "prune": ["prune", "digits", "--ratio", "0.9", "-o", root / "p", "--device", "cpu"],
        "distill": ["distill", "--student", root / "p", "-o", root / "s", "--data", "digits", "--steps", "2",
                    "--batch-size", "4", "--checkpoint-every", "0", "--device", "cpu"],
        "eval": ["eval", "digits", root / "s", "--fid", "--num-samples", "8", "--sampler-steps", "2",
                 "--grid-size", "2", "--latency-batch-size", "2", "--device", "cpu"],
        "export": ["export", root / "s", "-o", root / "e"],
        "stats": ["stats", "digits", "-o", root / "ref.npz", "--feature-extractor", "digits"],
    }
    results = {}
    here = os.getcwd()
    os.chdir(root)  # eval writes to its default ./difcompress-eval: here, not in the repository
    try:
        for name, args in commands.items():
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
                try:
                    main([str(a) for a in args] + ["--json"])
                except SystemExit as exit_:
                    assert not exit_.code, name
            results[name] = json.loads(out.getvalue())
    finally:
        os.chdir(here)
    assert (root / "difcompress-eval" / "eval.json").is_file()
    return results


@pytest.mark.parametrize("command", sorted(KEYS))
def test_json_output_has_the_documented_keys(command, outputs):
    result = outputs[command]
    assert result["schema_version"] == 1
    assert KEYS[command] <= set(result), KEYS[command] - set(result)
    for key in KEYS[command]:
        assert re.search(rf"`{re.escape(key)}`", DOCS), f"{command}.{key} is not in docs/output-format.md"
    assert Path(result["output"]).is_absolute()


def test_eval_rows_share_one_protocol_and_widths_have_one_shape(outputs):
    rows, protocol = outputs["eval"]["models"], outputs["eval"]["protocol"]
    assert all(EVAL_ROW <= set(row) and "protocol" not in row for row in rows)
    assert Path(rows[1]["path"]).is_absolute() and Path(outputs["eval"]["grid"]).is_absolute()
    assert protocol["num_samples"] == 8 and rows[1]["speedup_vs_first"] > 0
    for widths in (outputs["prune"]["widths"], outputs["export"]["pruning"]["widths"]):
        assert all(isinstance(v, list) and len(v) == 2 for v in widths.values())
    assert outputs["distill"]["data"]["resolved"] == "digits"


def test_json_stdout_holds_only_the_result_when_a_library_prints_there(tmp_path):
    """deepspeed's logger prints to stdout when accelerate imports it; under --json anything a
    library writes to stdout goes to stderr, so a script can parse stdout whole."""
    code = ("import sys; from difcompress.cli import main\n"
            "import difcompress.commands.stats as stats\n"
            "real = stats.stats\n"
            "def noisy(*args, **kwargs):\n"
            "    print('a library talking on stdout')\n"
            "    return real(*args, **kwargs)\n"
            "stats.stats = noisy\n"
            "sys.exit(main(['stats', 'digits', '--json', '--feature-extractor', 'digits',\n"
            f"                '-o', {str(tmp_path / 'stats.npz')!r}]))\n")
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["schema_version"] == 1
    assert "a library talking on stdout" in proc.stderr
