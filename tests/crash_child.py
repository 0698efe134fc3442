"""Run `featcache extract ARGS` in this process and SIGKILL it at a chosen point (used by test_kill.py).

    python tests/crash_child.py POINT N ARGS...

POINT, N:
  none 0           run to the end
  batch K          die when the K-th batch is about to be written (batches 1..K-1 are on disk)
  mid-write K:J    die inside the K-th batch's write, just before its J-th dataset assignment (the
                   arrays, then captions, then the `done` flags: J past the arrays is "data flushed,
                   flags not yet set")
  flags K          die inside the K-th batch's write just before its `done` flags are set: its rows are
                   written and flushed, the flags that would claim them are not (the window the writer's
                   data-before-flags order exists for; hit whatever the order of the other datasets)
  flagged K        die inside the K-th batch's write just after the first flush that follows setting its
                   `done` flags (a writer that flushed flags before data would leave flagged empty rows)
  close 0          die in `finish` after the final metadata is set, before the file is closed
  rename 0         die just before the partial file is renamed onto the final path
  after-rename 0   die just after that rename, before the side files and the lock are cleaned up
  pause K          after the K-th batch, print "paused" and wait for a line on stdin (the test looks at
                   the files of a live writer, then kills it)
Every written batch prints "wrote START" on stdout (flushed), so a test can also kill from outside at a
moment of its choosing. The kill is a real SIGKILL: no Python cleanup, no HDF5 close, no finally blocks.
"""
import os
import signal
import sys

import h5py

import featcache.cache.store as fs


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    point, n, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    real_write, real_replace, real_close = fs.CacheWriter.write, os.replace, h5py.File.close
    real_setitem, real_flush = h5py.Dataset.__setitem__, h5py.File.flush
    batches = []

    def write(self, start, *a, **k):
        batches.append(start)
        if point == "batch" and len(batches) == int(n):
            die()
        if point == "mid-write" and len(batches) == int(n.split(":")[0]):
            left = [int(n.split(":")[1])]

            def setitem(ds, key, value):
                left[0] -= 1
                if left[0] == 0:
                    die()
                real_setitem(ds, key, value)
            h5py.Dataset.__setitem__ = setitem
        if point in ("flags", "flagged") and len(batches) == int(n):
            flagged = []

            def setitem(ds, key, value):
                if ds.name == "/samples/done":
                    if point == "flags":
                        die()
                    flagged.append(True)
                real_setitem(ds, key, value)

            def flush(f):
                real_flush(f)
                if flagged:
                    die()
            h5py.Dataset.__setitem__ = setitem
            h5py.File.flush = flush
        real_write(self, start, *a, **k)
        print(f"wrote {start}", flush=True)
        if point == "pause" and len(batches) == int(n):
            print("paused", flush=True)
            sys.stdin.readline()

    def replace(src, dst):
        final = src.endswith(".h5.partial")
        if final and point == "rename":
            die()
        real_replace(src, dst)
        if final and point == "after-rename":
            die()

    def close(self):
        if point == "close" and self.mode == "r+" and self.filename.endswith(".partial") \
                and bool(self.attrs.get("complete")):
            die()
        real_close(self)

    fs.CacheWriter.write = write
    os.replace = replace  # the module featcache.cache.store calls it through
    h5py.File.close = close
    from cli import featcache_app
    featcache_app(["extract", *args])


if __name__ == "__main__":
    main()
