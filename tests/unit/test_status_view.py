"""`adrenaline status`'s table, from a scheduler's view and heartbeats made here."""

from __future__ import annotations

from common.messages import ClusterStatus, InstanceLoad
from services.status import ClusterView, render


def test_the_table_shows_each_instance_and_what_is_wrong() -> None:
    loads = {
        "decode-0": InstanceLoad("decode-0", "decode", b"", 16, 100, 25, 7, 2, offload_stall_s=0.0031),
        "prefill-0": InstanceLoad("prefill-0", "prefill", b"", 16, 40, 40, 0, 0),
        "executor-0": InstanceLoad("executor-0", "executor", b"", 16, 200, 150, 3, 0, colocated_with="prefill-0"),
        "decode-9": InstanceLoad("decode-9", "decode", b"", 16, 100, 100, 0, 0, waiting_tokens=48),
    }
    status = ClusterStatus(prefill=["prefill-0"], decode=["decode-0"], inflight=12, executor=["executor-0"])
    lines = render(ClusterView(status, loads)).splitlines()
    assert "in flight 12" in lines[0] and "prefill 1, decode 1, executor 1 live" in lines[0]
    rows = {line.split()[1]: line for line in lines[2:]}
    assert [line.split()[0] for line in lines[2:]] == ["prefill", "executor", "decode", "decode"]  # by role
    assert "75/100  75%" in rows["decode-0"] and "executor wait 3.1 ms/step" in rows["decode-0"]
    assert rows["decode-0"].split()[4:6] == ["7", "2"]  # running, waiting
    assert "beside prefill-0" in rows["executor-0"] and "50/200  25%" in rows["executor-0"]
    assert "NOT LIVE for the scheduler" in rows["decode-9"] and "48 KV tokens queued" in rows["decode-9"]


def test_no_scheduler_and_no_heartbeats_say_so() -> None:
    text = render(ClusterView(None, {}))
    assert "no scheduler answered" in text and "no heartbeats heard" in text
