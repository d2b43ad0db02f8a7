"""Loading a checkpoint from disk at real scale: the engine against transformers, on the same files.

    python benchmarks/bench_load.py          # GPU: Llama-3-8B shape in bf16 (~16 GB written), then a 1B shape in fp32
    python benchmarks/bench_load.py --tiny   # CPU: tiny shapes, a few seconds (checks the script itself)

1. Write: a model of the shape, randomly initialised by transformers, saved as sharded safetensors (5 GB shards and
   ``model.safetensors.index.json``) with a tokenizer, under ``--dir``; deleted at the end unless ``--keep``.
2. Load, each in a fresh process so that its peak host memory is its own: the engine (``LLMEngine`` on the
   directory: every tensor streamed from its shard into its parameter, already on the GPU) and transformers
   (``from_pretrained(dir, dtype=..., device_map="cuda")``). Reported, over the weights load alone (the engine's
   ``load_into``; transformers' whole ``from_pretrained``): its time and GB/s beside the floor (checkpoint bytes
   over the slower of reading the files and copying host to device, both measured here), the peak host RSS above
   what the process held before (the kernel's high-water mark, ``ru_maxrss``, reset at the start; file pages
   mapped included), the peak anonymous RSS above it (sampled every 5 ms), and the GPU memory allocated at the
   peak. The engine's whole start (tokenizer, KV cache) is reported beside. The files are in the page cache (just
   written): warm reads for both.
3. Parity on the same weights. In bf16, greedy tokens of random weights part at near-ties (the best two logits
   of a random model often differ by less than bf16 rounding), so equality of token sequences is not the test:
   (a) the last-position logits of every prompt are as close to the exact ones as transformers' own bf16 logits:
   the exact ones are transformers' forward in float32 over the same weights (a third process), and the engine's
   relative L2 error from them, ``|ours - fp32| / |fp32|``, must be at most 1.5x transformers' bf16 error
   ``|hf - fp32| / |fp32|`` (both are bf16 rounding: a fixed bound would judge the shape, not the engine; the
   direct ``|ours - hf| / |hf|`` is reported beside it); (b) every greedy token of ours, scored by transformers'
   forward over prompt + our tokens, is within ``3 * delta`` of transformers' best logit there (``delta``: the
   largest logit difference of the two models at those positions), i.e. a near-tie, not a wrong token. The
   identical-token count is reported beside it. In float32 (the 1B shape) the greedy tokens must be identical and
   the logits' relative error from transformers' <= 1e-3.

The result is printed as a table last and written to ``benchmarks/results/<name>.json`` (and ``$OUT``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_info, write_result  # noqa: E402
from engine.greedy_check import engine_logits  # noqa: E402

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "engine" / "weights" / "configs"
# Llama-3.2-1B: tied embeddings and llama3 RoPE scaling, small enough to check in float32.
LLAMA_1B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": True,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
FP32_REL_L2_TOLERANCE = 1e-3
# bf16: the engine's error from the float32 logits, at most this many times transformers' bf16 error from them.
BF16_ERROR_RATIO = 1.5
GREEDY_DELTA_FACTOR = 3.0
SUBPROCESS_TIMEOUT_S = 300
TIME_BUDGET_S = 480  # the whole run on an H100; a later check is skipped when the first took over half of it


# ---- measurements inside one process ----------------------------------------------------------------------------


def _status_mib() -> dict[str, float]:
    """This process's resident memory now (all, anonymous) and at its peak (``VmHWM``, what ``ru_maxrss`` reports)."""
    keys = {"VmRSS:": "rss", "RssAnon:": "anon", "VmHWM:": "peak_rss"}
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split()[0]
            if key in keys:
                out[keys[key]] = int(line.split()[1]) / 1024
    return out


