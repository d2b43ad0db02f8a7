"""bench_resilience's accounting: how each request ended and what a run must show (the runs themselves need a
cluster: benchmarks/results/resilience_*.json)."""

from benchmarks.bench_resilience import Sent, outcomes, verdicts
from benchmarks.bench_serving import RequestResult


def sent(status: int, ok: bool, error: str = "", replica: str = "a", in_band: bool = False) -> Sent:
    result = RequestResult("closed_loop", ok, status, 8, replica=replica, error=error, in_band_error=in_band)
    return Sent(0.0, 1.0, result)


def test_each_way_a_request_can_end_is_told_apart():
    assert sent(200, True).outcome == "ok"
    assert sent(503, False, "overloaded").outcome == "rejected"
    assert sent(200, False, "engine replica unavailable", in_band=True).outcome == "in_band_error"
    assert sent(200, False, "RemoteProtocolError: peer closed connection").outcome == "other"  # dropped mid-stream
    assert sent(0, False, "ReadTimeout").outcome == "other"
    assert sent(500, False, "boom").outcome == "other"
    summary = outcomes([sent(200, True), sent(200, True, replica="b"), sent(0, False, "ReadTimeout", replica="")])
    assert summary["outcomes"] == {"ok": 2, "other": 1}
    assert summary["by_replica"] == {"a": 1, "b": 1, "-": 1}
    assert summary["error_samples"] == ["0: ReadTimeout"]


def test_a_kill_passes_only_when_nothing_but_the_victims_streams_failed():
    def run(victim: dict, others: dict, after: dict, recovered_s) -> dict:
        return {
            "on_victim_in_flight": {"outcomes": victim, "requests": sum(victim.values())},
            "others_in_flight": {"outcomes": others},
            "sent_after_kill": {"outcomes": after},
            "recovered_s": recovered_s,
        }

    good = run({"in_band_error": 3}, {"ok": 2}, {"ok": 9}, 12.0)
    assert all(verdicts("kill_replica", good).values())
    assert not all(verdicts("kill_replica", run({"other": 1}, {"ok": 2}, {"ok": 9}, 12.0)).values())
    assert not all(verdicts("kill_replica", run({"in_band_error": 3}, {"ok": 2}, {"rejected": 1}, 12.0)).values())
    assert not all(verdicts("kill_replica", run({"in_band_error": 3}, {"ok": 2}, {"ok": 9}, None)).values())
    assert not all(verdicts("kill_replica", run({}, {"ok": 2}, {"ok": 9}, 12.0)).values())  # nothing was on it
    # A lone tensor-parallel replica: refusals while it is replaced are the right answer.
    assert all(verdicts("kill_tp_worker", run({"in_band_error": 3}, {}, {"ok": 4, "rejected": 30}, 40.0)).values())


def test_autoscaling_passes_only_without_failures_both_ways():
    run = {
        "second_replica_first_token_s": 20.0,
        "back_to_one_replica_s": 25.0,
        "under_load": {"outcomes": {"ok": 40}},
        "after_the_load": {"outcomes": {"ok": 8}},
    }
    assert all(verdicts("autoscale", run).values())
    assert not all(verdicts("autoscale", {**run, "after_the_load": {"outcomes": {"ok": 7, "rejected": 1}}}).values())
    assert not all(verdicts("autoscale", {**run, "second_replica_first_token_s": None}).values())
