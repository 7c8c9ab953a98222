"""Every visible device at once: one predict function per device, batches spread over them in order.

    pool = DevicePool([predict_gpu0, predict_gpu1])
    for probabilities in pool.map(batches):      # results in the order of `batches`
        ...

Batch i runs on device i mod n, and at most `in_flight` batches per device are submitted ahead of
the consumer, so the devices compute while the caller reduces and writes, and memory stays bounded.
With one device, map() is a plain loop in the caller's thread.
"""

import collections
import concurrent.futures
import importlib.metadata
import os
import site
import sys

# the wheels whose TensorFlow can show a GPU (tensorflow-cpu is built without CUDA)
GPU_CAPABLE_DISTRIBUTIONS = ("tensorflow", "tensorflow-gpu", "tensorflow-rocm", "tensorflow-macos", "tf-nightly")


def no_gpu_without_loading_tensorflow():
    """True when TensorFlow, not loaded yet, could show no GPU if it were: the installed wheel is
    tensorflow-cpu (what requirements.txt installs on x86-64), no wheel that can drive a GPU is
    installed beside it, and no PluggableDevice plugin is (the tensorflow-plugins folder that
    TensorFlow loads DirectML's or Metal's from, or TF_PLUGGABLE_DEVICE_LIBRARY_PATH). Loading
    TensorFlow only to hear "no GPU" took 5 s of a 7 s inference run on OpenVINO (2-core AMD EPYC,
    2026-12-07); this answer takes milliseconds. False, so ask TensorFlow, when unsure."""
    if "tensorflow" in sys.modules or os.environ.get("TF_PLUGGABLE_DEVICE_LIBRARY_PATH"):
        return False
    installed = set()
    for name in ("tensorflow-cpu", *GPU_CAPABLE_DISTRIBUTIONS):
        try:
            importlib.metadata.distribution(name)
            installed.add(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    if installed != {"tensorflow-cpu"}:
        return False
    # as TensorFlow looks for plugins: the site folders (some virtualenvs lack getsitepackages) and sys.path
    folders = [*getattr(site, "getsitepackages", list)(), site.getusersitepackages(), *sys.path]
    return not any(os.path.isdir(os.path.join(folder, "tensorflow-plugins")) for folder in folders)


def inference_devices():
    """The TensorFlow devices inference spreads over: every logical GPU, else every logical CPU.

    On a machine without a GPU there is one CPU device (TensorFlow spreads its work over the cores
    itself) unless the CPU was split into logical devices, as the tests do.
    """
    import tensorflow as tf

    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    return [device.name for device in devices]


class DevicePool:
    """One predict function per device; map() runs batches on all of them at once, in order."""

    def __init__(self, predicts, in_flight=2):
        if not predicts:
            raise ValueError("a device pool needs at least one predict function")
        self.predicts = list(predicts)
        self.in_flight = in_flight

    def __len__(self):
        return len(self.predicts)

    def __call__(self, batch):
        return self.predicts[0](batch)

    def map(self, batches):
        """predict(batch) of every batch, in order, with the devices working concurrently."""
        if len(self.predicts) == 1:
            for batch in batches:
                yield self.predicts[0](batch)
            return
        pending = collections.deque()
        with concurrent.futures.ThreadPoolExecutor(len(self.predicts)) as executor:
            try:
                for index, batch in enumerate(batches):
                    predict = self.predicts[index % len(self.predicts)]
                    pending.append(executor.submit(predict, batch))
                    if len(pending) >= self.in_flight * len(self.predicts):
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()
