"""P8 figures from one ``bench/gpu.sh`` run: the stages' rates over the bare models' rates.

Reads the run's work folder and prints (and writes as JSON) what issue #10 asks for:

- extract-teacher: steady-state images/s (the pipeline fill excluded, as the stage's summary
  reports it) / the bare teacher forward's images/s at the same batch;
- train-student at each batch: samples/s over the log intervals after the first (the first
  holds the loader's start and the first steps' warm-up) / the bare step's samples/s; the
  share of that time spent waiting for the loader (``data_s`` / ``step_s``); peak GPU memory;
- each ratio against the target (>= 0.85), or ``missing`` where a stage did not report it.

Inputs, all in the work folder: ``bare.jsonl`` (bench/bare.py), ``stages.jsonl`` (one record
per stage: rc, seconds), ``machine.json``, ``extract.log`` and the cache folder,
``train-<batch>[-compile]/logs/metrics.jsonl``. Parsing is tolerant: what is not there is
reported as missing, never a crash.

    python bench/gpu_summary.py WORK --extract-batch 1024 --train-batches 256,1024 --out RESULTS/summary.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

TARGET = 0.85
NUMBER = r"(\d[\d,]*(?:\.\d+)?)"


def read_jsonl(path: Path) -> list[dict]:
    """The JSON records of a file, skipping lines that do not parse (a run cut short)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            records.append(value)
    return records


def bare_rate(bare: list[dict], figure: str, batch: int) -> float | None:
    return next((r["rate"] for r in bare if r.get("figure") == figure and r.get("batch") == batch), None)


def _find_key(value: Any, key: str) -> Any:
    """The first value of ``key`` anywhere in a JSON document."""
    if isinstance(value, dict):
        if key in value:
            return value[key]
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            found = _find_key(item, key)
            if found is not None:
                return found
    return None


def extract_figures(work: Path, cache: str = "cache", log_name: str = "extract.log") -> dict:
    """Steady-state and whole-run images/s of extract-teacher: from a JSON file the stage
    wrote (any ``*.json`` in the cache folder holding ``steady_images_per_second``), else
    from its printed summary line (numbers before ``images/s``/``img/s``; the one nearest
    the word ``steady`` is the steady rate)."""
    found: dict[str, Any] = {"steady_images_per_second": None, "images_per_second": None, "source": None}
    for path in sorted((work / cache).glob("**/*.json")) if (work / cache).is_dir() else []:
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        steady = _find_key(document, "steady_images_per_second")
        if isinstance(steady, (int, float)):
            whole = _find_key(document, "images_per_second")
            found.update(steady_images_per_second=float(steady), source=str(path.relative_to(work)),
                         images_per_second=float(whole) if isinstance(whole, (int, float)) else None)
            return found
    log = work / log_name
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines() if log.is_file() else []
    rate_lines = [line for line in lines if re.search(r"(images|img)/s", line)]
    if not rate_lines:
        return found
    line = next((line for line in reversed(rate_lines) if "steady" in line.lower()), rate_lines[-1])
    found["line"] = line.strip()
    found["source"] = log_name
    rates = [(m.start(), float(m.group(1).replace(",", ""))) for m in
             re.finditer(NUMBER + r"\s*(?:images|img)/s", line)]
    steady_at = [m.start() for m in re.finditer("steady", line, re.IGNORECASE)]
    if steady_at and rates:
        nearest = min(rates, key=lambda r: min(abs(r[0] - s) for s in steady_at))
        found["steady_images_per_second"] = nearest[1]
        others = [r for r in rates if r is not nearest]
        found["images_per_second"] = others[0][1] if others else None
    elif rates:
        found["images_per_second"] = rates[0][1]
    return found


def train_figures(run: Path, batch: int) -> dict:
    """Steady-state samples/s, data-wait share and peak memory of one train-student run
    from its metrics.jsonl (one record per log interval)."""
    records = [r for r in read_jsonl(run / "logs" / "metrics.jsonl") if isinstance(r.get("step"), int)]
    result: dict[str, Any] = {"records": len(records), "last_step": records[-1]["step"] if records else None}
    if not records:
        return result
    steady = records[1:] if len(records) > 1 else records
    result["steady_steps"] = f"{steady[0]['step'] - _interval_steps(records, steady[0]) + 1}..{steady[-1]['step']}"
    samples = seconds = data = 0.0
    rates = []
    has_time = has_data = True
    for record in steady:
        steps = _interval_steps(records, record)
        if isinstance(record.get("step_s"), (int, float)):
            interval = float(record["step_s"])
        elif isinstance(record.get("samples_per_s"), (int, float)) and record["samples_per_s"] > 0:
            interval, has_time = steps * batch / record["samples_per_s"], False
        else:
            continue
        samples += steps * batch
        seconds += interval
        if interval > 0:
            rates.append(steps * batch / interval)
        if isinstance(record.get("data_s"), (int, float)):
            data += float(record["data_s"])
        else:
            has_data = False
    result["samples_per_s"] = samples / seconds if seconds > 0 else None
    result["interval_rates_min_max"] = [min(rates), max(rates)] if rates else None
    result["data_wait_share"] = data / seconds if has_data and seconds > 0 else None
    result["seconds_from"] = "step_s" if has_time else "samples_per_s (no step_s key)"
    peaks = [r["peak_mem_gib"] for r in records if isinstance(r.get("peak_mem_gib"), (int, float))]
    result["peak_mem_gib"] = max(peaks) if peaks else None
    return result


