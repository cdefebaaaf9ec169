"""The bench's per-read hop breakdown from trace marks (pure)."""
from nixl_connectors.tools.bench.hops import median_hops, rep_hops


def test_rep_hops_in_time_order_without_off_path_marks():
    marks = [("x", "called", 1.0), ("ipc", "start", 1.5), ("ipc", "mapped", 1.6),
             ("ipc", "synced", 3.0), ("bench", "returned", 3.25)]
    hops = rep_hops(list(reversed(marks)))       # recorded by two threads: order by time
    assert hops == [("called -> start", 0.5), ("start -> synced", 1.5), ("synced -> returned", 0.25)]


def test_median_keeps_hops_seen_in_half_the_reps_and_adds_repeats():
    reps = [
        [("a -> b", 1e-6), ("b -> c", 3e-6)],
        [("a -> b", 2e-6), ("b -> c", 5e-6), ("x -> y", 9e-6)],
        [("a -> b", 4e-6), ("b -> c", 1e-6), ("b -> c", 1e-6)],   # repeated in one rep: 2 us
    ]
    med = median_hops(reps)
    assert list(med) == ["a -> b", "b -> c"]          # "x -> y" came in one rep of three
    assert abs(med["a -> b"] - 2.0) < 1e-9 and abs(med["b -> c"] - 3.0) < 1e-9


def test_no_reps_no_hops():
    assert median_hops([]) == {}
    assert rep_hops([]) == []


def test_order_follows_the_typical_rep_not_the_first():
    asked = rep_hops([("x", "called", 0.0), ("x", "request_sent", 1.0), ("x", "copied", 2.0),
                      ("b", "returned", 3.0), ("b", "done", 4.0)])
    granted = rep_hops([("x", "called", 0.0), ("x", "copied", 1.0), ("b", "returned", 2.0), ("b", "done", 3.0)])
    med = median_hops([asked, granted, granted])
    assert list(med) == ["called -> copied", "copied -> returned", "returned -> done"]
