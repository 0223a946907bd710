"""The `raysdpb` console command (pyproject's [project.scripts], installed by scripts/setup.sh) runs the same
commands as the `python -m raysdpb.<command>` forms."""

import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from trial_configs import sweep_env, sweep_raw

REPO = Path(__file__).resolve().parents[1]


def _run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), cwd=cwd, env=sweep_env(), capture_output=True, text=True, timeout=120)


def test_the_raysdpb_command_runs_each_module_s_main(tmp_path, shared_data_dir):
    command = shutil.which("raysdpb")
    assert command, "the raysdpb command is not installed: pip install -e . (scripts/setup.sh)"
    config = tmp_path / "cli.yaml"
    config.write_text(yaml.safe_dump(sweep_raw(shared_data_dir, tmp_path / "results", "cli",
                                               {"method": ["finetune", "dynsdpb"], "seed": [0, 1]})))
    # the same dry run, the same output
    ours = _run(command, "sweep", str(config), "--dry-run", cwd=tmp_path)
    module = _run(sys.executable, "-m", "raysdpb.sweep", str(config), "--dry-run", cwd=tmp_path)
    assert ours.returncode == module.returncode == 0, ours.stderr + module.stderr
    assert ours.stdout == module.stdout and "4 trials" in ours.stdout
    via_package = _run(sys.executable, "-m", "raysdpb", "sweep", str(config), "--dry-run", cwd=tmp_path)
    assert via_package.stdout == module.stdout
    # a user's mistake inside a command: its one clear line and exit code 2, as from the module
    missing = _run(command, "export", str(tmp_path / "nowhere"), "--best", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("raysdpb: error: ")
    assert "Traceback" not in missing.stderr
    # the command's own help and mistakes
    listing = _run(command, "--help", cwd=tmp_path)
    assert listing.returncode == 0 and all(f"  {c} " in listing.stdout for c in ("sweep", "train", "report", "export"))
    wrong = _run(command, "swep", cwd=tmp_path)
    assert wrong.returncode == 2 and "no command 'swep'; the commands: sweep, train, report, export" in wrong.stderr
    assert _run(command, cwd=tmp_path).returncode == 2
    assert _run(command, "train", "--help", cwd=tmp_path).stdout.startswith("usage: python -m raysdpb.train")
