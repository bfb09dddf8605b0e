"""Writing never destroys what the user had, and a write that cannot be made or fails part-way is one line.

- outputs that cannot be made (parent missing, a file, read-only) and writes
  that fail part-way (disk full, file size limit): one NpquantError naming
  OUT, nothing left behind, an old OUT untouched;
- OUT equal to, inside or containing the input model is refused even with
  ``force``; ``force`` replaces only a directory npquant wrote (its
  ``.npquant-output.json``), never a file, a link or someone else's folder;
- temporary directories of a killed run are removed by the next run beside
  them, and only those (a live run's, or someone else's, are left alone);
- the model card is copied under a header saying what the copy is;
- plans: budgets, candidates, calibration files and the plan path refused
  from shapes alone, before anything is measured.
"""

import errno
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import npquant
from npquant import NpquantError
from npquant.checkpoints import quantize_checkpoint
from npquant.checkpoints.output_dir import MARKER, OutputLock, clean_stale
from npquant.cli import main
from npquant.plan import budget_bytes, check_budget, check_plan_path, layer_bytes, write_plan
from test_checkpoint import write_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def model(tmp_path):
    root = tmp_path / "model"
    write_model(root)
    return root


def snapshot(path: Path) -> dict:
    """Every file under ``path`` (relative name -> bytes), to prove nothing changed."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def one_line(capsys, argv, pattern):
    """Run the CLI; assert exit 2 and a single stderr line matching ``pattern``."""
    import re

    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert re.search(pattern, err), err
    return err


# --- 1. outputs that cannot be made, writes that fail part-way -------------------------
def test_output_whose_parent_is_a_file_is_one_line(model, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    one_line(capsys, ["quantize", str(model), "-o", str(tmp_path / "afile" / "out")],
             r"cannot write output .*afile/out: .*afile is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "model"]


def test_output_whose_parent_is_missing_is_refused_and_nothing_is_made(model, tmp_path):
    with pytest.raises(NpquantError, match=r"cannot write output .*no/such/out: the folder .*no/such does not exist"):
        quantize_checkpoint(model, tmp_path / "no" / "such" / "out", "w8-channel")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the next test simulates it")
def test_output_in_a_read_only_folder_is_one_line(model, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        one_line(capsys, ["quantize", str(model), "-o", str(ro / "out")], r"cannot write output .*ro/out: .* not writable")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_output_in_a_folder_that_refuses_writes_is_one_line(model, tmp_path, capsys, monkeypatch):
    import tempfile

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkdtemp", refused)  # what a read-only folder does to a non-root user
    one_line(capsys, ["quantize", str(model), "-o", str(tmp_path / "out")],
             r"cannot write output .*out: .* is not writable \(Permission denied\)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def full_disk_after(monkeypatch, calls: int):
    """Make the safetensors writer fail with ENOSPC on its ``calls``-th tensor, after writing half of it."""
    import npquant.safetensors_io as io

    real = io._write_array
    seen = []

    def write_array(f, arr):
        seen.append(1)
        if len(seen) == calls:
            f.write(b"\0" * 100)  # part of the tensor reached the disk
            raise OSError(errno.ENOSPC, "No space left on device")
        real(f, arr)

    monkeypatch.setattr(io, "_write_array", write_array)


def test_disk_full_mid_write_is_one_line_and_leaves_nothing(model, tmp_path, capsys, monkeypatch):
    full_disk_after(monkeypatch, 3)
    one_line(capsys, ["quantize", str(model), "-o", str(tmp_path / "out")],
             r"cannot write output .*out: No space left on device \(at model.safetensors\); nothing was written$")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no OUT, no temporary directory


def test_disk_full_while_replacing_keeps_the_old_output(model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    quantize_checkpoint(model, out, "w8-channel")
    before = snapshot(out)
    full_disk_after(monkeypatch, 2)
    with pytest.raises(NpquantError, match=r"No space left on device .*nothing was written; the existing .*out is as"):
        quantize_checkpoint(model, out, "w4-g128", force=True)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]


def test_disk_full_in_copy_file_range_is_an_error_not_a_retry(model, tmp_path, monkeypatch):
    if not hasattr(os, "copy_file_range"):
        pytest.skip("no copy_file_range on this platform")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", full)  # the copied tensors (embeddings, norms) go this way
    with pytest.raises(NpquantError, match=r"cannot write output .*out: No space left on device"):
        quantize_checkpoint(model, tmp_path / "out", "w8-channel")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


_QUANTIZE_UNDER_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
from npquant.cli import main
sys.exit(main(["quantize", sys.argv[1], "-o", sys.argv[2], "--scheme", "w8-channel"]))
"""


