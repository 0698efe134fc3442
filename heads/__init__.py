"""Light fusion heads trained from a feature cache in seconds (stage 1), the top text layers with them
(stage 2), ablations and reports.

    from heads.config import TrainConfig, FinetuneConfig      # nested configs; TrainConfig.from_flat(lr=...)
    from heads.train.stage1 import train                      # train(cfg, cache_path_or_CacheData, out_dir)
    from heads.train.stage2 import finetune                   # finetune(cfg, cache_path_or_CacheData, out_dir)
    from heads.predict import predict                         # predict(run_dir, cache, out, split="test")
    from heads import load_run                                # load_run(run_dir).predict(texts=, images=)
    from heads.fusions import list_fusions, create_fusion, HeadConfig, HeadDims, DEFAULT_FUSION
    from heads.data import load_cache, split_labelled

Layout: fusions/ (the heads, a registry) and data/ (the cache in memory, splits, stage-2 inputs) never import
train/ (the trainer, losses, metrics, both stages, the probe) or the reports; rundir.py is the run directory's
one writer and reader; infer.py the one inference loop. Heads never import transformers or open_clip:
everything they see comes from the HDF5 cache (stage 2 loads the cache's text backbone through featcache).
"""


def load_run(run_dir: str, device: str = "auto", progress: bool = False):
    """A trained run as a classifier: .predict(texts=, images=), .predict_proba(...), .predict_cache(path)
    (heads.api). Raw input is extracted with the run's backbones, loaded when first needed."""
    from .api import load_run as load  # torch and the heads' code only when used: `import heads` stays light
    return load(run_dir, device, progress)
