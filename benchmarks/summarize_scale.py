"""Merge ``bench_serving.py --compare-routers`` records of several layouts of replicas (e.g. 4 x TP=1 and 2 x TP=2
on one 4-GPU machine) into one JSON, a Markdown table per layout with the router targets checked, and a plot
per layout.

    python benchmarks/summarize_scale.py --commit 6ad064a \\
        --layout "4x1=run_a/scale_h100x4_4x1.json,run_b/scale_h100x4_4x1.json" \\
        --layout "2x2=run_b/scale_h100x4_2x2.json" --out benchmarks/results/scale_h100x4

Records of one layout are merged rate by rate (later files add rates). Each run is re-read against the replicas
that served it (``free_page_spread``, ``preemptions_by_replica``), so records written before that filter existed
come out the same as new ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.bench_serving import free_page_spread, plot  # noqa: E402

ROUTERS = ("page_aware", "power_of_two")
SLO_ATTAINMENT = 0.9  # the rate judged: the highest where the default router meets the SLO for 90% of requests
GOODPUT_TARGET, PREEMPTION_TARGET = 1.3, 0.5


def _refilter(run: dict) -> dict:
    served = set(run["requests_by_replica_and_kind"])
    run = {**run, **free_page_spread(run.get("free_page_timeline") or [], served)}
    by_replica = run.get("preemptions_by_replica")
    if by_replica is not None:
        run["preemptions_by_replica"] = {r: n for r, n in by_replica.items() if r in served}
        run["num_preemptions"] = sum(run["preemptions_by_replica"].values())
    return run


def merge(paths: list[Path]) -> dict:
    records = [json.loads(p.read_text()) for p in paths]
    runs: dict[str, dict] = {}
    for record in records:
        for label, run in record["results"].items():  # a single-rate record labels its runs by router alone
            runs[f"{label.split('@')[0]}@{run['request_rate_per_s']:g}"] = _refilter(run)
    runs = dict(sorted(runs.items(), key=lambda kv: (kv[0].split("@")[0], float(kv[1]["request_rate_per_s"]))))
    return {"app_args": records[0]["app_args"], "workload": records[0]["workload"], "runs": runs}


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _ttft_no_worse(page_aware: dict, default: dict) -> bool | None:
    """Page-aware p50 and p99 TTFT no higher than the default's; None when a run produced no first token."""
    keys = ("p50_ttft_ms", "p99_ttft_ms")
    if any(run.get(key) is None for run in (page_aware, default) for key in keys):
        return None
    return all(page_aware[key] <= default[key] for key in keys)


def verdict(runs: dict) -> dict:
    """The router targets at the highest rate where the default router meets the SLO for 90% of requests."""
    rates = sorted({run["request_rate_per_s"] for run in runs.values()})
    pairs = [(rate, runs.get(f"page_aware@{rate:g}"), runs.get(f"power_of_two@{rate:g}")) for rate in rates]
    pairs = [(rate, pa, p2) for rate, pa, p2 in pairs if pa and p2]
    judged = [(rate, pa, p2) for rate, pa, p2 in pairs if (p2["slo_attainment"] or 0) >= SLO_ATTAINMENT]
    if not judged:
        return {"rate": None}
    rate, pa, p2 = judged[-1]
    goodput = pa["goodput_req_s"] / p2["goodput_req_s"] if p2["goodput_req_s"] else None
    pre = None
    if pa["num_preemptions"] is not None and p2["num_preemptions"] is not None:
        pre = [pa["num_preemptions"], p2["num_preemptions"]]
    return {
        "rate": rate,
        "goodput_ratio": goodput,
        "goodput_met": goodput is not None and goodput >= GOODPUT_TARGET,
        # The most a router can gain where the default already meets the SLO for a fraction f of requests,
        # over a run of equal duration, is 1/f.
        "goodput_ratio_bound": 1.0 / p2["slo_attainment"],
        "preemptions": pre,
        "preemptions_met": pre is not None and pre[0] <= PREEMPTION_TARGET * pre[1],
        "ttft_never_worse": {f"{r:g}": _ttft_no_worse(pa_, p2_) for r, pa_, p2_ in pairs},
    }


def markdown(layout: str, merged: dict) -> str:
    cols = [
        ("request_rate_per_s", "rate", "g"),
        ("request_throughput_per_s", "req/s", ".2f"),
        ("goodput_req_s", "goodput", ".2f"),
        ("slo_attainment", "in SLO", ".3f"),
        ("output_throughput_tok_s", "out tok/s", ".0f"),
        ("p50_ttft_ms", "TTFT p50", ".0f"),
        ("p99_ttft_ms", "TTFT p99", ".0f"),
        ("p50_tpot_ms", "TPOT p50", ".1f"),
        ("p99_tpot_ms", "TPOT p99", ".1f"),
        ("p50_e2e_ms", "E2E p50", ".0f"),
        ("p99_e2e_ms", "E2E p99", ".0f"),
        ("num_preemptions", "preemptions", "d"),
        ("mean_free_fraction_spread", "free-page spread", ".2f"),
        ("num_failed", "failed", "d"),
    ]
    lines = [
        f"### {layout}",
        "",
        "| router | " + " | ".join(title for _, title, _ in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for label, run in merged["runs"].items():
        cells = [_fmt(run.get(key), spec) for key, _, spec in cols]
        lines.append(f"| {label.split('@')[0]} | " + " | ".join(cells) + " |")
    v = merged["verdict"]
    lines.append("")
    if v["rate"] is None:
        lines.append("No rate where both routers ran and the default met the SLO for 90% of requests.")
    else:
        pre = v["preemptions"]
        lines.append(
            f"Judged at {v['rate']:g} req/s (the highest rate where the default router met the SLO for >= 90% of "
            f"requests): goodput page-aware / default {_fmt(v['goodput_ratio'], '.2f')}x (target >= "
            f"{GOODPUT_TARGET}x; at most {v['goodput_ratio_bound']:.2f}x is possible there), preemptions "
            f"{'n/a' if pre is None else f'{pre[0]} vs {pre[1]}'} (target <= half). Page-aware p50 and p99 TTFT "
            f"no higher than the default's at: "
            + ", ".join(
                f"{r}/s {'n/a' if ok is None else 'yes' if ok else 'no'}" for r, ok in v["ttft_never_worse"].items()
            )
            + "."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", action="append", required=True, help="NAME=path.json[,path.json...]")
    p.add_argument("--commit", required=True, help="the commit of the tree that was measured")
    p.add_argument("--machine", default="4 x NVIDIA H100 80GB HBM3 (one host)")
    p.add_argument("--out", required=True, help="output prefix: writes PREFIX.json, PREFIX.md, PREFIX_<layout>.png")
    args = p.parse_args()
    out = Path(args.out)
    layouts = {}
    for spec in args.layout:
        name, paths = spec.split("=", 1)
        merged = merge([Path(x) for x in paths.split(",")])
        merged["verdict"] = verdict(merged["runs"])
        layouts[name] = merged
        plot(merged["runs"], out.parent / f"{out.name}_{name}.png")
    out.with_suffix(".json").write_text(
        json.dumps({"commit": args.commit, "machine": args.machine, "layouts": layouts}, indent=2) + "\n"
    )
    body = [f"# Router comparison on {args.machine} at {args.commit}", ""]
    body += [markdown(name, merged) for name, merged in layouts.items()]
    out.with_suffix(".md").write_text("\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
