"""Low-memory building blocks: tensors mapped from safetensors files, activation caches whose pages
leave RAM once used, and checkpoints of them written batch by batch; all checked against
safetensors' own reader and writer."""
import mmap

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelpress.calib.blocks import MappedFile
from modelpress.core.errors import ModelpressError
from modelpress.models import mapped


def _resident_kib(path) -> int:
    """Resident KiB of this process's mappings of ``path`` (from /proc/self/smaps)."""
    total, cur = 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and "-" in parts[0] and ":" not in parts[0]:
                cur = parts[5] if len(parts) > 5 else None
            elif parts and parts[0] == "Rss:" and cur == str(path):
                total += int(parts[1])
    return total


@pytest.fixture()
def st_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"emb": torch.randn(300, 70, generator=g), "half": torch.randn(5, 3, generator=g).to(torch.bfloat16),
               "f16": torch.randn(7, generator=g).half(), "ids": torch.arange(11), "empty": torch.zeros(0, 4)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def test_mapped_tensors_equal_the_library_reader(st_file):
    path, tensors = st_file
    got = mapped.map_tensors(path, list(tensors))
    ref = load_file(str(path))
    for k in tensors:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k])
    assert mapped.checked_at_load(got["emb"]) and not mapped.checked_at_load(ref["emb"])


def test_writes_to_a_mapped_tensor_stay_private_and_survive_page_out(st_file):
    path, tensors = st_file
    t = mapped.map_tensors(path, ["emb"])["emb"]
    t[3] = 7.0
    mapped.page_out()
    assert torch.all(t[3] == 7.0) and torch.equal(t[4], tensors["emb"][4])
    assert torch.equal(load_file(str(path))["emb"], tensors["emb"])  # the file is untouched


def test_a_non_finite_tensor_is_refused_when_mapped(tmp_path):
    path = tmp_path / "bad.safetensors"
    w = torch.ones(9000, 2)
    w[8500, 1] = float("nan")  # past the first checked slice
    save_file({"w": w}, str(path))
    with pytest.raises(ModelpressError, match="NaN"):
        mapped.map_tensors(path, ["w"])


@pytest.mark.parametrize("rows", [1, 3, 64])
def test_save_by_rows_is_read_back_by_safetensors(tmp_path, rows):
    g = torch.Generator().manual_seed(1)
    tensors = {"hidden": torch.randn(10, 4, 6, generator=g), "float_hidden": torch.randn(10, 4, 6, generator=g),
               "b": torch.randn(3, 5, generator=g).to(torch.bfloat16), "i": torch.arange(7)}
    seen = []
    mapped.save_by_rows(tmp_path / "s.safetensors", tensors, rows, lambda n, a, b: seen.append((n, a, b)))
    back = load_file(str(tmp_path / "s.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    covered = sorted((a, b) for n, a, b in seen if n == "hidden")
    assert covered[0][0] == 0 and covered[-1][1] == 10 and all(x[1] == y[0] for x, y in zip(covered, covered[1:]))


def test_released_activation_pages_leave_ram_and_keep_their_data(tmp_path):
    path = tmp_path / "act.bin"
    shape = (16, 256, 64)  # 1 MiB of float32
    f = MappedFile(str(path), 16 * 256 * 64 * 4)
    h = f.tensor(shape, torch.float32)
    for i in range(shape[0]):
        h[i] = i
    before = _resident_kib(path)
    row = 256 * 64 * 4
    f.release(0, 16 * row)
    after = _resident_kib(path)
    assert before >= 1000 and after < before / 4, (before, after)
    assert all(float(h[i].mean()) == i for i in range(shape[0]))  # read back from the page cache / file
    assert mmap.PAGESIZE and f.mm.size() == 16 * row
