"""The demo's PNG timeline: the outage as three stacked panels sharing the time axis.

1. Request latency: every request of the load as a dot (log scale), coloured by what
   answered it (reads from the cache, reads from the database, writes, declared 503s, HTTP
   errors as red crosses), with the per-second p50 and p99.
2. Breaker state as the ``/health`` poller saw it (closed / half-open / open), with the
   breaker-transition span events as markers when the demo's own OTLP receiver got them.
3. Fallbacks, rejections and retries per second, from the app's ``/metrics`` scraped every
   half second, and the write-behind journal's size (right axis).

The outage (redis-server SIGKILLed until it answers again) is shaded in every panel.
Rendered with matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from demo.report import RunInfo, percentile
from demo.traffic import COUNTER, EVENTS, ITEMS, Recording

__all__ = ["plot_timeline"]

STATE_LEVEL = {"closed": 0, "half_open": 1, "open": 2}
STATE_COLOR = {"closed": "tab:green", "half_open": "tab:orange", "open": "tab:red"}


def _series(run: RunInfo, rec: Recording) -> dict[str, tuple[list[float], list[float]]]:
    groups: dict[str, tuple[list[float], list[float]]] = {
        k: ([], [])
        for k in ("read: cache", "read: database", "write", "health", "declared 503", "HTTP error")
    }
    for s in rec.samples:
        if s.outcome == "error":
            key = "HTTP error"
        elif s.outcome == "declared":
            key = "declared 503"
        elif s.route == ITEMS:
            key = f"read: {s.note}"
        elif s.route in (COUNTER, EVENTS):
            key = "write"
        else:
            key = "health"
        xs, ys = groups[key]
        xs.append(s.t - run.t_start)
        ys.append(max(s.latency, 1e-4) * 1000)
    return groups


def _per_second(run: RunInfo, rec: Recording) -> tuple[list[float], list[float], list[float]]:
    bins: dict[int, list[float]] = {}
    for s in rec.samples:
        if s.status is not None:
            bins.setdefault(int(s.t - run.t_start), []).append(s.latency * 1000)
    xs, p50, p99 = [], [], []
    for sec in sorted(bins):
        if sec < 0:
            continue
        xs.append(sec + 0.5)
        p50.append(percentile(bins[sec], 50) or 0.0)
        p99.append(percentile(bins[sec], 99) or 0.0)
    return xs, p50, p99


def _rates(run: RunInfo, rec: Recording) -> tuple[list[float], dict[str, list[float]]]:
    """Counter increase per second over each scrape interval, drawn from the interval's start."""
    points = [m for m in rec.metrics if m.status == 200 and m.totals]
    xs: list[float] = []
    rates: dict[str, list[float]] = {"fallbacks": [], "rejections": [], "retries": []}
    for prev, cur in itertools.pairwise(points):
        dt = cur.t - prev.t
        if dt <= 0:
            continue
        xs.append(prev.t - run.t_start)
        for k in rates:
            rates[k].append(max(0.0, cur.totals[k] - prev.totals[k]) / dt)
    return xs, rates


def _gauge(run: RunInfo, rec: Recording, name: str) -> tuple[list[float], list[float]]:
    points = [m for m in rec.metrics if m.status == 200 and m.totals]
    return [m.t - run.t_start for m in points], [m.totals[name] for m in points]


