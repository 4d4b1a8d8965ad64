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


_TIME = re.compile(r"(?:(?P<d>\d+)-(?P<dh>\d{1,2})(?::(?P<dm>\d{1,2})(?::(?P<ds>\d{1,2}))?)?"
                   r"|(?P<h>\d+):(?P<m>\d{1,2}):(?P<s>\d{1,2})|(?P<mm>\d+)(?::(?P<ss>\d{1,2}))?)")
# SLURM's names: letters, digits, . _ - (+ in job names; partitions may be a comma-separated list). Anything
# else (a newline above all, which would end the #SBATCH line and start a shell command) is refused.
_NAMES = {"--job-name": r"[\w.+-]{1,200}", "--partition": r"[\w.-]+(,[\w.-]+)*", "--account": r"[\w.-]+",
          "--qos": r"[\w.-]+", "--mem": r"\d+[KMGTkmgt]?"}


def time_limit_s(text: str) -> int:
    """Seconds in a SLURM time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS), or the error."""
    found = _TIME.fullmatch(text.strip())
    if not found:
        raise UserError(f"submit: --time '{text}' is not a SLURM time; use HH:MM:SS (or MM, MM:SS, D-HH, "
                        "D-HH:MM, D-HH:MM:SS)")
    g = {k: int(v) for k, v in found.groupdict().items() if v is not None}
    if "d" in g:
        days, hours, minutes, seconds = g["d"], g["dh"], g.get("dm", 0), g.get("ds", 0)
        if hours > 23:
            raise UserError(f"submit: --time '{text}': hours must be 0-23 after a day count, got {hours}")
    elif "h" in g:
        days, hours, minutes, seconds = 0, g["h"], g["m"], g["s"]
    else:
        days, hours, minutes, seconds = 0, 0, g["mm"], g.get("ss", 0)
    late = [f"{what} {value}" for what, value, limited in (("minutes", minutes, "d" in g or "h" in g),
                                                           ("seconds", seconds, True)) if limited and value > 59]
    if late:
        raise UserError(f"submit: --time '{text}': {' and '.join(late)} must be 0-59")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total == 0:
        raise UserError(f"submit: --time '{text}' is no time at all; give the job's time limit, e.g. 01:00:00")
    return total


def check(args: SubmitArgs) -> None:
    """Every option, before anything is rendered or submitted."""
    limit = time_limit_s(args.time)
    for flag, value, low in (("--nodes", args.nodes, 1), ("--nproc-per-node", args.nproc_per_node, 1),
                             ("--gpus-per-node", args.gpus_per_node, 0), ("--signal-lead", args.signal_lead, 0),
                             ("--cpus-per-task", args.cpus_per_task, 1)):
        if value is not None and value < low:
            raise UserError(f"submit: {flag} must be >= {low}, got {value}")
    if args.signal_lead > 65535:
        raise UserError(f"submit: --signal-lead must be at most 65535 s (SLURM's limit), got {args.signal_lead}")
    if args.signal_lead >= limit:
        raise UserError(f"submit: --signal-lead {args.signal_lead} s is not shorter than --time {args.time} "
                        f"({limit} s): the stop signal would come at the start; lower --signal-lead")
    for flag, pattern in _NAMES.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and not re.fullmatch(pattern, value):
            shown = value.encode("unicode_escape").decode()
            rule = ("a number with an optional unit K, M, G or T, e.g. 64G" if flag == "--mem" else
                    "letters, digits and . _ -" + (" +" if flag == "--job-name" else "") +
                    (" (several: comma-separated)" if flag == "--partition" else ""))
            raise UserError(f"submit: {flag} '{shown}' is not a valid SLURM value; use {rule}")


def render(args: SubmitArgs) -> str:
    check(args)
    nproc = args.gpus_per_node or args.nproc_per_node
    extra = [f"--gpus-per-node={args.gpus_per_node}" if args.gpus_per_node else None,
             f"--partition={shlex.quote(args.partition)}" if args.partition else None,
             f"--account={shlex.quote(args.account)}" if args.account else None,
             f"--qos={shlex.quote(args.qos)}" if args.qos else None,
             f"--mem={shlex.quote(args.mem)}" if args.mem else None,
             "--requeue" if args.requeue else "--no-requeue"]
    fields = {
        "job_name": shlex.quote(args.job_name), "nodes": str(args.nodes),
        "cpus_per_task": str(args.cpus_per_task or nproc),
        "time": args.time.strip(), "log_dir": shlex.quote(str(log_dir(args))), "signal_lead": str(args.signal_lead),
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
