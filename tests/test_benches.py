"""The benchmark harness measures what it says: fresh gradients outside the
timer, a probe that streams the arrays it claims, cache labels, per-round
ratios, and a README block generated from the results (benches/)."""

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import oxoptim

BENCHES = Path(__file__).resolve().parent.parent / "benches"
sys.path.insert(0, str(BENCHES))

import bandwidth  # noqa: E402
import bench_report  # noqa: E402
import compare_torch  # noqa: E402
import per_optimizer  # noqa: E402
import readme_perf  # noqa: E402

LLC = 32 * 2**20


def _params(n=3):
    return [torch.nn.Parameter(torch.zeros(5)) for _ in range(n)]


def test_fresh_gradients_are_new_tensors_at_new_addresses():
    # 100k elements: a size glibc hands straight back when a block is freed before the next is made
    params = [torch.nn.Parameter(torch.zeros(100_000)) for _ in range(3)]
    grads = [torch.full((100_000,), float(i)) for i in range(3)]
    compare_torch._give_grads(params, grads, "fresh")
    for _ in range(3):
        before = [(p.grad, p.grad.data_ptr()) for p in params]
        compare_torch._give_grads(params, grads, "fresh")
        for p, g, (old, old_ptr) in zip(params, grads, before):
            assert p.grad is not g and p.grad is not old
            assert p.grad.data_ptr() != old_ptr  # the previous copy was alive while this one was made
            assert torch.equal(p.grad, g)


def test_fresh_copies_are_made_while_the_previous_gradients_are_alive(monkeypatch):
    # What guarantees the new addresses whatever the allocator does.
    params = _params()
    grads = [torch.ones(5) for _ in range(3)]
    compare_torch._give_grads(params, grads, "fresh")
    alive_at_copy = []
    real_clone = torch.Tensor.clone

    def watching_clone(self, *a, **kw):
        alive_at_copy.append(all(p.grad is not None for p in params))
        return real_clone(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "clone", watching_clone)
    compare_torch._give_grads(params, grads, "fresh")
    assert alive_at_copy == [True, True, True]


def test_reused_gradients_are_the_shared_tensors():
    params = _params()
    grads = [torch.ones(5) for _ in range(3)]
    compare_torch._give_grads(params, grads, "reused")
    assert all(p.grad is g for p, g in zip(params, grads))


def test_each_timed_fresh_step_sees_a_new_gradient_and_reused_steps_the_same_one():
    params = _params(1)
    grads = [torch.ones(5)]
    seen = []
    contender = compare_torch.Contender(lambda: seen.append(params[0].grad), params)
    compare_torch._timed_block(contender, grads, "fresh", 4)
    assert len({id(g) for g in seen}) == 4 and all(g is not grads[0] for g in seen)
    assert params[0].grad is None  # a contender's copies are released after its block
    seen.clear()
    compare_torch._timed_block(contender, grads, "reused", 4)
    assert len(seen) == 5 and all(g is grads[0] for g in seen)  # one untimed settling step, then 4 timed


def test_making_fresh_gradients_is_outside_the_timer(monkeypatch):
    params = _params(2)
    grads = [torch.ones(5), torch.ones(5)]
    real_clone = torch.Tensor.clone

    def slow_clone(self, *a, **kw):
        time.sleep(0.02)
        return real_clone(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "clone", slow_clone)
    per_step = compare_torch._timed_block(compare_torch.Contender(lambda: None, params), grads, "fresh", 3)
    assert per_step < 0.005  # each step's two copies took 40 ms, none of it timed


def test_cases_declare_the_streams_of_their_kernels():
    by_name = {c.name: c for c in compare_torch.cases([])}
    assert (by_name["SGD momentum"].reads, by_name["SGD momentum"].writes) == (3, 2)
    assert (by_name["Adam"].reads, by_name["Adam"].writes) == (4, 3)
    assert (by_name["AdamW"].reads, by_name["AdamW"].writes) == (4, 3)
    assert all((c.reads, c.writes) in bandwidth.PATTERNS for c in by_name.values())
    assert not by_name["EMA averaging"].reads_grads


def test_cache_labels():
    assert bandwidth.cache_label(LLC, LLC) == "fits in LLC"
    assert bandwidth.cache_label(2 * LLC, LLC) == "2.0× LLC"
    assert bandwidth.cache_label(4 * LLC - 1, LLC) == "4.0× LLC"
    assert bandwidth.cache_label(4 * LLC, LLC) is None


def test_cache_sizes_parse_and_the_llc_is_found():
    assert bandwidth._parse_size("32768K") == 32 * 2**20
    assert bandwidth._parse_size("1 MiB") == 2**20
    assert bandwidth._parse_size("512") == 512
    size, source = bandwidth.llc_bytes()
    assert size >= 2**20 and source
    assert bandwidth.probe_elements(size) * bandwidth.F32 == bandwidth.DRAM_FACTOR * size