def test_file_size_limit_mid_write_is_one_line_and_leaves_nothing(model, tmp_path):
    # A real kernel error in a child: its files may not exceed 64 KiB; the model's shard is larger.
    done = subprocess.run([sys.executable, "-c", _QUANTIZE_UNDER_LIMIT, str(model), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    err = done.stderr.strip()
    assert done.returncode == 2 and "\n" not in err and "Traceback" not in err, err
    assert "cannot write output" in err and "File too large" in err and "nothing was written" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# --- 2. nothing the user had is destroyed ---------------------------------------------
@pytest.mark.parametrize("where", ["same", "same-relative", "inside", "link-to-model", "inside-link"])
def test_output_equal_to_or_inside_the_input_is_refused_even_with_force(model, tmp_path, monkeypatch, capsys, where):
    (tmp_path / "link").symlink_to(model, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    out = {"same": str(model), "same-relative": "model/../model", "inside": str(model / "q"),
           "link-to-model": "link", "inside-link": "link/extra/q"}[where]
    before = snapshot(model)
    one_line(capsys, ["quantize", "model", "-o", out, "--force"],
             r"output .* is (the input model|inside the input model) .*even with --force")
    assert snapshot(model) == before and not (model / "q").exists()


def test_output_containing_the_input_is_refused_even_with_force(tmp_path, capsys):
    model = tmp_path / "models" / "m"
    write_model(model)
    before = snapshot(tmp_path)
    one_line(capsys, ["quantize", str(model), "-o", str(tmp_path / "models"), "--force"],
             r"output .*models contains the input model .*even with --force")
    single = model / "model.safetensors"  # a single-file input: its folder contains it
    one_line(capsys, ["quantize", str(single), "-o", str(model), "--force"], r"contains the input model")
    assert snapshot(tmp_path) == before


def test_output_containing_a_file_the_input_links_to_is_refused(tmp_path, capsys):
    # The hub's cache: the snapshot holds links into blobs/, where the bytes are.
    model = tmp_path / "snapshot"
    write_model(model)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (model / "model.safetensors").rename(blobs / "abc123")
    (model / "model.safetensors").symlink_to(blobs / "abc123")
    before = snapshot(blobs)
    one_line(capsys, ["quantize", str(model), "-o", str(blobs), "--force"], r"contains the input model")
    assert snapshot(blobs) == before


def test_force_replaces_a_directory_npquant_wrote(model, tmp_path):
    out = tmp_path / "out"
    quantize_checkpoint(model, out, "w8-channel")
    marker = json.loads((out / MARKER).read_text())
    assert marker["written_by"] == "npquant" and marker["complete"] is True
    assert sorted(marker["files"]) == sorted(p.name for p in out.iterdir() if p.name != MARKER)
    quantize_checkpoint(model, out, "w4-g128", force=True)
    assert npquant.load(out)["model.layers.0.mlp.up_proj.weight"].scheme == npquant.get_scheme("w4-g128")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]  # the old one gone, no temporary


def test_force_replaces_an_empty_directory(model, tmp_path):
    (tmp_path / "out").mkdir()
    quantize_checkpoint(model, tmp_path / "out", "w8-channel", force=True)
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize("force", [False, True])
def test_a_regular_file_at_out_is_never_replaced(model, tmp_path, capsys, force):
    out = tmp_path / "out"
    out.write_text("my notes")
    one_line(capsys, ["quantize", str(model), "-o", str(out)] + ["--force"] * force,
             r"output .*out is a file, not a directory npquant wrote; npquant never replaces it, even with --force")
    assert out.read_text() == "my notes"


def test_someone_elses_model_directory_is_not_replaced(model, tmp_path, capsys):
    other = tmp_path / "other"
    write_model(other)  # a model directory with a config.json, not written by npquant
    before = snapshot(other)
    one_line(capsys, ["quantize", str(model), "-o", str(other), "--force"],
             r"output .*other is a directory npquant did not write \(it holds 'config.json' and 3 more and no "
             r"\.npquant-output\.json\); --force replaces only a directory npquant wrote")
    assert snapshot(other) == before


def test_npquant_output_with_files_added_is_not_replaced(model, tmp_path, capsys):
    out = tmp_path / "out"
    quantize_checkpoint(model, out, "w8-channel")
    (out / "eval-results.txt").write_text("mine")
    one_line(capsys, ["quantize", str(model), "-o", str(out), "--force"],
             r"output .*out holds 'eval-results.txt', which npquant did not write there")
    assert (out / "eval-results.txt").read_text() == "mine"


@pytest.mark.parametrize("marker", ['{"written_by": "npquant", "complete": false, "files": []}', "not json",
                                    '{"written_by": "someone", "complete": true, "files": ["a"]}'])
def test_an_incomplete_or_foreign_marker_is_not_npquant_output(model, tmp_path, capsys, marker):
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text(marker)
    (out / "a").write_text("mine")
    one_line(capsys, ["quantize", str(model), "-o", str(out), "--force"], r"is not a complete npquant output's")
    assert (out / "a").read_text() == "mine"


def test_a_link_at_out_is_not_replaced(model, tmp_path, capsys):
    target = tmp_path / "target"
    quantize_checkpoint(model, target, "w8-channel")
    (tmp_path / "out").symlink_to(target, target_is_directory=True)
    one_line(capsys, ["quantize", str(model), "-o", str(tmp_path / "out"), "--force"],
             r"output .*out is a symbolic link \(to .*target\)")
    assert (tmp_path / "out").is_symlink()


def test_what_appears_at_out_during_the_run_is_not_replaced(model, tmp_path, monkeypatch):
    import npquant.checkpoints.writer as writer

    out = tmp_path / "out"
    real = writer._write_sidecars

    def meanwhile(ckpt, tmp, *args):
        out.mkdir()
        (out / "theirs.txt").write_text("written while we quantized")
        return real(ckpt, tmp, *args)

    monkeypatch.setattr(writer, "_write_sidecars", meanwhile)
    with pytest.raises(NpquantError, match=r"output .*out already exists; pass --force"):
        quantize_checkpoint(model, out, "w8-channel")
    assert (out / "theirs.txt").read_text() == "written while we quantized"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]


# --- 3. temporary directories of a killed run -----------------------------------------
_KILLED_MID_WRITE = """
import os, signal, sys
import npquant.checkpoints.writer as writer
from npquant.cli import main

def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)  # the shards are written; the run dies before it completes

writer._write_sidecars = killed
main(["quantize", sys.argv[1], "-o", sys.argv[2], "--scheme", "w8-channel"])
"""


def test_a_killed_runs_temporary_directory_is_removed_by_the_next_run(model, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", _KILLED_MID_WRITE, str(model), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(left) == 1 and (left[0] / "model.safetensors").is_file() and (left[0] / MARKER).is_file()
    summary = quantize_checkpoint(model, out, "w8-channel")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]
    assert any(f"removed {left[0]}, left by an npquant run that was stopped" == w for w in summary["warnings"])


def test_a_running_writers_temporary_directory_is_left_alone(model, tmp_path):
    live = OutputLock.create(tmp_path, "out")  # held, as by a run still going
    try:
        summary = quantize_checkpoint(model, tmp_path / "elsewhere", "w8-channel")
        assert live.directory.is_dir()
        assert any("left alone" in w and "a running npquant" in w for w in summary["warnings"])
    finally:
        live.close()
    assert clean_stale(tmp_path) == [f"removed {live.directory}, left by an npquant run that was stopped"]
    assert not live.directory.exists()


def test_hidden_folders_that_are_not_npquants_are_untouched(tmp_path):
    theirs = tmp_path / ".out.tmp-123-abcdefgh"  # npquant's name, someone else's contents
    theirs.mkdir()
    (theirs / "data.txt").write_text("mine")
    other = tmp_path / ".cache"
    other.mkdir()
    (other / MARKER).write_text("{}")
    link = tmp_path / ".out.tmp-456-abcdefgh"
    link.symlink_to(theirs, target_is_directory=True)
    assert clean_stale(tmp_path) == []
    assert (theirs / "data.txt").read_text() == "mine" and (other / MARKER).exists() and link.is_symlink()


def test_an_empty_temporary_of_a_dead_process_is_removed_and_of_a_live_one_kept(tmp_path):
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".out.tmp-{int(child.stdout)}-abcdefgh"  # killed between mkdtemp and its marker
    dead.mkdir()
    alive = tmp_path / f".out.tmp-{os.getpid()}-abcdefgh"
    alive.mkdir()
    assert sorted(clean_stale(tmp_path)) == [
        f"left alone {alive}: a running npquant (pid {os.getpid()}) is writing it",
        f"removed {dead}, left by an npquant run that was stopped"]
    assert alive.is_dir() and not dead.exists()


def test_a_moved_aside_old_output_whose_out_is_gone_is_reported_not_removed(tmp_path):
    trash = OutputLock.create(tmp_path, "out", "old")
    (trash.directory / "old").mkdir()
    (trash.directory / "old" / "config.json").write_text("{}")
    trash.close()  # killed between moving OUT aside and moving the new one in
    notes = clean_stale(tmp_path)
    assert len(notes) == 1 and "is the previous" in notes[0] and (trash.directory / "old" / "config.json").exists()
    (tmp_path / "out").mkdir()  # once OUT is back, the old copy is garbage
    assert clean_stale(tmp_path) == [f"removed {trash.directory}, left by an npquant run that was stopped"]


# --- 5. the model card -----------------------------------------------------------------
CARD = b"---\nlicense: apache-2.0\ntags:\n- sentence-transformers\n---\n\n# all-MiniLM-L6-v2\n\nThe original text.\n"


def test_model_card_is_copied_under_a_header(model, tmp_path):
    (model / "README.md").write_bytes(CARD)
    quantize_checkpoint(model, tmp_path / "out", "w4-g128")
    card = (tmp_path / "out" / "README.md").read_bytes()
    front = CARD[: CARD.index(b"---\n", 4) + 4]
    assert card.startswith(front)  # the hub reads its metadata only at the top
    header, rest = card[len(front):].split(b"\n\n", 1)
    assert rest == CARD[len(front):]  # the original follows, unchanged
    text = header.decode()
    assert "Quantized copy" in text and "npquant" in text and "w4-g128" in text and "pack-quantized" in text
    assert "lm_head" not in text and len(header.splitlines()) == 2


def test_model_card_without_front_matter_and_of_a_plan(model, tmp_path):
    (model / "README.md").write_bytes(b"# A model\n\xe2\x9c\x93 text\n")
    plan = {"model.layers.0.mlp.up_proj.weight": "w8-channel", "model.layers.0.mlp.down_proj.weight": "w4-g128",
            "model.layers.0.self_attn.q_proj.weight": "w4-g128"}
    quantize_checkpoint(model, tmp_path / "out", plan)
    card = (tmp_path / "out" / "README.md").read_bytes()
    assert card.startswith(b"<!-- npquant: quantized copy -->\n") and card.endswith(b"\n\n# A model\n\xe2\x9c\x93 text\n")
    text = card.decode()
    assert "a scheme per linear layer: " in text and "w8-channel (1 linear layer)" in text
    assert "w4-g128 (2 linear layers)" in text and "2 linear layers left as they were" in text  # embed, lm_head


# --- 8. plans: refused from shapes, before measuring -----------------------------------
@pytest.mark.parametrize("preset", list(npquant.schemes()))
@pytest.mark.parametrize("shape", [(64, 256), (96, 384), (130, 512), (3, 4096)])
def test_layer_bytes_is_what_quantize_holds(preset, shape):
    scheme = npquant.get_scheme(preset)
    w = (0.02 * np.random.default_rng(0).standard_normal(shape)).astype(np.float32)
    if scheme.granularity == "group" and shape[1] % scheme.group_size:
        assert layer_bytes(shape, scheme) is None
        return
    assert layer_bytes(shape, scheme) == npquant.quantize(w, scheme).nbytes  # exact, integer bytes


def test_a_budget_below_the_smallest_plan_is_refused_from_shapes(model):
    from npquant.checkpoints import select_layers
    from npquant.safetensors_io import Checkpoint

    with Checkpoint(model) as ckpt:
        layers = {c.name: c.shape for c in select_layers(ckpt) if c.quantize}
    candidates = {"w4-g128": "w4-g128", "w8-channel": "w8-channel"}
    with pytest.raises(NpquantError, match=r"budget of .* \(1.00 bits per weight\) is below the smallest plan, "
                                           r".* raise the budget to at least 4.\d\d bits per weight"):
        check_budget(layers, candidates, budget_bytes(layers, bits=1))
    sizes = check_budget(layers, candidates, budget_bytes(layers, bits=8))
    smallest = sum(min(v.values()) for v in sizes.values())
    assert check_budget(layers, candidates, smallest) == sizes  # exactly the smallest plan fits
    with pytest.raises(NpquantError, match="below the smallest plan"):
        check_budget(layers, candidates, smallest - 1)
    with pytest.raises(NpquantError, match=r"no candidate scheme fits layer .* \(no group size divides 384\)"):
        check_budget({"w": (8, 384)}, {"w4-g256": npquant.Scheme("int", 4, "group", 256)}, 10**9)
    with pytest.raises(NpquantError, match="scheme='w5' is not a preset"):
        check_budget(layers, {"w5": "w5"}, 10**9)


@pytest.mark.parametrize("kwargs, pattern", [
    ({"bits": 0}, "bits must be a positive number"), ({"bits": float("nan")}, "bits must be a positive"),
    ({"bits": float("inf")}, "bits must be"), ({"bits": True}, "bits must be"), ({"size": 0}, "size must be a positive"),
    ({"size": 1.5}, "size must be"), ({}, "exactly one"), ({"bits": 4, "size": 10}, "exactly one")])
def test_budget_arguments_are_checked(kwargs, pattern):
    with pytest.raises(NpquantError, match=pattern):
        budget_bytes({"a": (8, 8)}, **kwargs)


def test_plan_path_is_checked_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NpquantError, match=r"cannot write plan .*afile/plan.json: .*afile is a file, not a folder"):
        check_plan_path(tmp_path / "afile" / "plan.json")
    with pytest.raises(NpquantError, match=r"the folder .*missing does not exist"):
        check_plan_path(tmp_path / "missing" / "plan.json")
    (tmp_path / "adir").mkdir()
    with pytest.raises(NpquantError, match=r"cannot write plan .*adir: it is a directory"):
        check_plan_path(tmp_path / "adir")
    (tmp_path / "model.safetensors").write_bytes(b"precious weights")
    with pytest.raises(NpquantError, match=r"a file that is not an npquant plan is there"):
        write_plan(tmp_path / "model.safetensors", {"version": 1, "layers": {}})
    assert (tmp_path / "model.safetensors").read_bytes() == b"precious weights"
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')  # JSON, but no plan
    with pytest.raises(NpquantError, match=r"a file that is not an npquant plan is there"):
        write_plan(tmp_path / "config.json", {"version": 1, "layers": {}})
    assert (tmp_path / "config.json").read_text() == '{"model_type": "bert"}'
    write_plan(tmp_path / "plan.json", {"version": 1, "layers": {"a": {}}})
    write_plan(tmp_path / "plan.json", {"version": 1, "layers": {"b": {}}})  # a plan is replaced
    assert json.loads((tmp_path / "plan.json").read_text())["layers"] == {"b": {}}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "plan.json").stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_a_failed_plan_write_leaves_nothing(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", full)
    with pytest.raises(NpquantError, match=r"cannot write plan .*plan.json: No space left on device; nothing"):
        write_plan(tmp_path / "plan.json", {"version": 1, "layers": {}})
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "calibration.txt"
    os.mkfifo(path)
    old = signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError("blocked opening a FIFO")))
    signal.alarm(10)  # without the check, open() blocks for ever: fail instead of hanging
    yield path
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_a_calibration_fifo_is_refused_before_opening(fifo):
    from npquant.calibrate import calibration_texts

    with pytest.raises(NpquantError, match=r"--calibration .*calibration.txt is not a regular file"):
        calibration_texts(fifo)


