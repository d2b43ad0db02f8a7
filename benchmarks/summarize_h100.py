"""Collects the GPU-performance targets from the H100 result files into results/h100.json, h100.md and a plot.

    python benchmarks/summarize_h100.py

Reads attention_h100.json (bench_attention.py), kvcache_h100.json (bench_kvcache.py) and engine_h100.json
(bench_engine_gpu.py); every figure there was measured beside its limit or baseline in the same run.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _target(number, title, figure, limit, better="higher", note=""):
    ratio = None if figure is None or limit in (None, 0) else figure / limit
    met = None if ratio is None else (ratio >= 1 if better == "higher" else ratio <= 1)
    return {
        "target": number,
        "title": title,
        "figure": figure,
        "limit_or_baseline": limit,
        "ratio": ratio,
        "met": met,
        "note": note,
    }


def _params(config_name: str = "llama-3-8b") -> int:
    """Parameters of a named config (engine/weights/configs), for the compute ceiling."""
    c = json.loads((RESULTS.parent.parent / "engine/weights/configs" / f"{config_name}.json").read_text())
    hidden, inter, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    head_dim = c.get("head_dim") or hidden // c["num_attention_heads"]
    attn = hidden * head_dim * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])
    per_layer = attn + 3 * hidden * inter + 2 * hidden
    embeddings = vocab * hidden * (1 if c.get("tie_word_embeddings") else 2)
    return layers * per_layer + embeddings + hidden


def _issue_14_rows(attention: dict, tm: dict, pg: dict) -> list[dict]:
    """The targets of the kernels issue: the vAttention engine against the paged mode (FlashInfer prefill in both
    where installed), the compute ceiling, the decode floor, and the kernels against FlashInfer's paged ones."""
    at = attention["targets"]

    def ratio(workload):
        return tm[workload]["output_tok_s"] / pg[workload]["output_tok_s"]

    rows = []
    for workload, label in (("decode_heavy_256_1024", "decode-heavy"), ("throughput_1024_128", "default")):
        d = tm[workload]
        rows.append(
            _target(
                14,
                f"vAttention engine / paged engine ({pg.get('prefill_kernel')} prefill in both), {label} output tok/s",
                ratio(workload),
                1.05,
                note=f"{tm['source']}, one run: {d['output_tok_s']:.0f} vs {pg[workload]['output_tok_s']:.0f} tok/s; "
                f"GPU idle over decode {d['decode_host_overhead_total']:.1%} vs "
                f"{pg[workload]['decode_host_overhead_total']:.1%} (the step loop's host time beyond the device's); "
                "decode step GPU time over its floor "
                f"{d['decode_gpu_over_floor_median']:.2f}x vs {pg[workload]['decode_gpu_over_floor_median']:.2f}x",
            )
        )
    params = _params()
    # The GEMM rate measured in the engines' own run where it was (the ceiling and the figure from one machine).
    gemm, gemm_source = (
        (tm["gemm_tflops"], tm["source"])
        if tm.get("gemm_tflops")
        else (attention["gemm_tflops"], "attention_h100.json")
    )
    ceiling = gemm * 1e12 / (2 * params)
    t = tm["throughput_1024_128"]
    rows.append(
        _target(
            14,
            "default workload total tok/s / compute ceiling (2 x params x tokens at the GEMM rate)",
            t["total_tok_s"] / ceiling,
            0.80,
            note=f"{t['total_tok_s']:.0f} tok/s; ceiling {ceiling:.0f} tok/s ({params / 1e9:.2f} B params, "
            f"{gemm:.0f} TFLOP/s measured in {gemm_source}'s run); prefill MFU "
            f"{t['prefill_mfu_vs_gemm_median']:.2f}",
        )
    )
    rows.append(
        _target(
            14,
            "decode step / floor (weights + KV read at copy bandwidth), batch >= 64, decode-heavy",
            tm["decode_heavy_256_1024"]["decode_step_over_floor_median"],
            1.08,
            better="lower",
            note=f"GPU time alone {tm['decode_heavy_256_1024']['decode_gpu_over_floor_median']:.2f}x; paged "
            f"{pg['decode_heavy_256_1024']['decode_step_over_floor_median']:.2f}x",
        )
    )
    pre = at.get("prefill_slots_vs_flashinfer_paged", {})
    rows.append(
        _target(
            14,
            "prefill attention, our path (FlashInfer FA3, each slot one page) / FlashInfer FA3 paged (min over points)",
            pre.get("min"),
            1.0,
            note=f"median {pre.get('median', float('nan')):.2f}x over {pre.get('n', 0)} points (1-4 requests, "
            "2K-16K chunks); torch FA2 varlen (the engine's earlier path) 0.61-0.66x of it",
        )
    )
    dec = at.get("decode_vs_flashinfer_paged", {})
    below = [
        f"B={p['batch']} L={p['context']} {p['triton_split_vs_fi_paged_tc']:.2f}x"
        for p in attention["decode"]["points"]
        if p.get("triton_split_vs_fi_paged_tc") is not None and p["triton_split_vs_fi_paged_tc"] < 1.0
    ]
    modes = {
        k.get("timed_in", "eager")
        for p in attention["decode"]["points"]
        for k in (p.get("kernels") or {}).values()
        if k.get("status") == "ok"
    }
    rows.append(
        _target(
            14,
            "decode attention, our Triton split-KV / FlashInfer paged decode (tensor cores), min over the grid",
            dec.get("min"),
            1.0,
            note=f"median {dec.get('median', float('nan')):.2f}x; {dec.get('points_meeting', 0)} of {dec.get('n', 0)} "
            f"points meet it; below it: {', '.join(below) or 'none'}; kernels timed "
            + (
                "replayed from CUDA graphs, as the engine's decode steps run"
                if modes == {"graph"}
                else f"{'/'.join(sorted(modes))} (eager timing counts a call's host launch where it exceeds the L2 flush)"
            ),
        )
    )
    return rows


