"""Checkpoints at the paper's scale: a kill at any moment of a write, a full disk, and the temporary
files of killed writers (palign/training/checkpointing.py, palign/artifacts/writes.py).

Writers are real processes stopped or killed with real signals; full disks are real tmpfs mounts of
a few MiB, each in a mount namespace of its own process (`unshare -rm`: nothing outside sees it, and
it vanishes with the process), so a write fails with the kernel's own ENOSPC.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from palign.training.checkpointing import AtomicCheckpointIO, remove_abandoned_temporary_files, temporary_path
from tests.conftest import PROJECT_ROOT, cli_command, cli_env

# A real writer (AtomicCheckpointIO) stopped in the middle of a checkpoint write: the checkpoint holds
# an object whose pickling, which torch.save does with the temporary file already open, says
# "writing" and waits for a line on stdin.
WRITER = textwrap.dedent("""
    import sys, torch
    from palign.training.checkpointing import AtomicCheckpointIO

    class Gate:
        def __reduce__(self):
            print("writing", flush=True)
            sys.stdin.readline()
            return (str, ("released",))

    AtomicCheckpointIO().save_checkpoint({"step": 2, "weights": torch.ones(1000), "gate": Gate()}, sys.argv[1])
    print("done", flush=True)
""")


def start_writer(path: Path) -> subprocess.Popen:
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        cwd=PROJECT_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout.readline() == "writing\n"  # its temporary file is open: it is mid-write
    return writer


def temporary_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_a_dead_writers_temporary_file_is_removed_and_a_live_writers_is_kept(tmp_path):
    last = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "weights": torch.zeros(1000)}, last)
    host = _host_part(last)
    live, killed = start_writer(last), start_writer(last)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        # a file from before writers locked theirs (`.tmp-<pid>`), and one of a writer on another host
        (tmp_path / "last.ckpt.tmp-4194304").write_bytes(b"\0" * 4096)
        (tmp_path / "last.ckpt.tmp-other-node-17").write_bytes(b"\0" * 4096)
        assert temporary_files(tmp_path) == sorted(
            [
                "last.ckpt.tmp-4194304",
                "last.ckpt.tmp-other-node-17",
                f"last.ckpt.tmp-{host}-{live.pid}",
                f"last.ckpt.tmp-{host}-{killed.pid}",
            ]
        )

        removed = remove_abandoned_temporary_files(tmp_path)

        # the killed writer's file and the unlocked ones are gone; the live writer's is still being written
        assert sorted(p.name for p, _ in removed) == sorted(
            ["last.ckpt.tmp-4194304", "last.ckpt.tmp-other-node-17", f"last.ckpt.tmp-{host}-{killed.pid}"]
        )
        assert temporary_files(tmp_path) == [f"last.ckpt.tmp-{host}-{live.pid}"]
        # the kill left the previous checkpoint whole
        assert torch.load(last, weights_only=True)["step"] == 1
    finally:
        live.stdin.write("\n")
        live.stdin.close()
        assert live.stdout.readline() == "done\n"
        live.wait()
    assert live.returncode == 0
    assert temporary_files(tmp_path) == []
    finished = torch.load(last, weights_only=False)
    assert (
        finished["step"] == 2 and finished["gate"] == "released" and torch.equal(finished["weights"], torch.ones(1000))
    )


def _host_part(path: Path) -> str:
    """`<host>` of this machine's temporary names `<path>.tmp-<host>-<pid>`."""
    return Path(temporary_path(str(path))).name.removeprefix(f"{path.name}.tmp-").rsplit("-", 1)[0]


# -- a full disk ----------------------------------------------------------------------------------

# what each scenario does when a write fails: the error's type, text and errno
FAILURE = """
    def failure(write):
        try:
            write()
        except Exception as err:
            return {"type": type(err).__name__, "message": str(err), "errno": getattr(err, "errno", None)}
        return None

    def fill(disk, leave):
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        with open(os.path.join(disk, "filler"), "wb") as f:
            f.write(bytes(free - leave))
"""