class MemoryWindow:
    """Host (and GPU) memory over a block: the peak resident set above what the process held on entry (file pages
    mapped included: the kernel's high-water mark, reset on entry through ``/proc/self/clear_refs``, else
    ``ru_maxrss`` since start), and the peak anonymous memory above entry (sampled every 5 ms on a thread: the kernel
    keeps no such peak). ``report`` is filled on exit."""

    def __init__(self, device: str, period_s: float = 0.005) -> None:
        self.device = device
        self.period_s = period_s
        self.report: dict = {}

    def __enter__(self) -> MemoryWindow:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.peak_reset = True
        except OSError:
            self.peak_reset = False
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        self.before = _status_mib()
        self.anon_peak = self.before["anon"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.period_s):
            self.anon_peak = max(self.anon_peak, _status_mib()["anon"])

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        after = _status_mib()
        self.report = {
            "rss_before_mib": round(self.before["rss"], 1),
            "peak_rss_above_before_mib": round(after["peak_rss"] - self.before["rss"], 1),
            "peak_anon_above_before_mib": round(max(self.anon_peak, after["anon"]) - self.before["anon"], 1),
            "peak_rss_reset": self.peak_reset,
        }
        if self.device.startswith("cuda"):
            self.report["gpu_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _prepare_process(device: str) -> None:
    """What every loading process does before measuring, so that it is in the baseline: the device context up and
    the transformers modules both loaders use (config, tokenizer) imported."""
    from transformers import AutoConfig, AutoTokenizer  # noqa: F401

    if device.startswith("cuda"):
        torch.cuda.init()
        torch.zeros(1, device=device)
        torch.backends.cuda.matmul.allow_tf32 = False


# ---- phases (each in its own process) ---------------------------------------------------------------------------


def phase_write(spec: dict) -> dict:
    """Write the checkpoint: transformers' random init of the shape, saved sharded, plus a tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.weights.resolve import DUMMY_TOKENIZER_DIR

    config_dict = dict(spec["config"])
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    dtype = getattr(torch, spec["dtype"])
    path = Path(spec["dir"])
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(spec["device"]):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path, max_shard_size=spec["shard_size"])
    for f in DUMMY_TOKENIZER_DIR.iterdir():
        shutil.copy(f, path / f.name)
    num_bytes = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return {
        "write_s": round(time.perf_counter() - start, 1),
        "checkpoint_bytes": num_bytes,
        "num_shards": len(list(path.glob("*.safetensors"))),
        "num_params": sum(p.numel() for p in model.parameters()),
    }


def phase_engine(spec: dict) -> dict:
    """Load through the engine; then its last-position logits, greedy tokens and the logits at those tokens."""
    import engine.model_runner as model_runner
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    device = spec["device"]
    _prepare_process(device)
    measured: dict = {}
    get_weight_loader = model_runner.get_weight_loader

    def timed_weight_loader(*args, **kwargs):  # measures the weights alone, as the engine builds and fills its model
        loader = get_weight_loader(*args, **kwargs)
        load_into = loader.load_into

        def load_and_measure(model) -> None:
            with MemoryWindow(device) as window:
                start = time.perf_counter()
                load_into(model)
                _sync(device)
                measured["weights_s"] = round(time.perf_counter() - start, 2)
            measured.update(window.report)

        loader.load_into = load_and_measure
        return loader

    model_runner.get_weight_loader = timed_weight_loader
    start = time.perf_counter()
    engine = LLMEngine(
        EngineConfig.from_dict(
            {
                "model": spec["dir"],
                "dtype": spec["dtype"],
                "device": device,
                "enforce_eager": True,
                "max_batch_size": len(spec["prompts"]),
                "max_seq_len": 1024,
                "kv_cache_memory_bytes": spec["kv_cache_bytes"],
                "sampler_seed": 0,
            }
        )
    )
    _sync(device)
    result = {"engine_start_s": round(time.perf_counter() - start, 2), **measured}
    result["attention_backend"] = engine.runner.attention_backend

    prompts = spec["prompts"]
    outs = engine.generate(prompts, SamplingParams(max_tokens=spec["new_tokens"], temperature=0.0, ignore_eos=True))
    greedy = [list(o.token_ids) for o in outs]
    last_logits = torch.stack([engine_logits(engine, p)[-1] for p in prompts]).cpu()
    at_greedy = [engine_logits(engine, p + g)[len(p) - 1 : -1].cpu() for p, g in zip(prompts, greedy)]
    torch.save({"last_logits": last_logits, "greedy": greedy, "at_greedy": at_greedy}, spec["tensors"])
    engine.shutdown()
    return result


def phase_transformers(spec: dict) -> dict:
    """Load through transformers; then the same outputs, and its logits over prompt + the engine's greedy tokens."""
    import transformers.models.llama.modeling_llama  # noqa: F401 - its import is not the load
    from transformers import AutoModelForCausalLM

    device = spec["device"]
    dtype = getattr(torch, spec["dtype"])
    _prepare_process(device)
    with MemoryWindow(device) as window:
        start = time.perf_counter()
        try:
            model = AutoModelForCausalLM.from_pretrained(spec["dir"], dtype=dtype, device_map=device)
            how = f'from_pretrained(dtype={spec["dtype"]}, device_map="{device}")'
        except (ImportError, ValueError) as exc:  # device_map needs accelerate in some versions
            model = AutoModelForCausalLM.from_pretrained(spec["dir"], dtype=dtype).to(device)
            how = f"from_pretrained(dtype={spec['dtype']}).to({device!r}) (device_map failed: {exc})"
        _sync(device)
        weights_s = round(time.perf_counter() - start, 2)
    result = {"weights_s": weights_s, "how": how, **window.report}
    model.eval()

    ours = torch.load(spec["engine_tensors"])
    last, greedy, at_ours = [], [], []
    with torch.inference_mode():
        for prompt, our_tokens in zip(spec["prompts"], ours["greedy"]):
            out = model(torch.tensor([prompt], device=device), use_cache=True)
            last.append(out.logits[0, -1].float().cpu())
            tokens = [int(out.logits[0, -1].argmax())]
            past = out.past_key_values
            for _ in range(spec["new_tokens"] - 1):
                out = model(torch.tensor([[tokens[-1]]], device=device), past_key_values=past, use_cache=True)
                past = out.past_key_values
                tokens.append(int(out.logits[0, -1].argmax()))
            greedy.append(tokens)
            scored = model(torch.tensor([prompt + our_tokens], device=device)).logits[0]
            at_ours.append(scored[len(prompt) - 1 : -1].float().cpu())
    torch.save({"last_logits": torch.stack(last), "greedy": greedy, "at_greedy": at_ours}, spec["tensors"])
    return result


PHASES = {"write": phase_write, "engine": phase_engine, "transformers": phase_transformers}


# ---- the driver -------------------------------------------------------------------------------------------------


def _run_phase(name: str, spec: dict, work: Path) -> dict:
    spec_path = work / f"{name}.spec.json"
    result_path = work / f"{name}.result.json"
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
    cmd = [sys.executable, __file__, "--phase", name, "--spec", str(spec_path)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, timeout=SUBPROCESS_TIMEOUT_S, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"phase {name} failed (exit {proc.returncode})")
    result = json.loads(result_path.read_text())
    result["process_s"] = round(time.perf_counter() - start, 1)
    return result


def _rel_l2(logits: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """Per prompt, ``|logits - reference| / |reference|`` over the vocabulary."""
    return ((logits - reference).norm(dim=1) / reference.norm(dim=1)).tolist()


def compare(ours: dict, hf: dict, dtype: str, reference: dict | None = None) -> dict:
    """The parity figures and verdict (see the module docstring); ``reference``: transformers' float32 outputs on
    the same weights, required in bf16."""
    rel_l2 = _rel_l2(ours["last_logits"], hf["last_logits"])
    identical, delta, shortfall = [], 0.0, 0.0
    for our_tokens, hf_tokens, our_logits, hf_logits in zip(
        ours["greedy"], hf["greedy"], ours["at_greedy"], hf["at_greedy"]
    ):
        n = next((i for i, (a, b) in enumerate(zip(our_tokens, hf_tokens)) if a != b), len(our_tokens))
        identical.append(n)
        delta = max(delta, float((our_logits - hf_logits).abs().max()))
        chosen = hf_logits.gather(1, torch.tensor(our_tokens)[:, None])[:, 0]
        shortfall = max(shortfall, float((hf_logits.max(dim=1).values - chosen).max()))
    result = {
        "logits_rel_l2_max": max(rel_l2),
        "logits_max_abs_diff": float((ours["last_logits"] - hf["last_logits"]).abs().max()),
        "greedy_identical_prefix": identical,
        "greedy_tokens_per_prompt": len(ours["greedy"][0]),
        "greedy_logit_delta_max": delta,
        "greedy_shortfall_max": shortfall,
    }
    if dtype == "float32":
        greedy_ok = all(n == len(t) for n, t in zip(identical, ours["greedy"]))
        logits_ok = max(rel_l2) <= FP32_REL_L2_TOLERANCE
        result.update(
            logits_rule=f"rel L2 from transformers <= {FP32_REL_L2_TOLERANCE}", greedy_rule="identical tokens"
        )
    else:
        if reference is None:
            raise ValueError("a bf16 comparison needs transformers' float32 reference")
        greedy_ok = shortfall <= GREEDY_DELTA_FACTOR * delta + 1e-6
        ours_err = _rel_l2(ours["last_logits"], reference["last_logits"])
        hf_err = _rel_l2(hf["last_logits"], reference["last_logits"])
        logits_ok = all(o <= BF16_ERROR_RATIO * h for o, h in zip(ours_err, hf_err))
        result.update(
            fp32_rel_l2_engine=ours_err,
            fp32_rel_l2_transformers_bf16=hf_err,
            logits_rule=f"per prompt, the engine's rel L2 from float32 <= {BF16_ERROR_RATIO} x transformers' bf16's",
            greedy_rule=f"shortfall <= {GREEDY_DELTA_FACTOR} * delta",
        )
    result["pass"] = logits_ok and greedy_ok
    return result


def measure_read_floor(model_dir: Path, device: str) -> dict:
    """How fast the checkpoint's files read (page cache, plain reads) and host memory copies to the device: the
    load cannot beat the slower of the two."""
    shard = max(model_dir.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    buf = bytearray(64 << 20)
    start = time.perf_counter()
    num_bytes = 0
    with open(shard, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            num_bytes += n
    floor = {"file_read_gbps": round(num_bytes / (time.perf_counter() - start) / 1e9, 2)}
    if device.startswith("cuda"):
        src = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
        dst = torch.empty_like(src, device=device)
        dst.copy_(src)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        floor["h2d_pinned_gbps"] = round(5 * src.numel() / (time.perf_counter() - start) / 1e9, 2)
        del src, dst
    return floor


def run_check(label: str, config: dict, dtype: str, args, work: Path) -> dict:
    model_dir = Path(args.dir) / label
    shutil.rmtree(model_dir, ignore_errors=True)
    device = "cpu" if args.tiny else "cuda"
    g = torch.Generator().manual_seed(0)
    lengths = [7, 33, 120, 250][: args.prompts] if not args.tiny else [5, 9, 17, 30][: args.prompts]
    prompts = [torch.randint(100, 49000, (n,), generator=g).tolist() for n in lengths]
    base = {"dir": str(model_dir), "dtype": dtype, "device": device, "prompts": prompts, "new_tokens": args.new_tokens}
    entry = {"label": label, "dtype": dtype, "device": device, "config": config, "prompt_lengths": lengths}
    try:
        entry["write"] = _run_phase(
            "write", {**base, "config": config, "shard_size": "100KB" if args.tiny else "5GB"}, work
        )
        entry["floor"] = measure_read_floor(model_dir, device)
        ours_path, hf_path = work / f"{label}.engine.pt", work / f"{label}.hf.pt"
        kv_bytes = (64 << 20) if args.tiny else (2 << 30)
        entry["engine"] = _run_phase("engine", {**base, "tensors": str(ours_path), "kv_cache_bytes": kv_bytes}, work)
        entry["transformers"] = _run_phase(
            "transformers", {**base, "tensors": str(hf_path), "engine_tensors": str(ours_path)}, work
        )
        reference = None
        if dtype != "float32":  # the exact logits of these weights: transformers in float32
            ref_path = work / f"{label}.fp32.pt"
            entry["transformers_fp32"] = _run_phase(
                "transformers",
                {**base, "dtype": "float32", "tensors": str(ref_path), "engine_tensors": str(ours_path)},
                work,
            )
            reference = torch.load(ref_path)
        entry["parity"] = compare(torch.load(ours_path), torch.load(hf_path), dtype, reference)
    finally:
        if not args.keep:
            shutil.rmtree(model_dir, ignore_errors=True)
    num_bytes = entry["write"]["checkpoint_bytes"]
    floor_gbps = min(v for k, v in entry["floor"].items() if k.endswith("_gbps"))
    entry["floor"]["floor_s"] = round(num_bytes / floor_gbps / 1e9, 2)
    for who in ("engine", "transformers"):
        entry[who]["gbps"] = round(num_bytes / entry[who]["weights_s"] / 1e9, 2)
    return entry


def print_table(entries: list[dict]) -> None:
    print()
    print(
        f"{'check':<14} {'loader':<13} {'GB':>6} {'load s':>7} {'GB/s':>6} {'floor s':>7} "
        f"{'peak RSS+ MiB':>13} {'peak anon+ MiB':>14} {'GPU peak GiB':>12}"
    )
    for e in entries:
        gb = e["write"]["checkpoint_bytes"] / 1e9
        for who in ("engine", "transformers"):
            r = e[who]
            print(
                f"{e['label']:<14} {who:<13} {gb:>6.2f} {r['weights_s']:>7.2f} {r['gbps']:>6.2f} "
                f"{e['floor']['floor_s']:>7.2f} {r['peak_rss_above_before_mib']:>13.0f} "
                f"{r['peak_anon_above_before_mib']:>14.0f} {r.get('gpu_peak_allocated_gib', float('nan')):>12.2f}"
            )
    print()
    print(
        f"{'check':<14} {'dtype':<9} {'rel L2 vs hf':>12} {'ours vs fp32':>12} {'hf vs fp32':>10} "
        f"{'identical greedy':>18} {'shortfall':>9} {'delta':>7} {'pass':>5}"
    )
    for e in entries:
        p = e["parity"]
        same = (
            f"{sum(p['greedy_identical_prefix'])}/{p['greedy_tokens_per_prompt'] * len(p['greedy_identical_prefix'])}"
        )
        ours_fp32 = max(p["fp32_rel_l2_engine"]) if "fp32_rel_l2_engine" in p else float("nan")
        hf_fp32 = max(p["fp32_rel_l2_transformers_bf16"]) if "fp32_rel_l2_engine" in p else float("nan")
        print(
            f"{e['label']:<14} {e['dtype']:<9} {p['logits_rel_l2_max']:>12.2e} {ours_fp32:>12.2e} {hf_fp32:>10.2e} "
            f"{same:>18} {p['greedy_shortfall_max']:>9.4f} {p['greedy_logit_delta_max']:>7.4f} {str(p['pass']):>5}"
        )
    for e in entries:
        print(f"{e['label']}: logits {e['parity']['logits_rule']}; greedy {e['parity']['greedy_rule']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/tmp/vattn_bench_load", help="where the checkpoints are written")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: checks the script")
    parser.add_argument("--skip-fp32", action="store_true", help="only the bf16 check at the 8B shape")
    parser.add_argument("--prompts", type=int, default=4, choices=range(1, 5))
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    parser.add_argument("--name", default=None, help="result name (default: load_h100, or load_tiny with --tiny)")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:
        spec = json.loads(Path(args.spec).read_text())
        result = PHASES[args.phase](spec)
        Path(spec["result"]).write_text(json.dumps(result))
        return 0

    if not args.tiny and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --tiny on the CPU)")
    start = time.perf_counter()
    big = json.loads((CONFIGS_DIR / ("tiny-llama.json" if args.tiny else "llama-3-8b.json")).read_text())
    small = {**big, "tie_word_embeddings": True} if args.tiny else LLAMA_1B
    checks = [("llama-3-8b" if not args.tiny else "tiny", big, "bfloat16")]
    if not args.skip_fp32:
        checks.append(("llama-3.2-1b" if not args.tiny else "tiny-tied", small, "float32"))
    work = Path(args.dir) / "work"
    work.mkdir(parents=True, exist_ok=True)
    entries, skipped = [], []
    for label, config, dtype in checks:
        if entries and time.perf_counter() - start > TIME_BUDGET_S / 2:
            skipped.append(f"{label}: the checks before took over half of {TIME_BUDGET_S} s")
            continue
        entries.append(run_check(label, config, dtype, args, work))
    shutil.rmtree(work, ignore_errors=True)
    name = args.name or ("load_tiny" if args.tiny else "load_h100")
    payload = {
        "machine": machine_info("cpu" if args.tiny else "cuda"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("phase", "spec")},
        "page_cache": "warm (each checkpoint was just written)",
        "checks": entries,
        "skipped": skipped,
        "total_s": round(time.perf_counter() - start, 1),
    }
    path = write_result(name, payload)
    print_table(entries)
    for line in skipped:
        print(f"skipped {line}")
    print(f"\ntotal {payload['total_s']} s; written {path}")
    return 0 if all(e["parity"]["pass"] for e in entries) else 1


if __name__ == "__main__":
    sys.exit(main())
