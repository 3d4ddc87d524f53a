"""Engine latency side by side: eager executor vs baked eager module vs ONNX Runtime engine vs NFE x bare forward.

Same model, schedule, inputs and thread count for every way, in one run. ``bare`` is NFE times one ONNX
Runtime forward of the network call alone (CFG batch included): the floor of an engine whose loop costs
nothing. Targets (issue 7): the onnxruntime engine at least 1.3x faster than eager at batch 1 on CPU,
and within 1.1x of ``bare``. Optionally the fp16 torch engine's ``mse_ref`` vs the eager fp32 schedule
(``--quality``; worth running on a GPU, where the torch engine uses torch.compile with CUDA graphs). Times are
this process's CPU time when every way runs on the CPU in one thread (``--clock auto``; evaluate/clock.py: the
engine's one long call and bare's NFE short ones are inflated unequally by the machine's other load on the wall
clock), else the wall clock.

    python bench/compile.py [--model digits] [--schedule FILE | --named dpmsolver++2m --nfe 8]
                            [--guidance 2] [--batch 1,16] [--repeats 20] [--threads 1]
                            [--ways eager,baked,onnxruntime,bare] [--provider cpu|cuda] [--quality]
                            [--clock auto|wall|cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import tempfile
from pathlib import Path

import torch

from autotune.compile.backends import check_provider
from autotune.compile.timing import bench, ratios
from autotune.errors import BackendError
from autotune.evaluate.clock import CLOCKS, clock_words
from autotune.models.registry import load_model
from autotune.sampling.named import build
from autotune.space.fileformat import load


def quality(model, schedule, report_size: int) -> dict[str, float]:
    """mse_ref on the report set: the eager fp32 executor vs the torch fp16 engine, same noises and labels."""
    from autotune.compile import build_engine, load_engine
    from autotune.evaluate.evaluator import Evaluator

    ev = Evaluator(model, "report", size=report_size)
    eager = ev.evaluate(schedule)["mse_ref"]
    with tempfile.TemporaryDirectory() as tmp:
        build_engine(model, schedule, Path(tmp) / "t16", "torch", "fp16", parity_noises=2)
        engine = load_engine(Path(tmp) / "t16")
        es = ev.eval_set
        feed = {"noise": es.noise(torch.float32).numpy()}
        if es.labels() is not None:
            feed["class_labels"] = es.labels().long().numpy()
        out = torch.from_numpy(engine(**feed)).double()
        ref = ev.reference(schedule.guidance, nfe=schedule.nfe).final.double()
        fp16 = float(((out - ref) ** 2).flatten(1).mean(1).mean())  # as evaluate.metrics.score: mse_ref
    return {"eager_fp32_mse_ref": eager, "torch_fp16_mse_ref": fp16, "engine": engine.description}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits")
    p.add_argument("--schedule", type=Path, default=None)
    p.add_argument("--named", default="dpmsolver++2m")
    p.add_argument("--nfe", type=int, default=8)
    p.add_argument("--guidance", type=float, default=2.0, help="for class-conditional models (negative: none)")
    p.add_argument("--batch", default="1,16")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ways", default="eager,baked,onnxruntime,bare")
    p.add_argument("--provider", default="cpu", help="onnxruntime execution provider of the engine and bare: cpu, cuda")
    p.add_argument("--quality", action="store_true", help="also mse_ref of the torch fp16 engine vs eager fp32")
    p.add_argument("--report-size", type=int, default=64)
    p.add_argument("--clock", default="auto", choices=CLOCKS, help="auto: this process's CPU time when every way "
                   "runs on the CPU in one thread (the machine's other load does not inflate it), else the wall clock")
    args = p.parse_args()
    try:
        check_provider(args.provider)
    except BackendError as e:
        p.error(f"--provider: {e}")
    torch.set_num_threads(args.threads)

    model = load_model(args.model)
    if args.schedule is not None:
        schedule = load(args.schedule)
    else:
        schedule = build(args.named, model.noise, args.nfe)
        if getattr(model, "num_classes", None) and args.guidance >= 0:
            schedule = dataclasses.replace(schedule, guidance=args.guidance)
    batches = [int(b) for b in args.batch.split(",")]
    ways = args.ways.split(",")
    print(f"model {args.model}, schedule {schedule.name or args.schedule} ({schedule.hash()}), NFE {schedule.nfe}, "
          f"guidance {schedule.guidance}, {args.threads} thread(s), {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, cuda {torch.cuda.is_available()}, onnxruntime provider {args.provider}")
    rows = bench(model, schedule, ways, batches, repeats=args.repeats, threads=args.threads, provider=args.provider,
                 clock=args.clock,
                 on_row=lambda r: print(f"  measured {r.way:<12} batch {r.batch:<4} {1e3 * r.seconds:9.2f} ms",
                                        flush=True))
    rel = ratios(rows)
    print(f"\nclock: {clock_words(rows[0].clock)}")
    print(f"{'way':<12} {'batch':>5} {'ms':>10} {'x vs eager':>11} {'/ NFE*bare':>11}  runs on")
    for r in rows:
        e = rel[(r.way, r.batch)]
        speed = f"{e['speedup_vs_eager']:.2f}" if "speedup_vs_eager" in e else ""
        bare = f"{e['vs_bare']:.2f}" if "vs_bare" in e else ""
        print(f"{r.way:<12} {r.batch:>5} {1e3 * r.seconds:>10.2f} {speed:>11} {bare:>11}  {r.note}")
    if "onnxruntime" in ways:
        for b in batches:
            e = rel[("onnxruntime", b)]
            verdicts = []
            if "speedup_vs_eager" in e:
                target = " (target >= 1.3 at batch 1)" if b == 1 else ""
                verdicts.append(f"{e['speedup_vs_eager']:.2f}x faster than eager{target}")
            if "vs_bare" in e:
                verdicts.append(f"{e['vs_bare']:.2f}x NFE x bare forward (target <= 1.1)")
            print(f"onnxruntime engine, batch {b}: " + "; ".join(verdicts))
    if args.quality:
        q = quality(model, schedule, args.report_size)
        change = q["torch_fp16_mse_ref"] / q["eager_fp32_mse_ref"] - 1.0
        print(f"\nmse_ref on the report set ({args.report_size}): eager fp32 {q['eager_fp32_mse_ref']:.5g}, "
              f"torch fp16 engine {q['torch_fp16_mse_ref']:.5g} ({100 * change:+.1f} %, target <= +10 %); "
              f"{q['engine']}")


if __name__ == "__main__":
    main()
