"""Command-line tools: plot_log on a real demo log, and the demo solver's net builds."""
import subprocess
import sys
from pathlib import Path

from vggcaffe.prototxt import read_solver
from vggcaffe.solver import SGDSolver

ROOT = Path(__file__).resolve().parents[1]


def test_plot_log_parses_the_demo_log_and_writes_a_png(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    from plot_log import parse_log
    with open(ROOT / "docs" / "demo.log") as f:
        train, tests, lrs = parse_log(f)
    assert train[0][0] == 0 and len(train[0]) == len(train[1]) > 10
    assert tests["accuracy"][0][-1] == 1950 and 0 < tests["accuracy"][1][-1] <= 1
    assert set(lrs[1]) == {0.02, 0.002}
    out = tmp_path / "curves.png"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_log.py"), str(ROOT / "docs" / "demo.log"),
                             str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_solver_builds_on_the_shipped_data(monkeypatch):
    monkeypatch.chdir(ROOT)
    import vggcaffe
    assert vggcaffe.SGDSolver is SGDSolver  # pycaffe's caffe.SGDSolver
    param = read_solver(ROOT / "models" / "demo_solver.prototxt")
    solver = SGDSolver(param)
    assert solver.net.blobs["data"].shape == (64, 3, 32, 32)
    assert [name for name, _ in solver.test(0, solver.test_nets[0])] == ["accuracy", "accuracy_top5", "loss"]
