"""How much faster does CPU training run when glibc keeps the memory TensorFlow frees?

    python bench/bench_kept_memory.py
    python bench/bench_kept_memory.py --steps 30

Builds the example data's databases (build_lmdb.py, as the quick start does), then runs
train_fcdensenet.py twice with the quick start's settings (FCDenseNet56, batch 8 of 96x96 crops) for
one epoch of --steps steps, its test pass and its export: once as it runs for users (the trainer
calls fcdn.common.startup.keep_freed_memory), once with glibc's defaults (MALLOC_ARENA_MAX set to
glibc's own default, 8 per core, which makes the trainer leave the allocator alone). Each run prints
its images/s over the epoch's second half, wall and system time, page faults and peak resident
memory. The last line: training images/s (kept memory vs glibc's defaults) ratio=<X> target=1.3.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
QUICK_START = ["--batch_size", "8", "--crop_size", "96", "--dropout_rate", "0", "--learning_rate", "2e-3",
               "--warmup", "linear", "--seed", "0", "--max_epochs", "1", "--augmentation_config",
               os.path.join(REPO, "quickstart_augmentation.json")]
TARGET = 1.3


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="training steps of each run (one epoch)")
    return parser.parse_args()


def build_databases(folder):
    subprocess.run([sys.executable, os.path.join(REPO, "build_lmdb.py"), "--image_folder",
                    os.path.join(REPO, "data", "images"), "--mask_folder", os.path.join(REPO, "data", "masks"),
                    "--output_folder", folder, "--seed", "0"], check=True, capture_output=True)
    return os.path.join(folder, "train-HES.lmdb"), os.path.join(folder, "test-HES.lmdb")


def train(databases, output, steps, environment):
    """Run the trainer; return (images/s over the second half, wall s, system s, page faults, peak MB)."""
    train_database, test_database = databases
    command = [sys.executable, os.path.join(REPO, "train_fcdensenet.py"), "--train_database", train_database,
               "--test_database", test_database, "--output_dir", output, "--test_every_n_steps", str(steps),
               "--log_every_n_steps", str(steps // 2), *QUICK_START]
    started = time.monotonic()
    # one pipe: reading two in turn could stall on the other one filling up
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(os.environ, **QUIET, **environment))
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)  # this child's own figures, not every child's
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    if process.returncode != 0:
        raise SystemExit(f"the trainer failed: {output.strip().splitlines()[-1:]}")
    rates = re.findall(r"images/s ([0-9.]+)", output)
    return float(rates[-1]), wall, usage.ru_stime, usage.ru_minflt, usage.ru_maxrss / 1024


def main():
    args = parse_args()
    if args.steps < 2:
        raise SystemExit("error: --steps must be >= 2")
    glibc_default = {"MALLOC_ARENA_MAX": str(8 * os.cpu_count())}
    with tempfile.TemporaryDirectory() as folder:
        databases = build_databases(os.path.join(folder, "db"))
        print(f"databases built; {args.steps} steps of FCDenseNet56 (batch 8 of 96x96 crops) a run", flush=True)
        figures = {}
        for name, environment in (("glibc defaults", glibc_default), ("kept memory", {})):
            figures[name] = train(databases, os.path.join(folder, name.replace(" ", "_")), args.steps,
                                  environment)
            rate, wall, system, faults, peak = figures[name]
            print(f"{name:>14}: {rate:.2f} images/s, {wall:.0f} s wall, {system:.0f} s system, "
                  f"{faults / 1e6:.1f} million page faults, peak {peak:.0f} MB", flush=True)
    ratio = figures["kept memory"][0] / figures["glibc defaults"][0]
    print(f"training images/s (kept memory vs glibc's defaults) ratio={ratio:.2f} target={TARGET}")


if __name__ == "__main__":
    main()
