"""The bad-input suite: every CLI command and every file format we read, fed wrong things.

Each case is one command line (with ``{w}`` the shared workspace of crafted files and ``{o}`` a fresh,
empty output folder of its own). A case is

- clean: exit code 2, stderr is one ``error:`` line (or click's usage message), no traceback, and nothing
  written under ``{o}`` (no partial output, no ``.tmp``); a case marked ``warns`` instead exits 0 with one
  ``warning:`` line naming what was clamped, and its output passes the case's check;
- traceback: an exception escaped the command;
- silent: anything else (exit 0 on a bad input, wrong output, a half-written file, a multi-line error).

``pytest -q tests/test_bad_input.py -rA`` prints the counts (``bad-input suite: N clean, 0 traceback,
0 silent``) from ``test_counts``; every case must be clean.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from typer.testing import CliRunner

from autotune.cli import app

runner = CliRunner()


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    warns: str = ""  # a clamp, not a refusal: exit 0 and a `warning:` line containing this
    check: Callable[[Path], bool] | None = field(default=None, compare=False)  # the output of a warns case


def case(id: str, *args: object, warns: str = "", check=None) -> Case:
    return Case(id, tuple(str(a) for a in args), warns, check)


GOOD = "{w}/good.json"  # dpmsolver++2m, NFE 5, for gmm2d
UNIPC = "{w}/unipc.json"  # unipc-bh2-o2, NFE 5, for gmm2d
DIGITS = "{w}/digits.json"  # dpmsolver++2m, NFE 3, guidance 2, for digits
CPR = "{w}/cpr.json"  # fitted on gmm2d's fingerprint, NFE grid 4..8, unguided
GCPR = "{w}/gcpr.json"  # fitted on digits' fingerprint, NFE grid 4..6, guidance grid 1..3
NOISE = "{w}/noise.npy"  # (4, 2) float32 for gmm2d
OUT = "{o}/x.json"
UNDER_FILE = "{w}/afile/x.json"  # a path whose parent is a regular file: unwritable even for root

MODEL_DIRS = ("no_index", "index_list", "index_garbage", "unet_config_list", "unet_config_not_utf8",
              "unet_config_deep", "sched_config_list", "sched_bad_betas", "weights_truncated", "weights_garbage",
              "weights_missing", "weights_pickle_bin", "unet_unknown_class", "unet_dir_missing", "sample_size_str",
              "sched_steps_text", "sched_steps_huge", "sched_beta_text", "sched_trained_betas_bad",
              "sched_prediction_list", "in_channels_zero")
SCHEDULE_FILES = ("missing", "empty", "garbage", "not_utf8", "deep_list", "deep_object", "list", "nan",
                  "huge_int", "too_many_steps", "version_2", "bad_order", "t_outside", "deep_metadata")
NOISE_FILES = ("missing", "garbage", "text", "npz", "object", "str", "complex", "bool", "nan", "inf", "shape3d",
               "scalar", "empty_batch", "one_d", "overflows_float32")
CPR_FILES = ("missing", "empty", "garbage", "not_utf8", "deep", "list", "tiny_scale", "scale_mismatch",
             "huge_coefficients", "nan_text", "grid_nfe_str", "fingerprint_int")
ENGINE_DIRS = ("empty", "manifest_list", "manifest_garbage", "manifest_not_utf8", "manifest_deep",
               "manifest_missing_key", "manifest_bad_input")


def _ratios_between(low: float, high: float) -> Callable[[Path], bool]:
    def check(out: Path) -> bool:
        ratios = [s["ratio"] for s in json.loads((out / "x.json").read_text())["steps"]]
        return all(low <= r <= high for r in ratios)
    return check


CASES: list[Case] = [
    # ---------------------------------------------------------------- models
    case("models-unknown", "models", "--model", "nope"),
    *[case(f"models-dir-{d}", "models", "--model", f"{{w}}/m_{d}") for d in MODEL_DIRS],
    *[case(f"baseline-dir-{d}", "baseline", "ddim", "--model", f"{{w}}/m_{d}", "--nfe", 3, "--out", OUT)
      for d in MODEL_DIRS],
    case("models-dir-empty", "models", "--model", "{o}"),
    case("sample-dir-forward-fails", "sample", "--model", "{w}/m_forward_fails", "--schedule", "{w}/tiny.json",
         "--num", 2, "--out", "{o}/x.npy"),
    case("eval-dir-forward-fails", "eval", "--model", "{w}/m_forward_fails", "--schedule", "{w}/tiny.json",
         "--size", 4, "--no-cache"),
    # ---------------------------------------------------------------- baseline
    case("baseline-nfe-0", "baseline", "ddim", "--model", "gmm2d", "--nfe", 0, "--out", OUT),
    case("baseline-nfe-negative", "baseline", "ddim", "--model", "gmm2d", "--nfe", -3, "--out", OUT),
    case("baseline-nfe-huge", "baseline", "ddim", "--model", "gmm2d", "--nfe", 100000, "--out", OUT),
    case("baseline-nfe-text", "baseline", "ddim", "--model", "gmm2d", "--nfe", "five", "--out", OUT),
    case("baseline-unknown-name", "baseline", "dpm9", "--model", "gmm2d", "--nfe", 5, "--out", OUT),
    case("baseline-final-bogus", "baseline", "ddim", "--model", "gmm2d", "--nfe", 5, "--final", "x", "--out", OUT),
    case("baseline-out-is-dir", "baseline", "ddim", "--model", "gmm2d", "--nfe", 5, "--out", "{o}"),
    case("baseline-out-under-file", "baseline", "ddim", "--model", "gmm2d", "--nfe", 5, "--out", UNDER_FILE),
    case("baseline-guidance-unconditional", "baseline", "ddim", "--model", "gmm2d", "--nfe", 5, "--guidance", 2,
         "--out", OUT),
    case("baseline-guidance-nan", "baseline", "ddim", "--model", "digits", "--nfe", 5, "--guidance", "nan",
         "--out", OUT),
    case("baseline-guidance-inf", "baseline", "ddim", "--model", "digits", "--nfe", 5, "--guidance", "inf",
         "--out", OUT),
    case("baseline-guidance-negative", "baseline", "ddim", "--model", "digits", "--nfe", 5, "--guidance", -3,
         "--out", OUT),
    case("baseline-model-unknown", "baseline", "ddim", "--model", "nope", "--nfe", 5, "--out", OUT),
    case("baseline-model-file", "baseline", "ddim", "--model", GOOD, "--nfe", 5, "--out", OUT),
    # ---------------------------------------------------------------- schedule files
    *[case(f"eval-schedule-{s}", "eval", "--model", "gmm2d", "--schedule", f"{{w}}/s_{s}.json", "--no-cache",
           "--size", 8) for s in SCHEDULE_FILES],
    *[case(f"sample-schedule-{s}", "sample", "--model", "gmm2d", "--schedule", f"{{w}}/s_{s}.json", "--out",
           "{o}/x.npy") for s in SCHEDULE_FILES],
    case("eval-schedule-is-dir", "eval", "--model", "gmm2d", "--schedule", "{w}", "--no-cache"),
    case("eval-set-bogus", "eval", "--model", "gmm2d", "--schedule", GOOD, "--set", "bogus", "--no-cache"),
    case("eval-size-huge", "eval", "--model", "gmm2d", "--schedule", GOOD, "--size", 10**9, "--no-cache"),
    case("eval-size-negative", "eval", "--model", "gmm2d", "--schedule", GOOD, "--size", -1, "--no-cache"),
    case("eval-schedule-units", "eval", "--model", "gmm2d", "--schedule", "{w}/s_skip.json", "--no-cache"),
    # ---------------------------------------------------------------- cache URL / file
    case("eval-cache-dir", "eval", "--model", "gmm2d", "--schedule", GOOD, "--size", 8, "--cache", "{w}/afolder"),
    case("eval-cache-garbage", "eval", "--model", "gmm2d", "--schedule", GOOD, "--size", 8, "--cache",
         "{w}/garbage.bin"),
    case("eval-cache-under-file", "eval", "--model", "gmm2d", "--schedule", GOOD, "--size", 8, "--cache",
         "{w}/afile/c.sqlite"),
    case("eval-cache-bad-url", "eval", "--model", "gmm2d", "--schedule", GOOD, "--size", 8, "--cache",
         "bogus+driver://x/y"),
    case("eval-cache-sqlite-url-missing-dir", "eval", "--model", "gmm2d", "--schedule", GOOD, "--size", 8,
         "--cache", "sqlite:///{w}/afile/c.sqlite"),
    case("cache-stats-dir", "cache", "stats", "--cache", "{w}/afolder"),
    case("cache-stats-garbage", "cache", "stats", "--cache", "{w}/garbage.bin"),
    case("cache-clear-bad-table", "cache", "clear", "--cache", "{w}/c.sqlite", "--table", "nope", "--yes"),
    case("cache-export-under-file", "cache", "export", UNDER_FILE.replace(".json", ".jsonl"), "--cache",
         "{w}/c.sqlite"),
    # ---------------------------------------------------------------- sample: noise, labels, options
    *[case(f"sample-noise-{n}", "sample", "--model", "gmm2d", "--schedule", GOOD, "--noise", f"{{w}}/n_{n}.npy",
           "--out", "{o}/x.npy") for n in NOISE_FILES],
    case("sample-noise-is-dir", "sample", "--model", "gmm2d", "--schedule", GOOD, "--noise", "{w}", "--out",
         "{o}/x.npy"),
    case("sample-num-0", "sample", "--model", "gmm2d", "--schedule", GOOD, "--num", 0, "--out", "{o}/x.npy"),
    case("sample-num-huge", "sample", "--model", "gmm2d", "--schedule", GOOD, "--num", 2 * 10**9, "--out",
         "{o}/x.npy"),
    case("sample-seed-huge", "sample", "--model", "gmm2d", "--schedule", GOOD, "--seed", 2**70, "--out",
         "{o}/x.npy"),
    case("sample-seed-negative", "sample", "--model", "gmm2d", "--schedule", GOOD, "--seed", -5, "--out",
         "{o}/x.npy"),
    case("sample-dtype-bogus", "sample", "--model", "gmm2d", "--schedule", GOOD, "--dtype", "float16", "--out",
         "{o}/x.npy"),
    case("sample-guidance-unconditional", "sample", "--model", "gmm2d", "--schedule", GOOD, "--guidance", 3,
         "--out", "{o}/x.npy"),
    case("sample-guidance-nan", "sample", "--model", "digits", "--schedule", DIGITS, "--guidance", "nan",
         "--num", 2, "--out", "{o}/x.npy"),
    case("sample-guidance-huge", "sample", "--model", "digits", "--schedule", DIGITS, "--guidance", 1e300,
         "--num", 2, "--out", "{o}/x.npy"),
    case("sample-out-is-dir", "sample", "--model", "gmm2d", "--schedule", GOOD, "--out", "{o}"),
    case("sample-out-under-file", "sample", "--model", "gmm2d", "--schedule", GOOD, "--out", "{w}/afile/x.npy"),
    case("sample-png-under-file", "sample", "--model", "gmm2d", "--schedule", GOOD, "--out", "{o}/x.npy",
         "--png", "{w}/afile/g.png"),
    case("sample-png-is-dir", "sample", "--model", "gmm2d", "--schedule", GOOD, "--out", "{o}/x.npy",
         "--png", "{w}/afolder"),
    case("sample-noise-overflows-float64", "sample", "--model", "gmm2d", "--schedule", GOOD, "--noise",
         "{w}/n_overflows_float32.npy", "--dtype", "float64", "--out", "{o}/x.npy"),
    case("sample-png-not-png", "sample", "--model", "gmm2d", "--schedule", GOOD, "--out", "{o}/x.npy",
         "--png", "{o}/grid.txt"),
    case("sample-noise-and-num", "sample", "--model", "gmm2d", "--schedule", GOOD, "--noise", NOISE, "--num", 3,
         "--out", "{o}/x.npy"),
    case("sample-model-empty-name", "sample", "--model", "", "--schedule", GOOD, "--out", "{o}/x.npy"),
    case("search-budget-huge", "search", "--model", "gmm2d", "--budget", 10**9, "--workers", 0, "--no-cache",
         "--out", OUT),
    # image-to-image, prompts and flow names (issue 15)
    *[case(f"search-strength-{name}", "search", "--model", "gmm2d", "--workers", 0, "--no-cache", *extra,
           "--out", OUT) for name, extra in (
        ("zero", ("--strength", 0)), ("one", ("--strength", 1)), ("nan", ("--strength", "nan")),
        ("text", ("--strength", "half")), ("nfe-range", ("--strength", 0.5, "--nfe", "4-6")),
        ("refine", ("--strength", 0.5, "--refine", 2)), ("ratios", ("--strength", 0.5, "--ratios", "fit")))],
    case("search-prompts-no-text-model", "search", "--model", "gmm2d", "--prompts", "{w}/p_three.txt", "--workers",
         0, "--no-cache", "--out", OUT),
    case("search-prompts-empty", "search", "--model", "{w}/sd", "--prompts", "{w}/p_empty.txt", "--workers", 0,
         "--no-cache", "--out", OUT),
    case("search-report-size-negative", "search", "--model", "gmm2d", "--report-size", -1, "--workers", 0,
         "--no-cache", "--out", OUT),
    case("baseline-flow-name-on-vp-model", "baseline", "flow-euler", "--model", "gmm2d", "--nfe", 4, "--out", OUT),
    *[case(f"sample-prompts-{name}", "sample", "--model", "{w}/sd", "--schedule", "{w}/sd.json", "--prompts",
           path, *extra, "--out", "{o}/x.npy") for name, path, extra in (
        ("not-utf8", "{w}/p_not_utf8.txt", ()), ("dir", "{w}/afolder", ()), ("empty", "{w}/p_empty.txt", ()),
        ("count", "{w}/p_three.txt", ("--num", 2)), ("with-labels", "{w}/p_three.txt",
                                                      ("--class-labels", "{w}/l_ok4.npy")))],
    case("sample-columns-0", "sample", "--model", "gmm2d", "--schedule", GOOD, "--out", "{o}/x.npy",
         "--columns", 0),
    case("sample-no-schedule", "sample", "--model", "gmm2d", "--out", "{o}/x.npy"),
    case("sample-labels-unconditional", "sample", "--model", "gmm2d", "--schedule", GOOD, "--noise", NOISE,
         "--class-labels", "{w}/l_ok4.npy", "--out", "{o}/x.npy"),
    case("sample-prompts-unconditional", "sample", "--model", "gmm2d", "--schedule", GOOD, "--prompts",
         "{w}/prompts.txt", "--out", "{o}/x.npy"),
    *[case(f"sample-labels-{lab}", "sample", "--model", "digits", "--schedule", DIGITS, "--num", 4,
           "--class-labels", f"{{w}}/l_{lab}.npy", "--out", "{o}/x.npy")
      for lab in ("float", "short", "two_d", "negative", "too_big", "str", "missing", "garbage")],
    # ---------------------------------------------------------------- sample --engine
    case("sample-engine-is-file", "sample", "--engine", GOOD, "--out", "{o}/x.npy"),
    case("sample-engine-missing", "sample", "--engine", "{w}/nope", "--out", "{o}/x.npy"),
    *[case(f"sample-engine-{e}", "sample", "--engine", f"{{w}}/e_{e}", "--out", "{o}/x.npy") for e in ENGINE_DIRS],
    case("sample-engine-with-model", "sample", "--engine", "{w}/e_empty", "--model", "gmm2d", "--out", "{o}/x.npy"),
    # ---------------------------------------------------------------- compare
    case("compare-nfe-text", "compare", "--model", "gmm2d", "--nfe", "a,b", "--no-cache"),
    case("compare-nfe-zero", "compare", "--model", "gmm2d", "--nfe", "0", "--no-cache"),
    case("compare-nfe-huge", "compare", "--model", "gmm2d", "--nfe", "100000", "--baselines", "ddim", "--no-cache",
         "--out", "{o}/c"),
    case("compare-baselines-unknown", "compare", "--model", "gmm2d", "--nfe", "3", "--baselines", "nope",
         "--no-cache", "--out", "{o}/c"),
    case("compare-schedule-missing", "compare", "--model", "gmm2d", "--schedules", "{w}/s_missing.json",
         "--no-cache", "--out", "{o}/c"),
    case("compare-out-is-file", "compare", "--model", "gmm2d", "--nfe", "3", "--baselines", "ddim", "--size", 8,
         "--no-cache", "--out", "{w}/afile"),
    case("compare-out-under-file", "compare", "--model", "gmm2d", "--nfe", "3", "--baselines", "ddim", "--size", 8,
         "--no-cache", "--out", "{w}/afile/c"),
    case("compare-set-bogus", "compare", "--model", "gmm2d", "--nfe", "3", "--baselines", "ddim", "--set", "x",
         "--no-cache", "--out", "{o}/c"),
    case("compare-guidance-unconditional", "compare", "--model", "gmm2d", "--nfe", "3", "--baselines", "ddim",
         "--guidance", 2, "--size", 8, "--no-cache", "--out", "{o}/c"),
    # ---------------------------------------------------------------- search
    *[case(f"search-{name}", "search", "--model", "gmm2d", "--budget", 1, "--workers", 0, "--validate", 0,
           "--no-cache", *extra) for name, extra in {
        "nfe-zero": ("--nfe", "0", "--out", OUT),
        "nfe-huge": ("--nfe", "5000", "--out", OUT),
        "nfe-range-huge": ("--nfe", "4-100000", "--out", OUT),
        "nfe-half-range": ("--nfe", "4-", "--out", OUT),
        "method-unknown": ("--method", "nope", "--out", OUT),
        "objectives-duplicate": ("--objectives", "mse_ref,mse_ref", "--out", OUT),
        "objective-unknown": ("--objective", "nope", "--out", OUT),
        "ratios-bogus": ("--ratios", "magic", "--out", OUT),
        "ratios-cpr-missing": ("--ratios", "cpr:{w}/nope.json", "--out", OUT),
        "ratios-cpr-garbage": ("--ratios", "cpr:{w}/c_garbage.json", "--out", OUT),
        "ratios-cpr-other-model": ("--ratios", "cpr:" + GCPR, "--out", OUT),
        "out-is-dir": ("--out", "{o}"),
        "out-under-file": ("--out", UNDER_FILE),
        "report-is-file": ("--report", GOOD, "--out", OUT),
        "guidance-unconditional": ("--guidance", 2, "--out", OUT),
        "latency-budget-nan": ("--latency-budget", "nan", "--out", OUT),
        "stage2-no-units": ("--stage2-budget", 2, "--out", OUT),
        "set-size-huge": ("--set-size", 10**9, "--out", OUT),
        "workers-negative": ("--workers", -1, "--out", OUT),
        "budget-zero": ("--budget", 0, "--out", OUT),
    }.items()],
    # ---------------------------------------------------------------- compile / bench
    case("compile-out-is-file", "compile", "--model", "{w}/m_ok", "--schedule", "{w}/tiny.json", "--backend", "torch",
         "--out", GOOD),
    case("compile-out-under-file", "compile", "--model", "{w}/m_ok", "--schedule", "{w}/tiny.json", "--backend",
         "torch", "--out", "{w}/afile/e"),
    case("compile-backend-unknown", "compile", "--model", "{w}/m_ok", "--schedule", "{w}/tiny.json", "--backend",
         "nope", "--out", "{o}/e"),
    case("compile-precision-unknown", "compile", "--model", "{w}/m_ok", "--schedule", "{w}/tiny.json",
         "--precision", "fp8", "--backend", "torch", "--out", "{o}/e"),
    case("compile-max-batch-0", "compile", "--model", "{w}/m_ok", "--schedule", "{w}/tiny.json", "--max-batch", 0,
         "--out", "{o}/e"),
    case("compile-no-network", "compile", "--model", "gmm2d", "--schedule", GOOD, "--backend", "torch", "--out",
         "{o}/e"),
    case("compile-guidance-nan", "compile", "--model", "{w}/m_ok", "--schedule", "{w}/tiny.json", "--backend",
         "torch", "--guidance", "nan", "--out", "{o}/e"),
    case("compile-schedule-garbage", "compile", "--model", "{w}/m_ok", "--schedule", "{w}/s_garbage.json",
         "--out", "{o}/e"),
    case("bench-batch-zero", "bench", "--model", "gmm2d", "--schedule", GOOD, "--batch", "0"),
    case("bench-batch-text", "bench", "--model", "gmm2d", "--schedule", GOOD, "--batch", "a"),
    case("bench-batch-huge", "bench", "--model", "gmm2d", "--schedule", GOOD, "--batch", str(10**9)),
    case("bench-backends-unknown", "bench", "--model", "gmm2d", "--schedule", GOOD, "--backends", "nope"),
    case("bench-backends-empty", "bench", "--model", "gmm2d", "--schedule", GOOD, "--backends", ","),
    case("bench-repeats-0", "bench", "--model", "gmm2d", "--schedule", GOOD, "--repeats", 0),
    case("bench-threads-huge", "bench", "--model", "gmm2d", "--schedule", GOOD, "--threads", 10**6),
    case("bench-repeats-huge", "bench", "--model", "gmm2d", "--schedule", GOOD, "--repeats", 10**9),
    # ---------------------------------------------------------------- dc fit
    *[case(f"dc-fit-{name}", "dc", "fit", "--model", "gmm2d", "--schedule", UNIPC, "--no-cache", "--iterations", 2,
           "--datapoints", 2, *extra) for name, extra in {
        "schedule-missing": ("--schedule", "{w}/nope.json", "--out", OUT),
        "lr-nan": ("--lr", "nan", "--out", OUT),
        "lr-zero": ("--lr", 0, "--out", OUT),
        "lr-negative": ("--lr", -1, "--out", OUT),
        "method-unknown": ("--method", "nope", "--out", OUT),
        "datapoints-huge": ("--datapoints", 10**9, "--out", OUT),
        "iterations-huge": ("--iterations", 10**9, "--out", OUT),
        "out-is-dir": ("--out", "{o}"),
        "out-under-file": ("--out", UNDER_FILE),
        "guidance-unconditional": ("--guidance", 2, "--out", OUT),
        "nothing-to-fit": ("--schedule", "{w}/ddim2.json", "--out", OUT),
    }.items()],
    # ---------------------------------------------------------------- cpr fit
    *[case(f"cpr-fit-{name}", "cpr", "fit", "--model", "gmm2d", "--no-cache", "--iterations", 1, "--datapoints", 2,
           *extra) for name, extra in {
        "nfe-text": ("--nfe", "x", "--out", OUT),
        "nfe-zero": ("--nfe", "0-3", "--out", OUT),
        "nfe-reversed": ("--nfe", "10-4", "--out", OUT),
        "nfe-huge": ("--nfe", "4-100000", "--out", OUT),
        "degrees-text": ("--nfe", "4-5", "--degrees", "a,b,c", "--out", OUT),
        "degrees-two": ("--nfe", "4-5", "--degrees", "1,2", "--out", OUT),
        "degrees-negative": ("--nfe", "4-5", "--degrees", "-1,0,0", "--out", OUT),
        "degrees-huge": ("--nfe", "4-5", "--degrees", "1000,0,0", "--out", OUT),
        "guidance-text": ("--nfe", "4-5", "--guidance", "a", "--out", OUT),
        "guidance-nan": ("--nfe", "4-5", "--guidance", "nan", "--out", OUT),
        "guidance-unconditional": ("--nfe", "4-5", "--guidance", "1,2", "--out", OUT),
        "solver-unknown": ("--nfe", "4-5", "--solver", "nope", "--out", OUT),
        "out-is-dir": ("--nfe", "4-5", "--out", "{o}"),
        "out-under-file": ("--nfe", "4-5", "--out", UNDER_FILE),
        "lr-nan": ("--nfe", "4-5", "--lr", "nan", "--out", OUT),
    }.items()],
    # ---------------------------------------------------------------- cpr apply
    *[case(f"cpr-apply-file-{c}", "cpr", "apply", "--cpr", f"{{w}}/c_{c}.json", "--schedule", UNIPC, "--model",
           "gmm2d", "--out", OUT) for c in CPR_FILES],
    case("cpr-apply-cpr-is-dir", "cpr", "apply", "--cpr", "{w}", "--schedule", UNIPC, "--out", OUT),
    case("cpr-apply-other-model", "cpr", "apply", "--cpr", CPR, "--schedule", UNIPC, "--model", "digits",
         "--out", OUT),
    case("cpr-apply-fingerprint-from-schedule", "cpr", "apply", "--cpr", CPR, "--schedule", "{w}/unipc_digits.json",
         "--out", OUT),
    case("cpr-apply-no-fingerprint", "cpr", "apply", "--cpr", CPR, "--schedule", UNIPC, "--out", OUT),
    case("cpr-apply-nfe-zero", "cpr", "apply", "--cpr", CPR, "--model", "gmm2d", "--nfe", 0, "--out", OUT),
    case("cpr-apply-nfe-huge", "cpr", "apply", "--cpr", CPR, "--model", "gmm2d", "--nfe", 100000, "--out", OUT),
    case("cpr-apply-guidance-unguided", "cpr", "apply", "--cpr", CPR, "--model", "gmm2d", "--nfe", 5,
         "--guidance", 2, "--out", OUT),
    case("cpr-apply-guidance-missing", "cpr", "apply", "--cpr", GCPR, "--model", "digits", "--nfe", 5, "--out", OUT),
    case("cpr-apply-guidance-nan", "cpr", "apply", "--cpr", GCPR, "--model", "digits", "--nfe", 5, "--guidance",
         "nan", "--out", OUT),
    case("cpr-apply-out-is-dir", "cpr", "apply", "--cpr", CPR, "--model", "gmm2d", "--nfe", 5, "--out", "{o}"),
    case("cpr-apply-out-under-file", "cpr", "apply", "--cpr", CPR, "--model", "gmm2d", "--nfe", 5, "--out",
         UNDER_FILE),
    case("cpr-apply-nfe-beyond-grid", "cpr", "apply", "--cpr", CPR, "--model", "gmm2d", "--nfe", 40, "--out", OUT,
         warns="NFE", check=_ratios_between(0.5, 1.5)),
    case("cpr-apply-guidance-beyond-grid", "cpr", "apply", "--cpr", GCPR, "--model", "digits", "--nfe", 5,
         "--guidance", 30, "--out", OUT, warns="guidance", check=_ratios_between(0.5, 1.5)),
    case("cpr-apply-schedule-missing", "cpr", "apply", "--cpr", CPR, "--schedule", "{w}/nope.json", "--out", OUT),
    # ---------------------------------------------------------------- report
    case("report-search-schedule-garbage", "report", "search", "--schedule", "{w}/s_garbage.json", "--out",
         "{o}/r"),
    case("report-search-no-metadata", "report", "search", "--schedule", GOOD, "--out", "{o}/r", "--cache",
         "{w}/c.sqlite"),
    case("report-search-out-is-file", "report", "search", "--schedule", GOOD, "--model", "gmm2d", "--out", GOOD,
         "--cache", "{w}/c.sqlite"),
    case("report-compare-nfe-text", "report", "compare", "--model", "gmm2d", "--nfe", "x", "--out", "{o}/r",
         "--no-cache"),
    case("report-compare-nfe-huge", "report", "compare", "--model", "gmm2d", "--nfe", "100000", "--baselines",
         "ddim", "--out", "{o}/r", "--no-cache"),
    case("report-compare-out-is-file", "report", "compare", "--model", "gmm2d", "--nfe", "3", "--baselines", "ddim",
         "--size", 8, "--out", GOOD, "--no-cache"),
    case("report-compare-schedule-missing", "report", "compare", "--model", "gmm2d", "--schedules",
         "{w}/nope.json", "--out", "{o}/r", "--no-cache"),
    case("report-compare-guidance-nan", "report", "compare", "--model", "gmm2d", "--nfe", "3", "--baselines",
         "ddim", "--guidance", "nan", "--out", "{o}/r", "--no-cache"),
    case("report-compare-guidance-unconditional", "report", "compare", "--model", "gmm2d", "--nfe", "3",
         "--baselines", "ddim", "--guidance", 2, "--size", 8, "--out", "{o}/r", "--no-cache"),
    case("report-compare-schedule-guided-unconditional", "report", "compare", "--model", "gmm2d", "--schedules",
         "{w}/good_guided.json", "--baselines", "none", "--size", 8, "--out", "{o}/r", "--no-cache"),
    case("eval-schedule-guided-unconditional", "eval", "--model", "gmm2d", "--schedule", "{w}/good_guided.json",
         "--size", 8, "--no-cache"),
    # ---------------------------------------------------------------- zoo
    case("zoo-train-unknown", "zoo", "train", "nope", "--out", "{o}/z"),
    case("zoo-train-steps-0", "zoo", "train", "digits", "--steps", 0, "--out", "{o}/z"),
    case("zoo-train-threads-huge", "zoo", "train", "digits", "--threads", 10**6, "--out", "{o}/z"),
    case("zoo-train-out-is-file", "zoo", "train", "digits", "--steps", 1, "--out", GOOD),
    case("zoo-export-format", "zoo", "export", "digits", "--format", "onnx", "--out", "{o}/z"),
    case("zoo-export-unknown", "zoo", "export", "nope", "--out", "{o}/z"),
    case("zoo-export-out-is-file", "zoo", "export", "digits", "--out", GOOD),
    case("zoo-export-out-under-file", "zoo", "export", "digits", "--out", "{w}/afile/z"),
    # ---------------------------------------------------------------- unknown commands and options
    case("unknown-command", "frobnicate"),
    case("unknown-option", "baseline", "ddim", "--model", "gmm2d", "--nfe", 5, "--out", OUT, "--bogus"),
]


# --------------------------------------------------------------------------------------------- workspace


def _deep(depth: int, open_: str, close: str, inner: str = "0") -> str:
    return open_ * depth + inner + close * depth


def _write_model_dirs(w: Path) -> None:
    from diffusers import DDPMScheduler, UNet2DModel

    import torch

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=4, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(4, 4),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=2, attention_head_dim=2)
    sched = DDPMScheduler(num_train_timesteps=100)
    ok = w / "m_ok"
    unet.save_pretrained(str(ok / "unet"))
    sched.save_pretrained(str(ok / "scheduler"))
    (ok / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers",
                                         "UNet2DModel"], "scheduler": ["diffusers", "DDPMScheduler"]}))
    weights = (ok / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    for d in MODEL_DIRS:
        target = w / f"m_{d}"
        for sub in ("unet", "scheduler"):
            (target / sub).mkdir(parents=True)
            for f in (ok / sub).iterdir():
                (target / sub / f.name).write_bytes(f.read_bytes())
        (target / "model_index.json").write_bytes((ok / "model_index.json").read_bytes())
    unet_cfg = json.loads((ok / "unet" / "config.json").read_text())
    (w / "m_no_index" / "model_index.json").unlink()
    (w / "m_index_list" / "model_index.json").write_text("[1, 2]")
    (w / "m_index_garbage" / "model_index.json").write_bytes(b"\x00\xff garbage")
    (w / "m_unet_config_list" / "unet" / "config.json").write_text("[]")
    (w / "m_unet_config_not_utf8" / "unet" / "config.json").write_bytes(b'{"a": "\xff\xfe"}')
    (w / "m_unet_config_deep" / "unet" / "config.json").write_text(_deep(200_000, "[", "]"))
    (w / "m_sched_config_list" / "scheduler" / "scheduler_config.json").write_text('["DDPMScheduler"]')
    (w / "m_sched_bad_betas" / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "num_train_timesteps": 100, "beta_start": -1.0, "beta_end": 3.0}))
    wpath = "unet/diffusion_pytorch_model.safetensors"
    (w / "m_weights_truncated" / wpath).write_bytes(weights[: len(weights) // 2])
    (w / "m_weights_garbage" / wpath).write_bytes(b"\x07" * 4096)
    (w / "m_weights_missing" / wpath).unlink()
    (w / "m_weights_pickle_bin" / wpath).unlink()
    (w / "m_weights_pickle_bin" / "unet" / "diffusion_pytorch_model.bin").write_bytes(
        pickle.dumps({"conv_in.weight": [1, 2, 3]}))
    (w / "m_unet_unknown_class" / "unet" / "config.json").write_text(json.dumps({**unet_cfg,
                                                                                "_class_name": "Transformer9"}))
    import shutil

    shutil.rmtree(w / "m_unet_dir_missing" / "unet")
    (w / "m_sample_size_str" / "unet" / "config.json").write_text(json.dumps({**unet_cfg, "sample_size": "big"}))
    (w / "m_in_channels_zero" / "unet" / "config.json").write_text(json.dumps({**unet_cfg, "in_channels": 0}))
    # loads, but 4 channels over heads of 8 give 0 attention heads: the forward divides by zero
    broken = w / "m_forward_fails"
    UNet2DModel.from_config({**unet_cfg, "attention_head_dim": 8}).save_pretrained(str(broken / "unet"))
    sched.save_pretrained(str(broken / "scheduler"))
    (broken / "model_index.json").write_bytes((ok / "model_index.json").read_bytes())
    sched_cfg = json.loads((ok / "scheduler" / "scheduler_config.json").read_text())
    for name, change in {"steps_text": {"num_train_timesteps": "many"}, "steps_huge": {"num_train_timesteps": 10**12},
                         "beta_text": {"beta_start": "small"}, "trained_betas_bad": {"trained_betas": ["a", 1]},
                         "prediction_list": {"prediction_type": ["epsilon"]}}.items():
        (w / f"m_sched_{name}" / "scheduler" / "scheduler_config.json").write_text(json.dumps({**sched_cfg, **change}))


def _write_schedule_files(w: Path) -> None:
    import dataclasses

    from autotune.models.registry import load_model
    from autotune.sampling.named import build
    from autotune.space.fileformat import save, to_dict

    gmm = load_model("gmm2d")
    good = build("dpmsolver++2m", gmm.noise, 5)
    save(good, w / "good.json")
    save(dataclasses.replace(good, guidance=2.0), w / "good_guided.json")
    save(build("unipc-bh2-o2", gmm.noise, 5), w / "unipc.json")
    save(build("ddim", gmm.noise, 2), w / "ddim2.json")
    digits = load_model("digits")
    save(dataclasses.replace(build("unipc-bh2-o2", gmm.noise, 5), metadata={
        "model_fingerprint": digits.fingerprint()}), w / "unipc_digits.json")
    save(dataclasses.replace(build("dpmsolver++2m", digits.noise, 3), guidance=2.0), w / "digits.json")
    save(build("ddim", gmm.noise, 2), w / "tiny.json")
    doc = to_dict(good)
    s = {
        "empty": "",
        "garbage": "\x01\x02 not json",
        "deep_list": _deep(200_000, "[", "]"),
        "deep_object": _deep(200_000, '{"a":', "}"),
        "list": "[1, 2, 3]",
        "nan": json.dumps(doc).replace('"t_start": 1.0', '"t_start": NaN'),
        "huge_int": json.dumps(doc).replace('"t_start": 1.0', '"t_start": ' + "9" * 5000),
        "too_many_steps": json.dumps({**{k: v for k, v in doc.items() if k not in ("nfe", "hash")},
                                      "steps": [{**doc["steps"][0], "t": 1 - (k + 1) / 5000, "order": 1}
                                                for k in range(5000)]}),
        "version_2": json.dumps({**doc, "schema_version": 2}),
        "bad_order": json.dumps({**doc, "steps": [{**doc["steps"][0], "order": 9}] + doc["steps"][1:]}),
        "t_outside": json.dumps({**doc, "t_start": 7.0}),
        "deep_metadata": json.dumps({**doc, "metadata": {}}).replace('"metadata": {}',
                                                                      '"metadata": ' + _deep(5000, '{"a":', "}")),
        "skip": json.dumps({**doc, "steps": [{**doc["steps"][0], "skip": ["unet.mid"]}] + doc["steps"][1:]}),
    }
    for name, text in s.items():
        (w / f"s_{name}.json").write_text(text)
    (w / "s_not_utf8.json").write_bytes(b'{"name": "\xff\xfe"}')


def _write_noise_and_labels(w: Path) -> None:
    np.save(w / "noise.npy", np.zeros((4, 2), np.float32))
    ok = np.random.default_rng(0).standard_normal((4, 2)).astype(np.float32)
    arrays = {
        "str": np.array([["a", "b"]] * 4), "complex": ok.astype(np.complex64), "bool": ok > 0,
        "nan": np.where(np.arange(8).reshape(4, 2) == 3, np.nan, ok).astype(np.float32),
        "inf": np.where(np.arange(8).reshape(4, 2) == 3, np.inf, ok).astype(np.float32),
        "shape3d": np.zeros((4, 2, 2), np.float32), "scalar": np.float32(1.0), "empty_batch": np.zeros((0, 2)),
        "one_d": np.zeros(2, np.float32), "overflows_float32": np.full((4, 2), 1e200),
    }
    for name, a in arrays.items():
        np.save(w / f"n_{name}.npy", a)
    np.save(w / "n_object.npy", np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True)
    (w / "n_garbage.npy").write_bytes(b"\x93NUMPY garbage")
    (w / "n_text.npy").write_text("1 2 3")
    np.savez(w / "n_npz.npy", a=ok)
    (w / "n_npz.npy.npz").rename(w / "n_npz.npy")
    labels = {"ok4": np.arange(4), "float": np.arange(4, dtype=np.float32), "short": np.arange(2),
              "two_d": np.zeros((4, 1), np.int64), "negative": np.array([0, -1, 2, 3]),
              "too_big": np.array([0, 1, 2, 10_000]), "str": np.array(["0", "1", "2", "3"])}
    for name, a in labels.items():
        np.save(w / f"l_{name}.npy", a)
    (w / "l_garbage.npy").write_bytes(b"garbage")
    (w / "prompts.txt").write_text("a cat\n")
    (w / "p_not_utf8.txt").write_bytes(b"a \xff cat\n")
    (w / "p_empty.txt").write_text("\n  \n")
    (w / "p_three.txt").write_text("a cat\na dog\na car\n")


def _write_cpr_files(w: Path) -> None:
    from autotune.models.registry import load_model
    from autotune.predictors.cpr import RatioSample, fit_cpr, save_cpr, to_dict

    def truth(x, g, n):
        return 1.0 + 0.05 * x * (1 + 0.1 * g) - 0.02 * x**2 + 0.001 * n

    def samples(nfes, guidances):
        return [RatioSample(n, g, tuple([1.0, 1.0] + [truth((k + 1) / n, g or 0.0, n) for k in range(2, n)]))
                for n in nfes for g in guidances]

    cpr = fit_cpr(samples((4, 5, 6, 7, 8), (None,)), load_model("gmm2d").fingerprint(), "unipc-bh2-o2")
    save_cpr(cpr, w / "cpr.json")
    save_cpr(fit_cpr(samples((4, 5, 6), (1.0, 2.0, 3.0)), load_model("digits").fingerprint(), "dpmsolver++2m"),
             w / "gcpr.json")
    doc = to_dict(cpr)
    texts = {
        "empty": "", "garbage": "\x00garbage", "deep": _deep(200_000, "[", "]"), "list": "[]",
        "tiny_scale": json.dumps({**doc, "scales": {"guidance": 1.0, "nfe": 1e-300}}),
        "scale_mismatch": json.dumps({**doc, "scales": {"guidance": 1.0, "nfe": 0.5}}),
        "huge_coefficients": json.dumps({**doc, "coefficients": (np.array(doc["coefficients"]) * 0 + 1e300).tolist()}),
        "nan_text": json.dumps(doc).replace('"nfe": 8.0', '"nfe": NaN'),
        "grid_nfe_str": json.dumps({**doc, "grid": {"nfe": ["4"], "guidance": [None]}}),
        "fingerprint_int": json.dumps({**doc, "model_fingerprint": 7}),
    }
    for name, text in texts.items():
        (w / f"c_{name}.json").write_text(text)
    (w / "c_not_utf8.json").write_bytes(b'{"kind": "\xff"}')


def _write_engine_dirs(w: Path) -> None:
    manifests = {"manifest_list": "[]", "manifest_garbage": "\x00\x01", "manifest_deep": _deep(200_000, "[", "]"),
                 "manifest_missing_key": json.dumps({"format": "autotune.engine", "version": 1}),
                 "manifest_bad_input": None}
    for name in ENGINE_DIRS:
        (w / f"e_{name}").mkdir()
    for name, text in manifests.items():
        if text is not None:
            (w / f"e_{name}" / "manifest.json").write_text(text)
    (w / "e_manifest_not_utf8" / "manifest.json").write_bytes(b'{"format": "\xff"}')
    from autotune.compile.manifest import FORMAT, MANIFEST, VERSION

    for name in ("manifest_missing_key", "manifest_bad_input"):
        doc = {"format": FORMAT, "version": VERSION}
        if name == "manifest_bad_input":
            doc.update(backend="torch", precision="fp32", artifact="../../etc/passwd", artifact_sha256="0",
                       inputs=[{"name": "noise", "dtype": "float32", "shape": ["batch", "x"]}], outputs=[],
                       model={}, schedule={}, parity={})
        (w / f"e_{name}" / MANIFEST).write_text(json.dumps(doc))


def _write_text_to_image(w: Path) -> None:
    """An untrained tiny Stable Diffusion directory (tests/tiny_sd.py) and a guided schedule for it."""
    import dataclasses

    from tiny_sd import make_tiny_sd_dir

    from autotune.models.registry import load_model
    from autotune.sampling.named import build
    from autotune.space.fileformat import save

    make_tiny_sd_dir(w / "sd", train_steps=0)
    save(dataclasses.replace(build("ddim", load_model(str(w / "sd")).noise, 2), guidance=3.0), w / "sd.json")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    pytest.importorskip("diffusers")
    w = tmp_path_factory.mktemp("bad_input")
    (w / "afile").write_text("a regular file")
    (w / "afolder").mkdir()
    (w / "garbage.bin").write_bytes(b"\x00\x01\x02 not a database" * 100)
    _write_model_dirs(w)
    _write_schedule_files(w)
    _write_noise_and_labels(w)
    _write_cpr_files(w)
    _write_engine_dirs(w)
    _write_text_to_image(w)
    return w


# --------------------------------------------------------------------------------------------- classification


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def classify(c: Case, result, out: Path) -> tuple[str, str]:
    """('clean' | 'traceback' | 'silent', why) of one finished case."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return "traceback", f"{type(result.exception).__name__}: {result.exception}"
    stderr = result.stderr.strip()
    if "Traceback" in result.output:
        return "traceback", result.output[-400:]
    if c.warns:
        lines = [ln for ln in stderr.splitlines() if ln.startswith("warning:")]
        if result.exit_code != 0 or not lines or c.warns not in " ".join(lines):
            return "silent", f"exit {result.exit_code}, expected a warning naming {c.warns!r}: {stderr[-300:]}"
        if c.check is not None and not c.check(out):
            return "silent", "warned, but the output fails its check"
        return "clean", ""
    if result.exit_code != 2:
        return "silent", f"exit {result.exit_code}: {result.output[-300:]}"
    left = _files(out)
    if left:
        return "silent", f"refused but left {[p.name for p in left]}"
    usage = "Usage:" in stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    # progress lines may come first (a search refuses an unknown objective after its first evaluation)
    one_line = len(errors) == 1 and stderr.splitlines()[-1] == errors[0]
    if not (usage or one_line):
        return "silent", f"exit 2 without one error line: {stderr[-300:]}"
    return "clean", ""


