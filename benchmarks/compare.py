"""rdcd against the tools a user would pick instead, on one `rdcd synth` benchmark.

    python benchmarks/compare.py SYNTH_DIR [--out benchmarks/results/compare.md]

Every method runs as its user would run it, as its own process: rdcd with the default model
and with the SSCD teacher (`rdcd search` for copy detection, `rdcd dedup` for dedup), pHash
(imagehash), PDQ (pdqhash) and imagededup's PHash (benchmarks/baselines.py). Its output is
scored by `rdcd eval`'s code against the benchmark's ground_truth.csv / dedup/groups.csv.
Wall time is the whole command (start-up, model loading and decoding included); images/s is
images handled over that time; peak memory is the highest sum of PSS (proportional set size,
shared pages split between their users) over the command's process tree, sampled every 0.2 s
(Linux /proc). The markdown table is printed and written to --out, the raw numbers beside it
as JSON. A method whose package is not installed is reported as such, not dropped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.eval import evaluate  # noqa: E402
from rdcd.metrics import IMAGE_EXTENSIONS  # noqa: E402
from rdcd.storage import StorageOptions  # noqa: E402

PYTHON = sys.executable
BASELINES = [PYTHON, str(ROOT / "benchmarks" / "baselines.py")]
SSCD_THRESHOLD = 0.75
"""SSCD's README: for sscd_disc_mixup, cosine > 0.75 means a copy with 90% precision on DISC."""


@dataclass
class Method:
    """One contender: how to run its copy detection and its dedup, and what it needs."""

    name: str
    search: list[str]  # command; {queries} {references} {out} are filled in
    dedup: list[str]  # command; {images} {out}
    search_output: str  # what `rdcd eval` reads, relative to {out}
    dedup_output: str
    needs: tuple[str, ...] = ()  # importable modules
    needs_background: str | None = None  # model whose background descriptors {background_*} is
    note: str = ""
    results: dict = field(default_factory=dict)


def methods(background: str | None) -> list[Method]:
    """The contenders; `python -m pipelines.<job>` is exactly `rdcd <job>`."""
    search = [PYTHON, "-m", "pipelines.search", "{queries}", "{references}", "{out}", "--k", "10"]
    dedup = [PYTHON, "-m", "pipelines.dedup", "{images}", "{out}"]
    found = [
        Method("rdcd, default model", search, dedup, "", "", note="threshold from its card"),
        Method(
            "rdcd, SSCD teacher",
            [*search, "--model", "sscd"],
            [*dedup, "--model", "sscd", "--threshold", str(SSCD_THRESHOLD)],
            "",
            "",
            note=f"SSCD disc_mixup (int8 ONNX, 512-d); dedup at cosine {SSCD_THRESHOLD}, the "
            "threshold SSCD's README gives for 90% precision on DISC",
        ),
    ]
    if background:
        for model, name in (("default", "rdcd, default model"), ("sscd", "rdcd, SSCD teacher")):
            found.append(
                Method(
                    f"{name} + score normalisation",
                    [*search, "--model", model, "--background", "{background_" + model + "}"],
                    [],
                    "",
                    "",
                    needs_background=model,
                    note=f"search --background: descriptors of {background} (METHOD.md 4.4)",
                )
            )
    hashes = [
        ("pHash (imagehash)", "phash", "imagehash", "64-bit DCT hash; dedup at Hamming <= 10"),
        ("PDQ (pdqhash)", "pdq", "pdqhash", "256-bit; dedup at Hamming <= 31 (ThreatExchange)"),
        (
            "imagededup PHash",
            "imagededup-phash",
            "imagededup",
            "dedup = its find_duplicates(max_distance_threshold=10)",
        ),
    ]
    for name, key, module, note in hashes:
        found.append(
            Method(
                name,
                [*BASELINES, key, "search", "{queries}", "{references}", "{out}", "--k", "10"],
                [*BASELINES, key, "dedup", "{images}", "{out}"],
                "predictions.parquet",
                "pairs.parquet",
                needs=(module,),
                note=note,
            )
        )
    return found


