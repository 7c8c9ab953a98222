"""SLURM: the cluster a training reads from srun's environment (pure functions, fast), and the job
scripts of examples/slurm/ submitted with sbatch to a real one-node cluster (.ci/start_slurm.sh;
the tests marked `slurm`): a 2-task training, its requeue, a job array of inference, its scancel."""

import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO_ROOT, run_inference
from test_train import make_database

from fcdn.training.slurm import (
    SlurmStep,
    check_port_free,
    expand_counts,
    expand_hostlist,
    node_of_each_task,
    port_base,
)

EXAMPLES = os.path.join(REPO_ROOT, "examples", "slurm")
TRAIN_JOB = os.path.join(EXAMPLES, "train_multinode.sbatch")
SEGMENT_JOB = os.path.join(EXAMPLES, "segment_array.sbatch")
HOSTLISTS = ["vm", "gpu[01-03,7],login-a", "rack[1-2]-n[08-10]", "n[8-10]", "a,b,c[1-2]", "x[098-101]"]


# ----------------------------------------------------------------------------------------------
# the step's layout, read from the environment


def test_hostlists_expand_in_order_with_their_zero_padding():
    assert expand_hostlist("vm") == ["vm"]
    assert expand_hostlist("gpu[01-03,7],login-a") == ["gpu01", "gpu02", "gpu03", "gpu7", "login-a"]
    assert expand_hostlist("rack[1-2]-n[08-10]") == ["rack1-n08", "rack1-n09", "rack1-n10",
                                                     "rack2-n08", "rack2-n09", "rack2-n10"]
    assert expand_hostlist("x[098-101]") == ["x098", "x099", "x100", "x101"]
    for bad in ("n[1-", "n[3-1]", "n[a]", "n]1[", ""):
        with pytest.raises(ValueError, match="SLURM_STEP_NODELIST="):
            expand_hostlist(bad)


