"""How a folder's progress shows: a bar on a terminal, a line per image in a log (a batch job's)."""

import os
import shutil
import sys

from fcdn.common import errors


class Progress:
    """A progress bar over the images on a terminal (tqdm); a line per image in a log."""

    def __init__(self, total, terminal):
        self.bar = None
        if terminal:
            from tqdm import tqdm

            # a terminal that reports no size (a pseudo-terminal of a batch system) gets 80x24
            size = shutil.get_terminal_size()
            self.bar = tqdm(total=total, unit="image", ncols=size.columns, nrows=size.lines, file=sys.stdout)

    def image_done(self, result):
        if self.bar is None:
            planes = f" x {result.planes} planes" if result.planes > 1 else ""
            print(f"{errors.shown(os.path.basename(result.path))}: {result.height}x{result.width}{planes}, {result.tiles} tile(s), "
                  f"{result.seconds:.2f} s", flush=True)
        else:
            self.bar.update(1)

    def image_failed(self, message):
        if self.bar is None:
            print(f"error: {errors.shown(message)}", file=sys.stderr, flush=True)
        else:
            self.bar.write(f"error: {errors.shown(message)}", file=sys.stderr)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()