def _tree_pss(root: int) -> int:
    """Sum of PSS (bytes) of root and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def measure(command: list[str], log: Path) -> dict:
    """Run command; wall seconds, peak PSS of its process tree, exit status."""
    peak = 0
    started = time.perf_counter()
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _tree_pss(process.pid))
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = process.wait()
        done.set()
        sampler.join()
    return {
        "rc": rc,
        "wall_s": time.perf_counter() - started,
        "peak_mb": peak / 2**20,
        "load_1min": os.getloadavg()[0],  # others' work on a shared machine inflates wall_s
    }


def _count_images(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def _fill(command: list[str], **values: str) -> list[str]:
    return [part.format(**values) for part in command]


def embed_background(model: str, images: str, work: Path) -> str:
    """Background descriptors for score normalisation (set-up, not part of any timing)."""
    out = work / f"background-{model}"
    shutil.rmtree(out, ignore_errors=True)
    command = [PYTHON, "-m", "pipelines.embed", images, str(out), "--model", model]
    print(f"[background] {' '.join(command)}", flush=True)
    log = work / f"background-{model}.log"
    if measure(command, log)["rc"] != 0:
        raise SystemExit(f"embedding the background failed; see {log}")
    return str(out / "descriptors")


def run_method(method: Method, bench: Path, work: Path, backgrounds: dict[str, str]) -> None:
    missing = [m for m in method.needs if importlib.util.find_spec(m) is None]
    if missing:
        method.results = {"skipped": f"not installed: pip install {' '.join(missing)}"}
        return
    slug = "".join(c if c.isalnum() else "-" for c in method.name.lower()).strip("-")
    slug = "-".join(part for part in slug.split("-") if part)
    values = {
        "queries": str(bench / "queries"),
        "references": str(bench / "references"),
        "images": str(bench / "dedup" / "images"),
        **{f"background_{model}": url for model, url in backgrounds.items()},
    }
    tasks = {
        "search": (
            _fill(method.search, **values, out=str(work / slug / "search")),
            work / slug / "search" / method.search_output,
            _count_images(bench / "queries") + _count_images(bench / "references"),
        ),
    }
    if method.dedup:
        tasks["dedup"] = (
            _fill(method.dedup, **values, out=str(work / slug / "dedup")),
            work / slug / "dedup" / method.dedup_output,
            _count_images(bench / "dedup" / "images"),
        )
    shutil.rmtree(work / slug, ignore_errors=True)  # fresh outputs: nothing is skipped as done
    (work / slug).mkdir(parents=True)
    for task, (command, output, n_images) in tasks.items():
        print(f"[{method.name}] {task}: {' '.join(command)}", flush=True)
        log = work / slug / f"{task}.log"
        timing = measure(command, log)
        entry: dict = {**timing, "images": n_images, "command": command, "log": str(log)}
        if timing["rc"] != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            entry["error"] = " | ".join(tail)
        else:
            _, metrics = evaluate(str(output), str(bench), StorageOptions())
            entry["metrics"] = metrics
            entry["images_per_s"] = n_images / timing["wall_s"]
        method.results[task] = entry


def _f(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render(found: list[Method], bench: Path, counts: dict) -> str:
    """The markdown report: context, copy-detection table, dedup table, notes."""
    cpu = f"{os.cpu_count()} CPU cores, {platform.machine()}, Python {platform.python_version()}"
    lines = [
        "# rdcd against other tools",
        "",
        f"Benchmark: `rdcd synth` output `{bench}` ({counts['references']} references, "
        f"{counts['queries']} queries of which {counts['copy_queries']} are copies, "
        f"{counts['dedup_images']} images in {counts['dedup_groups']} groups for dedup). "
        f"Machine: {cpu}. Measured {time.strftime('%Y-%m-%d')} by "
        "`python benchmarks/compare.py`.",
        "",
        "## Copy detection (queries against references, k = 10)",
        "",
        "| method | µAP | recall@P90 | acc@1 | recall@10 | wall s | images/s | peak MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method in found:
        lines.append(_row(method, "search", ("uap", "recall_at_p90", "acc_at_1", "recall_at_10")))
    lines += [
        "",
        "## Dedup (one folder, pairs against groups.csv)",
        "",
        "| method | pair precision | pair recall | pair F1 | B-cubed F1 | wall s | images/s "
        "| peak MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method in found:
        if method.dedup:
            keys = ("pair_precision", "pair_recall", "pair_f1", "bcubed_f1")
            lines.append(_row(method, "dedup", keys))
    lines += ["", "Notes:", ""]
    for method in found:
        if method.note:
            lines.append(f"- {method.name}: {method.note}.")
    lines.append(
        "- µAP and recall@P90 follow ISC2021 (ties broken pessimistically, unpredicted matches "
        "count zero); recall@P90 is n/a when precision never reaches 0.9."
    )
    lines.append(
        "- Wall time includes process start, model loading and image decoding; rdcd's also "
        "includes starting its local Ray. Peak memory sums PSS over the process tree."
    )
    loads = [
        entry["load_1min"]
        for method in found
        for entry in method.results.values()
        if isinstance(entry, dict) and "load_1min" in entry
    ]
    if loads:
        lines.append(
            f"- 1-minute load average at the end of each run: {min(loads):.1f} to "
            f"{max(loads):.1f} on {os.cpu_count()} cores; above the core count, other work "
            "shared the machine and wall times are inflated (compare them within one run)."
        )
    return "\n".join(lines) + "\n"


def _row(method: Method, task: str, keys: tuple[str, ...]) -> str:
    if "skipped" in method.results:
        return f"| {method.name} | {method.results['skipped']} |" + " |" * 7
    entry = method.results[task]
    if "error" in entry:
        return f"| {method.name} | failed: {entry['error'][:120]} |" + " |" * 7
    metrics = entry["metrics"]
    cells = [_f(metrics[k]) for k in keys]
    cells += [f"{entry['wall_s']:.1f}", f"{entry['images_per_s']:.1f}", f"{entry['peak_mb']:.0f}"]
    return f"| {method.name} | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench", type=Path, help="output folder of `rdcd synth`")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/compare.md")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "rdcd-compare",
        help="scratch folder for every method's outputs and logs",
    )
    parser.add_argument("--only", nargs="*", help="run only methods whose name contains these")
    parser.add_argument(
        "--background",
        help="images never used as references (e.g. other photos): adds rdcd rows with score "
        "normalisation against them",
    )
    args = parser.parse_args(argv)
    manifest_path = args.bench / "manifest.json"
    if not manifest_path.is_file():
        parser.error(f"{args.bench} is not a `rdcd synth` output (no manifest.json)")
    counts = json.loads(manifest_path.read_text())["counts"]
    work = args.work
    found = [
        m
        for m in methods(args.background)
        if not args.only or any(o.lower() in m.name.lower() for o in args.only)
    ]
    work.mkdir(parents=True, exist_ok=True)
    backgrounds = {
        model: embed_background(model, args.background, work.resolve())
        for model in sorted({m.needs_background for m in found if m.needs_background})
    }
    for method in found:
        run_method(method, args.bench.resolve(), work.resolve(), backgrounds)
    report = render(found, args.bench, counts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    raw = {m.name: m.results for m in found}
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=2, default=str))
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