def _interval_steps(records: list[dict], record: dict) -> int:
    index = records.index(record)
    return record["step"] - (records[index - 1]["step"] if index > 0 else 0)


def verdict(ratio: float | None) -> str:
    if ratio is None:
        return "missing"
    return "met" if ratio >= TARGET else "NOT met"


def _fmt(value: float | None, pattern: str = "{:,.0f}") -> str:
    return "missing" if value is None else pattern.format(value)


def summarise(work: Path, extract_batch: int, train_batches: list[int]) -> dict:
    bare = read_jsonl(work / "bare.jsonl")
    stages = {r["stage"]: r for r in read_jsonl(work / "stages.jsonl") if "stage" in r}
    machine = json.loads((work / "machine.json").read_text()) if (work / "machine.json").is_file() else {}
    summary: dict[str, Any] = {"machine": machine, "target": TARGET, "stages": stages, "bare": bare}

    data_stage = stages.get("demo-data", {})
    images = machine.get("images")
    log = work / "demo-data.log"
    generated = re.search(r" in ([\d.]+) s:", log.read_text(errors="replace")) if log.is_file() else None
    if data_stage.get("rc") == 0 and generated and images:  # the stage's own time, start-up excluded
        summary["demo_data_images_per_s"] = images / max(float(generated.group(1)), 1e-3)

    extract = extract_figures(work)
    bare_forward = bare_rate(bare, "teacher_forward", extract_batch)
    steady = extract.get("steady_images_per_second")
    extract["bare_forward_images_per_s"] = bare_forward
    extract["ratio"] = steady / bare_forward if steady and bare_forward else None
    extract["target"] = verdict(extract["ratio"])
    summary["extract"] = extract

    summary["train"] = {}
    for batch in train_batches:
        figures = train_figures(work / f"train-{batch}", batch)
        bare_step = bare_rate(bare, "student_step", batch)
        rate = figures.get("samples_per_s")
        figures["bare_step_samples_per_s"] = bare_step
        figures["ratio"] = rate / bare_step if rate and bare_step else None
        figures["target"] = verdict(figures["ratio"])
        summary["train"][str(batch)] = figures
    for decode in str(machine.get("web_decodes") or "").split():  # the web regime (issue #16)
        if (work / f"extract-web-{decode}.log").is_file():
            summary.setdefault("web", {})[decode] = web_figures(work, bare, extract_batch, train_batches[-1],
                                                                 stages, machine, decode)
    compiled = sorted(work.glob("train-*-compile"))
    for run in compiled:
        batch = int(run.name.split("-")[1])
        figures = train_figures(run, batch)
        eager = summary["train"].get(str(batch), {}).get("samples_per_s")
        figures["over_eager"] = figures["samples_per_s"] / eager if figures.get("samples_per_s") and eager else None
        summary["train"][f"{batch}-compile"] = figures
    return summary


