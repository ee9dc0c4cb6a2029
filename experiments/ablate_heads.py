"""Which action head is best under equal conditions? Train the same tiny policy once per head on the same data,
with the same seed and step budget, evaluate each closed-loop on unseen Meta-World layouts, and write a Markdown
table and a PNG chart.

    python -m experiments.ablate_heads --tasks=mt10 --steps=3000 --workdir=runs/ablation

Every head runs in its own subprocess and workdir (``<workdir>/<head>``): an interrupted ablation continues where
it stopped (training resumes from its newest checkpoint; finished heads are read from their ``result.json``).
``--parallel=2`` trains two heads at a time with one thread each. Policies see the camera image, the
proprioceptive state and the instruction only.

Columns: closed-loop success per task and mean; the final training loss (not comparable across heads: L1, MSE
and cross-entropy differ in kind); parameters; train steps/s; inference latency per chunk (one
``PolicyRunner.infer`` call on one observation during evaluation, compilation excluded) and per executed action.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import ast  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

DEFAULT_HEADS = ("binned", "binned_lm", "chunk", "flow", "diffusion")
from experiments.configs.preset_rows import PRESET_ROWS  # noqa: E402

CONFIG = "experiments/configs/metaworld.py"

flags.DEFINE_list("heads", list(DEFAULT_HEADS), "registered head names to compare, or preset rows: "
                  f"{sorted(PRESET_ROWS)}")
flags.DEFINE_string("variant", "tiny", "config variant of experiments/configs/metaworld.py")
flags.DEFINE_string("tasks", "mt10", "mt10, mt50 or comma-separated task names (training and evaluation)")
flags.DEFINE_integer("steps", 3000, "training steps per head (the same for every head)")
flags.DEFINE_float("max_minutes", 0.0, "> 0: also stop a head's training after this wall time (safety net)")
flags.DEFINE_integer("parallel", 1, "heads trained at a time (each restricted to 2 // parallel threads)")
flags.DEFINE_integer("episodes_per_task", 10, "closed-loop evaluation episodes per task (unseen layouts)")
flags.DEFINE_integer("eval_workers", 2, "evaluation processes")
flags.DEFINE_string("execution", "receding", "receding | ensemble")
flags.DEFINE_integer("replan_every", 0, "receding horizon: actions executed per chunk (0: the whole chunk)")
flags.DEFINE_multi_string("set", [], "extra config overrides for every head, e.g. --set=data.batch_size=32")
flags.DEFINE_string("workdir", "runs/ablation", "one sub-directory per head, plus the table and chart")
flags.DEFINE_integer("seed", 0, "training and evaluation seed (the same for every head)")
FLAGS = flags.FLAGS


def _thread_env(threads: int) -> dict:
    env = dict(os.environ)
    if threads == 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    return env


def _train_seconds(workdir: Path) -> float:
    log = workdir / "train_time.json"
    return sum(json.loads(line)["seconds"] for line in log.read_text().splitlines()) if log.exists() else 0.0


def train_head(head: str, workdir: Path, threads: int) -> None:
    """Train (or resume) one head in a subprocess; its log goes to ``<run>/train.log``.

    The wall-time budget spans resumptions: a resumed run gets what earlier processes left of ``--max_minutes``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    minutes = FLAGS.max_minutes
    if minutes > 0:
        minutes = max(minutes - _train_seconds(workdir) / 60, 0.05)
    model = [f"--config.{s}" for s in PRESET_ROWS[head]] if head in PRESET_ROWS else [f"--config.model.head={head}"]
    cmd = [sys.executable, "-m", "experiments.train", f"--config={CONFIG}:{FLAGS.variant}",
           *model, f"--config.workdir={workdir}", f"--config.seed={FLAGS.seed}",
           f"--config.data.sources[0].tasks={FLAGS.tasks}", f"--config.train.steps={FLAGS.steps}",
           f"--config.train.max_minutes={minutes}", "--config.train.tensorboard=False"]
    cmd += [f"--config.{s}" for s in FLAGS.set]
    t0 = time.time()
    with open(workdir / "train.log", "a") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=_thread_env(threads))
    if code:
        raise RuntimeError(f"training {head} failed (exit {code}); see {workdir / 'train.log'}")
    with open(workdir / "train_time.json", "a") as f:  # one line per (resumed) training process
        f.write(json.dumps({"seconds": time.time() - t0, "threads": threads}) + "\n")
    (workdir / "train_done").touch()  # a finished budget is never extended by a later resumption


