"""One device helper and one atomic writer (docs/method.md): bad devices fail in one line, outputs appear whole or
not at all, and the CSV appender keeps one header."""
import os

import numpy as np
import pandas as pd
import pytest
import torch

from common import io
from common.device import DeviceError, describe_machine, resolve_device

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")


def test_cpu_and_auto_resolve_on_a_cpu_machine():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


@no_cuda
@pytest.mark.parametrize("device, gpu", [("cuda", None), ("cuda:3", None), ("auto", 0), ("cuda", 1)])
def test_cuda_without_cuda_fails_in_one_line_suggesting_cpu(device, gpu):
    with pytest.raises(DeviceError) as info:
        resolve_device(device, gpu)
    message = str(info.value)
    assert "no CUDA device" in message and "--device cpu" in message and "\n" not in message
    assert f"cuda:{gpu}" in message if gpu is not None else device in message


@pytest.mark.parametrize("flags, isa", [("fpu sse avx2 fma", "AVX2"), ("avx2 avx512f avx512bw", "AVX-512"),
                                        ("avx2 avx512f avx512_bf16 amx_tile", "AVX-512, bf16"),
                                        ("avx2 avx512f avx512_bf16 amx_bf16 amx_tile", "AVX-512, AMX bf16"),
                                        ("sse sse2", "no AVX2")])
def test_timings_name_the_cpu_model_and_its_vector_instructions(tmp_path, flags, isa):
    # one cloud machine kind came with AVX-512 one day and AVX2 the next: a 3x difference in our timings
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: {flags}\n")
    assert describe_machine("cpu", str(cpuinfo)) == f"AMD EPYC 9R14 ({isa}), {len(os.sched_getaffinity(0))} cores"


@pytest.mark.parametrize("device", ["tpu", "gpu0", "", "cuda:x", "cuda:-1", "mps", "meta", "cpu,cuda"])
def test_garbage_device_names_are_rejected_with_the_valid_choices(device):
    with pytest.raises(DeviceError, match="use auto, cpu, cuda or cuda:N") as info:
        resolve_device(device)
    assert repr(device) in str(info.value) and "\n" not in str(info.value)


# --- atomic writes -----------------------------------------------------------------------------------------
def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_writers_create_folders_and_leave_no_temp_files(tmp_path):
    out = tmp_path / "a" / "b"
    io.write_text(out / "t.txt", "hello\n")
    io.write_json(out / "j.json", {"l1": np.float32(1.5), "n": np.int64(3), "path": out})
    io.write_npz(out / "m.npz", mask=np.ones((2, 2), np.float32))
    io.write_png(out / "p.png", np.zeros((4, 4, 3), np.uint8))
    io.write_torch(out / "s.pth", {"w": torch.ones(2)})
    assert (out / "t.txt").read_text() == "hello\n"
    assert pd.read_json(out / "j.json", typ="series").to_dict() == {"l1": 1.5, "n": 3, "path": str(out)}
    with np.load(out / "m.npz") as data:
        assert data["mask"].tolist() == [[1, 1], [1, 1]]
    assert torch.equal(torch.load(out / "s.pth", weights_only=True)["w"], torch.ones(2))
    assert (out / "p.png").read_bytes().startswith(b"\x89PNG") and leftovers(out) == []


def test_a_writer_that_fails_midway_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "result.json"
    io.write_text(target, "old complete content\n")
    with pytest.raises(RuntimeError, match="disk full"):
        with io.atomic_path(target) as tmp:
            with open(tmp, "w") as fh:
                fh.write("new half-")
                fh.flush()
                raise RuntimeError("disk full")
    assert target.read_text() == "old complete content\n" and leftovers(tmp_path) == []


def test_a_failed_first_write_leaves_no_target_at_all(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_path(tmp_path / "trigger.npz") as tmp:
            tmp.write_bytes(b"PK half an archive")
            raise KeyboardInterrupt  # the user's Ctrl-C mid-write
    assert os.listdir(tmp_path) == []


def test_check_writable_names_the_folder(tmp_path):
    assert io.check_writable(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "file").write_text("")
    with pytest.raises(PermissionError, match=f"cannot write to output folder {tmp_path / 'file' / 'sub'}"):
        io.check_writable(tmp_path / "file" / "sub")


# --- CSV rows ----------------------------------------------------------------------------------------------
def test_csv_rows_get_one_header_and_read_back_with_pandas(tmp_path):
    path = tmp_path / "results" / "r.csv"
    io.append_csv_row(path, {"encoder_path": "a,b.pth", "l1": 1.5, "verdict": "clean"})
    io.append_csv_row(path, {"encoder_path": "c.pth", "l1": float("inf"), "verdict": "trojaned"})
    assert path.read_text().count("encoder_path") == 1
    table = pd.read_csv(path)
    assert table["encoder_path"].tolist() == ["a,b.pth", "c.pth"]  # the comma is quoted
    assert table["l1"].tolist() == [1.5, float("inf")] and leftovers(path.parent) == []


def test_csv_row_with_other_columns_is_refused_and_the_file_kept(tmp_path):
    path = tmp_path / "r.csv"
    io.append_csv_row(path, {"a": 1, "b": 2})
    before = path.read_text()
    with pytest.raises(ValueError, match="r.csv: has columns 'a,b', this run writes 'a,c'"):
        io.append_csv_row(path, {"a": 1, "c": 2})
    assert path.read_text() == before


def test_csv_row_into_an_existing_empty_file_writes_the_header(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("")
    io.append_csv_row(path, {"a": 1})
    assert path.read_text() == "a\n1\n"


def test_append_line_adds_whole_lines(tmp_path):
    io.append_line(tmp_path / "log" / "r.txt", "x.pth:1.0")
    io.append_line(tmp_path / "log" / "r.txt", "y.pth:2.0\n")
    assert (tmp_path / "log" / "r.txt").read_text() == "x.pth:1.0\ny.pth:2.0\n"