def on_a_small_disk(tmp_path: Path, size: str, code: str, *args: str) -> dict:
    """Run `code` (python, `sys.argv[1]` the disk, FAILURE's helpers defined) with `tmp_path/disk` a tmpfs
    of `size` in a mount namespace of its own; what it prints last, as JSON."""
    disk = tmp_path / "disk"
    disk.mkdir(exist_ok=True)
    if (
        not shutil.which("unshare")
        or subprocess.run(
            ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=4k tmpfs "$0"', str(disk)], capture_output=True
        ).returncode
    ):
        pytest.skip("needs `unshare -rm` and tmpfs mounts in a mount namespace (Linux, root or user namespaces)")
    command = [
        "unshare",
        "-rm",
        "sh",
        "-c",
        'mount -t tmpfs -o size="$1" tmpfs "$0" && shift && exec "$@"',
        str(disk),
        size,
        sys.executable,
        "-c",
        textwrap.dedent(FAILURE) + textwrap.dedent(code),
        str(disk),
        *args,
    ]
    proc = subprocess.run(
        command,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_checkpoint_on_a_full_disk_names_it_keeps_the_previous_one_and_resumes_once_space_is_freed(tmp_path):
    result = on_a_small_disk(
        tmp_path,
        "6m",
        """
        import json, os, sys, torch
        from palign.training.checkpointing import AtomicCheckpointIO
        disk = sys.argv[1]
        last = os.path.join(disk, "run", "checkpoints", "last.ckpt")
        io = AtomicCheckpointIO()
        io.save_checkpoint({"step": 1, "weights": torch.zeros(64 * 1024)}, last)  # 256 KiB
        fill(disk, leave=2 * 2**20)
        step_2 = {"step": 2, "weights": torch.ones(2**20)}  # 4 MiB: torch.save fails mid-write
        result = {"error": failure(lambda: io.save_checkpoint(step_2, last)),
                  "left": sorted(os.listdir(os.path.dirname(last))),
                  "step": torch.load(last, weights_only=True)["step"]}
        os.remove(os.path.join(disk, "filler"))
        io.save_checkpoint(step_2, last)
        result["step_once_freed"] = torch.load(last, weights_only=True)["step"]
        print(json.dumps(result))
    """,
    )
    last = tmp_path / "disk" / "run" / "checkpoints" / "last.ckpt"
    assert result["error"] == {
        "type": "DiskFullError",
        "errno": 28,
        "message": f"{last}: disk full (no space left on device) while writing it; free space on the disk holding "
        f"{last.parent} (or point paths.root / paths.cache_dir at a larger disk) and rerun the same command: "
        "the previous last.ckpt is kept, and the run resumes from it",
    }
    assert result["left"] == ["last.ckpt"] and result["step"] == 1  # no partial file, the previous checkpoint whole
    assert result["step_once_freed"] == 2


def test_the_students_export_on_a_full_disk_names_it_and_keeps_the_previous_one(tmp_path, cache_dir):
    result = on_a_small_disk(
        tmp_path,
        "40m",
        """
        import json, os, sys
        from omegaconf import OmegaConf
        from palign.llm.models import load_model, load_tokenizer
        from palign.training.module import StudentSFTModule
        disk, spec, cache = sys.argv[1], OmegaConf.load(sys.argv[2]), sys.argv[3]
        module = StudentSFTModule.with_defaults(lambda: load_model(spec, cache))
        tokenizer = load_tokenizer(spec, cache)
        student = os.path.join(disk, "run", "student")
        module.export_pretrained(student, tokenizer)  # 16 MiB: the weights and the tokenizer
        first = os.stat(os.path.join(student, "model.safetensors")).st_mtime_ns
        fill(disk, leave=8 * 2**20)
        result = {"error": failure(lambda: module.export_pretrained(student, tokenizer)),
                  "left": sorted(os.listdir(os.path.dirname(student))),
                  "kept": os.stat(os.path.join(student, "model.safetensors")).st_mtime_ns == first}
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained(student)  # the previous export still loads
        os.remove(os.path.join(disk, "filler"))
        module.export_pretrained(student, tokenizer)
        result["replaced_once_freed"] = os.stat(os.path.join(student, "model.safetensors")).st_mtime_ns != first
        print(json.dumps(result))
    """,
        str(PROJECT_ROOT / "conf" / "student" / "tiny_random.yaml"),
        str(cache_dir),
    )
    student = tmp_path / "disk" / "run" / "student"
    assert result["error"]["type"] == "DiskFullError" and result["error"]["errno"] == 28
    assert result["error"]["message"].startswith(
        f"{student}: disk full (no space left on device) while writing it; "
        f"free space on the disk holding {student.parent}"
    )
    assert result["left"] == ["student"] and result["kept"]  # no half-written folder beside it
    assert result["replaced_once_freed"]


def test_a_stage_cache_on_a_full_disk_names_it_and_keeps_every_stored_record(tmp_path):
    # the stores behind every cached stage and evaluation's predictions: records are appended one by
    # one until the disk is full; every record stored before survives, and the store carries on
    result = on_a_small_disk(
        tmp_path,
        "64k",
        """
        import json, os, sys
        from palign.artifacts.stores import open_stage_store
        disk = sys.argv[1]
        folder = os.path.join(disk, "cache", "evaluation", "aime24-0123")
        stored = []
        with open_stage_store(folder, {"benchmark": "aime24"}) as store:
            def add_until_full():
                while True:
                    store.add({"id": str(len(stored)), "output": "x" * 1000})
                    stored.append(len(stored))
            error = failure(add_until_full)
        with open_stage_store(folder, {"benchmark": "aime24"}) as store:
            result = {"error": error, "stored": len(stored), "reopened": sorted(int(r["id"]) for r in store.records())}
        os.remove(os.path.join(folder, "records.jsonl"))  # space freed
        with open_stage_store(folder, {"benchmark": "aime24"}) as store:
            store.add({"id": "again", "output": "x" * 1000})
        print(json.dumps(result))
    """,
    )
    records = tmp_path / "disk" / "cache" / "evaluation" / "aime24-0123" / "records.jsonl"
    assert result["error"]["type"] == "DiskFullError" and result["error"]["errno"] == 28
    assert result["error"]["message"].startswith(f"{records}: disk full (no space left on device) while writing it")
    assert result["stored"] > 10 and result["reopened"] == list(range(result["stored"]))


def test_a_tokenized_cache_on_a_full_disk_names_its_folder(tmp_path, smollm2_tokenizer, cache_dir):
    result = on_a_small_disk(
        tmp_path,
        "256k",
        """
        import json, os, sys
        from omegaconf import OmegaConf
        from palign.data.sft import SupervisedExample, build_tokenized_split
        from palign.llm.models import load_tokenizer
        disk, spec, cache, prompts = sys.argv[1], OmegaConf.load(sys.argv[2]), sys.argv[3], OmegaConf.load(sys.argv[4])
        tokenizer = load_tokenizer(spec, cache)
        examples = [SupervisedExample(id=str(i), question=f"What is {i} + {i}?", target=f"{2 * i} " * 200)
                    for i in range(200)]
        error = failure(lambda: build_tokenized_split(examples, tokenizer, OmegaConf.to_container(prompts), 4096,
                                                      os.path.join(disk, "cache"), "train"))
        print(json.dumps({"error": error, "left": sorted(os.listdir(os.path.join(disk, "cache", "tokenized")))}))
    """,
        str(PROJECT_ROOT / "conf" / "student" / "smollm2_135m.yaml"),
        str(cache_dir),
        str(PROJECT_ROOT / "conf" / "prompts" / "paper.yaml"),
    )
    assert result["error"]["type"] == "DiskFullError", result["error"]
    assert re.match(
        re.escape(str(tmp_path / "disk" / "cache" / "tokenized")) + r"/train-[0-9a-f]+: disk full \(no space "
        r"left on device\) while writing it",
        result["error"]["message"],
    ), result["error"]["message"]
    assert all(not name.endswith(".tmp") for name in result["left"])  # no half-written folder left


@pytest.mark.slow
def test_cli_a_run_that_fills_the_disk_while_checkpointing_stops_clearly_and_resumes_once_space_is_freed(tmp_path):
    """`python run.py` with paths.root on a tmpfs, three times in one mount namespace: (1) killed right
    after its first checkpoint; (2) rerun with the disk filled to half a checkpoint: the next checkpoint
    write finds the disk full; (3) the filler removed, the same command again: it resumes and finishes."""
    disk = tmp_path / "disk"
    disk.mkdir()
    on_a_small_disk(tmp_path, "4k", "print('{}')")  # skips where private tmpfs mounts are impossible
    args = [
        "experiment=tiny",
        "logger=csv",
        "baseline=sft_long_cot",
        "trainer.precision=32-true",
        "stage=train",
        f"paths.root={disk}",
    ]
    kill = [
        "+callbacks.crash._target_=tests.helpers.crash.KillAt",
        "+callbacks.crash.hook=on_train_batch_start",
        "+callbacks.crash.step=1",
    ]
    fill = (
        "import os, sys; (last,) = __import__('glob').glob(sys.argv[1] + '/runs/*/checkpoints/last.ckpt'); "
        "s = os.statvfs(sys.argv[1]); free = s.f_bavail * s.f_frsize; "
        "open(sys.argv[1] + '/filler', 'wb').write(bytes(free - os.path.getsize(last) // 2))"
    )
    q = shlex.quote
    steps = {"killed": cli_command([*args, *kill]), "full": cli_command(args), "freed": cli_command(args)}
    script = [f"mount -t tmpfs -o size=160m tmpfs {q(str(disk))} || exit 99"]
    for name, command in steps.items():
        if name == "freed":
            script.append(f"rm {q(str(disk / 'filler'))}")
        script.append(
            f"{shlex.join(command)} > {q(str(tmp_path / name))}.out 2> {q(str(tmp_path / name))}.err; "
            f"echo $? > {q(str(tmp_path / name))}.rc"
        )
        script.append(f"cp -a {q(str(disk / 'runs'))} {q(str(tmp_path / name))}")  # the run folder as this step left it
        if name == "killed":
            script.append(f"{q(sys.executable)} -c {q(fill)} {q(str(disk))}")
    subprocess.run(
        ["unshare", "-rm", "sh", "-c", "\n".join(script)],
        cwd=PROJECT_ROOT,
        check=True,
        timeout=1800,
        env=cli_env(tmp_path, {"PYTHONPATH": str(PROJECT_ROOT)}),
    )

    def step(name: str) -> tuple[int, str, Path]:
        (run_dir,) = (tmp_path / name).iterdir()
        return int((tmp_path / f"{name}.rc").read_text()), (tmp_path / f"{name}.err").read_text(), run_dir

    rc, err, run_dir = step("killed")
    assert rc == 128 + signal.SIGKILL, err[-3000:]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1

    rc, err, run_dir = step("full")
    last = disk / "runs" / run_dir.name / "checkpoints" / "last.ckpt"
    assert rc == 1
    assert (
        f"DiskFullError: {last}: disk full (no space left on device) while writing it; free space on the disk holding "
        f"{last.parent} (or point paths.root / paths.cache_dir at a larger disk) "
        "and rerun the same command: the previous "
        "last.ckpt is kept, and the run resumes from it"
    ) in err, err[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]  # no partial file left
    assert (
        torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
    )  # the previous one, whole

    rc, err, run_dir = step("freed")
    assert rc == 0, err[-3000:]
    train = json.loads((run_dir / "summary.json").read_text())["train"]
    assert train["complete"] and train["global_step"] == 5 and train["resumed_from"] == str(last)
    assert (run_dir / "student" / "model.safetensors").is_file()


# -- temporary folders of other atomic writes (the student's export, caches) ---------------------------

# a writer stopped inside `atomic_path` (palign/artifacts/writes.py) with a file half written into its folder
FOLDER_WRITER = textwrap.dedent("""
    import sys
    from palign.artifacts.writes import atomic_path

    with atomic_path(sys.argv[1]) as tmp:
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(b"\\0" * 65536)
        print("writing", flush=True)
        sys.stdin.readline()
    print("done", flush=True)
""")


def test_a_dead_writers_temporary_folder_is_removed_by_the_next_write_and_a_live_writers_is_kept(tmp_path):
    from palign.artifacts.writes import atomic_path

    student = tmp_path / "run" / "student"

    def start():
        writer = subprocess.Popen(
            [sys.executable, "-c", FOLDER_WRITER, str(student)],
            cwd=PROJECT_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert writer.stdout.readline() == "writing\n"
        return writer

    def temporaries():
        return sorted(p.name for p in student.parent.glob(".student.*.tmp"))

    live, killed = start(), start()
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert len(temporaries()) == 2
        with atomic_path(student) as tmp:  # the next export of the same folder
            tmp.mkdir()
            (tmp / "config.json").write_text("{}")
            left = temporaries()
        assert len(left) == 2  # the live writer's and this one's own, while writing
        assert temporaries() == [name for name in left if (student.parent / name).exists()]  # its own is gone
        assert len(temporaries()) == 1 and (student / "config.json").is_file()
    finally:
        live.stdin.write("\n")
        live.stdin.close()
        assert live.stdout.readline() == "done\n"
        live.wait()
    assert live.returncode == 0 and temporaries() == [] and (student / "model.safetensors").is_file()
