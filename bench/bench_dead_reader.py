"""How fast does a training run end once a reader worker dies, with another training beside it?

    python bench/bench_dead_reader.py
    python bench/bench_dead_reader.py --tries 5

A neighbour training (FCDenseNet56 on 64x64 records) keeps the cores busy for the whole bench, as
a second job on the same node would. Each try then starts a small training run as a user does
(train_fcdensenet.py, a subprocess in its own process group), kills its train reader's worker with
SIGKILL a few steps into epoch 1, and times the kill to the exit of the trainer. The run must end
with its one line (`... was killed by signal SIGKILL; saved a resume point ...`) and leave no process
of its group behind. Each try prints the seconds from the kill to the run's last
line and to its exit. The last line: kill-to-exit (20 s bound / worst try) ratio=<X> target=1.
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import lmdb
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from fcdn.data import records  # noqa: E402

SCRIPT = os.path.join(REPO, "train_fcdensenet.py")
BOUND_SECONDS = 20.0
QUIET = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tries", type=int, default=3, help="killed runs to time")
    return parser.parse_args()


def make_database(path, count, size, seed):
    rng = np.random.default_rng(seed)
    env = lmdb.open(path, map_size=1 << 28)
    with env.begin(write=True) as transaction:
        for index in range(count):
            image = rng.integers(0, 1000, (size, size, 1)).astype(np.uint16)
            mask = (image[..., 0] > 500).astype(np.uint8)
            transaction.put(records.make_key(f"image{index:03d}", np.unique(mask)), records.encode_record(image, mask))
    env.close()
    with open(os.path.join(path, records.FILENAMES_CSV), "w") as handle:
        handle.write("".join(f"image{index:03d}.tif\n" for index in range(count)))
    return path


def command(train, test, output, *extra):
    return [sys.executable, SCRIPT, "--train_database", train, "--test_database", test, "--output_dir", output,
            *extra]


def group_members(group):
    members = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(entry))
    return members


def train_reader_worker(trainer_pid):
    """The oldest process the trainer spawned: its train reader's worker 0."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                spawned = b"spawn_main" in handle.read()
        except OSError:
            continue
        if int(fields[1]) == trainer_pid and spawned:
            found.append((int(fields[19]), int(entry)))
    return min(found)[1]


def read_lines(stream, lines):
    for line in stream:
        lines.append((time.monotonic(), line))


def timed_try(train, test, output):
    """(seconds from the reader worker's SIGKILL to the run's last line, to the trainer's exit)."""
    process = subprocess.Popen(
        command(train, test, output, "--layers_per_block", "1", "--growth_rate", "4", "--batch_size", "2",
                "--test_every_n_steps", "20", "--max_epochs", "3", "--log_every_n_steps", "1", "--seed", "0"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, **QUIET),
        start_new_session=True)
    errors = []
    reader = threading.Thread(target=read_lines, args=(process.stderr, errors), daemon=True)
    reader.start()
    try:
        for line in process.stdout:
            if line.startswith("epoch 1 step 3/"):
                os.kill(train_reader_worker(process.pid), signal.SIGKILL)
                killed = time.monotonic()
                break
        else:
            raise SystemExit(f"the run ended before epoch 1: {''.join(line for _, line in errors)[-2000:]}")
        process.stdout.read()
        process.wait(timeout=300)
        exited = time.monotonic()
        reader.join(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    said, last = errors[-1]
    if "was killed by signal SIGKILL; saved a resume point" not in last:
        raise SystemExit(f"unexpected end: {''.join(line for _, line in errors)[-2000:]}")
    time.sleep(1.0)  # multiprocessing's resource tracker ends once the trainer has gone
    left = group_members(process.pid)
    if left:
        raise SystemExit(f"processes left behind: {left}")
    return said - killed, exited - killed


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory() as folder:
        small = [make_database(os.path.join(folder, f"{name}.lmdb"), count, 32, seed)
                 for name, count, seed in (("train", 16, 1), ("test", 5, 2))]
        large = [make_database(os.path.join(folder, f"{name}64.lmdb"), count, 64, seed)
                 for name, count, seed in (("train", 32, 3), ("test", 4, 4))]
        neighbour = subprocess.Popen(command(*large, os.path.join(folder, "neighbour"), "--test_every_n_steps",
                                             "100000", "--seed", "1"),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=dict(os.environ, **QUIET), start_new_session=True)
        try:
            times = []
            for number in range(args.tries):
                to_line, to_exit = timed_try(*small, os.path.join(folder, f"run{number}"))
                times.append(to_exit)
                print(f"try {number + 1}: the line {to_line:.1f} s after the kill, the exit {to_exit:.1f} s",
                      flush=True)
            if neighbour.poll() is not None:
                raise SystemExit("the neighbour training ended early: the figures were not taken under load")
        finally:
            os.killpg(neighbour.pid, signal.SIGKILL)
            neighbour.wait()
    print(f"kill to exit: median {np.median(times):.1f} s, worst {max(times):.1f} s, with a training beside it")
    print(f"kill-to-exit ({BOUND_SECONDS:.0f} s bound / worst try) ratio={BOUND_SECONDS / max(times):.2f} target=1")

if __name__ == "__main__":
    main()
