"""The benchmark suite's pure helpers (no servers): a broken median, percentile, RSS parser
or table would otherwise go unnoticed until a figure in RESULTS.md is wrong."""

from __future__ import annotations

import math

import pytest

from bench.common import (
    Record,
    cdf,
    cell,
    crossing,
    duplicates,
    parse_status,
    percentile,
    steady_rate,
    summary,
    table,
)
from bench.memory import explain


def test_summary_is_median_min_max_over_runs() -> None:
    assert summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "runs": 3}
    assert summary([4.0, 1.0])["median"] == 2.5
    empty = summary([])
    assert empty["runs"] == 0 and math.isnan(empty["median"])


@pytest.mark.parametrize(("q", "expected"), [(50, 50), (99, 99), (100, 100), (0, 1), (1, 1)])
def test_percentile_is_nearest_rank(q: float, expected: float) -> None:
    values = list(range(100, 0, -1))  # unsorted on purpose
    assert percentile(values, q) == expected


def test_percentile_of_few_values_and_none() -> None:
    assert percentile([5.0], 99) == 5.0
    assert percentile([1.0, 2.0], 50) == 1.0
    assert math.isnan(percentile([], 50))


def test_cdf_has_fixed_points_from_min_to_max() -> None:
    points = cdf(list(range(1, 10_001)), points=11)
    assert len(points) == 11
    assert points[0] == 1 and points[-1] == 10_000 and points[5] == 5000
    assert cdf([]) == []


def test_cell_shows_median_and_range() -> None:
    assert cell(summary([1000.0, 3000.0, 2000.0])) == "2,000 (1,000-3,000)"
    assert cell(summary([0.5]), "{:.2f}") == "0.50"
    assert cell(summary([])) == "n/a"


def test_table_pads_columns_as_markdown() -> None:
    text = table(["a", "figure"], [["throughput", "1"], ["x", "22,000"]])
    lines = text.splitlines()
    assert lines[0] == "| a          | figure |"
    assert lines[1] == "|------------|--------|"
    assert lines[3] == "| x          | 22,000 |"
    assert len({len(line) for line in lines}) == 1


STATUS = """Name:\tpython
VmPeak:\t  900000 kB
VmHWM:\t   65536 kB
VmRSS:\t   54321 kB
Threads:\t9
"""


def test_parse_status_reads_rss_and_peak_in_kib() -> None:
    assert parse_status(STATUS) == {"VmHWM": 65536, "VmRSS": 54321}
    assert parse_status("Name:\tzombie\n") == {}


def test_crossing_interpolates_and_steady_rate_leaves_out_the_ends() -> None:
    curve = [(0.0, 0.0), (1.0, 0.0), (2.0, 100.0), (12.0, 1100.0), (20.0, 1100.0)]
    assert crossing(curve, 50) == pytest.approx(1.5)
    assert math.isnan(crossing(curve, 2000))
    # 10% (110) to 90% (990) of 1100 falls in the straight part: 100 per second
    assert steady_rate(curve, 1100) == pytest.approx(100.0)


def _record(seq: int, arrival: int, dup: bool = False, partition: int = 0,
            run: str = "r1", offset: int | None = None) -> Record:
    body = f'{{"device_id":"dev-1","seq":{seq},"sent_ns":5,"run":"{run}","pad":"x"}}'
    return Record(1000, body.encode(), arrival, dup, "b", partition,
                  arrival if offset is None else offset)


def test_record_parses_the_payload_ids_when_asked() -> None:
    record = _record(7, 10)
    assert (record.run, record.device_id, record.seq, record.sent_ns) == ("r1", "dev-1", 7, 5)
    assert Record(1, b"not json").ids == ("", "", -1, 0)


def test_duplicates_group_copies_of_one_payload() -> None:
    records = [_record(1, 10), _record(1, 10), _record(2, 11), _record(1, 12, run="r2")]
    groups = duplicates(records)
    assert len(groups) == 1 and len(groups[0]) == 2


