"""ftransformer.io: atomic writes leave the old file or the new one, never a torn mix or a stray temp file."""

import pytest

from ftransformer import io


def test_atomic_write_replaces_and_makes_folders(tmp_path):
    path = tmp_path / "a" / "b" / "f.txt"
    assert io.atomic_write(path, "one ü") == path
    assert path.read_text(encoding="utf-8") == "one ü"
    io.atomic_write(path, b"\x00two")
    assert path.read_bytes() == b"\x00two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.txt"]


def test_error_mid_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with io.replacing(path) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_write_of_bad_data_leaves_the_old_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(TypeError):
        io.atomic_write(path, 12345)  # neither str nor bytes: fails inside the write
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_temp_sibling_is_hidden_fresh_and_beside(tmp_path):
    path = tmp_path / "model.safetensors"
    a, b = io.temp_sibling(path), io.temp_sibling(path, "old")
    assert a.parent == b.parent == tmp_path and a != b
    assert a.name.startswith(".model.safetensors.tmp-") and b.name.startswith(".model.safetensors.old-")


def test_fsync_file_directory_and_missing(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    io.fsync(f)
    io.fsync(tmp_path)
    io.fsync(tmp_path / "missing")  # nothing to flush: no error
    assert f.read_text() == "x"


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1), dpi=50)
    FigureCanvasAgg(fig)
    fig.add_subplot().plot([0, 1], [1, 0])
    return fig


def test_save_figure_writes_a_png(tmp_path):
    path = tmp_path / "plots" / "p.png"
    assert io.save_figure(_figure(), path) == path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["p.png"]


def test_save_figure_failure_leaves_the_old_png(tmp_path):
    path = tmp_path / "p.png"
    path.write_bytes(b"old png")

    class Broken:
        def savefig(self, *args, **kwargs):
            raise ValueError("cannot render")

    with pytest.raises(ValueError, match="cannot render"):
        io.save_figure(Broken(), path)
    assert path.read_bytes() == b"old png"
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]
