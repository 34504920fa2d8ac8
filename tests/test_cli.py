"""The command line as a user meets it."""

import subprocess
import sys


def test_module_entry_point_lists_every_command():
    proc = subprocess.run([sys.executable, "-m", "difcompress", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("prune", "distill", "eval", "export", "run", "demo", "build-digits"):
        assert command in proc.stdout


def test_unknown_option_is_a_usage_error_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "difcompress", "prune", "--no-such-option"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "No such option" in proc.stderr