def test_explain_classifies_where_copies_came_from() -> None:
    records = [_record(1, 10), _record(1, 10, partition=1),  # one receipt, produced twice
               _record(2, 11), _record(2, 15, dup=True),     # broker redelivery
               _record(3, 12), _record(3, 13),               # received twice, no DUP
               _record(4, 20, offset=7), _record(4, 20, offset=7)]  # one record read twice
    found = explain(records)
    assert found["messages"] == 4 and found["extra_copies"] == 4
    assert found["kinds"] == {"one receipt, produced twice (same arrival time)": 1,
                              "broker redelivery (DUP flag)": 1,
                              "received twice, no DUP flag": 1,
                              "one record read twice (same offset): the reader's, not Kafka's": 1}


def test_targets_say_met_or_missed_from_the_medians() -> None:
    from bench.suite import markdown, targets

    results = {"benchmarks": {
        "throughput": {"200": {"ratio.mosquitto_sub.end_to_end": summary([0.4, 0.6, 0.55]),
                               "ratio.mosquitto_sub.steady": summary([0.6, 0.65, 0.69])}},
        "memory": {"peak": summary([54.0, 55.0, 53.0])}}}
    assert targets(results) == [
        ["200 B end to end >= 0.5x mosquitto_sub", "0.55 (0.40-0.60)", "met"],
        ["200 B steady >= 0.7x mosquitto_sub", "0.65 (0.60-0.69)", "missed"],
        ["RSS <= 64 MiB on the 1M backlog (peak)", "54 (53-55)", "met"]]
    assert "| target (issue 10)" in markdown({"benchmarks": {}})


PROC_STAT = """cpu  100 10 50 800 20 5 15 0 7 0
cpu0 50 5 25 400 10 2 8 0 3 0
intr 12345
"""


def test_parse_cpu_stat_is_busy_and_total_ticks_of_all_cores() -> None:
    from bench.common import parse_cpu_stat

    # total: user nice system idle iowait irq softirq steal (guest is inside user)
    assert parse_cpu_stat(PROC_STAT) == (180, 1000)
    with pytest.raises(ValueError):
        parse_cpu_stat("intr 1\n")


def _samples() -> list[tuple[float, dict[str, float], tuple[int, int]]]:
    # (wall time, CPU s per kind, (busy, total) ticks at 100 a second, 2 cores)
    return [(9.0, {"bridges": 0.0, "tansu": 0.0}, (0, 0)),
            (10.0, {"bridges": 1.0, "tansu": 0.5}, (100, 200)),
            (12.0, {"bridges": 3.0, "tansu": 1.0}, (460, 600)),
            (14.0, {"bridges": 5.0, "tansu": 1.5}, (820, 1000)),
            (15.0, {"bridges": 5.5, "tansu": 1.5}, (900, 1200))]


def test_cpu_window_takes_the_samples_inside_and_what_is_left_is_the_rest() -> None:
    from bench.common import cpu_window

    window = cpu_window(_samples(), 9.5, 14.5)
    assert window is not None
    assert (window["start"], window["end"]) == (10.0, 14.0)
    assert window["cpu_s"] == {"bridges": 4.0, "tansu": 1.0}
    assert window["busy_s"] == pytest.approx(7.2)  # 720 ticks
    assert window["busy_share"] == pytest.approx(0.9)  # 720 of 800 ticks of both cores
    assert window["rest_s"] == pytest.approx(2.2)
    assert cpu_window(_samples(), 11.0, 12.5) is None  # one sample is no window


