"""Shared helpers for the benchmarks: run `quantfab run` in a subprocess and sample its process tree.

The Prefect ephemeral API server is a child of the `quantfab run` process, started by Prefect as
``python -m uvicorn --app-dir .../site-packages --factory prefect.server.api.server:create_app --host
127.0.0.1 --port N ...``. It is the same size whatever the model (~190 MiB), so the RSS benchmark keeps it
out of the "tree" figure and reports it on its own. A process counts as the server when its command line
mentions "prefect" together with "server" or "uvicorn".
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
QUANTFAB = [str(Path(sys.executable).with_name("quantfab"))]
if not Path(QUANTFAB[0]).exists():  # fall back to the module when the console script is not beside python
    QUANTFAB = [sys.executable, "-m", "quantfab.pipelines.cli"]

MiB = 1024 * 1024
STAGE_LINE = re.compile(r"^\s*(download|calibrate|quantize|convert|validate|package)\s+(ran|cached)\s+([\d.]+) s", re.M)


def bench_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "90"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.update(extra or {})
    return env


def is_prefect_server(cmdline: list[str]) -> bool:
    text = " ".join(cmdline).lower()
    return "prefect" in text and ("server" in text or "uvicorn" in text)


@dataclass
class RunResult:
    argv: list[str]
    returncode: int
    wall_s: float
    stdout: str
    stderr: str
    peak_tree_rss: int = 0         # max over samples of sum(RSS) of the tree, server excluded
    peak_main_rss: int = 0         # max over samples of the `quantfab run` process's own RSS
    main_hwm_rss: int = 0          # kernel high-water mark from wait4 (max over main and its reaped children)
    peak_server_rss: int = 0       # max over samples of the server's RSS (for reference)
    samples: int = 0
    stage_times: list[tuple[float, str]] = field(default_factory=list)  # (s since start, stderr stage line)
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (s since start, tree RSS) per sample
    excluded: dict[int, str] = field(default_factory=dict)   # pid -> command line of what was left out
    included: dict[int, str] = field(default_factory=dict)   # pid -> command line of children counted

    @property
    def startup_s(self) -> float:
        """Process start to the first stage line (imports, recipe load, Prefect server start, flow run)."""
        return self.stage_times[0][0] - self._first_stage_seconds() if self.stage_times else float("nan")

    @property
    def teardown_s(self) -> float:
        """Last stage line to process exit (result table, flow finish, Prefect and server shutdown)."""
        return self.wall_s - self.stage_times[-1][0] if self.stage_times else float("nan")

    def _first_stage_seconds(self) -> float:
        m = STAGE_LINE.search(self.stage_times[0][1])
        return float(m[3]) if m else 0.0

    def stage_peaks(self) -> dict[str, int]:
        """Peak tree RSS while each stage ran: the samples between a stage's start (its end line's time less
        its reported seconds) and its end line."""
        peaks = {}
        for t_end, line in self.stage_times:
            m = STAGE_LINE.search(line)
            t_start = t_end - float(m[3])
            peaks[m[1]] = max((rss for t, rss in self.timeline if t_start <= t <= t_end), default=0)
        return peaks

    @property
    def stages(self) -> dict[str, tuple[str, float]]:
        return {m[0]: (m[1], float(m[2])) for m in STAGE_LINE.findall(self.stderr)}


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def run_quantfab(args: list[str], *, sample: bool, interval: float = 0.05, log_dir: Path,
                 env: dict[str, str] | None = None) -> RunResult:
    """Run ``quantfab <args>`` from the repo root; with ``sample``, poll the tree's RSS every ``interval`` s."""
    return run_command(QUANTFAB + args, sample=sample, interval=interval, log_dir=log_dir, env=env)


def run_command(argv: list[str], *, sample: bool, interval: float = 0.05, log_dir: Path,
                env: dict[str, str] | None = None) -> RunResult:
    """Run ``argv`` from the repo root, stdout and stderr logged in ``log_dir``; RSS sampled as for quantfab."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=REPO, env=env or bench_env(), stdout=out, stderr=subprocess.PIPE)
        res = RunResult(argv, 0, 0.0, "", "")

        def pump() -> None:  # copy stderr to the log, timestamping the CLI's per-stage lines
            for line in iter(proc.stderr.readline, b""):
                err.write(line)
                text = line.decode(errors="replace")
                if STAGE_LINE.search(text):
                    res.stage_times.append((time.perf_counter() - start, text))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        root = psutil.Process(proc.pid)
        cmdlines: dict[int, list[str]] = {}
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if sample:
                _sample(root, cmdlines, res, time.perf_counter() - start)
            time.sleep(interval)
        res.wall_s = time.perf_counter() - start
        reader.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    res.returncode = proc.returncode
    res.main_hwm_rss = rusage.ru_maxrss * 1024  # Linux: KiB
    res.stdout, res.stderr = _read(out_path), _read(err_path)
    return res


def _sample(root: psutil.Process, cmdlines: dict[int, list[str]], res: RunResult, now: float) -> None:
    try:
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return
    tree = server = main = 0
    for proc in procs:
        try:
            rss = proc.memory_info().rss
            if proc.pid == root.pid:
                main = rss
                tree += rss
                continue
            if not cmdlines.get(proc.pid):  # empty while a child is still starting or already a zombie
                cmdlines[proc.pid] = proc.cmdline() or [f"<{proc.name()}, {proc.status()}>"]
        except psutil.Error:
            continue
        cmd = cmdlines[proc.pid]
        if is_prefect_server(cmd):
            server += rss
            res.excluded[proc.pid] = " ".join(cmd)
        else:
            tree += rss
            res.included[proc.pid] = " ".join(cmd)
    res.samples += 1
    res.timeline.append((now, tree))
    res.peak_tree_rss = max(res.peak_tree_rss, tree)
    res.peak_main_rss = max(res.peak_main_rss, main)
    res.peak_server_rss = max(res.peak_server_rss, server)