RESULTS: dict[str, tuple[str, str]] = {}


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_cleanly(c: Case, workspace: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    args = [a.format(w=workspace, o=out) for a in c.args]
    result = runner.invoke(app, args, env={"AUTOTUNE_CACHE": str(workspace / "default.sqlite"), "COLUMNS": "200"})
    verdict = RESULTS[c.id] = classify(c, result, out)
    assert verdict[0] == "clean", f"{c.id}: {verdict[0]}: {verdict[1]}"


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 150


def test_counts() -> None:
    """Runs last (file order): the counts of the cases run in this session, printed for the report."""
    counts = {k: sum(v[0] == k for v in RESULTS.values()) for k in ("clean", "traceback", "silent")}
    print(f"\nbad-input suite: {counts['clean']} clean, {counts['traceback']} traceback, {counts['silent']} silent "
          f"(of {len(RESULTS)} run)")
    for cid, (verdict, why) in RESULTS.items():
        if verdict != "clean":
            print(f"  {verdict:9s} {cid}: {why[:200]}")
    assert counts["traceback"] == counts["silent"] == 0


# --------------------------------------------------------------------------------------------- the library side


def _grid_cpr():
    from autotune.predictors.cpr import RatioSample, fit_cpr

    def truth(x, g, n):
        return 1.0 + 0.05 * x * g - 0.01 * n * x**2

    return fit_cpr([RatioSample(n, g, tuple([1.0, 1.0] + [truth((k + 1) / n, g, n) for k in range(2, n)]))
                    for n in (4, 6, 8) for g in (1.0, 2.0, 3.0)], "fp", "unipc-bh2-o2")


def test_cpr_clamps_outside_its_grid_and_says_which():
    from autotune.predictors.cpr import features

    cpr = _grid_cpr()
    assert cpr.outside_grid(6, 2.0) == []
    far = cpr.predict(40, 2.0)
    # the polynomial evaluated at the grid's edge (N = 8), at the 40 steps' own positions
    edge = [float(features(((k + 1) / 40, 2.0, 8), cpr.degrees, cpr.scales) @ cpr.coefficients.ravel())
            for k in range(2, 40)]
    assert list(far[2:]) == pytest.approx(edge) and all(0.5 < r < 1.5 for r in far)
    assert [n.split(" is ")[0] for n in cpr.outside_grid(40, 30.0)] == ["NFE 40", "guidance 30"]
    assert cpr.predict(5, 30.0) == cpr.predict(5, 3.0)
    assert cpr.predict(2, 0.5) == (1.0, 1.0)


def test_cpr_refuses_absurd_files_and_predictions():
    import dataclasses

    from autotune.predictors.cpr import CPRError, loads, to_dict

    cpr = _grid_cpr()
    doc = to_dict(cpr)
    with pytest.raises(CPRError, match="scales"):
        loads(json.dumps({**doc, "scales": {"guidance": 3.0, "nfe": 1e-300}}), "c.json")
    assert loads(json.dumps(doc)).predict(5, 2.0) == cpr.predict(5, 2.0)
    wild = dataclasses.replace(cpr, coefficients=cpr.coefficients * 0 + 1e300)
    with pytest.raises(CPRError, match="outside"):
        wild.predict(5, 2.0)
    with pytest.raises(CPRError, match="finite"):
        cpr.predict(5, float("nan"))


def test_executor_refuses_noise_that_cannot_give_samples():
    import dataclasses

    import torch

    from autotune.errors import SamplingError
    from autotune.models.registry import load_model
    from autotune.sampling.executor import sample
    from autotune.sampling.named import build

    m = load_model("gmm2d", torch.float64)
    s = build("ddim", m.noise, 3)
    ok = torch.zeros(2, 2, dtype=torch.float64)
    assert torch.isfinite(sample(m, s, ok).sample).all()
    for bad, why in ((torch.full((2, 2), float("nan")), "NaN"), (torch.zeros(2, 2, dtype=torch.int64), "floating"),
                     (torch.zeros(0, 2), "at least one")):
        with pytest.raises(SamplingError, match=why):
            sample(m, s, bad)
    with pytest.raises(SamplingError, match="t_start"):
        sample(m, dataclasses.replace(s, t_start=7.0), ok)


def test_write_atomically_leaves_nothing_behind(tmp_path):
    from autotune.errors import OutputError
    from autotune.space.fileformat import write_atomically

    (tmp_path / "afile").write_text("x")
    for target in (tmp_path, tmp_path / "afile" / "out.json"):
        with pytest.raises(OutputError):
            write_atomically(target, "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    assert write_atomically(tmp_path / "new" / "o.bin", b"\x00").read_bytes() == b"\x00"
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("content, why", [(b"[" * 100_000, "nested too deeply"), (b'{"a": "\xff"}', "UTF-8"),
                                          (b'{"a": NaN}', "NaN"), (b"{", "not valid JSON")])
def test_read_json_file_turns_every_failure_into_one_error(tmp_path, content, why):
    from autotune.errors import ModelError
    from autotune.space.fileformat import read_json_file

    path = tmp_path / "c.json"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=why):
        read_json_file(path, ModelError, "config file")
    with pytest.raises(ModelError, match="is a directory"):
        read_json_file(tmp_path, ModelError, "config file")
