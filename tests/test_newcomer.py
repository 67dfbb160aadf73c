"""A newcomer's friction (#18): file modes, sweep discovery messages, cached demo, readable pictures,
validation that warns, no half-made results folders."""
import os
import stat

import pytest

from common import io as atomic


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_outputs_get_the_modes_the_umask_allows(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    assert atomic.current_umask() == mask
    atomic.write_json(tmp_path / "results" / "run.json", {"a": 1})
    atomic.write_torch(tmp_path / "results" / "model.pth", {"w": 1})
    atomic.append_csv_row(tmp_path / "results" / "rows.csv", {"a": 1})
    atomic.append_line(tmp_path / "results" / "lines.csv", "a,b")
    assert stat.S_IMODE((tmp_path / "results").stat().st_mode) == dir_mode
    for name in ("run.json", "model.pth", "rows.csv", "lines.csv"):
        assert stat.S_IMODE((tmp_path / "results" / name).stat().st_mode) == file_mode, name


def test_sweep_discovery_names_where_it_looked_and_the_flag_that_finds_the_demo(tmp_path):
    from decree.sweep import discover_output_folder
    demo = tmp_path / "demo" / "encoders" / "clean_encoder"
    demo.mkdir(parents=True)
    (demo / "model_12.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as err:
        discover_output_folder(tmp_path)
    message = str(err.value)
    assert f"{tmp_path}/cifar10/" in message and f"{tmp_path}/CLIP_text/" in message
    assert f"--encoders '{tmp_path}/demo/**/*.pth'" in message and "--manifest" in message
    with pytest.raises(FileNotFoundError, match="--output_root .*no such folder.*--encoders"):
        discover_output_folder(tmp_path / "missing")
