"""Run a command of cli.py in this process, pausing at a chosen point so a test can signal it (test_faults.py).

    python tests/fault_child.py POINT ARG APP ARGS...

POINT, ARG:
  extract-models -  when `featcache extract` has loaded its models, before the cache file exists
  extract-batch K   after the K-th batch of `featcache extract` is written, print "paused" and sleep
  ablate-run NAME   when the ablation starts training a run whose name contains NAME, print "paused" and sleep
                    (the other runs train normally, in this process or in the ablation's forked workers)
  fold K            when fold K of a cross-fit run starts training (two forked workers, also on one core), print
                    "paused" and sleep: the other fold trains on
  commit NAME       when a finished temporary file or folder is about to be renamed to a path named NAME
                    (featcache.outdir.commit: run directories, reports, predictions), print "paused" and sleep
The signal then arrives in a real process at a known moment. sys.argv is set to APP ARGS..., as the entry
point would have it, so the "continue with" line the command prints can be compared. SIGINT is restored to
Python's KeyboardInterrupt: a child of a background shell job inherits it ignored.
"""
import os
import signal
import sys
import time


def pause():
    print("paused", flush=True)
    time.sleep(120)


def main():
    point, arg, app, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if point == "extract-batch":
        import featcache.cache.store as fs
        real_write, seen = fs.CacheWriter.write, []

        def write(self, *a, **k):
            real_write(self, *a, **k)
            seen.append(1)
            if len(seen) == int(arg):
                pause()
        fs.CacheWriter.write = write
    elif point == "extract-models":
        import featcache.extract.engine as fe
        real_load = fe._load_models

        def load(plan):
            loaded = real_load(plan)
            pause()
            return loaded
        fe._load_models = load
    elif point == "ablate-run":
        import heads.ablate as ha
        real_unit = ha.train_unit

        def train_unit(folds):
            train = real_unit(folds)

            def paused_train(cfg, data, out_dir=None, **kw):
                if arg in out_dir:
                    pause()
                return train(cfg, data, out_dir, **kw)
            return paused_train
        ha.train_unit = train_unit
    elif point == "fold":
        import heads.parallel as hp
        import heads.train.crossfit as hc
        real_train, hp.cpu_threads = hc.train, lambda: 2

        def fold_train(cfg, data, *a, **k):
            if cfg.split.fold == int(arg):
                pause()
            return real_train(cfg, data, *a, **k)
        hc.train = fold_train
    elif point == "commit":
        import featcache.outdir as od
        real_commit = od.commit

        def commit(tmp, path):
            if os.path.basename(path) == arg:
                pause()
            real_commit(tmp, path)
        od.commit = commit
    import cli
    sys.argv = [app, *args]
    {"featcache": cli.featcache_app, "heads": cli.heads_app}[app](args)


if __name__ == "__main__":
    main()