def test_cpu_per_1000_messages_and_shares_of_the_busy_cpu() -> None:
    from bench.common import cpu_window
    from bench.scaleout import cpu_per_1000, cpu_share, in_window

    window = cpu_window(_samples(), 9.5, 14.5)
    # 4,000 records timestamped inside [10, 14], some outside
    curve = [(9.9, 1.0)] + [(10 + i / 1000, 2.0 + i) for i in range(4000)] + [(14.2, 4002.0)]
    assert in_window(curve, 10.0, 14.0) == 4000
    per = cpu_per_1000(window, curve)
    assert per == pytest.approx({"bridges": 1.0, "tansu": 0.25, "rest": 0.55, "busy": 1.8})
    share = cpu_share(window)
    assert share == pytest.approx({"bridges": 100 * 4 / 7.2, "tansu": 100 * 1 / 7.2,
                                   "rest": 100 * 2.2 / 7.2, "busy": 90.0})
    assert cpu_per_1000(None, curve) == {} and cpu_share(None) == {}
    assert cpu_per_1000(window, []) == {}


def test_cores_used_and_the_ceiling_of_the_path() -> None:
    from bench.common import cpu_window
    from bench.scaleout import ceiling, cpu_cores

    cores = cpu_cores(cpu_window(_samples(), 9.5, 14.5))  # a 4 s window
    assert cores == pytest.approx({"bridges": 1.0, "tansu": 0.25, "rest": 0.55, "busy": 1.8})
    assert cpu_cores(None) == {}
    # 0.025 + 0.01 + 0.005 CPU s per 1,000 messages on the path (harness and rest left out):
    # 2 cores of it make 50,000 msg/s
    per = {"bridges": 0.025, "tansu": 0.01, "mosquitto": 0.005, "harness": 1.0, "rest": 9.0}
    assert ceiling(per, 2) == pytest.approx(50_000)
    assert math.isnan(ceiling({}, 2))


def _case(steady: float, busy: float, bridges_share: float) -> dict[str, object]:
    return {"steady": steady, "end_to_end": steady / 2, "stalls": [],
            "cpu_per_1000": {"bridges": 0.02, "busy": 0.04},
            "cpu_share": {"bridges": bridges_share, "rest": 100 - bridges_share, "busy": busy},
            "cpu_cores": {"bridges": bridges_share / 50}}


def test_scaleout_ratios_are_within_each_run_and_the_limit_says_where_the_cpu_went() -> None:
    from bench.scaleout import aggregate, limit, rows

    runs = [{"1": _case(100, 95, 60), "2": _case(150, 99, 70), "3": _case(120, 99, 80)},
            {"1": _case(50, 85, 50), "2": _case(100, 97, 60), "3": _case(100, 98, 70)}]
    result = {"messages": 1000, "runs": runs, **aggregate(runs)}
    assert result["ratio.2.steady"]["min"] == 1.5 and result["ratio.2.steady"]["max"] == 2.0
    assert result["ratio.3.steady"]["median"] == pytest.approx(1.6)  # 1.2 and 2.0
    assert result["3.cpu_share"]["busy"]["median"] == 98.5
    assert limit(result, 3) == ("cores 98% busy (saturated): bridges 75% (1.50 cores), "
                                "rest of machine 25%")
    assert limit(result, 1).startswith("cores 90% busy (saturated)")
    assert limit({}, 1) == "no CPU window"
    table_rows = rows(result)
    assert table_rows[0][1] == "1 bridge, 1,000 backlog, steady (msg/s)"
    assert table_rows[3] == ["scale-out", "ratio 2 / 1, steady / end to end",
                             "1.75 (1.50-2.00) / 1.75 (1.50-2.00)",
                             "same run; end to end incl. start-up"]
    # 2 cores / the bridges' 0.02 CPU s per 1,000 msgs (the machine's busy CPU is not the path)
    assert table_rows[-2][2].startswith("100,000 (100,000-100,000) / ")
    assert table_rows[-1][2] == "0 of 4"


def test_bridge_timeline_is_first_and_last_record_after_the_spawn() -> None:
    from bench.scaleout import bridge_timeline

    records = [Record(t, b"{}", instance=i) for t, i in ((101_500, "a"), (104_000, "a"),
                                                         (100_200, "b"))]
    assert bridge_timeline(records, "a", 100.0) == {"first_s": 1.5, "last_s": 4.0}
    assert bridge_timeline(records, "c", 100.0) == {}
