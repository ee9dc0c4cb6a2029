"""The TPU pod launcher builds the exact gcloud commands (checked with --dry-run)."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(*args):
    out = subprocess.run([sys.executable, str(ROOT / "tpu" / "pod.py"), "--name=pod1", "--zone=us-central2-b",
                          "--dry-run", *args], capture_output=True, text=True, check=True).stdout
    return [shlex.split(line) for line in out.strip().splitlines()]


def test_create():
    (cmd,) = _dry_run("create", "--accelerator=v4-32", "--spot")
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod1", "--zone=us-central2-b",
                   "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]


def test_install_runs_on_every_worker_with_pinned_set():
    (cmd,) = _dry_run("install", "--repo=https://example.org/vlax.git", "--ref=v0.1")
    assert cmd[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1", "--zone=us-central2-b"]
    assert "--worker=all" in cmd
    remote = cmd[-1]
    assert remote.startswith("--command=")
    assert "git checkout -q v0.1" in remote and "-c constraints.txt" in remote and "jax[tpu]" in remote


def test_launch_passes_training_flags_through():
    (cmd,) = _dry_run("launch", "--", "--config=experiments/configs/metaworld.py:small",
                      "--config.model.head=flow")
    remote = cmd[-1]
    assert "--worker=all" in cmd
    assert ("-m experiments.train --config=experiments/configs/metaworld.py:small --config.model.head=flow"
            in remote)
    assert remote.endswith("> ~/vlax_train.log 2>&1 &")


def test_logs_and_delete():
    (logs,) = _dry_run("logs", "--worker=3")
    assert "--worker=3" in logs and logs[-1] == "--command=tail -n 200 -f ~/vlax_train.log"
    (delete,) = _dry_run("delete")
    assert delete[4:6] == ["delete", "pod1"] and delete[-1] == "--quiet"


def test_missing_required_flag_is_reported():
    proc = subprocess.run([sys.executable, str(ROOT / "tpu" / "pod.py"), "--name=p", "--zone=z", "create"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--accelerator" in proc.stderr


def _documented_train_commands() -> list[list[str]]:
    """The trainer arguments of every command in tpu/README.md (``experiments.train`` or ``pod.py launch --``)."""
    text = (ROOT / "tpu" / "README.md").read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        words = shlex.split(line.replace("$RANK", "3"), comments=True) if "--config=" in line else []
        if "experiments.train" in words:
            commands.append(words[words.index("experiments.train") + 1:])
        elif "launch" in words and "--" in words:
            commands.append(words[words.index("--") + 1:])
    return commands


def test_readme_commands_use_real_trainer_flags():
    """Every flag the README documents is a flag of experiments/train.py or a field of the config it names."""
    import importlib.util

    trainer_flags = {"config", "coordinator", "num_processes", "process_id"}
    commands = _documented_train_commands()
    assert len(commands) == 3
    for args in commands:
        names = {a[2:].split("=", 1)[0] for a in args if not a.startswith("--config.")}
        assert names <= trainer_flags, names - trainer_flags
        (path, variant), = [a.split("=", 1)[1].split(":") for a in args if a.startswith("--config=")]
        spec = importlib.util.spec_from_file_location("documented_config", ROOT / path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cfg = module.get_config(variant)
        for arg in args:
            if arg.startswith("--config."):
                key = arg[len("--config."):].split("=", 1)[0]
                node = cfg
                for part in key.replace("]", "").replace("[", ".").split("."):
                    node = node[int(part)] if part.isdigit() else node[part]  # KeyError/IndexError: not real
