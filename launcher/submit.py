"""`dist-train submit`: render the sbatch template in slurm/ for a config and submit it."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dist_train.errors import UserError

TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "dist-train.sbatch"


@dataclass
class SubmitArgs:
    config: str
    overrides: list[str] = field(default_factory=list)
    output_dir: str = "output/run"
    """Base output folder; each job writes into ``<output_dir>/job-<SLURM_JOB_ID>``."""
    nodes: int = 1
    gpus_per_node: int = 0
    """GPUs per node; one training process per GPU. 0 = CPU job with ``nproc_per_node`` processes."""
    nproc_per_node: int = 1
    time: str = "01:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    cpus_per_task: int | None = None
    """CPUs per node task (default: one per training process)."""
    mem: str | None = None
    requeue: bool = False
    """Requeue the job when it is stopped by its time-limit signal or a USR1 before the end."""
    signal_lead: int = 120
    """Seconds before the time limit at which SLURM signals the job to checkpoint and stop."""
    job_name: str = "dist-train"


def render(args: SubmitArgs) -> str:
    if not re.fullmatch(r"(\d+-)?\d{1,2}(:\d{2}){0,2}", args.time):
        raise UserError(f"submit: --time '{args.time}' is not a SLURM time; use HH:MM:SS (or D-HH:MM:SS)")
    if args.nodes < 1 or args.nproc_per_node < 1 or args.gpus_per_node < 0 or args.signal_lead < 0:
        raise UserError("submit: --nodes and --nproc-per-node must be >= 1, --gpus-per-node and --signal-lead >= 0")
    nproc = args.gpus_per_node or args.nproc_per_node
    extra = [f"--gpus-per-node={args.gpus_per_node}" if args.gpus_per_node else None,
             f"--partition={args.partition}" if args.partition else None,
             f"--account={args.account}" if args.account else None,
             f"--qos={args.qos}" if args.qos else None,
             f"--mem={args.mem}" if args.mem else None,
             "--requeue" if args.requeue else "--no-requeue"]
    fields = {
        "job_name": args.job_name, "nodes": str(args.nodes), "cpus_per_task": str(args.cpus_per_task or nproc),
        "time": args.time, "log_dir": shlex.quote(str(log_dir(args))), "signal_lead": str(args.signal_lead),
        "sbatch_extra": "\n".join(f"#SBATCH {e}" for e in extra if e),
        "workdir": shlex.quote(str(Path.cwd())), "output_dir": shlex.quote(str(Path(args.output_dir).resolve())),
        "python": shlex.quote(sys.executable), "config": shlex.quote(str(Path(args.config).resolve())),
        "nproc_per_node": str(nproc), "overrides": shlex.join(args.overrides),
        "requeue": "1" if args.requeue else "0",
    }
    text = TEMPLATE.read_text()
    for key, value in fields.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def log_dir(args: SubmitArgs) -> Path:
    return Path(args.output_dir).resolve() / "slurm-logs"


def submit(args: SubmitArgs) -> tuple[str, Path]:
    """Submit the rendered script with sbatch; returns (job id, log file pattern)."""
    script = render(args)
    if shutil.which("sbatch") is None:
        raise UserError("submit: sbatch not found; run this on a SLURM login node (or use --dry-run)")
    log_dir(args).mkdir(parents=True, exist_ok=True)  # SLURM does not create the --output folder
    result = subprocess.run(["sbatch", "--parsable"], input=script, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"submit: sbatch refused the job: {result.stderr.strip().splitlines()[-1]}")
    job_id = result.stdout.strip().split(";")[0]
    return job_id, log_dir(args) / f"{args.job_name}-{job_id}.out"
