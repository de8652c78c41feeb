"""The recipe stays a thin script over the package: the demo and bench import the package only."""
from tests.conftest import REPO


def test_train_py_is_thin():
    assert len((REPO / "train.py").read_text().splitlines()) < 350


def test_demo_and_bench_do_not_load_train_py_or_private_helpers():
    for path in (*sorted((REPO / "composer_sheared" / "demo").glob("*.py")), *sorted((REPO / "bench").glob("*.py"))):
        text = path.read_text()
        assert "spec_from_file_location" not in text and "import train" not in text, path
        assert "_model_state" not in text, path