def train_summary(workdir: Path) -> dict:
    """Final loss, steps/s and parameter count from the run's metrics and log."""
    from vlax.train.metrics import read_metrics

    rows = read_metrics(workdir)
    if not rows:
        raise RuntimeError(f"no metrics under {workdir}; did training run?")
    rates = [r["steps_per_s"] for r in rows[len(rows) // 5:]]  # past compilation and warm-up
    summary = {"final_step": int(rows[-1]["step"]), "final_loss": float(rows[-1]["loss"]),
               "steps_per_s": float(np.median(rates)), "examples_per_s": float(np.median(
                   [r["examples_per_s"] for r in rows[len(rows) // 5:]]))}
    for line in (workdir / "train.log").read_text().splitlines():
        if "M parameters" in line:
            summary["params_m"] = float(line.split("policy: ")[1].split("M parameters")[0])
    return summary


def evaluate_head(workdir: Path) -> dict:
    from vlax.eval import evaluate

    return evaluate(str(workdir), tasks=FLAGS.tasks, episodes_per_task=FLAGS.episodes_per_task, seed=FLAGS.seed,
                    execution=FLAGS.execution, replan_every=FLAGS.replan_every or None,
                    num_workers=FLAGS.eval_workers, results_path=str(workdir / "eval.json"), progress=False)


def saved_config(workdir: Path) -> dict:
    from vlax.checkpoint import Checkpointer

    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        return ckpt.read_json(ckpt.latest_step, "config")
    finally:
        ckpt.close()


def run_one(head: str, threads: int) -> dict:
    name = head
    workdir = Path(FLAGS.workdir) / name
    done = workdir / "result.json"
    if done.exists():
        print(f"[{name}] already done: {done}")
        return json.loads(done.read_text())
    if not (workdir / "train_done").exists():
        print(f"[{name}] training ({threads} thread{'s' * (threads > 1)})", flush=True)
        train_head(head, workdir, threads)
    result = {"head": head, **train_summary(workdir)}
    result["train_minutes"] = _train_seconds(workdir) / 60
    result["config"] = saved_config(workdir)
    print(f"[{name}] evaluating", flush=True)
    result["eval"] = {k: v for k, v in evaluate_head(workdir).items() if k != "episodes"}
    done.write_text(json.dumps(result, indent=1))
    print(f"[{name}] mean success {result['eval']['mean_success']:.1%}", flush=True)
    return result


def table(results: list[dict]) -> str:
    tasks = list(results[0]["eval"]["per_task"])
    short = [t.replace("-v3", "") for t in tasks]
    head = ["run", *short, "mean", "final loss", "params (M)", "train steps/s", "ms/chunk", "ms/action"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        ev = r["eval"]
        cells = [r["head"]]
        cells += [f"{ev['per_task'][t]['success_rate']:.0%}" for t in tasks]
        cells += [f"**{ev['mean_success']:.1%}**", f"{r['final_loss']:.4f}", f"{r.get('params_m', float('nan')):.2f}",
                  f"{r['steps_per_s']:.2f}", f"{ev['timing']['ms_per_policy_call']:.1f}",
                  f"{ev['timing']['ms_per_action']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results[0]["eval"]["per_task"])
    x = np.arange(len(tasks) + 1)
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(x)), 4))
    for i, r in enumerate(results):
        ev = r["eval"]
        vals = [ev["per_task"][t]["success_rate"] for t in tasks] + [ev["mean_success"]]
        ax.bar(x + (i - (len(results) - 1) / 2) * width, vals, width, label=r["head"])
    ax.set_xticks(x, [t.replace("-v3", "") for t in tasks] + ["MEAN"], rotation=35, ha="right")
    ax.set_ylabel("success on unseen layouts")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, ncol=min(5, len(results)))
    ax.set_title("Action-head ablation (same policy, data, seed and steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ensure_dataset() -> None:
    from experiments.configs.metaworld import get_config
    from vlax.data.source_config import open_source

    cfg = get_config(FLAGS.variant)
    source = cfg.data.sources[0]
    source.tasks = FLAGS.tasks
    for override in FLAGS.set:  # the dataset follows data.sources[0].* overrides the way the trainer reads them
        key, value = override.split("=", 1)
        if key.startswith("data.sources[0]."):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass  # a plain string
            source[key.split(".", 2)[2]] = value
    open_source(source.to_dict())  # generates the Meta-World dataset once, before the parallel runs


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    from vlax.heads import HEADS

    unknown = [h for h in FLAGS.heads if h not in HEADS]
    if unknown:
        raise ValueError(f"unknown heads {unknown}; known: {sorted(HEADS)}")
    if FLAGS.parallel not in (1, 2):
        raise ValueError(f"--parallel must be 1 or 2, got {FLAGS.parallel}")
    threads = 2 // FLAGS.parallel
    ensure_dataset()  # once, before parallel heads race to create it
    with ThreadPoolExecutor(FLAGS.parallel) as pool:
        results = list(pool.map(lambda head: run_one(head, threads), FLAGS.heads))
    out = Path(FLAGS.workdir)
    md = table(results)
    (out / "ablation.md").write_text(md + "\n")
    chart(results, out / "ablation.png")
    print(md)
    print(f"wrote {out / 'ablation.md'} and {out / 'ablation.png'}")


if __name__ == "__main__":
    app.run(main)