def web_figures(work: Path, bare: list[dict], extract_batch: int, batch: int, stages: dict, machine: dict,
                decode: str) -> dict:
    """extract-teacher and train-student on the web-regime photos: rate, bare rate, ratio,
    data-wait share and host CPU per sample: the CPU seconds of the stage (its workers
    included) minus those of its small run, over the difference of their samples (start-up
    out); the whole run's CPU over its samples when the small run is missing."""
    images = machine.get("web_images")
    extract = extract_figures(work, f"cache-web-{decode}", f"extract-web-{decode}.log")
    bare_forward = bare_rate(bare, "teacher_forward", extract_batch)
    steady = extract.get("steady_images_per_second")
    extract.update(bare_forward_images_per_s=bare_forward,
                   ratio=steady / bare_forward if steady and bare_forward else None)
    extract.update(_host_cpu(stages, f"extract-web-{decode}", images, images // 5 if images else None))
    train = train_figures(work / f"train-web-{decode}-{batch}", batch)
    small = train_figures(work / f"train-web-{decode}-{batch}-small", batch)
    bare_step = bare_rate(bare, "student_step", batch)
    rate = train.get("samples_per_s")
    train.update(batch=batch, bare_step_samples_per_s=bare_step, ratio=rate / bare_step if rate and bare_step else None)
    train.update(_host_cpu(stages, f"train-web-{decode}-{batch}", (train.get("last_step") or 0) * batch,
                           (small.get("last_step") or 0) * batch))
    return {"preprocess": machine.get("web_preprocess"), "decode": decode, "images": images, "extract": extract,
            "train": train}


def _host_cpu(stages: dict, name: str, samples: int | None, small_samples: int | None) -> dict:
    full, small = stages.get(name, {}).get("cpu_s"), stages.get(f"{name}-small", {}).get("cpu_s")
    if full is not None and small is not None and samples and small_samples and samples > small_samples:
        return {"host_cpu_ms_per_sample": 1000 * (full - small) / (samples - small_samples),
                "host_cpu_from": "marginal over the small run"}
    if full is not None and samples:
        return {"host_cpu_ms_per_sample": 1000 * full / samples, "host_cpu_from": "whole run, start-up included"}
    return {"host_cpu_ms_per_sample": None, "host_cpu_from": None}


def print_summary(summary: dict) -> None:
    machine = summary["machine"]
    print(f"machine: {machine.get('gpu', '?')}; {machine.get('cpus', '?')} CPUs ({machine.get('cpu', '?')}); "
          f"torch {machine.get('torch', '?')}; {machine.get('device', '?')} {machine.get('precision', '?')}; "
          f"teacher {machine.get('teacher', '?')}, student {machine.get('student', '?')}, "
          f"{machine.get('images', '?')} images of {machine.get('size', '?')} px, {machine.get('workers', '?')} workers")
    for name, stage in summary["stages"].items():
        state = "skipped" if stage.get("skipped") else f"rc {stage.get('rc')}"
        print(f"  stage {name:<22} {state:<8} {stage.get('seconds', 0):6.0f} s (limit {stage.get('limit_s', '-')} s)")
    if "demo_data_images_per_s" in summary:
        print(f"demo-data: {summary['demo_data_images_per_s']:,.0f} images/s")
    ex = summary["extract"]
    print(f"extract-teacher: steady {_fmt(ex.get('steady_images_per_second'))} img/s "
          f"(whole run {_fmt(ex.get('images_per_second'))}) / bare forward {_fmt(ex.get('bare_forward_images_per_s'))} "
          f"= {_fmt(ex.get('ratio'), '{:.3f}')}  target >= {TARGET}: {ex['target']}  [{ex.get('source') or 'no summary found'}]")
    if ex.get("line") and ex.get("steady_images_per_second") is None:
        print(f"  extract summary line: {ex['line']}")
    for name, tr in summary["train"].items():
        if name.endswith("-compile"):
            print(f"train-student batch {name}: {_fmt(tr.get('samples_per_s'))} samples/s "
                  f"= {_fmt(tr.get('over_eager'), '{:.3f}')} x eager; data wait {_fmt(tr.get('data_wait_share'), '{:.1%}')}")
            continue
        spread = tr.get("interval_rates_min_max")
        print(f"train-student batch {name}: {_fmt(tr.get('samples_per_s'))} samples/s over steps "
              f"{tr.get('steady_steps', '-')} (intervals {_fmt(spread[0]) if spread else '-'}-{_fmt(spread[1]) if spread else '-'}) "
              f"/ bare step {_fmt(tr.get('bare_step_samples_per_s'))} = {_fmt(tr.get('ratio'), '{:.3f}')}  "
              f"target >= {TARGET}: {tr['target']}; data wait {_fmt(tr.get('data_wait_share'), '{:.1%}')}; "
              f"peak GPU memory {_fmt(tr.get('peak_mem_gib'), '{:.1f} GiB')}")
    for web in summary.get("web", {}).values():
        ex, tr = web["extract"], web["train"]
        print(f"web regime ({web.get('images')} photos, --preprocess {web.get('preprocess')} --decode "
              f"{web.get('decode')}): extract-teacher "
              f"{_fmt(ex.get('steady_images_per_second'))} img/s / bare {_fmt(ex.get('bare_forward_images_per_s'))} "
              f"= {_fmt(ex.get('ratio'), '{:.3f}')} (target >= 0.9), host CPU "
              f"{_fmt(ex.get('host_cpu_ms_per_sample'), '{:.2f} ms')}/image; train-student batch {tr.get('batch')} "
              f"{_fmt(tr.get('samples_per_s'))} samples/s / bare {_fmt(tr.get('bare_step_samples_per_s'))} = "
              f"{_fmt(tr.get('ratio'), '{:.3f}')}, data wait {_fmt(tr.get('data_wait_share'), '{:.1%}')}, host CPU "
              f"{_fmt(tr.get('host_cpu_ms_per_sample'), '{:.2f} ms')}/sample")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("--extract-batch", type=int, required=True)
    parser.add_argument("--train-batches", required=True, help="comma-separated")
    parser.add_argument("--out", type=Path, help="write the summary JSON here too")
    args = parser.parse_args()
    summary = summarise(args.work, args.extract_batch, [int(b) for b in args.train_batches.split(",") if b])
    print_summary(summary)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
        print(f"summary: {args.out}")


if __name__ == "__main__":
    main()
