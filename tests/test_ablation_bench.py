"""benchmarks/gpu_ablation.py --smoke: the one-command GPU ablation's plumbing on CPU (tiny world, 2 steps, one seed, two
runs at a time in child processes)."""

import json

import pytest


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_ablation_smoke_writes_every_row_and_the_papers_claims(tmp_path, capsys):
    from benchmarks.gpu_ablation import main
    from model.caft import ablation_names

    assert main(["--smoke", "--work", str(tmp_path)]) == 0
    t = json.loads((tmp_path / "ablation.json").read_text())
    rows = {r["row"]: r for r in t["rows"]}
    assert list(rows) == ablation_names("tiny") and t["seeds"] == [0] and t["steps"] == 2
    for name, r in rows.items():
        assert r["seeds"] == [0] and len(r["i2t_r1"]["values"]) == 1 and r["n_test"] == 6, name
        assert all(0 <= v <= 1 for v in r["t2i_r1"]["values"]), name
    # grounding only where the attention pooling is trained (FLAIR's TCS, CAFT's part loss)
    assert [n for n, r in rows.items() if r["miou"] is not None] == [
        "flair-tiny", "ablate-tiny-visual", "ablate-tiny-textual", "ablate-tiny-hloss"]
    claims = [(c["better"], c["worse"], c["metric"]) for c in t["claims"]]
    assert ("ablate-tiny-hloss", "ablate-tiny-no-part", "i2t_r1") in claims
    assert ("ablate-tiny-hloss", "flair-tiny", "miou") in claims and len(claims) == 9
    for c in t["claims"]:
        b, w = rows[c["better"]][c["metric"]]["values"], rows[c["worse"]][c["metric"]]["values"]
        assert c["diffs"] == pytest.approx([x - y for x, y in zip(b, w)])
    out = capsys.readouterr().out
    assert "| SigLIP (not in the paper) | siglip-tiny |" in out and "paired by seed" in out
    # a second call with the same jobs reuses every finished run (an interrupted ablation resumes)
    logs = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/job.log")}
    assert len(logs) == len(rows) and main(["--smoke", "--work", str(tmp_path)]) == 0
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/job.log")} == logs
    assert json.loads((tmp_path / "ablation.json").read_text())["rows"] == t["rows"]
