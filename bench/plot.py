"""`python -m bench.plot`: the speed figures of docs/, drawn from bench/results/*.json.

    python -m bench.plot [--results bench/results] [--out docs/figures] [--stages NAME]

- `latency.png`: seconds per edit (the benchmark's standard edit: 1024x1024 from one 1024x1024
  reference, 50 steps, true CFG, HTTP end to end) by GPUs per replica, bf16 and fp8. A line per
  precision (colour) and GPU model (line style) joins the headline run of each GPU count (the
  fastest run of one replica with the shipped switches: `headlines`), labelled with its seconds
  and its results file; every result is a dot. Results of modes the server no longer has are
  left out. The README's GPU table quotes the same headline runs (tests/deploy/test_numbers.py).
  Published figures of other servers (bench/peers.json) are marked: filled for the same job,
  hollow for another.
- `stages.png`: where the time of one edit goes, from a result's Server-Timing medians (the
  fastest result that has them, or `--stages NAME`).

Whatever lies in the results folder is read: a file without what a figure needs (a different job,
a forward-only benchmark, a future kind of result) is skipped with its reason, never a crash.
matplotlib is the `bench` extra (`pip install -e '.[bench]'`), not a server dependency.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PEERS = ROOT / "bench" / "peers.json"
OUT = ROOT / "docs" / "figures"

# The job every latency is compared on; other results are skipped for the latency figure.
STANDARD_JOB = {"size": "1024x1024", "steps": 50, "true_cfg": True}
_GPU_NAME = re.compile(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b")
_COLORS = {"bf16": "#4b3fd6", "fp8": "#d6453f"}
# Modes the server no longer has: their results stay (docs cite them), the figure shows what it
# serves today. cfg_parallel (two transformer copies in one process): model.parallel replaced it.
_REMOVED_MODES = ("cfg_parallel",)
# Switches the shipped configs leave off: their runs are dots, not the headline a user reads.
_OPTIONAL_SWITCHES = ("cpp_wrapper",)
_EXTRA_COLORS = ["#2a9d8f", "#e9a23b", "#6c757d", "#8e44ad"]
# Colour is the precision; the line and marker tell GPU models apart (H100 solid, H200 dashed).
_MODEL_STYLES = ["o-", "s--", "^:", "v-."]


@dataclass(frozen=True)
class Run:
    """One benchmark result of the standard edit."""

    name: str
    gpus: int
    precision: str
    seconds: float
    gpu_model: str
    mode: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    replicas: int = 1  # >1: a throughput run, several replicas at once

    @property
    def shipped(self) -> bool:
        """One replica, with the switches the shipped configs use: a headline candidate."""
        switches = self.mode.split("+")
        return self.replicas == 1 and not any(s in switches for s in _OPTIONAL_SWITCHES)

    @property
    def label(self) -> str:
        """What the figure writes beside a headline point: the seconds as its file holds them,
        and the file, so a reader can find the run (and the README quotes the same)."""
        return f"{self.seconds:g} s, {self.gpu_model} ({self.name}.json)"


@dataclass(frozen=True)
class Peer:
    name: str
    seconds: float
    gpus: int
    hardware: str
    same_job: bool
    job: str
    source: str


def _precision(result: dict[str, Any]) -> str:
    quantization = result.get("quantization")
    if quantization in (None, "", "none", "bf16"):
        return "bf16"
    return str(quantization)


def _gpu_model(result: dict[str, Any]) -> str:
    match = _GPU_NAME.search(str(result.get("gpu") or ""))
    return match.group(1) if match else "GPU"


def _run_of(name: str, result: Any) -> Run | str:
    """A Run, or why the result cannot be one."""
    if not isinstance(result, dict):
        return "not a JSON object"
    seconds, gpus = result.get("latency_s_median"), result.get("gpus_per_replica")
    if not isinstance(seconds, int | float) or not isinstance(gpus, int) or gpus < 1:
        return "no end-to-end latency (latency_s_median, gpus_per_replica)"
    differs = {k: result.get(k) for k, v in STANDARD_JOB.items() if result.get(k) != v}
    if differs:
        return f"another job than the standard edit: {differs}"
    mode = str(result.get("mode") or "")
    if mode.split("+")[0] in _REMOVED_MODES:
        return f"a mode this server no longer has: {mode.split('+')[0]}"
    timings = result.get("server_timing_ms_median")
    replicas = result.get("replicas")
    return Run(
        name=str(result.get("name") or name),
        gpus=gpus,
        precision=_precision(result),
        seconds=float(seconds),
        gpu_model=_gpu_model(result),
        mode=mode,
        timings_ms=dict(timings) if isinstance(timings, dict) else {},
        replicas=replicas if isinstance(replicas, int) and replicas > 0 else 1,
    )


def load_runs(results: Path) -> tuple[list[Run], list[tuple[str, str]]]:
    """The standard-edit runs in `results`, and (file, reason) for every file left out."""
    runs: list[Run] = []
    skipped: list[tuple[str, str]] = []
    for path in sorted(results.glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            skipped.append((path.name, f"unreadable: {exc}"))
            continue
        run = _run_of(path.stem, result)
        if isinstance(run, str):
            skipped.append((path.name, run))
        else:
            runs.append(run)
    return runs, skipped


def load_peers(path: Path) -> list[Peer]:
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return [Peer(**{k: p[k] for k in Peer.__dataclass_fields__}) for p in data.get("peers", [])]


def best_per_gpus(runs: Sequence[Run]) -> dict[tuple[str, str], dict[int, Run]]:
    """(precision, GPU model) -> GPUs per replica -> the headline run: the fastest of one
    replica with the shipped switches."""
    best: dict[tuple[str, str], dict[int, Run]] = {}
    for run in runs:
        if not run.shipped:
            continue
        series = best.setdefault((run.precision, run.gpu_model), {})
        if run.gpus not in series or run.seconds < series[run.gpus].seconds:
            series[run.gpus] = run
    return best


def headlines(runs: Sequence[Run]) -> list[Run]:
    """The runs the figure labels (and the README's GPU table quotes): one per precision, GPU
    model and GPUs per replica."""
    return [run for series in best_per_gpus(runs).values() for run in series.values()]


def _spread(targets: list[float], *, gap: float) -> list[float]:
    """Label positions near `targets`, at least `gap` apart, in the same order."""
    order = sorted(range(len(targets)), key=lambda i: targets[i])
    placed = [0.0] * len(targets)
    previous = -math.inf
    for i in order:
        placed[i] = max(targets[i], previous + gap)
        previous = placed[i]
    # Centre the moved group on its targets so labels don't all drift upwards.
    shift = (sum(placed) - sum(targets)) / max(1, len(targets))
    return [p - shift for p in placed]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def plot_latency(runs: Sequence[Run], peers: Sequence[Peer], out: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.6, 5.6), dpi=130)
    gpu_counts = sorted({r.gpus for r in runs} | {p.gpus for p in peers} | {1, 2})
    ax.scatter(
        [r.gpus for r in runs], [r.seconds for r in runs],
        s=14, color="#9aa3b2", zorder=2, label="every measured configuration",
    )  # fmt: skip
    labels: list[tuple[float, float, str, str, str]] = []  # x, y, text, color, side
    extra = iter(_EXTRA_COLORS)
    models = sorted({r.gpu_model for r in runs})
    for (precision, model), series in sorted(best_per_gpus(runs).items()):
        color = _COLORS.get(precision) or next(extra, "#333333")
        xs = sorted(series)
        ys = [series[x].seconds for x in xs]
        ax.plot(
            xs,
            ys,
            _MODEL_STYLES[models.index(model) % len(_MODEL_STYLES)],
            color=color,
            lw=2,
            ms=7,
            zorder=3,
            label=f"this server, {precision}, {model}",
        )
        for x in xs:
            labels.append((x, series[x].seconds, series[x].label, color, "right"))
    for peer in peers:
        # Same-job figures just left of the GPU count, labelled leftwards, so ours stay readable.
        x = peer.gpus * 0.86 if peer.same_job else peer.gpus
        face = "#222222" if peer.same_job else "white"
        ax.scatter(
            [x], [peer.seconds], marker="D", s=36, facecolor=face, edgecolor="#222222", zorder=4
        )
        text = f"{peer.name}{'' if peer.same_job else '*'} {peer.seconds:g} s ({peer.hardware})"
        labels.append((x, peer.seconds, text, "#222222", "left" if peer.same_job else "right"))
    top = max([r.seconds for r in runs] + [p.seconds for p in peers] + [1.0]) * 1.12
    for side in ("left", "right"):
        for x in sorted({lab[0] for lab in labels if lab[4] == side}):
            group = [lab for lab in labels if lab[4] == side and lab[0] == x]
            placed = _spread([lab[1] for lab in group], gap=top * 0.04)
            for (lx, ly, text, color, _), py in zip(group, placed, strict=True):
                offset = 0.88 if side == "left" else 1.12
                ax.annotate(
                    text, (lx, ly), xytext=(lx * offset, py), color=color,
                    ha="right" if side == "left" else "left", va="center", fontsize=8,
                    arrowprops={"arrowstyle": "-", "color": color, "lw": 0.5, "alpha": 0.6},
                )  # fmt: skip
    # One legend entry per kind of peer marker (the markers above carry no label).
    for face, label in (("#222222", "published, same job"), ("white", "* published, another job")):
        ax.scatter([], [], marker="D", s=36, facecolor=face, edgecolor="#222222", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(gpu_counts, [str(g) for g in gpu_counts])
    ax.set_xlim(min(gpu_counts) / 3.2, max(gpu_counts) * 3)
    ax.set_ylim(0, top)
    ax.set_xlabel("GPUs per replica")
    ax.set_ylabel("seconds per edit (lower is better)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("One Qwen-Image-Edit edit: 1024x1024, one reference image, 50 steps, true CFG")
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    notes = [
        "This server: bench/results/*.json, HTTP end to end, median of runs; a labelled point is"
        " the fastest run of one replica with the shipped switches, named by its results file."
        " Published figures: bench/peers.json, as each project reported them, not re-measured.",
        *(f"* {p.name}: {p.job}." for p in peers if not p.same_job),
    ]
    note = "\n".join(textwrap.fill(line, 180) for line in notes)
    fig.text(0.01, 0.01, note, fontsize=6.5, color="#5d6676", va="bottom")
    fig.tight_layout(rect=(0, 0.025 * (note.count("\n") + 1) + 0.01, 1, 1))
    path = out / "latency.png"
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


# (label, where, how to compute it from the Server-Timing medians), in request order.
def _stage_rows(t: dict[str, float]) -> list[tuple[str, str, float]]:
    def get(name: str) -> float:
        return float(t.get(name, 0.0))

    parts = ("text_encoder", "vae_encode", "denoise", "vae_decode")
    rows = [
        ("parse (multipart)", "ingress", get("parse")),
        ("decode (input images)", "ingress", get("decode")),
        ("queue (to the replica)", "replica", get("queue")),
        *((f"{p} (pipeline)", "pipeline", get(p)) for p in parts),
        ("pipeline, other", "pipeline", get("pipeline") - sum(get(p) for p in parts)),
        ("replica, other", "replica", get("replica") - get("pipeline")),
        ("handle call (transfers)", "ingress", get("model") - get("replica") - get("queue")),
        ("encode (output image)", "ingress", get("encode")),
        ("body (base64, JSON)", "ingress", get("body")),
        (
            "ingress, other",
            "ingress",
            get("total") - sum(get(k) for k in ("parse", "decode", "model", "encode", "body")),
        ),
    ]
    return [(label, where, ms) for label, where, ms in rows if ms >= 0.05]


def pick_stage_run(runs: Sequence[Run], name: str | None) -> Run | None:
    timed = [r for r in runs if {"total", "pipeline"} <= set(r.timings_ms)]
    if name is not None:
        return next((r for r in timed if r.name == name), None)
    return min(timed, key=lambda r: r.seconds, default=None)


def plot_stages(run: Run, out: Path) -> Path:
    plt = _pyplot()
    from matplotlib.patches import Patch

    rows = _stage_rows(run.timings_ms)
    total = run.timings_ms["total"]
    colors = {"ingress": "#4b3fd6", "replica": "#e9a23b", "pipeline": "#2a9d8f"}
    fig, ax = plt.subplots(figsize=(8.6, 4.6), dpi=130)
    ys = list(range(len(rows)))[::-1]
    ax.barh(ys, [ms for _, _, ms in rows], color=[colors[w] for _, w, _ in rows], height=0.65)
    for y, (_, _, ms) in zip(ys, rows, strict=True):
        share = 100 * ms / total
        shown = f"{share:.1f} %" if share >= 0.1 else "<0.1 %"
        ax.text(ms * 1.12, y, f"{ms:,.1f} ms ({shown})", va="center", fontsize=8)
    ax.set_yticks(ys, [label for label, _, _ in rows])
    ax.set_xscale("log")
    ax.set_xlim(min(ms for _, _, ms in rows) / 2, total * 6)
    ax.set_xlabel("milliseconds (log scale)")
    handles = [Patch(color=color, label=where) for where, color in colors.items()]
    ax.legend(
        handles=handles, loc="lower right", fontsize=8, frameon=False, title="runs in",
        title_fontsize=8,
    )  # fmt: skip
    ax.set_title(
        f"Where {total / 1000:.2f} s of one edit go: {run.gpus} GPU(s) per replica,"
        f" {run.precision}, {run.gpu_model}"
    )
    fig.text(
        0.01, 0.01,
        f"Server-Timing medians of bench/results/{run.name}.json ({run.mode}).",
        fontsize=6.5, color="#5d6676",
    )  # fmt: skip
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path = out / "stages.png"
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--peers", type=Path, default=PEERS)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--stages", help="result name for stages.png (default: the fastest)")
    args = parser.parse_args(argv)
    runs, skipped = load_runs(args.results)
    for name, reason in skipped:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    if not runs:
        print(f"no standard-edit results in {args.results}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    print(plot_latency(runs, load_peers(args.peers), args.out))
    stage_run = pick_stage_run(runs, args.stages)
    if stage_run is None:
        print("no result with Server-Timing medians: stages.png not drawn", file=sys.stderr)
        return 1 if args.stages else 0
    print(plot_stages(stage_run, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
