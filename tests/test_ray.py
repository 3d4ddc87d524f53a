"""Ray: actors that hold the model score like the in-process pool, a killed worker is retried, and a search
runs against a real `ray start --head` cluster on loopback."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray")

from autotune.evaluate.evaluator import Evaluator  # noqa: E402
from autotune.models.registry import load_model  # noqa: E402
from autotune.sampling.named import NAMED, build  # noqa: E402
from autotune.search.runner import EvaluatorSpec, InProcessPool, RayPool  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="module")
def local_pool():
    model = load_model("gmm2d")
    evaluator = Evaluator(model, "search", size=16)
    ref = evaluator.reference(None)
    spec = EvaluatorSpec("gmm2d", "search", 16, 0, None, evaluator.ref_steps)
    pool = RayPool(spec, 2, references={evaluator.reference_version(None): ref})
    yield pool, evaluator, model
    pool.close()
    ray.shutdown()


def test_ray_pool_scores_like_the_in_process_pool(local_pool):
    pool, evaluator, model = local_pool
    schedules = [build(n, model.noise, k) for n in NAMED for k in (4, 6)]
    remote = pool.map(schedules)
    local = InProcessPool(evaluator).map(schedules)
    assert [r["nfe"] for r in remote] == [s.nfe for s in schedules]
    for r, m in zip(remote, local):
        assert abs(r["mse_ref"] - m["mse_ref"]) <= 1e-6 * max(1.0, m["mse_ref"])
    assert len(set(pool.worker_pids())) == 2  # two separate worker processes


def test_the_local_rays_workers_run_at_the_jobs_priority(local_pool):
    """Ray's default worker niceness (15) starved the workers beside any other busy process while the driver, at
    this process's priority, waited for them: the private Ray's workers run at the driver's niceness."""
    pool, _, _ = local_pool
    pids = pool.worker_pids()
    assert len(pids) == 2 and all(os.getpriority(os.PRIO_PROCESS, pid) == os.nice(0) for pid in pids)


def test_a_killed_worker_is_retried(local_pool):
    pool, _, model = local_pool
    os.kill(pool.worker_pids()[0], signal.SIGKILL)
    schedules = [build(n, model.noise, 5) for n in NAMED]
    results = pool.map(schedules)
    assert len(results) == len(schedules) and all(r["nfe"] == 5 for r in results)
    assert pool.restarts >= 1


def test_ray_workers_time_candidates_for_the_latency_objective(local_pool):
    from autotune.search.latency import LatencySpec

    pool, _, model = local_pool
    pool.latency = LatencySpec(batch=4, repeats=2)  # measured on the actor that scores the candidate
    try:
        results = pool.map([build("ddim", model.noise, 4), build("ddim", model.noise, 8)])
    finally:
        pool.latency = None
    assert all(r["latency_ms"] > 0 for r in results)
    assert "latency_ms" not in pool.map([build("ddim", model.noise, 4)])[0]


def test_held_out_sets_sample_on_the_workers_as_they_would_here(local_pool):
    """RayPool.sample_split as an Evaluator's sampler: a validation set's reference and scores come from the
    workers' slices and equal the driver's own (float rounding of other batch sizes aside), progress included."""
    import torch

    from autotune.sampling.executor import sample_in_chunks

    pool, _, model = local_pool
    assert pool.model_fingerprint() == model.fingerprint()
    s = build("unipc-bh2-o3", model.noise, 5)
    noise = torch.randn(256, *model.sample_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    heard = []
    split = pool.sample_split(model, s, noise, keep_states=True, callback=lambda k, x: heard.append(x.shape[0]))
    here = sample_in_chunks(model, s, noise, keep_states=True)
    torch.testing.assert_close(split.sample, here.sample, rtol=1e-6, atol=1e-9)
    assert len(split.states) == len(here.states) and split.nfe == here.nfe
    assert sum(heard) == len(s.steps) * 256  # every sample-step reported, as sample_in_chunks does
    local, remote = Evaluator(model, "validation", size=256), Evaluator(model, "validation", size=256)
    remote.sampler = pool.sample_split
    a, b = local.evaluate(s), remote.evaluate(s)
    assert abs(a["mse_ref"] - b["mse_ref"]) <= 1e-5 * a["mse_ref"]
    torch.testing.assert_close(local.reference(None, nfe=5).final, remote.reference(None, nfe=5).final)
    small = pool.sample_split(model, s, noise[:100])  # under two slices' worth: sampled here
    torch.testing.assert_close(small.sample, here.sample[:100], rtol=1e-6, atol=1e-9)


def test_the_refinement_gradient_sums_the_workers_slices(local_pool):
    """RayPool.gradient_split: each worker's error sum and gradient on its slice of the noise add up to the
    driver's own on all of it; under two slices' worth it declines (the refinement computes here)."""
    import torch

    from autotune.search.gradient import error_sum

    pool, _, model = local_pool
    while pool._starting:  # the killed worker's replacement (an earlier test): two slices need two workers
        pool._wait_for_a_worker(time.monotonic())
    s = build("unipc-bh2-o3", model.noise, 5)
    noise = torch.randn(160, *model.sample_shape, generator=torch.Generator().manual_seed(1))
    target = torch.randn(160, *model.sample_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    values = {"times": torch.tensor(s.times, dtype=torch.float64), "shifts": torch.full((5,), 0.1, dtype=torch.float64),
              "ratios": None}
    split = pool.gradient_split(model, s, noise, None, target, 2)
    total, grads = split(values)
    here_total, here_grads = error_sum(model, s, noise, None, target, 2, values)
    assert total == pytest.approx(here_total, rel=1e-6) and set(grads) == {"times", "shifts"}
    for k in grads:  # float32 states in other batch sizes; d/dt at t = 0 is nan (log-SNR infinite) in both
        torch.testing.assert_close(grads[k], here_grads[k], rtol=1e-5, atol=1e-9, equal_nan=True)
    assert grads["shifts"].abs().sum() > 0
    assert pool.gradient_split(model, s, noise[:100], None, target[:100], 2) is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_search_on_a_ray_cluster_started_with_ray_start(tmp_path):
    """`ray start --head --block` in its own process group, so stopping it touches no other Ray on the machine."""
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out = tmp_path / "s.json"
        cmd = [sys.executable, "-m", "autotune.cli", "search", "--model", "gmm2d", "--nfe", "4", "--budget", "16",
               "--workers", "2", "--address", f"127.0.0.1:{port}", "--cache", str(tmp_path / "c.sqlite"),
               "--refine", "0", "--validate", "0", "--report-size", "64", "--out", str(out)]  # the loop is the test
        for attempt in range(30):  # the head needs a few seconds before it accepts drivers
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
            if done.returncode == 0 or "cannot join" not in done.stderr or head.poll() is not None:
                break
            time.sleep(1)
        assert done.returncode == 0, done.stderr[-3000:]
        assert out.exists() and "16 true evaluations" in done.stdout.replace("\n", " ")
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:  # a graceful `ray start --block` exit took 33-60 s here; its whole group dies at once on SIGKILL
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