def _expected_checksum(n: int, reps: int) -> float:
    """What stream_probe computes: float32 arithmetic on element n // 2 of each array, in each of its four layouts."""
    c = np.float32(0.999)
    a = [np.float32(1.0) / np.float32(k + 2.0) for k in range(4)]
    for _ in range(reps):  # 2:1
        a[0] = a[0] * c + a[1]
    for _ in range(reps):  # 3:2
        a[1] = a[1] * c + a[2]
        a[0] = a[0] * c + a[1]
    for _ in range(reps):  # 4:3
        a[1] = a[1] * c + a[3]
        a[2] = a[2] * c + a[3]
        a[0] = a[0] * c + a[1] + a[2]
    return sum(float(x) for x in a * 4)


@pytest.mark.skipif(shutil.which("rustc") is None, reason="rustc absent: the probe cannot be built")
def test_probe_streams_every_array_of_every_pattern():
    n, reps = 100_003, 3  # odd length: both threads' chunks and the tail are covered
    exe = bandwidth._probe_binary()
    out = subprocess.run([str(exe), str(n), "2", str(reps)], capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    assert all(data[f"{r}:{w}"] > 0 for r, w in bandwidth.PATTERNS)
    # The ceiling of each mix is the best of the layouts (same-offset or staggered arrays, chunks or one piece per thread).
    assert set(data["layouts"]) == {"aligned chunks", "aligned pieces", "staggered chunks", "staggered pieces"}
    assert all(data[f"{r}:{w}"] == max(lay[f"{r}:{w}"] for lay in data["layouts"].values()) for r, w in bandwidth.PATTERNS)
    assert data["uniform"] is True  # every element, both threads' chunks and the tail, was updated alike
    assert struct.pack("d", data["checksum"]) == struct.pack("d", _expected_checksum(n, reps))


def test_engine_probe_runs_every_mix_in_both_layouts_and_joins_the_roofline(monkeypatch):
    out = bandwidth.engine_probe(50_003, 2, 2)
    for r, w in bandwidth.PATTERNS:
        layouts = [out[f"{layout} {r}:{w}"] for layout in ("separate", "staggered")]
        assert min(layouts) > 0 and out[f"{r}:{w}"] == max(layouts)
    # The roofline keeps, per mix, the better of the two probes and records each.
    rust = {"2:1": 10.0, "3:2": 99.0, "4:3": 30.0}
    engine = {"2:1": 20.0, "3:2": 15.0, "4:3": 31.0}
    monkeypatch.setattr(bandwidth, "_run_probe", lambda *a: dict(rust))
    monkeypatch.setattr(bandwidth, "engine_probe", lambda *a: dict(engine))
    monkeypatch.setattr(bandwidth, "torch_inplace_gbps", lambda *a: 1.0)
    roof = bandwidth.Roofline(LLC, "test", 1000, 2, {}, [], 0.0)
    roof.remeasure(1)
    assert roof.gbps == {(2, 1): 20.0, (3, 2): 99.0, (4, 3): 31.0}
    assert roof.runs[0]["engine 4:3"] == 31.0 and roof.runs[0]["stream_probe.rs 4:3"] == 30.0
    data = _synthetic()
    data["roofline"] = roof.to_json()
    header = "\n".join(bench_report.header_lines(data))
    assert "oxoptim's engine (`_core.stream_probe`) 2:1 20.0, 3:2 15.0, 4:3 31.0" in header
    assert "`stream_probe.rs` 2:1 10.0, 3:2 99.0, 4:3 30.0" in header


def test_a_capped_probe_uses_smaller_arrays_and_says_so(monkeypatch):
    """``--probe-mib`` (CI's smoke run) caps the probe's arrays below 4 LLCs, and the summary and
    the report header say that the % columns then read low; uncapped, neither says it."""
    monkeypatch.setattr(bandwidth, "llc_bytes", lambda: (LLC, "test"))
    seen = []
    monkeypatch.setattr(bandwidth.Roofline, "remeasure", lambda self, reps: seen.append(self.elements))
    full = bandwidth.measure_roofline(1)
    capped = bandwidth.measure_roofline(1, max_mib=2)
    assert seen == [bandwidth.probe_elements(LLC), 2 * 2**20 // bandwidth.F32]
    assert not full.capped() and capped.capped() and bandwidth.measure_roofline(1, max_mib=10**6).capped() is False
    for roof in (full, capped):
        roof.gbps = {mix: 10.0 for mix in bandwidth.PATTERNS}
        roof.runs = [{f"{r}:{w}": 10.0 for r, w in bandwidth.PATTERNS}]
        data = _synthetic()
        data["roofline"] = roof.to_json()
        header = "\n".join(bench_report.header_lines(data))
        assert ("capped" in roof.summary()) == ("capped by --probe-mib" in header) == (roof is capped)


def test_engine_probe_staggers_its_arrays_like_stream_probe_rs_whatever_their_length(monkeypatch):
    # Array k must start k·STAGGER floats further into a page than array 0, as in stream_probe.rs;
    # 8944 floats + STAGGER is a whole number of pages, which would put all four at one offset.
    from oxoptim import _core

    seen = []
    monkeypatch.setattr(_core, "stream_probe", lambda lists, **kw: seen.append([t.data_ptr() for (t,) in lists]) or True)
    for elements in (8944, 50_003, 1 << 14):
        bandwidth.engine_probe(elements, 1, 1)
        staggered = seen[-1]  # the last call: the staggered layout's 4:3 mix
        assert [(a - staggered[0]) % 4096 for a in staggered] == [k * bandwidth.STAGGER * 4 % 4096 for k in range(4)], elements


def test_engine_probe_frees_one_layout_before_making_the_next(monkeypatch):
    # Each layout is 4 arrays of 4 LLCs: both alive at once would double the probe's peak memory.
    import weakref

    from oxoptim import _core

    separate, alive = [], []

    def probe(lists, **kw):
        arrays = [t for (t,) in lists]
        if arrays[0]._base is None:
            separate.extend(weakref.ref(t) for t in arrays)
        else:  # a view of the staggered layout's buffer
            alive.append(sum(ref() is not None for ref in separate))
        return True

    monkeypatch.setattr(_core, "stream_probe", probe)
    bandwidth.engine_probe(1000, 1, 1)
    assert separate and alive and max(alive) == 0


def test_engine_probe_binding_bumps_what_it_writes_and_leaves_refused_input_untouched():
    from oxoptim import _core

    arrays = [torch.rand(37) for _ in range(4)]
    versions = [a._version for a in arrays]
    assert _core.stream_probe([[a] for a in arrays])
    # autograd is told of the in-place writes (param, state), not of the gradient, which is only read
    assert [a._version > v for a, v in zip(arrays, versions)] == [True, False, True, True]
    p = torch.rand(37)
    for lists in ([], [[p]], [[p]] * 5, [[p], [p]]):  # no array, one, five, the parameter as its own gradient
        before, version = p.clone(), p._version
        if len(lists) == 2:
            assert _core.stream_probe(lists) is False  # aliasing: torch's job, says the binding
        else:
            with pytest.raises(ValueError, match="takes 2 to 4 lists"):
                _core.stream_probe(lists)
        assert torch.equal(p, before) and p._version == version


def test_ratios_are_per_round():
    # Round 1 ran everything 10× slower: per-round ratios stay 2, a ratio of extremes would not.
    assert bench_report.ratio_rounds([2.0, 20.0, 4.0], [1.0, 10.0, 2.0]) == (2.0, 2.0, 2.0)
    assert bench_report.ratio_rounds([1.0, 3.0, 2.0], [1.0, 1.0, 1.0]) == (1.0, 2.0, 3.0)
    assert bench_report.spread(1.5, 2.0, 2.5) == "2.00× (1.50–2.50)"


def _synthetic(quick=False):
    big, small = 200_000_000, 1_000

    def rec(set_name, numel, impl, mode, ms):
        return dict(set=set_name, tensors=1, numel=numel, case="Adam", reads=4, writes=3, impl=impl, mode=mode, ms=ms, note="", steps_per_block=1)

    results = [
        rec("big", big, "oxoptim", "fresh", [100.0, 110.0, 90.0]),
        rec("big", big, "torch fused", "fresh", [150.0, 220.0, 180.0]),
        rec("big", big, "oxoptim", "reused", [100.0, 101.0, 99.0]),
        rec("big", big, "torch fused", "reused", [150.0, 151.0, 149.0]),
        rec("small", small, "oxoptim", "fresh", [1.0, 1.0, 1.0]),
        rec("small", small, "torch fused", "fresh", [0.5, 0.6, 0.4]),
        rec("small", small, "oxoptim", "reused", [2.0, 2.1, 2.2]),
        rec("small", small, "torch fused", "reused", [0.5, 0.5, 0.5]),
    ]
    roof = {"llc_bytes": LLC, "llc_source": "test", "elements_per_array": LLC, "threads": 2, "runs": [{}], "torch_inplace_gbps": 40.0}
    roof["gbps"] = {"2:1": 40.0, "3:2": 45.0, "4:3": 56.0}
    return dict(
        kind="compare_torch", quick=quick, command="python benches/compare_torch.py", machine="m", torch="t", oxoptim="o",
        simd="avx2", parallel="openmp", threads=2, python="3", rounds=3, target_s=0.1, grad_modes=["fresh", "reused"],
        roofline=roof, notes=[], results=results,
    )


def test_summary_rows_show_median_ratio_with_spread_and_percent_of_the_matching_probe():
    md = bench_report.compare_markdown(_synthetic())
    # big: 7 arrays × 200M × 4 B / 100 ms = 56 GB/s = 100% of the 4:3 probe; fused/ox per round 1.5, 2.0, 2.0: median 2.0
    assert "| big | Adam | 3052 MiB | 100.000 | 56.0 | 100% | 2.00× (1.50–2.00) |" in md
    assert "| small | Adam | 16 KiB | 1.000 | 0.0 | fits in LLC | 0.50× (0.40–0.60) |" in md


def test_findings_name_losses_and_mode_differences():
    lines = bench_report.findings(bench_report.Table(_synthetic()))
    assert "small Adam vs torch fused 0.50× (0.40–0.60), every round" in lines[0]
    assert "big Adam" not in lines[0]
    assert "small Adam oxoptim +110% when reused" in lines[2]
    assert "big Adam oxoptim" not in lines[2]  # fresh 90–110 overlaps reused 99–101


def test_rows_beating_the_probe_and_a_weak_probe_are_flagged():
    data = _synthetic()
    assert bench_report.findings(bench_report.Table(data))[1] == "- rows above 100% of their DRAM roofline: none."
    assert "not a ceiling" not in "\n".join(bench_report.header_lines(data))
    data["roofline"]["gbps"]["4:3"] = 50.0  # big oxoptim streams 56 GB/s; small fits in cache and is not judged
    assert bench_report.findings(bench_report.Table(data))[1].startswith("- rows above 100% of their DRAM roofline: big Adam oxoptim 112% —")
    data["roofline"]["torch_inplace_gbps"] = 41.0  # above the 2:1 probe's 40
    assert "probe is not a ceiling in this run" in "\n".join(bench_report.header_lines(data))


def test_percent_of_roofline_is_per_round_against_that_rounds_probe():
    # big oxoptim moves 5.6 GB per step: 100, 110, 90 ms are 56, 50.9, 62.2 GB/s; the machine sped up in
    # round 2 (probe 70): against the run's best probe (70) round 0 would read 80%, against its own 100%.
    data = _synthetic()
    for rec in data["results"]:
        rec["probe_gbps"] = [56.0, 56.0, 70.0]
    data["roofline"]["gbps"]["4:3"] = 70.0
    t = bench_report.Table(data)
    ox = t.get("big", "Adam", "oxoptim", "fresh")
    lo, mid, hi = t.roofline_percent(ox)
    assert (round(lo, 1), round(mid, 1), round(hi, 1)) == (88.9, 90.9, 100.0)
    assert t.roofline_cell(ox) == "91% (89–100)"
    assert "% is per round, of that round's ceiling" in "\n".join(bench_report.header_lines(data))
    # judged per round: a run-wide best probe of 50 would flag 112%, the rounds' own probes do not
    data["roofline"]["gbps"]["4:3"] = 50.0
    assert bench_report.findings(bench_report.Table(data))[1] == "- rows above 100% of their DRAM roofline: none."
    for rec in data["results"]:
        rec["probe_gbps"] = [50.0, 50.0, 50.0]
    assert "big Adam oxoptim 112%" in bench_report.findings(bench_report.Table(data))[1]


def test_percent_per_round_refuses_a_ceiling_list_that_does_not_match_the_rounds():
    # zip() would pair round r's time with another round's ceiling, or drop rounds, without a word
    data = _synthetic()
    t = bench_report.Table(data)
    ox = t.get("big", "Adam", "oxoptim", "fresh")
    for ceilings in ([56.0, 70.0], [56.0, 56.0, 70.0, 70.0]):
        ox["probe_gbps"] = ceilings
        with pytest.raises(ValueError, match="3 rounds but 2 ceilings|3 rounds but 4 ceilings"):
            t.roofline_percent(ox)


def test_a_row_just_above_the_roofline_is_not_listed_as_100_percent():
    # "rows above 100%: ... 100%" reads as a contradiction: the list shows what puts the row over
    data = _synthetic()
    ox = next(r for r in data["results"] if (r["set"], r["impl"], r["mode"]) == ("big", "oxoptim", "fresh"))
    ox["ms"], ox["probe_gbps"] = [100.0] * 3, [56.0 / 1.002] * 3  # 56 GB/s every round: 100.2%
    assert "big Adam oxoptim 100.2% —" in bench_report.findings(bench_report.Table(data))[1]


def test_run_case_probes_before_and_after_every_round_and_keeps_the_better_neighbour():
    probes = iter([10.0, 30.0, 20.0, 5.0])
    calls = []

    def probe():
        calls.append(len(calls))
        return next(probes)

    case = compare_torch.Case("SGD", 2, 1, {"oxoptim": compare_torch._opt(oxoptim.Subgradient, lr=1e-3)})
    records, _ = compare_torch.run_case([(8,)], case, rounds=3, target_s=1e-4, probe=probe)
    assert len(calls) == 4  # before round 0, after each of 3
    assert all(r["probe_gbps"] == [30.0, 30.0, 20.0] for r in records)
    assert all(len(r["ms"]) == 3 for r in records)
    records, _ = compare_torch.run_case([(8,)], case, rounds=2, target_s=1e-4)
    assert all("probe_gbps" not in r for r in records)


def test_run_case_ceilings_line_up_with_rounds_past_an_unavailable_contender_and_in_mode_none():
    def unavailable(params):
        raise RuntimeError("no fused path here")

    probes = iter(float(x) for x in range(100))
    for reads_grads, modes in ((True, {"fresh", "reused"}), (False, {"none"})):
        contenders = {"torch fused": unavailable, "oxoptim": compare_torch._opt(oxoptim.Subgradient, lr=1e-3)}
        case = compare_torch.Case("SGD", 2, 1, contenders, reads_grads=reads_grads)
        records, _ = compare_torch.run_case([(8,)], case, rounds=2, target_s=1e-4, probe=lambda: next(probes))
        fused = [r for r in records if r["impl"] == "torch fused"]
        assert len(fused) == 1 and fused[0]["ms"] == [] and "probe_gbps" not in fused[0]
        timed = [r for r in records if r["impl"] == "oxoptim"]
        assert {r["mode"] for r in timed} == modes
        assert all(len(r["ms"]) == len(r["probe_gbps"]) == 2 for r in timed)
    # the unavailable contender's row renders as n/a beside per-round rows
    for r in records:
        r.update(set="big", tensors=1, numel=200_000_000, case="SGD", reads=2, writes=1, steps_per_block=1)
    data = _synthetic()
    data["results"] = records
    md = bench_report.compare_markdown(data)
    assert "| big | SGD | torch fused | n/a | | | | | unavailable: RuntimeError: no fused path here |" in md


@pytest.mark.skipif(shutil.which("rustc") is None, reason="rustc absent: the probe cannot be built")
def test_round_probe_runs_its_mix_on_both_probes(monkeypatch):
    rust_calls, engine_calls = [], []
    real_rust, real_engine = bandwidth._run_probe, bandwidth._engine_mix_gbps
    engine_says = {"gbps": 1e6}

    def run_probe(*args):
        rust_calls.append(args)
        out = real_rust(*args)
        assert set(k for k in out if ":" in k and " " not in k) == {"3:2"}  # only the asked mix ran
        return out

    def engine(arrays, reads, writes, threads, reps):
        engine_calls.append((len(arrays), arrays[0].numel(), reads, writes, threads, reps))
        assert real_engine(arrays, reads, writes, threads, reps) > 0  # the engine's pass itself runs
        return engine_says["gbps"]

    monkeypatch.setattr(bandwidth, "_run_probe", run_probe)
    monkeypatch.setattr(bandwidth, "_engine_mix_gbps", engine)
    probe = bandwidth.RoundProbe(50_003, 2, 3, 2)
    assert [len(arrays) for _, arrays in probe.layouts] == [3, 3]
    # the ceiling is the better of the two probes, whichever it is
    assert probe.measure(1) == 1e6  # the engine's (stubbed far above any real stream)
    assert engine_calls == [(3, 50_003, 3, 2, 2, 1)] * 2  # both layouts, the case's mix
    assert rust_calls == [(50_003, 2, 1, (3, 2))]
    engine_says["gbps"] = 0.0
    assert 0 < probe.measure(1) < 1e6  # stream_probe.rs's


def test_readme_block_is_replaced_and_checked(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nhand-written\n\n{readme_perf.BEGIN}\nold figures\n{readme_perf.END}\n\n## after\n")
    compare = tmp_path / "c.json"
    compare.write_text(json.dumps(_synthetic()))
    args = ["--compare", str(compare), "--e2e", str(tmp_path / "absent.json"), "--readme", str(readme)]
    assert readme_perf.main(args + ["--check"]) == 1
    assert readme_perf.main(args) == 0
    text = readme.read_text()
    assert "old figures" not in text and "hand-written" in text and text.endswith("## after\n")
    assert "2.00× (1.50–2.00)" in text
    assert readme_perf.main(args + ["--check"]) == 0


def test_e2e_rows_give_per_round_ratios_and_memory():
    def rec(opt, iters, steps, mem):
        return dict(model="m (1M params)", optimizer=opt, iter_ms=iters, fwd_bwd_ms=[i - s for i, s in zip(iters, steps)], step_ms=steps, note="", memory=mem)

    data = dict(
        baseline="oxoptim AdamW",
        models=[{"name": "m (1M params)"}],
        results=[
            rec("oxoptim AdamW", [10.0, 20.0, 12.0], [1.0, 2.0, 1.0], {"peak_rss_mib": 700.0, "peak_over_model_mib": 40.0}),
            rec("torch AdamW fused", [9.0, 18.0, 12.0], [1.0, 3.0, 1.5], {"error": "x"}),
        ],
    )
    rows = bench_report.e2e_table(data)
    assert rows[2] == "| m (1M params) | oxoptim AdamW | 12.00 (10.00–20.00) | 11.00 | 1.00 | 8.3% | — | — | 700 | 40 |"
    assert rows[3] == "| m (1M params) | torch AdamW fused | 12.00 (9.00–18.00) | 10.50 | 1.50 | 12.5% | 0.90× (0.90–1.00) | 1.50× (1.00–1.50) | n/a | n/a |"


def test_e2e_peak_memory_counts_gradients_and_optimizer_state():
    import e2e

    mem = e2e.measure_memory(True, "lm", "oxoptim AdamW", 1)
    params = 1.4e6  # the --quick transformer
    assert mem["peak_rss_mib"] > mem["model_rss_mib"] > 0
    assert mem["peak_over_model_mib"] > 3 * params * 4 / 2**20  # gradients + exp_avg + exp_avg_sq


def test_per_optimizer_rows_cover_every_rust_optimizer_and_compare_per_round():
    notes = []
    cases = per_optimizer.cases(notes)
    covered = {type(c.contenders["oxoptim"]([torch.zeros(1, requires_grad=True)]).__self__).KIND for c in cases}
    assert covered == set(__import__("oxoptim")._core.optimizers())
    # Optional contenders: bitsandbytes (installed --no-deps in CI) and DeepSpeed (`pip install deepspeed ninja`).
    assert not [n for n in notes if "bitsandbytes" not in n and "DeepSpeed" not in n]
    # Round 2 ran everything 10× slower: per-round ratios stay put; the faster of foreach and fused is taken per round.
    records = [
        dict(impl="oxoptim", ms=[1.0, 10.0, 1.0], note=""),
        dict(impl="torch default", ms=[4.0, 40.0, 4.0], note=""),
        dict(impl="torch foreach", ms=[3.0, 20.0, 3.0], note=""),
        dict(impl="torch fused", ms=[2.0, 30.0, 2.0], note=""),
    ]
    cells = per_optimizer.row_cells(records)
    assert cells["vs torch default"] == "4.00× (4.00–4.00)"
    assert cells["vs torch's fastest (foreach/fused)"].startswith("2.00× (2.00–2.00)")
    records[-1] = dict(impl="torch fused", ms=[], note="unavailable: RuntimeError: no fused CPU kernel")
    cells = per_optimizer.row_cells(records)
    assert cells["vs torch's fastest (foreach/fused)"] == "3.00× (2.00–3.00) [foreach]"
    assert "no fused CPU kernel" in cells["not measured"]

def test_step_in_backward_contenders_train_as_their_ordinary_loops():
    # The bench's in-backward contenders are wired: same numbers as the ordinary loop they stand for.
    import step_in_backward as bench

    def trained(name):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        contender = next(c for c in bench.CONTENDERS if c.name == name)
        opt = contender.start(model)
        if contender.in_backward:  # hooks installed, so the loop's step() has nothing left to do
            assert all(p._post_accumulate_grad_hooks for p in model.parameters())
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            contender.iteration(model, opt, lambda m: m(x.to(contender.dtype)).float().square().mean())
        assert all(p.grad is None for p in model.parameters())
        return [p.detach() for p in model.parameters()]

    loop = trained("oxoptim AdamW, loop")
    for name in ("oxoptim AdamW, in backward",):
        assert all(torch.equal(a, b) for a, b in zip(loop, trained(name))), name
    fused = trained("torch AdamW fused, loop")
    tutorial = trained("torch fused AdamW per param, in backward (tutorial)")
    assert all(torch.equal(a, b) for a, b in zip(fused, tutorial))
    quarter = trained("oxoptim AdamW8bit, bf16 weights + SR, loop")
    assert all(p.dtype == torch.bfloat16 for p in quarter)
    inside = trained("oxoptim AdamW8bit, bf16 weights + SR, in backward")
    assert all(torch.equal(a, b) for a, b in zip(quarter, inside))


def test_rows_released_contenders_train_as_their_ordinary_loops():
    # One chunk covers this vocabulary: the weight gradient is autograd's product itself, bit for bit.
    import step_in_backward as bench
    from e2e import TinyLM

    def trained(name, tied=True, without_logits=False):
        torch.manual_seed(0)
        model = TinyLM(vocab=50, d=256, layers=1, heads=2, ctx=8)  # 50 x 256: 8-bit state, whole blocks
        if tied:
            model.head.weight = model.tok.weight
        contender = next(c for c in bench.CONTENDERS if c.name == name)
        opt = contender.start(model)
        loss = bench._lm_loss(model, 50, 2, 7)
        for _ in range(3):
            if without_logits:  # the ordinary loop with the head and loss of the "no logits" contenders
                loss(model, True).backward()
                opt.step()
                opt.zero_grad()
            else:
                contender.iteration(model, opt, loss)
            assert all(p.grad is None for p in model.parameters())
        if "8bit" in name:
            moment = "momentum_buffer" if "SGD8bit" in name else "exp_avg"
            assert opt.state[model.tok.weight][moment].dtype == torch.uint8
        return [p.detach() for p in model.parameters()]

    for tied in (True, False):
        loop, rows = trained("oxoptim AdamW, loop", tied), trained("oxoptim AdamW, in backward, rows released", tied)
        assert all(torch.equal(a, b) for a, b in zip(loop, rows))
        loop = trained("oxoptim AdamW, loop", tied, without_logits=True)
        assert all(torch.equal(a, b) for a, b in zip(loop, trained(
            "oxoptim AdamW, in backward, rows released, no logits", tied)))
        assert not all(torch.equal(a, b) for a, b in zip(loop, rows))  # another loss computation, other bits
        torch_loop = trained("torch AdamW fused, loop", tied, without_logits=True)
        assert all(torch.equal(a, b) for a, b in zip(torch_loop, trained("torch AdamW fused, loop, no logits", tied)))
        quarter = trained("oxoptim AdamW8bit, bf16 weights + SR, loop", tied)
        inside = trained("oxoptim AdamW8bit, bf16 weights + SR, in backward, rows released", tied)
        assert all(torch.equal(a, b) for a, b in zip(quarter, inside))
        sgd_loop = trained("oxoptim SGD8bit, bf16 weights + SR, loop", tied)
        sgd_rows = trained("oxoptim SGD8bit, bf16 weights + SR, in backward, rows released", tied)
        assert all(torch.equal(a, b) for a, b in zip(sgd_loop, sgd_rows))
        assert not all(torch.equal(a, b) for a, b in zip(sgd_loop, quarter))
    with pytest.raises(ValueError, match="transformer LMs"):
        bench._released_weights(torch.nn.Linear(2, 2))


def test_lowbit_sentiment_variants_change_every_stage_and_only_that():
    import lowbit_sentiment as bench

    from oxoptim.training.config import load_config

    base = load_config(os.path.join(bench.ROOT, "configs", "default.toml"))
    for variant, (_, change) in bench.VARIANTS.items():
        cfg = bench.variant_config(base, variant, 7)
        assert cfg["seed"] == 7 and cfg["data"] == base["data"] and cfg["model"] == base["model"]
        for stage, original in zip(cfg["stages"], base["stages"]):
            assert stage == {**original, **change}
    digests = {bench.config_digest(bench.variant_config(base, v, 0)) for v in bench.VARIANTS}
    assert len(digests) == len(bench.VARIANTS)


def test_lowbit_counts_state_bytes_and_reports_every_contender(tmp_path, monkeypatch):
    import lowbit

    import oxoptim

    params = [torch.nn.Parameter(torch.zeros(5000)), torch.nn.Parameter(torch.zeros(10))]
    opt = oxoptim.AdamW8bit(params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    # 8-bit: 2 codes + 2 absmax per 256-block + step; fp32: 2 moments + step.
    assert lowbit.state_bytes(opt) == 2 * 5000 + 2 * 4 * 20 + 4 + 2 * 4 * 10 + 4

    def broken(params):
        raise ImportError("no such package")

    monkeypatch.setattr(lowbit, "contenders", lambda: {lowbit.REFERENCE: lambda ps: torch.optim.AdamW(ps, fused=True), "oxoptim AdamW8bit": lambda ps: oxoptim.AdamW8bit(ps), "missing": broken})
    out = tmp_path / "lowbit.md"
    assert lowbit.main(["--rounds", "1", "--steps", "1", "--scale", "0.01", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| oxoptim AdamW8bit |" in text and "| missing | failed: ImportError: no such package |" in text
    # bf16-weight contenders get bfloat16 parameters and gradients; --only picks contenders.
    sr = "oxoptim AdamW bf16 weights + SR"
    monkeypatch.setattr(lowbit, "contenders", lambda: {lowbit.REFERENCE: lambda ps: torch.optim.AdamW(ps, fused=True), sr: lambda ps: oxoptim.AdamW(ps, bf16_stochastic_round=True), "skipped": broken})
    assert lowbit.main(["--rounds", "1", "--steps", "1", "--scale", "0.01", "--only", "SR", "--out", str(out)]) == 0
    text = out.read_text()
    assert f"| {sr} | bf16 |" in text and "skipped" not in text
    # --family sgd: SGD's contenders against torch's fused SGD, each its own weights' dtype.
    assert lowbit.main(["--family", "sgd", "--rounds", "1", "--steps", "1", "--scale", "0.01", "--only", "oxoptim SGD8bit",
                        "--out", str(out)]) == 0
    text = out.read_text()
    assert f"speed-up vs {lowbit.SGD_REFERENCE}" in text and "| oxoptim SGD8bit | fp32 |" in text
    assert "| oxoptim SGD8bit bf16 weights + SR | bf16 |" in text and "| oxoptim SGD |" not in text
    row = text.split("| oxoptim SGD8bit | fp32 |")[1].splitlines()[0]
    assert 1.0 < float(row.split("|")[-2]) < 1.1  # about 1 byte of state per parameter


def test_lowbit_sentiment_reuse_finds_a_run_whatever_the_job_filled_in(tmp_path, monkeypatch):
    import lowbit_sentiment as bench

    import oxoptim.training.job as job

    def fake_run_job(cfg, run_dir, quiet=False):
        cfg["threads"] = 1  # as the real job fills in defaults
        return {"test": {"accuracy": 0.5}, "val": {"accuracy": 0.6}, "wall_time_s": 1.0}

    monkeypatch.setattr(job, "run_job", fake_run_job)
    from oxoptim.training.config import load_config

    cfg = bench.variant_config(load_config(os.path.join(bench.ROOT, "configs", "default.toml")), "adamw8bit", 3)
    digest = bench.config_digest(cfg)
    row = bench.run_one("adamw8bit", 3, cfg, str(tmp_path), True)
    assert row["config_digest"] == digest == bench.config_digest(cfg)  # the key --reuse looks up


def test_overheads_reports_per_tensor_cost_of_every_contender_in_both_modes(tmp_path, monkeypatch):
    import overheads

    import oxoptim

    only = compare_torch.Case("AdamW", 4, 3, {
        "oxoptim": compare_torch._opt(oxoptim.AdamW, lr=1e-3),
        "torch fused": compare_torch._opt(torch.optim.AdamW, lr=1e-3, fused=True),
    })
    monkeypatch.setattr(overheads, "cases", lambda notes: [only])
    out = tmp_path / "overheads.md"
    assert overheads.main(["--tensors", "20", "--numel", "4", "--rounds", "2", "--target", "0.001", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| oxoptim | " in text and "| torch fused | " in text
    fused = next(line for line in text.splitlines() if line.startswith("| torch fused |"))
    assert fused.count("×") == 2  # a per-round ratio to oxoptim in both modes
    for name in overheads.DESCRIBE_CALLS:
        assert f"`Tensor.{name}`: " in text


def test_overheads_figures_are_ms_per_step_over_tensors_and_per_round_ratios(tmp_path, monkeypatch):
    import overheads

    rows = [dict(impl="oxoptim", mode=m, ms=[1.0, 2.0, 4.0], note="") for m in ("fresh", "reused")]
    rows += [dict(impl="torch fused", mode=m, ms=[3.0, 2.0, 4.0], note="") for m in ("fresh", "reused")]
    monkeypatch.setattr(overheads, "run_case", lambda *a: (rows, 5))
    monkeypatch.setattr(overheads, "per_call_ns", lambda name: 42.0)
    out = tmp_path / "overheads.md"
    overheads.main(["--tensors", "20", "--out", str(out)])
    lines = out.read_text().splitlines()
    # 2 ms per step over 20 tensors is 100 µs per tensor; ratios 3, 1, 1 per round
    assert "| oxoptim | 100.00 (50.00–200.00) | — | 100.00 (50.00–200.00) | — |" in lines
    assert "| torch fused | 150.00 (100.00–200.00) | 1.00× (1.00–3.00) | 150.00 (100.00–200.00) | 1.00× (1.00–3.00) |" in lines
    assert "- `Tensor.detach`: 42 ns" in lines



def test_seeded_runs_rewrite_results_after_every_row_and_reuse_only_the_same_name_seed_and_config(tmp_path):
    import seeded_runs

    out, md = tmp_path / "r.json", tmp_path / "r.md"
    cfg = {"lr": 0.1}

    def results(reuse):
        return seeded_runs.Results(str(out), str(md), {"m": 1}, "job", reuse,
                                   lambda rows: seeded_runs.aggregate(rows, "job", ("acc",)),
                                   lambda rows, agg: f"{len(rows)} rows, {sorted(agg)}\n")

    first = results(reuse=True)  # nothing to reuse yet
    for seed, acc in ((1, 0.5), (2, 0.7)):
        first.add({"job": "a", "seed": seed, "config_digest": seeded_runs.config_digest(cfg), "acc": acc})
        written = json.loads(out.read_text())
        assert len(written["rows"]) == seed and md.read_text() == f"{seed} rows, ['a']\n"  # after every row
    assert written["summary"]["a"]["acc"]["mean"] == pytest.approx(0.6)
    again = results(reuse=True)
    assert again.earlier("a", 2, dict(cfg))["acc"] == 0.7
    assert again.earlier("a", 3, cfg) is None and again.earlier("b", 2, cfg) is None
    assert again.earlier("a", 2, {"lr": 0.2}) is None  # another configuration
    assert results(reuse=False).earlier("a", 2, cfg) is None


def test_lowbit_quality_gives_the_same_runs_in_parallel_processes_as_in_one(tmp_path):
    import lowbit_quality

    tiny = ["--seeds", "0", "1", "--steps", "3", "--warmup", "1", "--batch", "2", "--block", "8", "--layers", "1",
            "--dim", "16", "--max-chars", "20000", "--variants", "fp32 AdamW", "bf16 + SR"]
    rows = {}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for jobs in ("1", "2"):
            out = tmp_path / f"q{jobs}.md"
            assert lowbit_quality.main(tiny + ["--threads", "1", "--jobs", jobs, "--out", str(out)]) == 0
            rows[jobs] = json.loads(out.with_suffix(".json").read_text())["rows"]
            assert torch.get_num_threads() == 2  # --threads holds for the runs only, not for the tests after this one
    finally:
        torch.set_num_threads(threads)
    key = [(r["variant"], r["seed"], r["val_bpc"], r["train_loss_last"]) for r in rows["1"]]
    assert key == [(r["variant"], r["seed"], r["val_bpc"], r["train_loss_last"]) for r in rows["2"]]
    assert [(v, s) for v, s, *_ in key] == [("fp32 AdamW", 0), ("bf16 + SR", 0), ("fp32 AdamW", 1), ("bf16 + SR", 1)]
    assert len({v for _, _, v, _ in key}) == 4  # the runs differ: not one result copied


def test_contention_child_times_the_loop_and_the_step_inside_backward():
    import contention

    times = contention.child(1)
    assert sorted(times) == sorted(contention.CONTENDERS)
    assert all(len(ms) == 1 and ms[0] > 0 for ms in times.values())
    assert contention.fmt([2.0, 1.0, 3.0]) == "2.00 (1.00–3.00)"


def test_step_in_backward_memory_table_gives_both_savings_and_every_process_peak():
    import step_in_backward as bench

    def memory(peaks, over):
        return {"peak_rss_mib": sorted(peaks)[len(peaks) // 2], "peaks_rss_mib": peaks, "peak_over_warmup_mib": over,
                "weights_mib": 10.0, "state_mib": 20.0, "peak_over_pre_model_mib": 100.0}

    data = {"machine": "m", "torch": "t", "oxoptim": "o", "threads": 2, "rounds": 1, "iters": 1, "command": "c",
            "memory_method": "peak RSS", "models": [{
                "name": "lm", "description": "d", "grad_mib": 100.0, "results": {
                    bench.REFERENCE: {"iter_ms": [1.0], "memory": memory([1000.0, 1060.0, 1010.0], 100.0)},
                    "x": {"iter_ms": [1.0], "memory": memory([950.0, 920.0, 930.0], 8.0)}}}]}
    table = bench.markdown(data)
    # 1010 - 930 = 80 MiB from the peaks, 100 - 8 = 92 MiB from the peaks over warm-up, of 100 MiB.
    assert "| x | 1.0 (1.0–1.0) | 930 [950, 920, 930] | 8 | 80%; 92% |" in table
    assert "| 1010 [1000, 1060, 1010] | 100 | 0%; 0% |" in table
