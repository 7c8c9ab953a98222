"""Running the stages of inference at once: one stream of results fanned out to several consumers.

    fan_out(bands, [write_mask, write_probabilities, build_overlay])

Each consumer runs in its own thread and reads its share of every item (item[i] goes to
consumers[i]) from a queue of at most `depth` items, so the model computes while the writers
compress, and no more than `depth` items per consumer are ever in flight. The first failure, of
the producer or of any consumer, stops every stage and is raised in the caller: a consumer that
is stopped sees its input end with Aborted, so an atomic writer removes its temporary file.
"""

import queue
import threading

POLL_SECONDS = 0.1


class Aborted(Exception):
    """Raised in a consumer's input when another stage failed."""


_END = object()


def _stream(channel, abort):
    while True:
        try:
            item = channel.get(timeout=POLL_SECONDS)
        except queue.Empty:
            if abort.is_set():
                raise Aborted("another stage of this image failed") from None
            continue
        if item is _END:
            return
        yield item


def _put(channel, item, abort):
    """Put unless the run was aborted; False when it was."""
    while not abort.is_set():
        try:
            channel.put(item, timeout=POLL_SECONDS)
            return True
        except queue.Full:
            continue
    return False


def fan_out(items, consumers, depth=2):
    """Feed part i of every item of `items` to consumers[i](iterator); returns when all are done."""
    abort = threading.Event()
    channels = [queue.Queue(maxsize=depth) for _ in consumers]
    errors = [None] * len(consumers)

    def run(index):
        try:
            stream = _stream(channels[index], abort)
            consumers[index](stream)
            for _ in stream:  # a consumer that stopped early must not block the producer
                pass
        except BaseException as error:  # reported to the caller, which re-raises it
            errors[index] = error
            abort.set()

    threads = [threading.Thread(target=run, args=(index,), daemon=True) for index in range(len(consumers))]
    for thread in threads:
        thread.start()
    try:
        for item in items:
            if not all(_put(channel, part, abort) for channel, part in zip(channels, item)):
                break
        else:
            for channel in channels:
                _put(channel, _END, abort)
    except BaseException:
        abort.set()
        raise
    finally:
        for thread in threads:
            thread.join()
    failures = [error for error in errors if error is not None and not isinstance(error, Aborted)]
    if failures:
        raise failures[0]


def prefetch(items, depth=1):
    """Iterate `items` in a background thread, at most `depth` items ahead of the consumer.

    The work of producing an item (opening the next image and its statistics pass) then overlaps
    with the consumer's. An error of the producer is raised in the consumer, after the items
    before it; a consumer that stops early stops the producer at its next item.
    """
    channel = queue.Queue(maxsize=depth)
    stop = threading.Event()
    failure = []

    def produce():
        try:
            for item in items:
                if not _put(channel, item, stop):
                    return
        except BaseException as error:  # handed to the consumer
            failure.append(error)
        _put(channel, _END, stop)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = channel.get()
            if item is _END:
                break
            yield item
        if failure:
            raise failure[0]
    finally:
        stop.set()
        thread.join()
