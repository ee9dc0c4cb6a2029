"""Drive a TPU VM pod slice: create it, install vlax on every worker, launch training on all workers, tail logs.

Every sub-command builds the exact ``gcloud`` command lines first; ``--dry-run`` prints them instead of running
them, which is how they are tested on machines without cloud access.

    python tpu/pod.py --name=vlax-v4 --zone=us-central2-b --accelerator=v4-32 create
    python tpu/pod.py --name=vlax-v4 --zone=us-central2-b install --repo=https://example.org/vlax.git
    python tpu/pod.py --name=vlax-v4 --zone=us-central2-b launch -- --config=experiments/configs/metaworld.py:small
    python tpu/pod.py --name=vlax-v4 --zone=us-central2-b logs
    python tpu/pod.py --name=vlax-v4 --zone=us-central2-b delete
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

DEFAULT_RUNTIME = "tpu-ubuntu2204-base"
REMOTE_DIR = "~/vlax"
LOG_FILE = "~/vlax_train.log"


def _base(args, verb: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, args.name, f"--zone={args.zone}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    return cmd


def _on_all_workers(args, remote: str) -> list[str]:
    return _base(args, "ssh") + ["--worker=all", f"--command={remote}"]


def create_commands(args) -> list[list[str]]:
    cmd = _base(args, "create") + [f"--accelerator-type={args.accelerator}", f"--version={args.runtime}"]
    if args.spot:
        cmd.append("--spot")
    return [cmd]


def install_commands(args) -> list[list[str]]:
    # Same pinned set as CI, plus the TPU build of jaxlib; every worker installs independently.
    remote = " && ".join([
        f"(test -d {REMOTE_DIR} || git clone {shlex.quote(args.repo)} {REMOTE_DIR})",
        f"cd {REMOTE_DIR} && git fetch -q && git checkout -q {shlex.quote(args.ref)}",
        "python3 -m venv .venv",
        ".venv/bin/pip install -q -c constraints.txt -e . 'jax[tpu]==0.10.2'",
    ])
    return [_on_all_workers(args, remote)]


def launch_commands(args) -> list[list[str]]:
    # jax.distributed.initialize() reads the TPU metadata on each worker, so every worker runs the same command.
    train = " ".join(shlex.quote(a) for a in [".venv/bin/python", "-m", "experiments.train", *args.train_args])
    remote = f"cd {REMOTE_DIR} && nohup {train} > {LOG_FILE} 2>&1 &"
    return [_on_all_workers(args, remote)]


def logs_commands(args) -> list[list[str]]:
    return [_base(args, "ssh") + [f"--worker={args.worker}", f"--command=tail -n 200 -f {LOG_FILE}"]]


def delete_commands(args) -> list[list[str]]:
    return [_base(args, "delete") + ["--quiet"]]


COMMANDS = {"create": create_commands, "install": install_commands, "launch": launch_commands,
            "logs": logs_commands, "delete": delete_commands}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="TPU VM name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default=None)
    parser.add_argument("--dry-run", action="store_true", help="print the commands instead of running them")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create")
    create.add_argument("--accelerator", required=True, help="e.g. v4-32, v5litepod-64")
    create.add_argument("--runtime", default=DEFAULT_RUNTIME)
    create.add_argument("--spot", action="store_true", help="preemptible capacity (training saves on SIGTERM)")
    install = sub.add_parser("install")
    install.add_argument("--repo", required=True, help="git URL every worker clones")
    install.add_argument("--ref", default="main")
    launch = sub.add_parser("launch")
    launch.add_argument("train_args", nargs=argparse.REMAINDER, help="arguments for experiments.train, after --")
    logs = sub.add_parser("logs")
    logs.add_argument("--worker", default="0")
    sub.add_parser("delete")
    args = parser.parse_args(argv)
    if args.command == "launch" and args.train_args[:1] == ["--"]:
        args.train_args = args.train_args[1:]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    for cmd in COMMANDS[args.command](args):
        if args.dry_run:
            print(shlex.join(cmd))
        else:
            rc = subprocess.call(cmd)
            if rc:
                return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