def plot_timeline(
    run: RunInfo, rec: Recording, transitions: Sequence[Mapping[str, Any]], path: Path, title: str
) -> Path:
    """Draw the timeline and save it as a PNG at ``path``."""
    fig, (ax_lat, ax_br, ax_rate) = plt.subplots(
        3, 1, figsize=(13, 9.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.3, 2]}, layout="constrained"
    )
    kill, back, end = run.t_kill - run.t_start, run.t_back - run.t_start, run.t_end - run.t_start
    for ax in (ax_lat, ax_br, ax_rate):
        ax.axvspan(kill, back, color="tab:red", alpha=0.08, lw=0)
        ax.axvline(kill, color="tab:red", lw=1, ls="--")
        ax.axvline(back, color="tab:green", lw=1, ls="--")
        ax.grid(True, alpha=0.3)

    # 1. latency
    styles = {
        "read: cache": ("tab:green", "o", 4),
        "read: database": ("tab:orange", "o", 4),
        "write": ("tab:blue", "o", 4),
        "health": ("tab:gray", "o", 3),
        "declared 503": ("tab:purple", "o", 6),
        "HTTP error": ("red", "x", 40),
    }
    for label, (xs, ys) in _series(run, rec).items():
        if not xs:
            continue
        color, marker, size = styles[label]
        ax_lat.scatter(
            xs, ys, s=size, c=color, marker=marker, alpha=0.9 if label == "HTTP error" else 0.35,
            linewidths=1.5 if marker == "x" else 0, label=f"{label} ({len(xs)})",
        )  # fmt: skip
    sx, p50, p99 = _per_second(run, rec)
    ax_lat.step(sx, p50, where="mid", color="black", lw=1.2, label="p50 per second")
    ax_lat.step(sx, p99, where="mid", color="black", lw=1.2, ls=":", label="p99 per second")
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("request latency (ms)")
    ax_lat.legend(loc="lower left", bbox_to_anchor=(0, 1.0), fontsize=8, ncol=8, markerscale=2, frameon=False)
    ax_lat.set_ylim(top=ax_lat.get_ylim()[1] * 2.5)  # room for the phase labels
    for x, text in (
        (kill / 2, "healthy"),
        ((kill + back) / 2, "Redis down (SIGKILL)"),
        ((back + end) / 2, "recovery"),
    ):
        ax_lat.text(
            x, 0.95, text, transform=ax_lat.get_xaxis_transform(), ha="center", va="top",
            fontsize=10, weight="bold", color="dimgray",
        )  # fmt: skip
    fig.suptitle(title, fontsize=11)

    # 2. breaker state
    hx = [h.t - run.t_start for h in rec.health if h.state is not None]
    hy = [STATE_LEVEL.get(h.state or "", 0) for h in rec.health if h.state is not None]
    if hx:
        ax_br.step(hx, hy, where="post", color="black", lw=1.2, label="/health (every 100 ms)")
        for state, level in STATE_LEVEL.items():
            ax_br.fill_between(
                hx,
                0,
                [level if y == level else 0 for y in hy],
                step="post",
                color=STATE_COLOR[state],
                alpha=0.35,
            )
    span_tr = [t for t in transitions if str(t.get("seen_by", "")).startswith("span event")]
    if span_tr:
        ax_br.scatter(
            [t["t"] for t in span_tr], [STATE_LEVEL.get(str(t["to"]), 0) for t in span_tr],
            marker="v", s=40, color="black", zorder=3, label="breaker.transition span event",
        )  # fmt: skip
    ax_br.set_yticks(list(STATE_LEVEL.values()), [s.replace("_", "-") for s in STATE_LEVEL])
    ax_br.set_ylim(-0.3, 2.5)
    ax_br.set_ylabel("breaker")
    ax_br.legend(loc="upper left", fontsize=8, framealpha=0.9)

    # 3. fallbacks / rejections / retries per second, journal size
    rx, rates = _rates(run, rec)
    qx, queue = _gauge(run, rec, "writebehind_queue_size")
    if rx:
        ax_rate.fill_between(rx, rates["fallbacks"], step="post", color="tab:orange", alpha=0.4)
        ax_rate.step(rx, rates["fallbacks"], where="post", color="tab:orange", label="fallbacks/s")
        ax_rate.step(
            rx, rates["rejections"], where="post", color="tab:red", lw=1, label="rejections/s (breaker open)"
        )
        ax_rate.step(rx, rates["retries"], where="post", color="tab:blue", lw=1, label="retries/s")
        ax_q = ax_rate.twinx()
        ax_q.step(
            qx,
            queue,
            where="post",
            color="tab:purple",
            lw=1.2,
            ls="--",
            label="write-behind journal (entries)",
        )
        ax_q.set_ylabel("journal entries", color="tab:purple")
        ax_q.set_ylim(bottom=0, top=max([*queue, 1]) * 1.15)
        lines = ax_rate.get_legend_handles_labels()
        qlines = ax_q.get_legend_handles_labels()
        ax_rate.legend(
            lines[0] + qlines[0], lines[1] + qlines[1], loc="upper left", fontsize=8, framealpha=0.9
        )
    ax_rate.set_ylim(bottom=0)
    ax_rate.set_ylabel("per second (from /metrics)")
    ax_rate.set_xlabel("seconds since the load started")
    ax_rate.set_xlim(0, end)

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