def main() -> None:
    attention, kvcache, engine = _load("attention_h100.json"), _load("kvcache_h100.json"), _load("engine_h100.json")
    at = attention["targets"]
    overlap = kvcache["decode_overlap"]
    et = engine["targets"]
    rows = [
        _target(
            1,
            "decode attention, min % of copy bandwidth at B*L >= 64K (best non-paged)",
            at["decode_bandwidth"]["best_nonpaged"]["min"],
            0.80,
            note=f"median {at['decode_bandwidth']['best_nonpaged']['median']:.0%}; copy "
            f"{attention['copy_bandwidth_gb_s']:.0f} GB/s",
        ),
        _target(
            1,
            "decode attention, non-paged / best paged (median over the grid)",
            at["decode_speedup_vs_paged"]["all_points"].get("median"),
            1.3,
            note="best paged = the fastest of our Triton paged twin (page 16) and FlashInfer's paged decode with and "
            "without tensor cores (the same grid, same inputs); FlexAttention paged skipped when its time budget "
            "(--budget-s) is spent",
        ),
        _target(
            2,
            "prefill attention, FA2 over the cache / FlexAttention paged (min)",
            at["prefill_speedup_vs_paged"].get("min"),
            1.2,
            note="not run where FlexAttention was skipped (time budget); FlashInfer's paged prefill is the paged peer "
            "now (row 14)",
        ),
        _target(
            3,
            "decode loop, on-demand mapping overhead vs pre-mapped (kvcache bench, 256 req)",
            overlap["overlapped"]["overhead_vs_premapped"],
            0.02,
            better="lower",
            note=f"inline mapping: {overlap['inline']['overhead_vs_premapped']:+.1%}; mapping "
            f"{overlap['overlapped']['map_gb_s']:.1f} GB/s vs 0.75 GB/s needed",
        ),
        _target(
            3,
            "engine decode loop, on-demand mapping vs pages left mapped (128 req crossing in lockstep)",
            et["mapping_overhead_vs_premapped"]["figure"],
            0.02,
            better="lower",
            note=f"whole runs (admission maps every first page on the cold cache): "
            f"{engine['mapping_overhead_whole_run']:+.1%}; median decode step "
            f"{engine['mapping_overhead_median_step']:+.1%}; next pages prefetched over 128 steps, "
            "<= 128 pages a step",
        ),
        _target(
            4,
            "host overhead per decode step (CUDA graphs, async scheduling), median at batch 256",
            et["host_overhead_per_decode_step"]["figure"],
            0.10,
            better="lower",
            note=f"GPU idle over all decode steps: "
            f"{engine['decode_heavy_256_1024']['decode_host_overhead_total']:.1%} (steps with preemption, "
            f"admission); synchronous scheduling: "
            f"{engine['decode_256_512_sync']['decode_host_overhead_median']:.0%} a step, async "
            f"{et['async_over_sync_scheduling_output_tok_s']['figure']:.2f}x its output tok/s",
        ),
        _target(
            5,
            "decode step / floor (weights + KV over copy bandwidth), batch >= 64",
            et["decode_step_over_floor_at_batch_ge_64"]["figure"],
            1.3,
            better="lower",
            note=f"GPU time alone: {engine['decode_heavy_256_1024']['decode_gpu_over_floor_median']:.2f}x",
        ),
        _target(
            5, "prefill model-FLOPs utilisation vs measured bf16 GEMM rate", et["prefill_mfu_vs_gemm"]["figure"], 0.5
        ),
        _target(
            5,
            "engine / transformers generate, output tok/s, 64 x (1024 in, 128 out)",
            et["engine_vs_transformers_same_workload"]["figure"],
            1.0,
            note=f"transformers {engine['hf_baseline']['output_tok_s']:.0f} tok/s",
        ),
    ]
    layouts = {}
    for name in ("engine_layouts_h100.json", "engine_layouts_more_h100.json"):  # one run each, one process a file
        if (RESULTS / name).exists():
            data = _load(name)
            for engine_name, entry in data.items():
                if isinstance(entry, dict) and "start_s" in entry:
                    layouts[engine_name] = {
                        **entry,
                        "source": name,
                        "commit": data["machine"].get("commit"),
                        "gemm_tflops": data.get("gemm_tflops"),
                    }
    tm, pg = layouts.get("token_major", {}), layouts.get("paged", {})
    if all("throughput_1024_128" in e for e in (tm, pg)):
        rows += _issue_14_rows(attention, tm, pg)
    names = [
        "throughput_1024_128",
        "decode_heavy_256_1024",
        "same_as_baseline",
        "decode_256_512_async",
        "decode_256_512_sync",
        "paged_throughput_1024_128",
        "paged_decode_heavy_256_1024",
    ]
    throughput = {
        name: {k: engine[name][k] for k in ("requests", "output_tok_s", "total_tok_s", "preemptions")}
        for name in names
        if name in engine
    }
    summary = {
        "machine": engine["machine"],
        "sources": [
            "attention_h100.json",
            "kvcache_h100.json",
            "engine_h100.json",
            "engine_layouts_h100.json",
            "engine_layouts_more_h100.json",
        ],
        "targets": rows,
        "throughput": throughput,
        "hf_baseline": engine["hf_baseline"],
    }
    (RESULTS / "h100.json").write_text(json.dumps(summary, indent=2))

    lines = [
        f"# GPU performance on {engine['machine'].get('gpu', '?')}",
        "",
        f"Commits: attention_h100.json {attention['machine'].get('commit', 'unknown')}, engine_layouts "
        f"{tm.get('commit', 'unknown')}, engine_h100.json {engine['machine'].get('commit', 'unknown')}, "
        "kvcache_h100.json: see README.md here.",
        "",
        "Each figure was measured in one run beside its limit or baseline; sources: "
        + ", ".join(summary["sources"])
        + ".",
        "",
        "| # | target | figure | limit / baseline | ratio | met | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fig = "-" if r["figure"] is None else f"{r['figure']:.3f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        met = {True: "yes", False: "no", None: "not run"}[r["met"]]
        lines.append(
            f"| {r['target']} | {r['title']} | {fig} | {r['limit_or_baseline']} | {ratio} | {met} | {r['note']} |"
        )
    if layouts:
        lines += [
            "",
            "Engines, Llama-3-8B-shaped dummy model, bf16, output tok/s (bench_engine_gpu.py --layouts; the engines of "
            "one file ran one after the other in one process):",
            "",
            "| engine | prefill kernel | decode-heavy 512 x 256/1024 | GPU idle over decode | default 1000 x 1024/128 | "
            "preemptions | source (commit) |",
            "|---|---|---|---|---|---|---|",
        ]
        labels = {
            "token_major": "vAttention, token-major (GPU default)",
            "token_major_fa2": "vAttention, token-major, torch FA2 prefill",
            "layer_major": "vAttention, layer-major (1024 tokens a page)",
            "paged": "paged-KV mode (16-token blocks, block tables)",
            "paged_gather": "paged-KV mode, K/V gathered for torch FA2 prefill",
        }
        for name, e in layouts.items():
            if "throughput_1024_128" not in e:
                lines.append(f"| {labels.get(name, name)} | | failed: {e.get('error')} | | | | {e['source']} |")
                continue
            d, t = e["decode_heavy_256_1024"], e["throughput_1024_128"]
            lines.append(
                f"| {labels.get(name, name)} | {e.get('prefill_kernel', '?')} | {d['output_tok_s']:.0f} | "
                f"{d['decode_host_overhead_total']:.1%} | {t['output_tok_s']:.0f} | "
                f"{d['preemptions'] + t['preemptions']} | {e['source']} ({e['commit']}) |"
            )
    lines += [
        "",
        "Offline throughput (engine_h100.json, layer-major cache), Llama-3-8B-shaped dummy model, bf16, "
        "2 MiB pages (1024 tokens/page):",
        "",
        "| workload | requests | output tok/s | total tok/s | preemptions |",
        "|---|---|---|---|---|",
    ]
    for name, t in throughput.items():
        lines.append(
            f"| {name} | {t['requests']} | {t['output_tok_s']:.0f} | {t['total_tok_s']:.0f} | {t['preemptions']} |"
        )
    lines.append(
        f"| transformers generate (same_as_baseline) | {engine['hf_baseline']['requests']} | "
        f"{engine['hf_baseline']['output_tok_s']:.0f} | - | - |"
    )
    (RESULTS / "h100.md").write_text("\n".join(lines) + "\n")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(9, 4))
    names = list(throughput) + ["transformers (64 req)"]
    values = [t["output_tok_s"] for t in throughput.values()] + [engine["hf_baseline"]["output_tok_s"]]
    ax.bar(names, values, color=["C2" if n.startswith("paged") else "C0" for n in throughput] + ["C3"])
    ax.set_ylabel("output tokens/s")
    ax.set_title("Engine throughput, Llama-3-8B shape, one H100")
    plt.setp(ax.get_xticklabels(), rotation=15, ha="right")
    fig.tight_layout()
    fig.savefig(RESULTS / "h100_throughput.png", dpi=120)


if __name__ == "__main__":
    main()
