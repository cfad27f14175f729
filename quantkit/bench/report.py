"""What ``quantkit bench`` prints and how two runs are compared.

The table follows llama-bench's: one row per artifact and test, ``pp N`` (prefill of N prompt tokens) and
``tg N`` (N decode steps), throughput as median ± half the 95 % interval.

``compare``: for each artifact and workload present in both files (matched by the model file's hash,
else its name), each speed metric's per-repetition samples are tested with a one-sided Mann-Whitney U test;
a slower NEW with p < ``ALPHA`` is a significant slowdown, and a regression when it is also at least
``MIN_CHANGE_PCT`` worse (run-to-run drift that the samples of one run cannot show). Noisy runs need a
larger change to be significant.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from quantkit.bench import stats
from quantkit.errors import QuantkitError

ALPHA = 0.01
# Two runs of one build on one machine drift by a few per cent between runs (measured on SmolLM2: up to
# 7.3 % in time to first token, p = 0.008), a shift the per-run samples cannot see; a regression must be
# both significant and at least this large (``--min-change``)
MIN_CHANGE_PCT = 10.0
# metric -> whether larger is better
COMPARED = {"prefill_tok_s": True, "decode_tok_s": True, "ttft_ms": False}


def _pm(summary: dict) -> str:
    low, high = summary["ci95"]
    return f"{summary['median']:.2f} ± {(high - low) / 2:.2f}"


def table(records: list[dict]) -> str:
    rows = [("artifact", "runtime", "size MiB", "bpw", "threads", "test", "tok/s", "ttft ms", "peak RSS MiB",
             "KLD")]
    for r in records:
        if r.get("type") != "measurement":
            continue
        a, m, w = r["artifact"], r["metrics"], r["workload"]
        kld = (a.get("accuracy") or {}).get("kld")
        common = (a["target"] or a["name"], a["runtime"], f"{a['size_bytes'] / 2**20:.1f}",
                  f"{a['bits_per_weight']:.2f}" if a.get("bits_per_weight") else "-", str(r["threads"]))
        tail = (f"{m['peak_rss_mb']:.0f}", f"{kld:.4f}" if kld is not None else "-")
        rows.append((*common, f"pp{w['prompt_tokens']}", _pm(m["prefill_tok_s"]),
                     f"{m['ttft_ms']['median']:.1f}", *tail))
        if "decode_tok_s" in m:
            rows.append((*common, f"tg{w['gen_tokens']}", _pm(m["decode_tok_s"]),
                         f"p50 {m['decode_ms_p50']:.1f}", *tail))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def read_jsonl(path: Path) -> list[dict]:
    try:
        records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise QuantkitError(f"{path} does not exist; pass two files written by quantkit bench --json") from None
    except json.JSONDecodeError:
        raise QuantkitError(f"{path} is not JSON Lines; pass a file written by quantkit bench --json") from None
    if not records or not str(records[0].get("schema", "")).startswith("quantkit.bench/"):
        raise QuantkitError(f"{path} was not written by quantkit bench (no quantkit.bench schema line)")
    return records


def _key(record: dict) -> tuple:
    a, w = record["artifact"], record["workload"]
    return (a.get("sha256") or a["name"], a["runtime"], w["prompt_tokens"], w["gen_tokens"])


def compare(old: list[dict], new: list[dict], alpha: float = ALPHA,
            min_change_pct: float = MIN_CHANGE_PCT) -> list[dict]:
    """One finding per metric of each artifact and workload measured in both runs."""
    before = {_key(r): r for r in old if r.get("type") == "measurement"}
    findings = []
    for record in new:
        if record.get("type") != "measurement" or _key(record) not in before:
            continue
        previous = before[_key(record)]
        for metric, larger_is_better in COMPARED.items():
            x, y = previous["samples"].get(metric), record["samples"].get(metric)
            if not x or not y:
                continue
            # a regression: NEW smaller than OLD for throughput, larger for latency
            p = stats.mann_whitney_less(y, x) if larger_is_better else stats.mann_whitney_less(x, y)
            shift = stats.shift_estimate(x, y)
            change_pct = 100 * shift / stats.median(x)
            worse = -change_pct if larger_is_better else change_pct
            # the smallest one-sided p the samples can give (complete separation): above alpha, the test
            # cannot flag anything, however large the change
            smallest_p = 1 / math.comb(len(x) + len(y), len(x))
            findings.append({
                "artifact": record["artifact"]["target"] or record["artifact"]["name"],
                "workload": record["workload"], "metric": metric, "old_median": stats.median(x),
                "new_median": stats.median(y), "change_pct": change_pct, "p_value": p,
                "regression": p < alpha and worse >= min_change_pct, "significant": p < alpha,
                "smallest_p": smallest_p, "underpowered": smallest_p >= alpha,
                "old_threads": previous["threads"], "new_threads": record["threads"],
            })
    if not findings:
        raise QuantkitError("the two files share no artifact and workload to compare; bench the same artifacts "
                            "with the same --prompt-tokens/--gen-tokens")
    return findings


def compare_table(findings: list[dict]) -> str:
    lines = ["| artifact | test | metric | old | new | change | p | verdict |", "|---|---|---|---|---|---|---|---|"]
    for f in findings:
        w = f["workload"]
        verdict = "REGRESSION" if f["regression"] else "slower, below --min-change" if f["significant"] else "ok"
        lines.append(f"| {f['artifact']} | pp{w['prompt_tokens']}/tg{w['gen_tokens']} | {f['metric']} | "
                     f"{f['old_median']:.2f} | {f['new_median']:.2f} | {f['change_pct']:+.1f}% | "
                     f"{f['p_value']:.4f} | {verdict} |")
    return "\n".join(lines)