@pytest.mark.parametrize("case, pattern", [
    ("dir", "is a directory"), ("device", "not a regular file"), ("missing", "No such file"),
    ("latin1", "is not UTF-8 text"), ("blank", "holds no text"), ("huge", "holds over 64 MiB of text")])
def test_bad_calibration_files_are_one_line(tmp_path, case, pattern):
    from npquant.calibrate import calibration_texts

    path = {"dir": tmp_path, "device": Path("/dev/zero"), "missing": tmp_path / "nope.txt"}.get(case, tmp_path / "c.txt")
    if case == "latin1":
        path.write_bytes("caf\xe9\n".encode("latin-1"))
    elif case == "blank":
        path.write_text("\n  \n")
    elif case == "huge":
        with open(path, "wb") as f:
            f.write(b"one text\nanother\n")
            f.truncate(65 << 20)  # sparse: costs no disk
    with pytest.raises(NpquantError, match=pattern):
        calibration_texts(path)
    if case == "huge":  # only the first lines are read when that is all that is asked for
        assert calibration_texts(path, max_samples=2) == ["one text", "another"]
        with open(path, "r+b") as f:
            f.write(b"x" * 18)  # now the file is one line of 65 MiB: never read whole
        with pytest.raises(NpquantError, match=pattern):
            calibration_texts(path, max_samples=2)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """test_calibrated's tiny BERT (hidden 64, feed-forward 128)."""
    pytest.importorskip("tokenizers", reason="the sentence encoder needs tokenizers (npquant[models])")
    from safetensors.numpy import save_file
    from test_calibrated import CONFIG, tiny_tensors, tiny_tokenizer

    from npquant.models import SentenceEncoder

    root = tmp_path_factory.mktemp("tiny-bert")
    save_file(tiny_tensors(), str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps(CONFIG))
    tiny_tokenizer().save(str(root / "tokenizer.json"))
    return SentenceEncoder.from_pretrained(root, backend="numpy")


