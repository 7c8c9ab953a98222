"""The cluster of a multi-node training under SLURM, read from the environment srun gives each task.

    step = SlurmStep.from_environment(os.environ)     # None outside an srun step of 2 or more tasks
    gpus = step.gpu_share(visible_gpus)               # which of the visible GPUs this task drives
    spec, port = step.cluster_spec(port_base(0, step.job_id)), ...

Every task reads the same step variables (SLURM_STEP_NODELIST, SLURM_STEP_TASKS_PER_NODE,
SLURM_DISTRIBUTION), so every task builds the same list of workers: rank r is worker r, at
<its node>:<port base + its index among the node's tasks>. Its own position is checked against
SLURMD_NODENAME and SLURM_LOCALID. No external command runs (TensorFlow's SlurmClusterResolver runs
nvidia-smi, which CPU nodes do not have): the GPUs are those TensorFlow sees.
"""

import errno
import itertools
import re
import socket
from dataclasses import dataclass

# a job's first port: 10000 + SLOT * (job ID mod SLOTS), below Linux's ephemeral range (32768 on),
# so that jobs sharing a node with up to SLOT tasks each rarely pick the same ports
SLOT, SLOTS = 8, 2800


def expand_hostlist(text, name="SLURM_STEP_NODELIST"):
    """SLURM's compressed host list ("gpu[01-03,7],login-a") as the list of host names, in order."""
    hosts = []
    for item in _split_top_level(text, name):
        parts = re.split(r"(\[[^\]]*\])", item)
        if any(c in part for part in parts[::2] for c in "[]"):
            raise ValueError(f"{name}={text!r}: unbalanced brackets")
        choices = [[part] if index % 2 == 0 else _expand_brackets(part[1:-1], text, name)
                   for index, part in enumerate(parts)]
        hosts.extend("".join(pieces) for pieces in itertools.product(*choices))
    if not hosts:
        raise ValueError(f"{name}={text!r}: no host")
    return hosts


def _split_top_level(text, name):
    items, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ValueError(f"{name}={text!r}: unbalanced brackets")
        if char == "," and depth == 0:
            items.append(text[start:index])
            start = index + 1
    items.append(text[start:])
    if depth:
        raise ValueError(f"{name}={text!r}: unbalanced brackets")
    return [item for item in items if item]


def _expand_brackets(ranges, text, name):
    """ "01-03,7" -> ["01", "02", "03", "7"]: a range keeps the zero padding of its first bound."""
    values = []
    for part in ranges.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match or (match[2] is not None and int(match[2]) < int(match[1])):
            raise ValueError(f"{name}={text!r}: {part!r} is not a number or a rising range")
        low, high = match[1], match[2] or match[1]
        values.extend(str(number).zfill(len(low)) for number in range(int(low), int(high) + 1))
    return values


def expand_counts(text, name="SLURM_STEP_TASKS_PER_NODE"):
    """SLURM's compressed counts ("2(x3),1") as a list ([2, 2, 2, 1])."""
    counts = []
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise ValueError(f"{name}={text!r}: {part!r} is not a count or count(xrepeat)")
        counts.extend([int(match[1])] * int(match[2] or 1))
    return counts


def node_of_each_task(counts, distribution):
    """The node index of every rank, as srun lays tasks out over nodes (block, cyclic or plane=N)."""
    kind = (distribution or "block").split(":")[0]
    if kind == "block":
        return [node for node, count in enumerate(counts) for _ in range(count)]
    if kind == "cyclic":
        size = 1
    elif re.fullmatch(r"plane=\d+", kind) and int(kind[6:]) > 0:
        size = int(kind[6:])
    else:
        raise ValueError(f"SLURM_DISTRIBUTION={distribution}: the workers' places cannot be known "
                         "(run srun with --distribution=block, cyclic or plane=N)")
    left, nodes = list(counts), []
    while any(left):
        for node, remaining in enumerate(left):
            take = min(size, remaining)
            nodes.extend([node] * take)
            left[node] -= take
    return nodes


def port_base(port, job_id):
    """The first worker port: `port` when set, else one derived from the job ID (see SLOT)."""
    return port if port else 10000 + SLOT * (job_id % SLOTS)


def check_port_free(host, port):
    """ValueError when another program listens on `port` here (the worker's server binds all
    addresses). SO_REUSEADDR as gRPC sets it, so a socket a previous run left in TIME_WAIT is not
    taken for a listener."""
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 on this node
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address, port))
                return
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise ValueError(f"port {port} on {host} is in use by another program: this worker cannot "
                                     "listen there (choose other ports with --worker_port)") from None
                if error.errno != errno.EADDRNOTAVAIL:
                    raise