def test_task_counts_and_layouts():
    assert expand_counts("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(ValueError, match=r"SLURM_STEP_TASKS_PER_NODE='2\(3\)'"):
        expand_counts("2(3)")
    assert node_of_each_task([2, 1], "block") == [0, 0, 1]
    assert node_of_each_task([2, 1], None) == [0, 0, 1]
    assert node_of_each_task([2, 1], "cyclic:block") == [0, 1, 0]
    assert node_of_each_task([3, 2], "plane=2") == [0, 0, 1, 1, 0]
    with pytest.raises(ValueError, match="SLURM_DISTRIBUTION=arbitrary: .*--distribution=block"):
        node_of_each_task([2, 1], "arbitrary")


def step_environment(rank, local_id, node, gpus_on_node=None, **extra):
    environ = {"SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
               "SLURM_JOB_ID": "4242", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(local_id),
               "SLURMD_NODENAME": node, "SLURM_DISTRIBUTION": "block", **extra}
    if gpus_on_node is not None:
        environ["SLURM_GPUS_ON_NODE"] = str(gpus_on_node)
    return environ


def test_every_task_builds_the_same_workers_and_names_its_own_devices():
    base = port_base(0, 4242)
    assert base == 10000 + 8 * (4242 % 2800)
    steps = [SlurmStep.from_environment(step_environment(rank, rank % 2, f"gpu0{7 + rank // 2}", 4))
             for rank in range(4)]
    addresses = [f"gpu07:{base}", f"gpu07:{base + 1}", f"gpu08:{base}", f"gpu08:{base + 1}"]
    assert all(step.addresses(base) == addresses for step in steps)
    # 4 GPUs on each node, 2 tasks: two each; SLURM giving each task its own (--gpus-per-task) is kept
    assert [step.gpu_share(4) for step in steps] == [[0, 1], [2, 3], [0, 1], [2, 3]]
    assert steps[3].gpu_share(2) == [0, 1] and steps[3].gpu_share(0) == []
    assert steps[3].describe(base, [2, 3]) == (
        f"SLURM job 4242: 4 workers on 2 nodes (workers gpu07: 0-1; gpu08: 2-3; ports from {base}); "
        "this is worker 3 on gpu08, using GPU 2, 3")
    assert steps[0].describe(base, []).endswith("this is worker 0 on gpu07, using the CPU")
    with pytest.raises(ValueError, match=r"^2 tasks on gpu08 share its 3 GPUs, which do not split evenly: "
                                         r"run one task per node \(--ntasks-per-node=1"):
        SlurmStep.from_environment(step_environment(3, 1, "gpu08")).gpu_share(3)


def test_a_task_outside_an_srun_step_or_misplaced_is_told_apart():
    assert SlurmStep.from_environment({}) is None
    assert SlurmStep.from_environment({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"}) is None  # the batch script
    with pytest.raises(ValueError, match=r"^SLURM placed task 1 on gpu08 as local task 0, but the step's "
                                         r"layout puts it on gpu07 as local task 1"):
        SlurmStep.from_environment(step_environment(1, 0, "gpu08"))
    with pytest.raises(ValueError, match="do not agree"):
        SlurmStep.from_environment(step_environment(0, 0, "gpu07", SLURM_STEP_TASKS_PER_NODE="2"))
    with pytest.raises(ValueError, match="^SLURM_JOB_ID is not set: run the training with srun"):
        SlurmStep.from_environment(step_environment(0, 0, "gpu07", SLURM_JOB_ID=""))


def test_a_port_another_program_listens_on_is_one_line():
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(ValueError, match=rf"^port {port} on gpu07 is in use by another program: .*--worker_port"):
            check_port_free("gpu07", port)
    check_port_free("gpu07", port)  # free again


# ----------------------------------------------------------------------------------------------
# the job scripts the documentation shows are the files


@pytest.mark.parametrize("page, script", [("docs/training.md", TRAIN_JOB), ("docs/inference.md", SEGMENT_JOB)])
def test_the_documentation_shows_the_job_scripts_as_they_are(page, script):
    with open(os.path.join(REPO_ROOT, page)) as handle:
        text = handle.read()
    name = os.path.relpath(script, REPO_ROOT)
    match = re.search(re.escape(f"[{name}](../{name})") + r"[^\n]*\n+```bash\n(.*?)```", text, re.S)
    assert match, f"{page} shows no script under a link to {name}"
    with open(script) as handle:
        assert match[1] == handle.read()


# ----------------------------------------------------------------------------------------------
# under a real SLURM: the job scripts as users submit them, with the paths set aside



def under_slurm(test):
    return pytest.mark.slow(pytest.mark.slurm(test))


# one node of 2 cores: the examples' GPUs, cores and nodes are what this machine has
ON_THIS_NODE = ["--gres=none", "--cpus-per-task=1", f"--chdir={REPO_ROOT}"]
TINY_TRAINING = ["--layers_per_block", "1", "--growth_rate", "4", "--batch_size", "2", "--test_every_n_steps", "3",
                 "--max_epochs", "2", "--seed", "0", "--reader_count", "1", "--log_every_n_steps", "1"]
QUIET = "TF_CPP_MIN_LOG_LEVEL=2,PYTHONUNBUFFERED=1"


def sbatch(*arguments, wait=False):
    """Submit a job; return its ID (with wait, once it has ended: (ID, exit status))."""
    result = subprocess.run(["sbatch", "--parsable", *(["--wait"] if wait else []), *map(str, arguments)],
                            capture_output=True, text=True, timeout=600)
    job = result.stdout.strip().split(";")[0]
    if wait:
        return job, result.returncode
    assert result.returncode == 0 and job.isdigit(), result.stderr
    return job


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.2)


def queued(job):
    """The states of a job's tasks still in the queue (none once every one has ended)."""
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.split()


def job_field(job, name):
    text = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return re.search(rf"\b{name}=(\S*)", text)[1]


def read(path):
    return open(path).read() if os.path.exists(path) else ""


def metric_rows(run):
    with open(os.path.join(run, "test_metrics.csv")) as handle:
        return [line.split(",")[:2] for line in handle.read().splitlines()[1:]]


@pytest.mark.parametrize("expression", HOSTLISTS)
@pytest.mark.slurm
def test_hostlists_read_as_scontrol_reads_them(slurm_cluster, expression):
    shown = subprocess.run(["scontrol", "show", "hostnames", expression], capture_output=True, text=True, check=True)
    assert expand_hostlist(expression) == shown.stdout.split()


@pytest.fixture(scope="module")
def training(slurm_cluster, tmp_path_factory):
    """The training job, 2 tasks on this node, run to its end: (its folder, the run, its log)."""
    folder = tmp_path_factory.mktemp("slurm_training")
    make_database(folder / "train-cells.lmdb", 16, seed=1)
    make_database(folder / "test-cells.lmdb", 5, seed=2)
    job, status = sbatch(*ON_THIS_NODE, "--nodes=1", "--ntasks-per-node=2", f"--output={folder}/whole-%j.out",
                         f"--export=ALL,VENV={sys.prefix},DATABASES={folder},RUN={folder}/whole,{QUIET}",
                         TRAIN_JOB, *TINY_TRAINING, wait=True)
    log = read(folder / f"whole-{job}.out")
    assert status == 0, log[-3000:]
    return folder, folder / "whole", log


@under_slurm
def test_two_tasks_train_together_and_export_a_model(training):
    folder, run, log = training
    job = re.search(r"SLURM job (\d+): ", log)[1]
    base = port_base(0, int(job))
    node = subprocess.run(["sinfo", "-h", "-o", "%N"], capture_output=True, text=True).stdout.strip()
    for worker in (0, 1):  # each names the workers, their host and its own devices
        assert (f"SLURM job {job}: 2 workers on 1 node (workers {node}: 0-1; ports from {base}); this is worker "
                f"{worker} on {node}, using the CPU") in log
    assert "workers: 2  replicas: 2 (1 per worker)  global batch: 4" in log
    assert log.count("finished: max_epochs 2 reached") == 2
    assert metric_rows(run) == [["0", "3"], ["1", "6"]]
    assert os.path.exists(run / "saved_model" / "saved_model.pb")
    assert os.path.exists(run / "saved_model" / "fcdensenet_metadata.json")


@under_slurm
def test_a_requeued_training_saves_a_resume_point_and_ends_as_an_uninterrupted_run(training):
    folder, whole, _ = training
    log = folder / "requeued.out"
    job = sbatch(*ON_THIS_NODE, "--nodes=1", "--ntasks-per-node=2", f"--output={log}", "--open-mode=append",
                 f"--export=ALL,VENV={sys.prefix},DATABASES={folder},RUN={folder}/requeued,{QUIET}",
                 TRAIN_JOB, *TINY_TRAINING)
    # early: SIGTERM takes a moment to arrive, and a run that has finished has nothing left to save
    wait_until(lambda: "epoch 0 step 1/3" in read(log), 240, "the training's first step")
    subprocess.run(["scontrol", "requeue", job], check=True)  # as a preemption: SIGTERM, then a new start
    # SLURM holds a requeued job for 2 minutes: let it start as soon as its first run has ended
    wait_until(lambda: queued(job) == ["PENDING"], 120, "the requeued job back in the queue")
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)
    wait_until(lambda: not queued(job), 300, "the requeued job's end")
    text = read(log)
    assert job_field(job, "Restarts") == "1" and job_field(job, "JobState") == "COMPLETED", text[-3000:]
    saved = re.findall(r"received SIGTERM: saved a resume point at (epoch \d+ step \d+)", text)
    assert len(saved) == 2 and saved[0] == saved[1], text[-3000:]  # both workers, at the same step
    assert text.count(f"resuming at {saved[0]} ") == 1, text[-3000:]  # the chief says it
    assert text.count("finished: max_epochs 2 reached") == 2
    assert metric_rows(folder / "requeued") == metric_rows(whole)  # every epoch once, at the same steps


# ----------------------------------------------------------------------------------------------
# the job array of inference


# the large image (2.4 megapixels) is streamed: its mask is written tile by tile into its temporary
# file, which so stays on disk for the whole image, long enough to cancel the task during it
SEGMENT_FLAGS = ("--tile_size", "512", "--streaming_megapixels", "2")


@pytest.fixture(scope="module")
def slides(slurm_cluster, gray_model, tmp_path_factory):
    """A folder of 5 small images and a larger one (second in the list: the second array task's
    first), and the masks one process writes for them."""
    import tifffile

    folder = tmp_path_factory.mktemp("slurm_slides")
    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(6):
        size = 1536 if index == 1 else 64
        tifffile.imwrite(images / f"slide{index}.tif", rng.integers(0, 4000, (size, size)).astype(np.uint16))
    result = run_inference("--saved_model_filepath", gray_model[0], "--image_folder", images,
                           "--output_folder", folder / "one_process", *SEGMENT_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder, images


def segment_array(slides, gray_model, masks, tag):
    folder, images = slides
    return (*ON_THIS_NODE, "--array=0-1", f"--output={folder}/{tag}-%A_%a.out",
            f"--export=ALL,VENV={sys.prefix},MODEL={gray_model[0]},IMAGES={images},MASKS={masks},{QUIET}",
            SEGMENT_JOB, *SEGMENT_FLAGS)


def same_masks(folder, expected):
    import tifffile

    names = sorted(os.listdir(expected))
    assert sorted(name for name in os.listdir(folder) if not name.startswith(".")) == names
    for name in names:
        np.testing.assert_array_equal(tifffile.imread(folder / name), tifffile.imread(expected / name), name)


@under_slurm
def test_a_job_array_writes_every_mask_once_as_one_process_does(slides, gray_model):
    folder, _ = slides
    job, status = sbatch(*segment_array(slides, gray_model, folder / "array", "array"), wait=True)
    logs = [read(folder / f"array-{job}_{task}.out") for task in (0, 1)]
    assert status == 0, logs
    for index in range(6):  # each image segmented by one task: every other one from the task's index
        written = [log.count(f"slide{index}.tif: ") for log in logs]
        assert written == ([1, 0] if index % 2 == 0 else [0, 1]), (index, logs)
    same_masks(folder / "array", folder / "one_process")


@under_slurm
def test_a_task_cancelled_mid_image_leaves_no_partial_mask_and_a_resubmission_completes(slides, gray_model):
    folder, _ = slides
    masks = folder / "cancelled"
    job = sbatch(*segment_array(slides, gray_model, masks, "cancelled"))
    # task 1 starts with the large image: cancel it while that mask is being written
    wait_until(lambda: any(name.startswith(".slide1.") for name in os.listdir(masks)) if masks.exists() else False,
               240, "the large mask's temporary file")
    subprocess.run(["scancel", f"{job}_1"], check=True)
    wait_until(lambda: not queued(job), 180, "the job array's end")
    assert job_field(f"{job}_1", "JobState") == "CANCELLED"
    left = sorted(name for name in os.listdir(masks) if not name.startswith("."))  # not the hidden temporary
    assert "slide1.tif" not in left and {"slide0.tif", "slide2.tif", "slide4.tif"} <= set(left), left

    again, status = sbatch(*segment_array(slides, gray_model, masks, "again"), wait=True)
    assert status == 0, [read(folder / f"again-{again}_{task}.out") for task in (0, 1)]
    same_masks(masks, folder / "one_process")
    assert not [name for name in os.listdir(masks) if name.startswith(".")]  # the cancelled task's temporary went

