"""``quantkit bench --html FILE``: one self-contained page (plots embedded as PNG data) to pick an artifact.

Three plots from the measurement records: decode speed against file size with each artifact's accuracy
from its manifest (the Pareto front: no other artifact is both smaller and faster), the distribution of
per-step decode latencies, and resident memory per phase (before loading, loading peak, steady state while
answering). Below them, the terminal table and the environment line.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from quantkit.bench.report import table
from quantkit.errors import QuantkitError

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>quantkit bench</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1100px; }}
img {{ max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 12px; }}
</style></head>
<body>
<h1>quantkit bench</h1>
<p>{summary}</p>
<h2>Decode speed, size and accuracy</h2>
<img id="pareto" alt="decode tokens per second against file size" src="data:image/png;base64,{pareto}">
<h2>Decode step latency</h2>
<img id="latency" alt="per-step decode latency distribution" src="data:image/png;base64,{latency}">
<h2>Memory per phase</h2>
<img id="memory" alt="resident memory per phase" src="data:image/png;base64,{memory}">
<h2>Table</h2>
<pre>{table}</pre>
<h2>Environment</h2>
<pre>{environment}</pre>
<script>
// a self-check for headless browsers and tests: how many plots decoded
window.addEventListener("load", () => {{
  document.body.dataset.imagesLoaded = [...document.images].filter(i => i.complete && i.naturalWidth > 0).length;
}});
</script>
</body></html>
"""


def _measurements(records: list[dict]) -> list[dict]:
    found = [r for r in records if r.get("type") == "measurement"]
    if not found:
        raise QuantkitError("no measurements to draw: every artifact failed before it was measured")
    return found


def _label(record: dict) -> str:
    a = record["artifact"]
    return a["target"] or a["name"]


def _png(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (size, speed) that no other point beats on both: smaller or equal size and
    greater or equal speed, one of them strictly."""
    front = []
    for i, (size, speed) in enumerate(points):
        dominated = any(s <= size and v >= speed and (s, v) != (size, speed) for s, v in points)
        if not dominated:
            front.append(i)
    return front


def _pareto_plot(measured: list[dict]) -> str:
    import matplotlib.pyplot as plt

    decoding = [r for r in measured if "decode_tok_s" in r["metrics"]]
    figure, axes = plt.subplots(figsize=(9, 5))
    if not decoding:
        axes.text(0.5, 0.5, "no decode steps measured (--gen-tokens 0)", ha="center", va="center")
    else:
        # one point per artifact: its fastest-prompt workload's decode median
        best: dict[str, dict] = {}
        for r in decoding:
            key = _label(r)
            if key not in best or r["workload"]["prompt_tokens"] < best[key]["workload"]["prompt_tokens"]:
                best[key] = r
        rows = list(best.values())
        points = [(r["artifact"]["size_bytes"] / 2**20, r["metrics"]["decode_tok_s"]["median"]) for r in rows]
        klds = [(r["artifact"].get("accuracy") or {}).get("kld") for r in rows]
        known = [k for k in klds if k is not None]
        colours = [k if k is not None else 0.0 for k in klds]
        scatter = axes.scatter([p[0] for p in points], [p[1] for p in points], c=colours, cmap="viridis_r",
                               s=80, edgecolors="black", vmin=0.0, vmax=max(known) if known else 1.0)
        if known:
            figure.colorbar(scatter, ax=axes, label="KL divergence vs unquantized (manifest)")
        front = sorted(pareto_front(points), key=lambda i: points[i][0])
        axes.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="grey",
                  label="Pareto front (smaller and faster)")
        for r, (x, y), kld in zip(rows, points, klds, strict=True):
            note = f"{_label(r)}" + (f"\nKLD {kld:.4f}" if kld is not None else "\naccuracy not in a manifest")
            axes.annotate(note, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
        axes.legend(loc="best", fontsize=8)
    axes.set_xlabel("file size (MiB)")
    axes.set_ylabel("decode tokens/s (median)")
    axes.grid(alpha=0.3)
    return _png(figure)


def _latency_plot(measured: list[dict]) -> str:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4))
    series, labels = [], []
    for r in measured:
        steps = [ms for run in r["samples"].get("decode_ms", []) for ms in run]
        if steps:
            series.append(steps)
            labels.append(f"{_label(r)}\npp{r['workload']['prompt_tokens']}")
    if series:
        axes.boxplot(series, whis=(1, 99), showfliers=False)
        axes.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
    else:
        axes.text(0.5, 0.5, "no decode steps measured", ha="center", va="center")
    axes.set_ylabel("ms per decode step (whiskers: p1-p99)")
    axes.grid(alpha=0.3, axis="y")
    return _png(figure)


def _memory_plot(measured: list[dict]) -> str:
    import matplotlib.pyplot as plt

    # one bar group per artifact (its largest workload's steady state)
    latest: dict[str, dict] = {}
    for r in measured:
        latest[_label(r)] = r
    names = list(latest)
    phases = (("before load", "baseline_rss_mb"), ("load peak", "peak_rss_mb_load"),
              ("steady (answering)", "rss_mb_steady"), ("run peak", "peak_rss_mb"))
    figure, axes = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(phases)
    for k, (title, key) in enumerate(phases):
        values = [latest[n]["metrics"].get(key) or 0.0 for n in names]
        axes.bar([i + k * width for i in range(len(names))], values, width, label=title)
    axes.set_xticks([i + width * (len(phases) - 1) / 2 for i in range(len(names))], names, fontsize=8)
    axes.set_ylabel("resident memory (MiB)")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3, axis="y")
    return _png(figure)


def render(records: list[dict]) -> str:
    try:
        import matplotlib
    except ImportError:
        raise QuantkitError("--html needs matplotlib; pip install 'quantkit[bench]'") from None
    matplotlib.use("Agg")
    measured = _measurements(records)
    env = next((r for r in records if r.get("type") == "environment"), {})
    summary = (f"{len({_label(r) for r in measured})} artifacts, {len(measured)} measurements on "
               f"{html.escape(str(env.get('cpu', 'unknown CPU')))}, {env.get('threads', '?')} threads, "
               f"{measured[0]['repetitions']} repetitions each; throughput is the median over repetitions.")
    return PAGE.format(summary=summary, pareto=_pareto_plot(measured), latency=_latency_plot(measured),
                       memory=_memory_plot(measured), table=html.escape(table(records)),
                       environment=html.escape(json.dumps(env, indent=1)))


def write_html(records: list[dict], path: Path) -> None:
    """Write the page next to its final path and move it into place, so a failed render leaves nothing."""
    page = render(records)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(page, encoding="utf-8")
    partial.replace(path)
