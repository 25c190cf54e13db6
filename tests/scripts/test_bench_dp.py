"""scripts/bench_dp.py runs (--quick --devices 8): every workload, parity, memory and HLO lines.

On 8 devices only: the one-device step's values and HLO are tests/smap/transform/test_lane_norms.py's.
"""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCH = ROOT / "scripts" / "bench_dp.py"


def test_the_quick_run_reports_every_workload_and_smap_matches_the_materialised_step():
    result = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--devices", "8"], capture_output=True, text=True, timeout=900, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    found = re.findall(
        r"^(\w+) +(\d) dev  ms: batch [\d.]+  \+noise [\d.]+  materialised [\d.]+  smap [\d.]+\n"
        r"  smap DP/\(batch\+noise\) [\d.]+ \([\d.]+\.\.[\d.]+\)  materialised/\(batch\+noise\) [\d.]+ .*\n"
        r"  parity with materialised: clipped sums (\S+), params (\S+)\n"
        r"  memory KiB/device temp: batch \d+ materialised \d+ smap \d+ .*; "
        r"peak: batch (\d+) batch\+noise \d+ materialised (\d+) .*\n"
        r"  per-example gradient arrays in the HLO: smap (\d+) .* materialised (\d+)$",
        out,
        re.MULTILINE,
    )
    assert [(name, devices) for name, devices, *_ in found] == [(name, "8") for name in ("mlp", "cnn", "lm")], out
    for name, devices, clipped, params, peak_batch, peak_materialised, _, materialised in found:
        assert float(clipped) <= 1e-6 and float(params) <= 1e-5, (name, devices, clipped, params)
        # the materialised step holds one gradient per example: the counter must see them
        assert int(materialised) > 0 and int(peak_materialised) > int(peak_batch), (name, devices)
    assert "all targets met" in out or "targets missed:" in out, out