@dataclass
class SlurmStep:
    """This task's place in an srun step: the step's hosts, tasks per host and layout."""
    job_id: int
    rank: int
    hosts: list
    counts: list
    nodes: list  # the node index of every rank
    gpus_on_node: int | None  # SLURM_GPUS_ON_NODE: the GPUs SLURM gave the job on this node

    @classmethod
    def from_environment(cls, environ):
        """The step of this task, or None when this is not a task of an srun step of 2+ tasks (the
        batch script itself runs as a single process, whatever --ntasks says)."""
        if int(environ.get("SLURM_STEP_NUM_TASKS", "1")) < 2:
            return None
        hosts = expand_hostlist(_variable(environ, "SLURM_STEP_NODELIST"))
        counts = expand_counts(_variable(environ, "SLURM_STEP_TASKS_PER_NODE"))
        if len(counts) != len(hosts) or sum(counts) != int(environ["SLURM_STEP_NUM_TASKS"]):
            raise ValueError(f"SLURM_STEP_NODELIST={environ['SLURM_STEP_NODELIST']}, SLURM_STEP_TASKS_PER_NODE="
                             f"{environ['SLURM_STEP_TASKS_PER_NODE']} and SLURM_STEP_NUM_TASKS="
                             f"{environ['SLURM_STEP_NUM_TASKS']} do not agree")
        gpus = environ.get("SLURM_GPUS_ON_NODE")
        step = cls(job_id=int(_variable(environ, "SLURM_JOB_ID")), rank=int(_variable(environ, "SLURM_PROCID")),
                   hosts=hosts, counts=counts, nodes=node_of_each_task(counts, environ.get("SLURM_DISTRIBUTION")),
                   gpus_on_node=int(gpus) if gpus and gpus.isdigit() else None)
        step.check_place(environ.get("SLURMD_NODENAME"), environ.get("SLURM_LOCALID"))
        return step

    @property
    def host(self):
        return self.hosts[self.nodes[self.rank]]

    @property
    def local_index(self):
        """This task's index among its node's tasks (SLURM_LOCALID)."""
        return self.nodes[: self.rank].count(self.nodes[self.rank])

    @property
    def tasks_on_node(self):
        return self.counts[self.nodes[self.rank]]

    def check_place(self, node_name, local_id):
        """This task must be where the layout puts it, or the workers would look for each other at
        the wrong addresses."""
        if (node_name is not None and node_name != self.host) or (
                local_id is not None and int(local_id) != self.local_index):
            raise ValueError(f"SLURM placed task {self.rank} on {node_name} as local task {local_id}, but the "
                             f"step's layout puts it on {self.host} as local task {self.local_index} "
                             "(run srun with --distribution=block)")

    def addresses(self, base):
        """host:port of every worker, by rank."""
        seen = {}
        addresses = []
        for node in self.nodes:
            addresses.append(f"{self.hosts[node]}:{base + seen.get(node, 0)}")
            seen[node] = seen.get(node, 0) + 1
        return addresses

    def gpu_share(self, visible):
        """The indices, among the `visible` GPUs TensorFlow sees, that this task drives. The tasks of
        one node share its GPUs evenly, unless SLURM already gave each its own (--gpus-per-task)."""
        if visible == 0 or self.tasks_on_node == 1:
            return list(range(visible))
        if self.gpus_on_node is not None and visible < self.gpus_on_node:
            return list(range(visible))
        if visible % self.tasks_on_node:
            raise ValueError(f"{self.tasks_on_node} tasks on {self.host} share its {visible} GPUs, which do not "
                             "split evenly: run one task per node (--ntasks-per-node=1; it drives every GPU of "
                             "its node) or a number of tasks that divides the GPUs")
        share = visible // self.tasks_on_node
        return list(range(self.local_index * share, (self.local_index + 1) * share))

    def describe(self, base, gpus):
        """The line a worker prints at start: the workers, their hosts, and this one's devices."""
        groups = []
        for node, host in enumerate(self.hosts):
            ranks = [rank for rank, where in enumerate(self.nodes) if where == node]
            groups.append(f"{host}: {_ranges(ranks)}")
        devices = f"GPU {', '.join(map(str, gpus))}" if gpus else "the CPU"
        nodes = f"{len(self.hosts)} node{'s' if len(self.hosts) > 1 else ''}"
        return (f"SLURM job {self.job_id}: {len(self.nodes)} workers on {nodes} "
                f"(workers {'; '.join(groups)}; ports from {base}); this is worker {self.rank} on "
                f"{self.host}, using {devices}")


def _variable(environ, name):
    if not environ.get(name):
        raise ValueError(f"{name} is not set: run the training with srun inside a SLURM job")
    return environ[name]


def _ranges(numbers):
    """[0, 1, 2, 5] -> "0-2, 5"."""
    parts = []
    for _, group in itertools.groupby(enumerate(numbers), lambda pair: pair[1] - pair[0]):
        values = [number for _, number in group]
        parts.append(str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}")
    return ", ".join(parts)
