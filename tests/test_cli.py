import subprocess
import sys

from addnorm.cli import main


def test_info_prints_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("addnorm", "torch", "backends", "cpu cores"):
        assert word in out
    from addnorm.bench import cpu_model

    assert cpu_model() in out  # the CPU's name, as the bench's header prints it


def test_console_script_entry_point():
    done = subprocess.run([sys.executable, "-m", "addnorm.cli", "info"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "backends" in done.stdout


def test_import_compiles_no_kernel_framework():
    code = "import sys, addnorm; print(any(m.split('.')[0] in ('numba', 'triton') for m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
