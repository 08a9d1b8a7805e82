"""Smoke runs of the benchmark suite at tiny sizes, so the benchmarks cannot go stale.

Every module's ``run`` → ``markdown`` → ``plot`` path runs on tiny problems (the size tables are
patched); the figures are checked for shape and sanity, not speed (timed assertions never go in
tests).
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import check_figures

import entnorm_jax as en

# The benchmarks package lives at the repository root, next to tests/.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import accuracy, common, core, memory, peers, scaling  # noqa: E402
from benchmarks import run as suite  # noqa: E402


def _positive_times(times: dict) -> None:
  for name, t in times.items():
    assert t["q25_s"] <= t["median_s"] <= t["q75_s"], name
    assert t["median_s"] > 0, name


def test_time_calls_interleaves_and_orders_quantiles():
  x = jax.random.normal(jax.random.key(3), (32, 32))
  f = common.compile_ahead(lambda x: jnp.tanh(x) @ x, x)
  g = common.compile_ahead(lambda x: jnp.sum(x), x)
  times = common.time_calls(
    {"f": (f, (x,)), "g": (g, (x,))}, repeats=4, min_sample_s=1e-4, warmup_s=0.01
  )
  assert set(times) == {"f", "g"} and all(t["samples"] == 4 for t in times.values())
  _positive_times(times)
  # Each function is called for warmup_s before it is timed (4 samples of ~0.1 ms take far less).
  calls = []
  h = lambda x: calls.append(time.perf_counter()) or x
  common.time_calls({"h": (h, (x,))}, repeats=4, min_sample_s=0.0, warmup_s=0.2)
  assert calls[-1] - calls[0] >= 0.2
  with pytest.raises(ValueError, match="at least one"):
    common.time_calls({}, repeats=3)


def test_environment_names_the_machine():
  env = common.environment()
  for key in ("jax", "jaxlib", "backend", "device_kind", "cpu_model"):
    assert isinstance(env[key], str) and env[key], key
  json.dumps(env)


def test_unrolled_baseline_converges_to_the_core_and_its_gradient():
  # The speed baseline must be a correct one: once its plain Newton steps converge, its output
  # and its autodiff gradient are the core's (whose gradient the gradient tests check).
  x, target, w = core.random_problem(5, (48, 24))
  loss = lambda f: jax.jit(jax.grad(lambda x: jnp.sum(w * f(x))))
  ours = lambda x: en.entropy_softmax(x, target)
  unrolled = lambda x: core.unrolled_entropy_softmax(x, target, 8)
  # The core stops within 2e-6·log n nats of the target; q moves by about as much.
  np.testing.assert_allclose(unrolled(x), ours(x), atol=1e-5)
  np.testing.assert_allclose(loss(unrolled)(x), loss(ours)(x), atol=2e-4)
  assert core._unrolled_steps(x, target, 1e-4) <= 8


def test_core_run_tiny(monkeypatch, tmp_path, figures):
  monkeypatch.setattr(core, "SHAPES", ((24, 48),))
  monkeypatch.setattr(core, "SHORT_SHAPES", ((64, 5),))
  monkeypatch.setattr(core, "FORWARD_BARS", {(3, 48): 5.0})
  monkeypatch.setattr(core, "SHORT_BARS", {(8, 5): 6.0})
  monkeypatch.setattr(core, "OPTIMISTIX_SHAPES", {(3, 48)})
  monkeypatch.setattr(core, "COMPILE_SHAPE", (16, 40))
  result = core.run(quick=True)
  per, short = result["shapes"]
  assert per["shape"] == [3, 48] and short["shape"] == [8, 5]
  for one in (per, short):
    _positive_times(one["times"])
    assert one["error"]["entropy_softmax"] < 1e-3
    assert one["grad_max_abs_error_vs_float64"]["grad entropy_softmax"] < 1e-4
  assert "optimistix Newton" in per["times"] and "optimistix Newton" not in short["times"]
  assert len(result["bars"]) == 4 and all(isinstance(b["met"], bool) for b in result["bars"])
  assert result["compile"]["shape"] == [2, 40]
  for seconds in result["compile"]["seconds"].values():
    assert 0 < seconds["trace_lower_s"] and 0 < seconds["compile_s"] < float("inf")
  json.dumps(result)
  assert "Targets" in core.markdown(result) and "Compile seconds" in core.markdown(result)
  assert core.plot(result, tmp_path) == [tmp_path / "core.png"]
  check_figures(figures, ["core.png"])


def test_accuracy_run_tiny(monkeypatch, tmp_path, figures):
  monkeypatch.setattr(accuracy, "SIZES", {True: (1, 24, 2)})
  result = accuracy.run(quick=True)
  curves = result["float32"]
  assert set(curves) == {"core", "seed Newton", "bisection"}
  for curve in curves.values():
    assert len(curve) == 3 and set(curve[0]) == set(accuracy.FAMILIES)
  # Two safeguarded Halley iterations already beat the seed's two Newton steps on Gaussians.
  assert curves["core"][2]["gauss 1"]["max"] < curves["seed Newton"][2]["gauss 1"]["max"]
  assert "float32" in accuracy.markdown(result)
  accuracy.plot(result, tmp_path)
  check_figures(figures, ["accuracy.png"])


def test_accuracy_families_are_random_and_nonconstant():
  rng = np.random.default_rng(0)
  for name in accuracy.FAMILIES:
    z = accuracy.family_logits(name, rng, 3, 16)
    assert z.shape == (3, 16) and np.all(np.isfinite(z)) and np.all(np.ptp(z, axis=1) > 0), name
  with pytest.raises(ValueError, match="unknown family"):
    accuracy.family_logits("cauchy", rng, 1, 4)


def test_scaling_run_tiny(monkeypatch, tmp_path, figures):
  monkeypatch.setattr(scaling, "SIZES", {True: (64, (16,), ())})
  result = scaling.run(quick=True)
  assert [(r["batch"], r["n"]) for r in result["by_length"]] == [(4, 16)] and not result["by_batch"]
  assert result["by_length"][0]["ratio_forward"] > 0 and result["by_length"][0]["ratio_grad"] > 0
  assert "row length sweep" in scaling.markdown(result)
  scaling.plot(result, tmp_path)
  check_figures(figures, ["scaling.png"])


def test_peers_run_tiny(monkeypatch, tmp_path, figures):
  monkeypatch.setattr(peers, "SHAPES", {True: (4, 32)})
  # optimistix and the unrolled reference are exercised by test_core_run_tiny; cheap stand-ins
  # here keep this test to the peers' own code (bisection, brentq, tables, plot).
  monkeypatch.setattr(peers, "optimistix_entropy_softmax", lambda x, t, atol: jax.nn.softmax(x))
  monkeypatch.setattr(peers, "unrolled_entropy_softmax", lambda x, t, n: jax.nn.softmax(x))
  result = peers.run(quick=True)
  _positive_times(result["times"])
  assert result["error"]["scipy brentq"] < 1e-6
  # Bisection is run to the core's accuracy (measured on the same rows; rounding aside).
  assert result["error"]["bisection (t-SNE)"] <= 2 * result["tolerance"]
  assert "Peers" in peers.markdown(result)
  peers.plot(result, tmp_path)
  check_figures(figures, ["peers.png"])


def test_memory_measure_and_render(tmp_path, figures):
  row = memory.measure_here("implicit", 2, (4, 64))
  assert row["xla_temp_bytes"] > 0 and row["peak_bytes"] >= 0
  result = {"name": "memory", "shape": [4, 64], "input_bytes": 1024, "rows": [row]}
  result["rows"].append(dict(row, method="unrolled"))
  assert "unrolled peak" in memory.markdown(result)
  memory.plot(result, tmp_path)
  check_figures(figures, ["memory.png"])
  with pytest.raises(ValueError, match="method"):
    memory.measure_here("adjoint", 1, (2, 8))


def test_suite_runner_writes_the_results_folder(monkeypatch, tmp_path):
  class Fake:
    @staticmethod
    def run(quick=False):
      return {
        "name": "fake",
        "quick": quick,
        "times": {"f": {"median_s": 1e-3, "q25_s": 9e-4, "q75_s": 2e-3}},
        "ratio": 1.5,
      }

    @staticmethod
    def plot(result, path):  # the one-file form: the runner picks the name
      path.write_bytes(b"png")

  class Broken:
    @staticmethod
    def run(quick=False):
      raise RuntimeError("boom")

  monkeypatch.setattr(suite, "load_modules", lambda only=None: {"fake": Fake, "broken": Broken})
  result = suite.run_suite(True, tmp_path, None)
  saved = json.loads((tmp_path / "run.json").read_text())
  assert saved["modules"]["fake"]["ratio"] == 1.5 and "boom" in saved["failed"]["broken"]
  text = (tmp_path / "run.md").read_text()
  assert "## fake" in text and "FAILED" in text
  # Each module's files as its own command writes them (one rule for where results go).
  assert json.loads((tmp_path / "fake.json").read_text())["ratio"] == 1.5
  assert "## fake" in (tmp_path / "fake.md").read_text()
  assert set(result["wall_s"]) == {"fake", "broken"}
  assert result["plots"] == ["fake.png"] and (tmp_path / "fake.png").exists()


def test_results_go_to_one_place(tmp_path):
  assert common.out_dir(None, quick=False) == common.RESULTS_DIR
  assert common.out_dir(None, quick=True) == common.QUICK_DIR != common.RESULTS_DIR
  assert common.out_dir(tmp_path, quick=True) == tmp_path == common.out_dir(tmp_path, quick=False)
  # --plot-only redraws from the saved JSON and runs nothing.
  drawn = []

  def plot(result, path):
    drawn.append(result)
    path.write_bytes(b"png")

  common.save_json({"ratio": 1.5}, tmp_path / "fake.json")
  never = lambda quick: pytest.fail("--plot-only ran the benchmark")
  common.module_main("fake", "Fake.", never, str, plot, ["--out", str(tmp_path), "--plot-only"])
  assert drawn == [{"ratio": 1.5}] and (tmp_path / "fake.png").exists()


def test_suite_knows_its_modules():
  modules = suite.load_modules(["core", "memory"])
  assert list(modules) == ["core", "memory"]
  with pytest.raises(ValueError, match="unknown benchmark"):
    suite.load_modules(["nope"])


def test_model_compile_run_tiny(monkeypatch, tmp_path, figures):
  from benchmarks import model_compile

  # One layer, scanned only (nn.scan over the block is the path most likely to break), no
  # warm-up: four compiles in all, well under 30 s on a 2-core CPU.
  tiny = {"layers": (1,), "length": 8, "batch": 1, "repeats": 1, "step_s": 0.0}
  monkeypatch.setitem(model_compile.SIZES, True, tiny)
  monkeypatch.setattr(model_compile, "LAYOUTS", ("scanned",))
  monkeypatch.setattr(model_compile, "WARM_UP", False)
  result = model_compile.run(quick=True)
  (row,) = result["rows"]
  assert (row["layout"], row["layers"]) == ("scanned", 1) and result["bar"] == []
  for attention in model_compile.ATTENTIONS:
    seconds = row["compile"][attention]
    for phase in ("trace_s", "lower_s", "compile_s", "trace_lower_s", "total_s"):
      assert 0 < seconds[phase] < float("inf"), (attention, phase)
    assert len(seconds["repeats"]) == 1
  _positive_times(row["step"])
  for key in ("compile_total", "trace_lower", "xla_compile", "step"):
    assert 0 < row[f"ratio/{key}"] < float("inf"), key
  json.dumps(result)
  assert "compile ratio" in model_compile.markdown(result)
  assert model_compile.plot(result, tmp_path) == [tmp_path / "model_compile.png"]
  check_figures(figures, ["model_compile.png"])
