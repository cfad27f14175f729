"""--events: JSON Lines progress events a CI dashboard can follow (start, stages, GPTQ blocks, each
artifact's export and verdict, done or failed)."""

import json

from quantkit.cli import main


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_run_reports_its_stages_blocks_and_verdicts(tmp_path):
    events_file = tmp_path / "events.jsonl"
    code = main(["ship", "--method", "gptq", "--targets", "gguf:Q4_K_M", "--calib-samples", "2", "--eval-samples",
                 "2", "--seq-len", "64", "--out", str(tmp_path / "o"), "--events", str(events_file), "--quiet"])
    events = read(events_file)
    assert code == 0 and {e["schema"] for e in events} == {"quantkit.events/1"}
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and events[-1]["ok"] is True
    assert events[0]["targets"] == ["gguf:Q4_K_M"] and events[0]["method"] == "gptq"
    assert {"reference", "quantize"} <= {e["stage"] for e in events if e["event"] == "stage"}
    blocks = [e["block"] for e in events if e["event"] == "block"]
    assert blocks == [0, 1, 2, 3]  # the embedded model's 4 blocks, in order, once each (one GPTQ pass)
    phases = [e["phase"] for e in events if e["event"] == "artifact"]
    assert phases == ["export", "exported", "checked"]
    checked = next(e for e in events if e.get("phase") == "checked")
    assert checked["verdict"] == "accepted" and checked["metrics"]["kld"] > 0
    times = [e["time"] for e in events]
    assert times == sorted(times)


def test_a_failed_run_ends_with_a_failed_event(tmp_path):
    events_file = tmp_path / "events.jsonl"
    code = main(["ship", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--events", str(events_file)])
    events = read(events_file)
    assert code == 2 and events[-1]["event"] == "failed" and "does not exist" in events[-1]["message"]


def test_events_to_stdout_cannot_share_it_with_json(tmp_path, capsys):
    assert main(["ship", "--events", "-", "--json", "--out", str(tmp_path / "o")]) == 2
    assert "give --events a file" in capsys.readouterr().err