def test_layer_costs_refuses_candidates_before_measuring(tiny_encoder, monkeypatch):
    from test_calibrated import texts

    from npquant.models.sensitivity import layer_costs

    ran = []
    monkeypatch.setattr(type(tiny_encoder), "_block", lambda *a, **k: ran.append(1))
    g256 = npquant.Scheme("int", 4, "group", 256)  # divides neither 64 nor 128
    with pytest.raises(NpquantError, match=r"no candidate scheme fits layer 'encoder.layer.0.*' \(64, 64\)"):
        layer_costs(tiny_encoder, {"w4-g256": g256}, texts(4, seed=0))
    with pytest.raises(NpquantError, match=r"observer='max' is not known"):
        layer_costs(tiny_encoder, {"w8-channel": "w8-channel"}, texts(4, seed=0), observer="max")
    with pytest.raises(NpquantError, match=r"non-empty list of non-empty calibration texts"):
        layer_costs(tiny_encoder, {"w8-channel": "w8-channel"}, ["a", ""])
    assert ran == []  # refused before the first forward pass


def test_layer_costs_skips_a_candidate_where_it_does_not_fit(tiny_encoder):
    from test_calibrated import texts

    from npquant.models.sensitivity import layer_costs

    costs, nbytes = layer_costs(tiny_encoder, {"w4-g128": "w4-g128", "w8-channel": "w8-channel"}, texts(4, seed=0))
    for name, by in nbytes.items():
        fits = tiny_encoder.tensors[name].shape[1] % 128 == 0  # only the FFN output (in 128) takes groups of 128
        assert set(by) == ({"w4-g128", "w8-channel"} if fits else {"w8-channel"}) and set(costs[name]) == set(by)
